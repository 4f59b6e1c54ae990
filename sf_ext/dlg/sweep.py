"""Pruning-rate sweeps of gradient-inversion attacks, with CSV, figures and a summary table.

Two settings:

* ``"dlg"``: DLG's own setting. Per seed, a :class:`sf_ext.models.DLGLeNet` (sigmoid) initialized
  from U(-0.5, 0.5) computes the gradient of real test images; that gradient is pruned by
  per-layer magnitude at each rate and attacked.
* ``"captured"``: rounds recorded from a real SecretFlow run (:mod:`sf_ext.dlg.capture`). With
  ``source="gradient"`` the captured first-batch gradient is pruned at each rate, as above; with
  ``source="update"`` the client's actual upload is attacked as sent (its own mask, its own
  pruning rate), read as a gradient through the recorded learning rate.

Each (target, rate, attack, attacker, seed) is one run and one CSV row. The naive attacker matches
the zero-filled gradient everywhere; the mask-aware one matches only the kept entries.
"""

import csv
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from sf_ext.dlg import plots
from sf_ext.dlg.attacks import ATTACKS, AttackResult, run_attack
from sf_ext.dlg.captured import load_capture
from sf_ext.dlg.gradients import (
    masks_kept_fraction,
    observe_gradient,
    prune_gradient,
    rate_to_keep_fraction,
)
from sf_ext.dlg.metrics import aggregate_rows, score_reconstruction

ATTACKERS = ("naive", "mask-aware")
DEFAULT_RATES = (0, 10, 20, 30, 50, 70, 90)
DEFAULT_ITERS = {"dlg": 300, "idlg": 300, "ig": 1000}
SUCCESS_PSNR = 40.0
FAILURE_PSNR = 15.0
CSV_FIELDS = [
    "setting",
    "dataset",
    "target",
    "seed",
    "rate",
    "keep_fraction",
    "attack",
    "attacker",
    "mse",
    "psnr",
    "ssim",
    "label_acc",
    "true_label",
    "recovered_label",
    "status",
    "iterations",
    "final_loss",
    "input_abs_max",
    "wall_s",
]


@dataclass
class SweepConfig:
    """What to sweep; every field has a command-line flag of the same name (see ``cli.py``).

    Attributes:
        dataset: Dataset name for the ``"dlg"`` setting (``fashion-mnist``, ``mnist``, ``cifar10``,
            ... anything :func:`sf_ext.data.load_dataset` reads).
        data_root: Data folder (``None``: ``SF_EXT_DATA`` and the system folders).
        rates: Pruning rates in percent (share of each weight tensor's entries zeroed).
        attacks: Attack names from :data:`sf_ext.dlg.attacks.ATTACKS`.
        attackers: ``"naive"`` and/or ``"mask-aware"``.
        seeds: Seeds (model initialization and image choice in the ``"dlg"`` setting, dummy
            initialization everywhere).
        iters: Iterations per attack run (``None``: 300 L-BFGS steps, 1000 Adam steps for ``ig``).
        snapshot_every: Keep the dummy every this many iterations (for the grids).
        batch_size: Images per attacked gradient in the ``"dlg"`` setting.
        image_index: First test image of every seed (``None``: seed ``s`` uses images from
            ``s * batch_size``).
        restarts: Extra L-BFGS starts of ``dlg``/``idlg`` within the step budget (0: original
            single start).
        distance: Gradient distance of ``dlg``/``idlg``: ``"l2"`` (original) or ``"l2-layer"``
            (per-tensor normalized).
        ig_restarts: Restarts of the ``ig`` attack.
        captures: Capture folders; when given, the ``"captured"`` setting is swept instead.
        source: ``"gradient"`` or ``"update"`` (captured setting only).
        device: ``"cpu"`` or ``"cuda"``.
        threads: Torch CPU threads.
        out: Output folder.
        grid_columns: Snapshot columns in the progress grids.
    """

    dataset: str = "fashion-mnist"
    data_root: Optional[str] = None
    rates: Sequence[float] = DEFAULT_RATES
    attacks: Sequence[str] = ("dlg",)
    attackers: Sequence[str] = ATTACKERS
    seeds: Sequence[int] = (0, 1, 2)
    iters: Optional[int] = None
    snapshot_every: int = 10
    batch_size: int = 1
    image_index: Optional[int] = None
    restarts: int = 3
    distance: str = "l2"
    ig_restarts: int = 2
    captures: Sequence[str] = ()
    source: str = "gradient"
    device: str = "cpu"
    threads: int = 1
    out: str = "runs/dlg_sweep"
    grid_columns: int = 10

    def validate(self) -> None:
        unknown = [a for a in self.attacks if a not in ATTACKS]
        if unknown:
            raise ValueError(f"unknown attacks {unknown}; choose from {sorted(ATTACKS)}")
        bad = [a for a in self.attackers if a not in ATTACKERS]
        if bad:
            raise ValueError(f"unknown attackers {bad}; choose from {list(ATTACKERS)}")
        for rate in self.rates:
            rate_to_keep_fraction(rate)
        if self.distance not in ("l2", "l2-layer"):
            raise ValueError(f"distance must be 'l2' or 'l2-layer', got {self.distance!r}")
        if self.source not in ("gradient", "update"):
            raise ValueError(f"source must be 'gradient' or 'update', got {self.source!r}")
        if self.batch_size < 1 or not self.seeds:
            raise ValueError("batch_size must be >= 1 and at least one seed is needed")

    def iters_for(self, attack: str) -> int:
        return int(self.iters) if self.iters is not None else DEFAULT_ITERS.get(attack, 300)


@dataclass
class Target:
    """One attacked observation: a model, what the attacker observed, and the truth."""

    name: str
    seed: int
    model: nn.Module
    observed: List[Optional[torch.Tensor]]
    truth: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    loss_fn: Optional[object] = None
    real_masks: Optional[List[Optional[torch.Tensor]]] = None  # the upload's own masks
    extra: Dict[str, object] = field(default_factory=dict)


@dataclass
class SweepResult:
    """Rows of every run, their summary and where the outputs went."""

    rows: List[Dict[str, object]]
    summary: List[Dict[str, object]]
    out: Path
    wall_time_s: float
    files: List[Path]


def dlg_setting_targets(config: SweepConfig) -> List[Target]:
    """DLG's own setting: per seed, a U(-0.5, 0.5) DLGLeNet and the gradient of real images."""
    from sf_ext.data import dataset_spec, load_dataset
    from sf_ext.models import DLGLeNet, uniform_init_

    spec = dataset_spec(config.dataset)
    x_all, y_all = load_dataset(config.dataset, config.data_root, split="test")
    device = torch.device(config.device)
    targets = []
    for seed in config.seeds:
        start = config.image_index if config.image_index is not None else seed * config.batch_size
        index = [(start + i) % len(y_all) for i in range(config.batch_size)]
        x = torch.as_tensor(x_all[index]).to(device)
        y = torch.as_tensor(y_all[index]).long().to(device)
        model = DLGLeNet(spec.in_channels, spec.image_size, spec.num_classes)
        uniform_init_(model, -0.5, 0.5, seed=seed)
        model.to(device)
        targets.append(
            Target(
                name=f"{config.dataset}[{','.join(map(str, index))}]",
                seed=int(seed),
                model=model,
                observed=observe_gradient(model, x, y),
                truth=x.cpu(),
                labels=y.cpu(),
                num_classes=spec.num_classes,
            )
        )
    return targets


def captured_targets(config: SweepConfig) -> List[Target]:
    """Targets from capture folders (one per folder and seed; the seed only moves the dummy)."""
    device = torch.device(config.device)
    targets = []
    for folder in config.captures:
        capture = load_capture(folder)
        model = capture.build_model().to(device)
        if config.source == "gradient":
            observed, real_masks = capture.gradient, None
        else:
            observed, real_masks = capture.update_as_gradient(), capture.masks()
        num_classes = list(model.parameters())[-1].shape[0]
        extra = {
            "kept_fraction": capture.meta.get("kept_fraction", 1.0),
            "optimizer": capture.meta.get("optimizer"),
        }
        for seed in config.seeds:
            targets.append(
                Target(
                    name=Path(folder).name,
                    seed=int(seed),
                    model=model,
                    observed=[None if g is None else g.to(device) for g in observed],
                    truth=capture.x.cpu(),
                    labels=capture.labels.cpu(),
                    num_classes=int(num_classes),
                    loss_fn=capture.loss,
                    real_masks=real_masks,
                    extra=extra,
                )
            )
    return targets


def _observations(config: SweepConfig, target: Target):
    """(rate, keep, observed, masks) per rate, or the upload's own mask in update mode."""
    if target.real_masks is not None:
        has_mask = any(m is not None for m in target.real_masks)
        keep = masks_kept_fraction(target.real_masks) if has_mask else 1.0
        yield round(100 * (1 - keep), 2), keep, target.observed, target.real_masks
        return
    for rate in config.rates:
        keep = rate_to_keep_fraction(rate)
        pruned, masks = prune_gradient(target.model, target.observed, keep)
        yield float(rate), keep, pruned, masks


def run_one(
    config: SweepConfig, target: Target, attack: str, attacker: str, observed, masks
) -> AttackResult:
    """One attack run on one (possibly pruned) observation."""
    options = {
        "masks": masks if attacker == "mask-aware" else None,
        "iters": config.iters_for(attack),
        "snapshot_every": config.snapshot_every,
        "seed": target.seed,
        "device": config.device,
    }
    if target.loss_fn is not None:
        options["loss_fn"] = target.loss_fn
    if attack == "ig":
        options["restarts"] = config.ig_restarts
    else:
        options["restarts"] = config.restarts
        options["distance"] = config.distance
    shape = tuple(target.truth.shape)
    return run_attack(attack, target.model, observed, shape, target.num_classes, **options)


def _row(config, setting, target, rate, keep, attack, attacker, result, score) -> Dict[str, object]:
    return {
        "setting": setting,
        "dataset": config.dataset if setting == "dlg" else "captured",
        "target": target.name,
        "seed": target.seed,
        "rate": rate,
        "keep_fraction": round(keep, 6),
        "attack": attack,
        "attacker": attacker,
        **score.as_row(),
        "true_label": " ".join(map(str, target.labels.tolist())),
        "recovered_label": " ".join(map(str, result.label.tolist())),
        "status": result.status,
        "iterations": result.iterations,
        "final_loss": result.final_loss,
        "input_abs_max": float(result.reconstruction.abs().max()),
        "wall_s": round(result.wall_time_s, 3),
    }


def run_sweep(config: SweepConfig, progress: bool = True) -> SweepResult:
    """Run every (target, rate, attack, attacker) and write CSV, figures and a summary.

    Outputs in ``config.out``: ``runs.csv`` (one row per run, written as runs finish),
    ``summary.csv`` (mean and spread over seeds), ``sweep.json`` (config and timing),
    ``grid_<attack>_<attacker>_seed<k>.png`` (dummy over iterations, one row per rate),
    ``final_<attack>.png`` (final reconstructions, rows attacker x seed, columns rates) and
    ``psnr_vs_rate_<attack>.png``.
    """
    config.validate()
    torch.set_num_threads(max(1, int(config.threads)))
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    setting = "captured" if config.captures else "dlg"
    targets = captured_targets(config) if config.captures else dlg_setting_targets(config)

    jobs = []
    for target in targets:
        for rate, keep, observed, masks in _observations(config, target):
            for attack in config.attacks:
                for attacker in config.attackers:
                    jobs.append((target, rate, keep, observed, masks, attack, attacker))

    rows: List[Dict[str, object]] = []
    kept_images: Dict[Tuple, Dict[str, object]] = {}
    csv_path = out / "runs.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        bar = tqdm(jobs, desc=f"{setting} sweep", unit="run", disable=not progress)
        for target, rate, keep, observed, masks, attack, attacker in bar:
            result = run_one(config, target, attack, attacker, observed, masks)
            score = score_reconstruction(
                result.reconstruction, target.truth, result.label.tolist(), target.labels.tolist()
            )
            row = _row(config, setting, target, rate, keep, attack, attacker, result, score)
            rows.append(row)
            writer.writerow(row)
            handle.flush()
            # Figures show item 0 of the batch next to the reconstruction matched to it.
            matched = score.assignment[0]
            kept_images[(attack, attacker, target.name, target.seed, rate)] = {
                "snapshots": [(it, image[matched : matched + 1]) for it, image in result.snapshots],
                "final": result.reconstruction[matched : matched + 1],
                "psnr": row["psnr"],
                "truth": target.truth,
            }
            bar.set_postfix(attack=attack, who=attacker, rate=rate, psnr=f"{row['psnr']:.1f}")

    summary = summarize(rows)
    _write_csv(out / "summary.csv", summary)
    files = [csv_path, out / "summary.csv"]
    files += _figures(config, rows, kept_images, out)
    wall = time.perf_counter() - started
    meta = {"config": asdict(config), "setting": setting, "runs": len(rows), "wall_time_s": wall}
    (out / "sweep.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    files.append(out / "sweep.json")
    return SweepResult(rows=rows, summary=summary, out=out, wall_time_s=wall, files=files)


def summarize(rows: Sequence[Dict[str, object]]) -> List[Dict[str, object]]:
    """Mean and spread over seeds per (setting, attack, attacker, rate), with success counts."""
    return aggregate_rows(
        rows, ("setting", "attack", "attacker", "rate"), success_psnr=SUCCESS_PSNR
    )


def breakdown_rates(summary: Sequence[Dict[str, object]], level: float = FAILURE_PSNR):
    """Per (attack, attacker), the lowest rate whose mean PSNR is below ``level`` (None: never)."""
    out: Dict[Tuple[str, str], Optional[float]] = {}
    for row in sorted(summary, key=lambda r: float(r["rate"])):
        key = (str(row["attack"]), str(row["attacker"]))
        out.setdefault(key, None)
        if out[key] is None and float(row["psnr_mean"]) < level:
            out[key] = float(row["rate"])
    return out


def format_summary(summary: Sequence[Dict[str, object]]) -> str:
    """Plain-text table of the summary (one line per attack, attacker and rate)."""
    header = (
        f"{'attack':<6} {'attacker':<10} {'rate%':>6} {'PSNR dB (mean±std)':>20} "
        f"{'min':>6} {'SSIM':>6} {'label':>6} {f'>={SUCCESS_PSNR:g}dB':>7}"
    )
    lines = [header, "-" * len(header)]
    for row in summary:
        lines.append(
            f"{row['attack']:<6} {row['attacker']:<10} {float(row['rate']):>6g} "
            f"{_pm(row['psnr_mean'], row['psnr_std']):>20} {float(row['psnr_min']):>6.1f} "
            f"{float(row['ssim_mean']):>6.3f} {float(row['label_acc_mean']):>6.2f} "
            f"{row['successes']:>4}/{row['n']}"
        )
    lines.append("")
    for (attack, attacker), rate in breakdown_rates(summary).items():
        where = f"from {rate:g}% pruning" if rate is not None else "at no rate tried"
        lines.append(f"{attack} / {attacker}: mean PSNR below {FAILURE_PSNR:g} dB {where}")
    return "\n".join(lines)


def _pm(mean, std) -> str:
    mean, std = float(mean), float(std)
    if math.isinf(mean):
        return "inf"
    return f"{mean:.1f} ± {std:.1f}"


def _write_csv(path: Path, rows: Sequence[Dict[str, object]]) -> None:
    if not rows:
        path.write_text("")
        return
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)


def _figures(config: SweepConfig, rows, kept_images, out: Path) -> List[Path]:
    """PSNR plot, final-reconstruction grid and progress grids per attack.

    Rows of the grids are (attacker, seed); columns (final grid) or rows (progress grids) are
    pruning rates. In update mode each capture brings its own rate, so captures line up by rate.
    """
    files = []
    rates = sorted({float(r["rate"]) for r in rows})
    seeds = sorted({k[3] for k in kept_images})
    for attack in config.attacks:
        attack_rows = [r for r in rows if r["attack"] == attack]
        if not attack_rows:
            continue
        files.append(
            plots.psnr_vs_rate(
                attack_rows,
                out / f"psnr_vs_rate_{attack}.png",
                title=f"{attack.upper()} vs. pruning ({attack_rows[0]['dataset']}, "
                f"{len(config.seeds)} seeds)",
            )
        )
        by_cell: Dict[Tuple[str, int, float], Dict[str, object]] = {}
        for (att, attacker, _name, seed, rate), entry in kept_images.items():
            if att == attack:
                by_cell[(attacker, seed, rate)] = entry
        cells, truths, row_keys = {}, {}, []
        for attacker in config.attackers:
            for seed in seeds:
                key = f"{attacker} s{seed}"
                row_keys.append(key)
                for rate in rates:
                    entry = by_cell.get((attacker, seed, rate))
                    if entry is not None:
                        cells[(key, rate)] = (entry["final"], entry["psnr"])
                        truths[key] = entry["truth"]
        files.append(
            plots.final_grid(
                cells,
                truths,
                [k for k in row_keys if k in truths],
                rates,
                out / f"final_{attack}.png",
                title=f"{attack.upper()}: final reconstructions (columns: pruning rate)",
            )
        )
        for attacker in config.attackers:
            for seed in seeds:
                grid_rows = [
                    {"label": f"{rate:g}%", **by_cell[(attacker, seed, rate)]}
                    for rate in rates
                    if (attacker, seed, rate) in by_cell
                ]
                if not grid_rows:
                    continue
                files.append(
                    plots.progress_grid(
                        grid_rows,
                        grid_rows[0]["truth"][0],
                        out / f"grid_{attack}_{attacker}_seed{seed}.png",
                        iters=config.iters_for(attack),
                        every=config.snapshot_every,
                        columns=config.grid_columns,
                        title=f"{attack.upper()} ({attacker}), seed {seed}: rows = pruning rate",
                    )
                )
    return files


__all__ = [
    "ATTACKERS",
    "DEFAULT_RATES",
    "SweepConfig",
    "SweepResult",
    "Target",
    "breakdown_rates",
    "captured_targets",
    "dlg_setting_targets",
    "format_summary",
    "run_one",
    "run_sweep",
    "summarize",
]
