"""Reconstruction quality: MSE, PSNR, SSIM, label accuracy and aggregation over seeds.

Images are compared in ``[0, 1]``: reconstructions are clamped first (DLG's dummy input is
unconstrained, and a display clamps it the same way). A gradient does not say in which order the
items of a batch were, so for batches each true image is paired with a distinct reconstruction by
minimum total MSE (Hungarian assignment) before scoring, and the best PSNR over all
reconstructions is kept too. Recognizability asks an independently trained classifier
(:mod:`sf_ext.dlg.judge`) whether it sees the true class in the paired reconstruction.
"""

import math
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np
import torch

# torchmetrics and scipy are imported where used: together they take seconds to import, and
# `import sf_ext.dlg` should not pay for them.


def _as_batch(images: torch.Tensor) -> torch.Tensor:
    images = torch.as_tensor(images).detach().float().cpu()
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W] or [C, H, W], got {tuple(images.shape)}")
    return images


def mse(recon: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared error, ``[B]`` (reconstruction clamped to [0, 1])."""
    recon, truth = _as_batch(recon).clamp(0, 1), _as_batch(truth)
    return ((recon - truth) ** 2).flatten(1).mean(dim=1)


def psnr(recon: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for data range 1, ``10 * log10(1 / MSE)`` (``inf`` for a copy)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    recon, truth = _as_batch(recon).clamp(0, 1), _as_batch(truth)
    return peak_signal_noise_ratio(
        recon, truth, data_range=1.0, reduction="none", dim=(1, 2, 3)
    ).reshape(-1)


def ssim(recon: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM: 11x11 Gaussian window (sigma 1.5); images under 11 pixels a side (8x8
    digits) use the largest odd uniform window that fits, since the Gaussian one would not."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    recon, truth = _as_batch(recon).clamp(0, 1), _as_batch(truth)
    side = min(truth.shape[-2:])
    if side >= 11:
        options = {"gaussian_kernel": True, "sigma": 1.5}
    else:
        options = {"gaussian_kernel": False, "kernel_size": side if side % 2 else side - 1}
    return structural_similarity_index_measure(
        recon, truth, data_range=1.0, reduction="none", **options
    ).reshape(-1)


def match_batch(recon: torch.Tensor, truth: torch.Tensor) -> List[int]:
    """For each true image, the index of its reconstruction (one-to-one, minimum total MSE).

    ``recon`` may hold more items than ``truth`` (e.g. an aggregate attack reconstructs every
    client's batch while the truth is one client's); each true image still gets its own.
    """
    from scipy.optimize import linear_sum_assignment

    recon, truth = _as_batch(recon).clamp(0, 1), _as_batch(truth)
    if recon.shape[1:] != truth.shape[1:] or recon.shape[0] < truth.shape[0]:
        raise ValueError(f"shape mismatch: {tuple(recon.shape)} vs {tuple(truth.shape)}")
    cost = torch.cdist(truth.flatten(1), recon.flatten(1)) ** 2
    rows, cols = linear_sum_assignment(cost.numpy())
    order = [0] * len(rows)
    for r, c in zip(rows, cols):
        order[r] = int(c)
    return order


def label_accuracy(predicted: Sequence[int], true: Sequence[int]) -> float:
    """Fraction of true labels recovered, ignoring order (multiset overlap / batch size)."""
    predicted = [int(v) for v in torch.as_tensor(predicted).reshape(-1)]
    true = [int(v) for v in torch.as_tensor(true).reshape(-1)]
    if not true:
        raise ValueError("no true labels")
    remaining = list(predicted)
    hits = 0
    for label in true:
        if label in remaining:
            remaining.remove(label)
            hits += 1
    return hits / len(true)


#: A reconstruction counts as recognizable when the judge classifier names its true class and its
#: SSIM to the true image is at least this. The SSIM floor keeps out the images the judge assigns
#: to a class by accident: it labels pure noise as one fixed class (a bag for Fashion-MNIST).
#: Calibrated on random blobs: at 0.3, under 1 % of blob "reconstructions" of 28x28
#: Fashion-MNIST images count as recognizable, and a clearly readable but noisy copy (~15 dB)
#: still does.
RECOGNIZED_MIN_SSIM = 0.3
#: Images under 11 pixels a side (8x8 digits) use SSIM with one nearly global window, which is
#: lenient: random binary blobs reach 0.3 against 11 % of digits. 0.6 brings that to 1 % while a
#: noisy copy at 14.5 dB still passes (76 %).
RECOGNIZED_MIN_SSIM_SMALL = 0.6


def recognized_min_ssim(side: int) -> float:
    """The SSIM floor of the recognizability rule for square images of this side."""
    return RECOGNIZED_MIN_SSIM if side >= 11 else RECOGNIZED_MIN_SSIM_SMALL


#: A recognizable reconstruction is *specific* (shows that image, not only its class) when its
#: SSIM to its own image exceeds this quantile of its SSIMs to real images of the same class...
SPECIFIC_QUANTILE = 0.9
#: ... and no other reconstruction of the batch is a near copy of it (SSIM at least this): when
#: several dummies collapse onto one shape, that shape is what the class looks like to the model.
DUPLICATE_SSIM = 0.9


def _has_near_copy(paired: torch.Tensor, truth: torch.Tensor, i: int) -> bool:
    """Whether the reconstruction paired with another image is a near copy of reconstruction
    ``i`` although the two true images differ clearly (by 0.15 SSIM or more)."""
    if paired.shape[0] < 2:
        return False
    keep = [j for j in range(paired.shape[0]) if j != i]
    others, other_truth = paired[keep].clamp(0, 1), truth[keep]
    recon_similarity = ssim(paired[i : i + 1].clamp(0, 1).expand_as(others), others)
    truth_similarity = ssim(truth[i : i + 1].expand_as(other_truth), other_truth)
    copies = (recon_similarity >= DUPLICATE_SSIM) & (recon_similarity > truth_similarity + 0.15)
    return bool(copies.any())


def class_similarity(recon: torch.Tensor, references: torch.Tensor, q: float) -> float:
    """The ``q`` quantile of the SSIM between one reconstruction and reference images."""
    repeated = _as_batch(recon).expand(references.shape[0], *references.shape[1:])
    return float(torch.quantile(ssim(repeated, references), q))


@dataclass
class ReconstructionScore:
    """Scores of one reconstruction against the truth.

    Means are over the true images, each paired with its own reconstruction (one-to-one, see
    :func:`match_batch`). The ``*_per_image`` lists follow the order of the true batch.

    Attributes:
        mse, psnr, ssim: Means over the paired images.
        label_accuracy: Multiset overlap of recovered and true labels (NaN when unknown).
        psnr_per_image, ssim_per_image: Per true image, against its paired reconstruction.
        assignment: Index of the reconstruction paired with each true image.
        best_psnr_per_image: Per true image, the best PSNR of any reconstruction in the batch.
        judge_label: The judge's class for each paired reconstruction (``None``: no judge).
        judge_true_prob: The judge's probability of the true class.
        recognized: Judge names the true class and SSIM >= :func:`recognized_min_ssim`: what it
            shows is recognizable as the true class.
        specific: Recognized, more similar to its own image than to :data:`SPECIFIC_QUANTILE` of
            real images of the same class, and not a near copy (:data:`DUPLICATE_SSIM`) of the
            reconstruction paired with another image: it shows *that* image, not a shape
            typical of the class (which a model can produce from the label alone).
        class_ssim: Per image, that quantile of SSIMs to real images of the true class.
    """

    mse: float
    psnr: float
    ssim: float
    label_accuracy: float
    psnr_per_image: List[float]
    ssim_per_image: List[float]
    assignment: List[int]
    best_psnr_per_image: List[float] = field(default_factory=list)
    judge_label: Optional[List[int]] = None
    judge_true_prob: Optional[List[float]] = None
    recognized: Optional[List[bool]] = None
    specific: Optional[List[bool]] = None
    class_ssim: Optional[List[float]] = None

    @property
    def recognized_fraction(self) -> float:
        """Share of true images recognizable in the reconstruction (NaN without a judge)."""
        if self.recognized is None:
            return math.nan
        return sum(self.recognized) / max(1, len(self.recognized))

    @property
    def specific_fraction(self) -> float:
        """Share of true images reconstructed specifically (NaN without a judge's references)."""
        if self.specific is None:
            return math.nan
        return sum(self.specific) / max(1, len(self.specific))

    def as_row(self) -> Dict[str, float]:
        return {
            "mse": self.mse,
            "psnr": self.psnr,
            "ssim": self.ssim,
            "label_acc": self.label_accuracy,
            "recognized": self.recognized_fraction,
            "specific": self.specific_fraction,
        }

    def image_rows(self, true_labels: Optional[Sequence[int]] = None) -> List[Dict[str, object]]:
        """One dictionary per true image (for per-image CSV files)."""
        rows = []
        for i, (p, s, j) in enumerate(
            zip(self.psnr_per_image, self.ssim_per_image, self.assignment)
        ):
            row: Dict[str, object] = {
                "image": i,
                "true_label": "" if true_labels is None else int(true_labels[i]),
                "matched_index": j,
                "psnr": p,
                "ssim": s,
                "best_psnr": self.best_psnr_per_image[i] if self.best_psnr_per_image else p,
                "judge_label": "" if self.judge_label is None else self.judge_label[i],
                "judge_true_prob": "" if self.judge_true_prob is None else self.judge_true_prob[i],
                "recognized": "" if self.recognized is None else int(self.recognized[i]),
                "class_ssim": "" if self.class_ssim is None else self.class_ssim[i],
                "specific": "" if self.specific is None else int(self.specific[i]),
            }
            rows.append(row)
        return rows


def score_reconstruction(
    recon: torch.Tensor,
    truth: torch.Tensor,
    recovered_labels: Optional[Sequence[int]] = None,
    true_labels: Optional[Sequence[int]] = None,
    judge=None,
) -> ReconstructionScore:
    """Score a reconstructed batch: pair items, then MSE/PSNR/SSIM, labels and recognizability.

    Args:
        recon: Reconstruction ``[M, C, H, W]`` (any range; clamped to [0, 1]); ``M`` may exceed
            the number of true images.
        truth: True images in ``[0, 1]``, ``[N, C, H, W]``.
        recovered_labels: Labels the attack recovered (``None``: label accuracy is NaN).
        true_labels: True labels (needed for recognizability).
        judge: A :class:`sf_ext.dlg.judge.Judge`; when given with ``true_labels``, each paired
            reconstruction is classified and ``recognized`` is filled in.
    """
    recon, truth = _as_batch(recon), _as_batch(truth)
    order = match_batch(recon, truth) if recon.shape[0] > 1 else [0]
    paired = recon[order]
    errors, peaks, sims = mse(paired, truth), psnr(paired, truth), ssim(paired, truth)
    best = []
    for i in range(truth.shape[0]):
        repeated = truth[i : i + 1].expand(recon.shape[0], *truth.shape[1:])
        best.append(float(psnr(recon, repeated).max()))
    labels = (
        label_accuracy(recovered_labels, true_labels)
        if recovered_labels is not None and true_labels is not None
        else math.nan
    )
    judge_label = judge_prob = recognized = specific = class_ssim = None
    if judge is not None and true_labels is not None:
        true_t = torch.as_tensor(true_labels).long().reshape(-1)
        predicted, probs = judge.predict(paired)
        judge_label = [int(v) for v in predicted]
        judge_prob = [float(probs[i, int(c)]) for i, c in enumerate(true_t)]
        floor = recognized_min_ssim(min(truth.shape[-2:]))
        recognized = [
            bool(int(p) == int(t) and float(s) >= floor) for p, t, s in zip(predicted, true_t, sims)
        ]
        references = getattr(judge, "references", None)
        if references:
            class_ssim, specific = [], []
            for i, t in enumerate(true_t.tolist()):
                refs = references.get(int(t))
                level = (
                    class_similarity(paired[i].clamp(0, 1), refs, SPECIFIC_QUANTILE)
                    if refs is not None and recognized[i]
                    else math.nan
                )
                class_ssim.append(level)
                specific.append(bool(recognized[i] and float(sims[i]) > level))
            for i in range(len(specific)):
                if specific[i] and _has_near_copy(paired, truth, i):
                    specific[i] = False
    return ReconstructionScore(
        mse=float(errors.mean()),
        psnr=float(peaks.mean()),
        ssim=float(sims.mean()),
        label_accuracy=labels,
        psnr_per_image=[float(v) for v in peaks],
        ssim_per_image=[float(v) for v in sims],
        assignment=order,
        best_psnr_per_image=best,
        judge_label=judge_label,
        judge_true_prob=judge_prob,
        recognized=recognized,
        specific=specific,
        class_ssim=class_ssim,
    )


def mean_std(values: Iterable[float]) -> Dict[str, float]:
    """Mean, sample standard deviation (0 for a single value), min, max and count."""
    arr = np.asarray([float(v) for v in values], dtype=np.float64)
    if arr.size == 0:
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return {
        "mean": float(arr.mean()),
        "std": std,
        "min": float(arr.min()),
        "max": float(arr.max()),
        "n": int(arr.size),
    }


def aggregate_rows(
    rows: Sequence[Mapping[str, object]],
    group_by: Sequence[str],
    metrics: Sequence[str] = ("psnr", "ssim", "mse", "label_acc", "recognized", "specific"),
    success_psnr: Optional[float] = None,
) -> List[Dict[str, object]]:
    """Group per-run rows (one per seed) and summarize each metric as mean and spread.

    Args:
        rows: Per-run dictionaries, e.g. the sweep's CSV rows.
        group_by: Keys that define a group (e.g. ``("attack", "attacker", "rate")``).
        metrics: Metric keys to summarize; each gives ``<m>_mean``, ``<m>_std``, ``<m>_min``,
            ``<m>_max``.
        success_psnr: When given, also count runs with PSNR at or above it (``successes``).

    Returns:
        One dictionary per group, in first-seen order, with the group keys and ``n``.
    """
    groups: Dict[tuple, List[Mapping[str, object]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in group_by), []).append(row)
    out = []
    for key, members in groups.items():
        summary: Dict[str, object] = dict(zip(group_by, key))
        summary["n"] = len(members)
        for metric in metrics:
            stats = mean_std(float(m[metric]) for m in members if metric in m and m[metric] != "")
            for stat in ("mean", "std", "min", "max"):
                summary[f"{metric}_{stat}"] = stats[stat]
        if success_psnr is not None:
            summary["successes"] = sum(float(m["psnr"]) >= success_psnr for m in members)
        out.append(summary)
    return out


__all__ = [
    "RECOGNIZED_MIN_SSIM",
    "RECOGNIZED_MIN_SSIM_SMALL",
    "DUPLICATE_SSIM",
    "SPECIFIC_QUANTILE",
    "class_similarity",
    "ReconstructionScore",
    "aggregate_rows",
    "label_accuracy",
    "match_batch",
    "mean_std",
    "mse",
    "psnr",
    "recognized_min_ssim",
    "score_reconstruction",
    "ssim",
]
