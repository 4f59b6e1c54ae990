"""Figures of a DLG sweep: reconstruction grids and PSNR against pruning rate (matplotlib, Agg)."""

import math
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from sf_ext.dlg.metrics import mean_std  # noqa: E402


def to_display(image: torch.Tensor) -> Tuple[np.ndarray, Optional[str]]:
    """One image ``[C, H, W]`` (any range) as an array imshow understands, clamped to [0, 1]."""
    image = torch.as_tensor(image).detach().float().cpu()
    if image.dim() == 4:
        image = image[0]
    image = image.clamp(0, 1)
    if image.shape[0] == 1:
        return image[0].numpy(), "gray"
    return image.permute(1, 2, 0).numpy(), None


def _show(ax, image: torch.Tensor, title: Optional[str] = None, fontsize: int = 7) -> None:
    array, cmap = to_display(image)
    ax.imshow(array, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title is not None:
        ax.set_title(title, fontsize=fontsize)


def _pick_columns(
    snapshots: Sequence[Tuple[int, torch.Tensor]], iters: int, every: int, columns: int
) -> List[Tuple[int, torch.Tensor]]:
    """``columns`` evenly spaced snapshot iterations of the full budget, each showing the dummy as
    it was then (a run that stopped early did not move afterwards, so its last snapshot holds)."""
    if not snapshots:
        return []
    grid = list(range(0, max(iters, 1), max(every, 1)))
    picks = sorted({grid[int(i)] for i in np.linspace(0, len(grid) - 1, min(columns, len(grid)))})
    out = []
    for target in picks:
        earlier = [s for s in snapshots if s[0] <= target] or [snapshots[0]]
        out.append((target, earlier[-1][1]))
    return out


def progress_grid(
    rows: Sequence[Mapping[str, object]],
    truth: torch.Tensor,
    path: Union[str, Path],
    iters: int,
    every: int = 10,
    columns: int = 10,
    title: str = "",
) -> Path:
    """The seed experiment's figure, one row per pruning rate: the dummy input over iterations.

    Args:
        rows: One dictionary per row with ``label`` (row title), ``snapshots`` (``(iteration,
            image)`` pairs), ``final`` (the returned reconstruction), ``psnr`` and optionally
            ``truth`` (that row's attacked image, when rows attack different images).
        truth: The attacked image ``[C, H, W]`` or ``[1, C, H, W]`` (default for every row).
        path: PNG file to write.
        iters: Iteration budget of the runs (for the column positions).
        every: Snapshot interval of the runs.
        columns: Snapshot columns (taken evenly over the budget; a run that stopped early keeps
            showing its last snapshot).
        title: Figure title.
    """
    ncols = columns + 2
    fig, axes = plt.subplots(
        len(rows),
        ncols,
        figsize=(1.0 * ncols + 0.4, 1.1 * len(rows) + 0.6),
        squeeze=False,
        layout="constrained",
    )
    for r, row in enumerate(rows):
        picked = _pick_columns(row["snapshots"], iters, every, columns)
        _show(axes[r][0], row.get("truth", truth), "truth" if r == 0 else None)
        axes[r][0].set_ylabel(str(row["label"]), fontsize=7, rotation=0, ha="right", va="center")
        for c in range(columns):
            if c < len(picked):
                _show(axes[r][c + 1], picked[c][1], f"it {picked[c][0]}" if r == 0 else None)
            else:
                axes[r][c + 1].axis("off")
        psnr = float(row["psnr"])
        _show(axes[r][-1], row["final"], f"{psnr:.1f} dB")
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def final_grid(
    cells: Mapping[Tuple[str, float], Tuple[torch.Tensor, float]],
    truths: Mapping[str, torch.Tensor],
    row_keys: Sequence[str],
    rates: Sequence[float],
    path: Union[str, Path],
    title: str = "",
) -> Path:
    """Final reconstructions: one row per (attacker, seed) key, one column per pruning rate.

    Args:
        cells: ``(row_key, rate) -> (reconstruction, psnr)``.
        truths: ``row_key -> true image`` (shown in the first column).
        row_keys: Row order.
        rates: Column order (percent).
        path: PNG file to write.
        title: Figure title.
    """
    ncols = len(rates) + 1
    fig, axes = plt.subplots(
        len(row_keys),
        ncols,
        figsize=(1.05 * ncols + 1.2, 1.15 * len(row_keys) + 0.6),
        squeeze=False,
        layout="constrained",
    )
    for r, key in enumerate(row_keys):
        _show(axes[r][0], truths[key], "truth" if r == 0 else None)
        axes[r][0].set_ylabel(key, fontsize=7, rotation=0, ha="right", va="center")
        for c, rate in enumerate(rates):
            if (key, rate) not in cells:
                axes[r][c + 1].axis("off")
                continue
            image, psnr = cells[(key, rate)]
            label = f"{rate:g}%: {psnr:.1f} dB"
            _show(axes[r][c + 1], image, label)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def psnr_vs_rate(
    runs: Sequence[Mapping[str, object]],
    path: Union[str, Path],
    title: str = "",
    thresholds: Mapping[str, float] = None,
) -> Path:
    """PSNR against pruning rate, one line per attacker (mean and standard deviation over seeds,
    individual runs as dots).

    Args:
        runs: Per-run rows with ``attacker``, ``rate`` and ``psnr`` (of one attack).
        path: PNG file to write.
        title: Plot title.
        thresholds: Label -> dB drawn as horizontal reference lines.
    """
    thresholds = {"success 40 dB": 40.0, "15 dB": 15.0} if thresholds is None else thresholds
    fig, ax = plt.subplots(figsize=(5.5, 3.8), layout="constrained")
    by_attacker: Dict[str, Dict[float, List[float]]] = {}
    for run in runs:
        by_attacker.setdefault(str(run["attacker"]), {}).setdefault(float(run["rate"]), []).append(
            _finite_psnr(float(run["psnr"]))
        )
    for i, (attacker, per_rate) in enumerate(sorted(by_attacker.items())):
        rates = sorted(per_rate)
        stats = [mean_std(per_rate[r]) for r in rates]
        color = f"C{i}"
        ax.errorbar(
            rates,
            [s["mean"] for s in stats],
            yerr=[s["std"] for s in stats],
            label=attacker,
            color=color,
            marker="o",
            capsize=3,
        )
        for rate in rates:
            ax.scatter([rate] * len(per_rate[rate]), per_rate[rate], color=color, s=8, alpha=0.4)
    for j, (label, level) in enumerate(thresholds.items()):
        ax.axhline(level, color="gray", linestyle="--" if j == 0 else ":", linewidth=0.8)
        ax.text(0.5, level + 0.8, label, fontsize=7, color="gray")
    ax.set_xlabel("% of weight-gradient entries pruned (zeroed)")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def batch_grid(
    truth: torch.Tensor,
    recon: torch.Tensor,
    score,
    path: Union[str, Path],
    title: str = "",
    labels: Optional[Sequence[int]] = None,
    per_row: int = 16,
) -> Path:
    """Every image of an attacked batch: pairs of rows, true images above their reconstructions.

    Args:
        truth: True images ``[N, C, H, W]``.
        recon: Reconstructions ``[M, C, H, W]`` (``M >= N``).
        score: The :class:`~sf_ext.dlg.metrics.ReconstructionScore` of ``recon`` against
            ``truth`` (pairing, PSNR, recognizability).
        path: PNG file to write.
        title: Figure title.
        labels: True labels (shown above the true images).
        per_row: Images per row.
    """
    n = truth.shape[0]
    per_row = max(1, min(per_row, n))
    groups = math.ceil(n / per_row)
    fig, axes = plt.subplots(
        2 * groups,
        per_row,
        figsize=(0.75 * per_row + 0.3, 1.65 * groups + 0.5),
        squeeze=False,
        layout="constrained",
    )
    recognized = score.recognized or [False] * n
    for i in range(groups * per_row):
        g, c = divmod(i, per_row)
        top, bottom = axes[2 * g][c], axes[2 * g + 1][c]
        if i >= n:
            top.axis("off")
            bottom.axis("off")
            continue
        head = f"#{i}" if labels is None else f"#{i} y={int(labels[i])}"
        _show(top, truth[i], head, fontsize=6)
        mark = " ok" if recognized[i] else ""
        _show(bottom, recon[score.assignment[i]], f"{score.psnr_per_image[i]:.0f}dB{mark}", 6)
        if recognized[i]:
            for spine in bottom.spines.values():
                spine.set_visible(True)
                spine.set_color("tab:green")
                spine.set_linewidth(2)
    if title:
        fig.suptitle(title + "\ntop: true, below: reconstruction; ok = recognizable", fontsize=7)
    return _save(fig, path)


def batch_rows(
    rows: Sequence[Tuple[str, torch.Tensor, object]],
    truth: torch.Tensor,
    path: Union[str, Path],
    title: str = "",
    limit: Optional[int] = None,
) -> Path:
    """Every image of a batch (or the first ``limit``): the true images on top, then one row of
    paired reconstructions per entry of ``rows`` (``(label, reconstruction, score)``), PSNR
    above each image."""
    n = truth.shape[0] if limit is None else min(limit, truth.shape[0])
    fig, axes = plt.subplots(
        len(rows) + 1,
        n,
        figsize=(0.8 * n + 1.0, 1.0 * (len(rows) + 1) + 0.5),
        squeeze=False,
        layout="constrained",
    )
    for c in range(n):
        _show(axes[0][c], truth[c], f"#{c}", fontsize=6)
    axes[0][0].set_ylabel("truth", fontsize=7, rotation=0, ha="right", va="center")
    for r, (label, recon, score) in enumerate(rows, start=1):
        recognized = score.recognized or [False] * truth.shape[0]
        for c in range(n):
            mark = "*" if recognized[c] else ""
            _show(axes[r][c], recon[score.assignment[c]], f"{score.psnr_per_image[c]:.0f}{mark}", 6)
        axes[r][0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title + " (dB; * = recognizable)", fontsize=8)
    return _save(fig, path)


def audit_overview(entries: Sequence[Tuple[str, object]], path: Union[str, Path], show: int = 10):
    """One block per setting: its most recognizable attacked batch (first ``show`` images),
    true images above reconstructions, with the verdict numbers in the row label."""
    rows = len(entries)
    fig, axes = plt.subplots(
        2 * rows,
        show,
        figsize=(0.8 * show + 2.2, 1.7 * rows + 0.4),
        squeeze=False,
        layout="constrained",
    )
    for r, (key, outcome) in enumerate(entries):
        truth = outcome.notes["truth"]
        recon = outcome.notes["reconstruction"]
        score = outcome.score
        label = (
            f"{key}\n{outcome.round} {outcome.attacker}\n"
            f"{outcome.recognized}/{outcome.items} recog."
        )
        # Recognizable images first, then the most similar ones.
        recognized = score.recognized or [False] * truth.shape[0]
        order = sorted(
            range(truth.shape[0]), key=lambda i: (not recognized[i], -score.ssim_per_image[i])
        )
        for c in range(show):
            top, bottom = axes[2 * r][c], axes[2 * r + 1][c]
            if c >= truth.shape[0]:
                top.axis("off")
                bottom.axis("off")
                continue
            i = order[c]
            _show(top, truth[i], f"#{i}", fontsize=6)
            mark = " ok" if recognized[i] else ""
            _show(bottom, recon[score.assignment[i]], f"{score.psnr_per_image[i]:.0f}dB{mark}", 6)
        axes[2 * r][0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle(
        "What the server reconstructs (top: true images, below: reconstructions)", fontsize=9
    )
    return _save(fig, path)


def _finite_psnr(value: float, cap: float = 100.0) -> float:
    # A bit-exact reconstruction has infinite PSNR; plot it at the cap.
    return cap if math.isinf(value) and value > 0 else value


def _save(fig, path: Union[str, Path]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = [
    "audit_overview",
    "batch_grid",
    "batch_rows",
    "final_grid",
    "progress_grid",
    "psnr_vs_rate",
    "to_display",
]
