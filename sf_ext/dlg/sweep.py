"""Pruning sweeps of gradient-inversion attacks, with CSV, figures and a summary table.

Two settings:

* ``"dlg"``: DLG's own setting. Per seed, a :class:`sf_ext.models.DLGLeNet` (sigmoid) initialized
  from U(-0.5, 0.5) computes the gradient of real test images; that gradient is magnitude-pruned
  per layer at each share in ``pruned_percent`` and attacked.
* ``"captured"``: rounds recorded from a real SecretFlow run (:mod:`sf_ext.dlg.capture`). With
  ``source="gradient"`` the client's first-batch gradient is pruned at each share, as above; with
  ``source="update"`` the client's actual upload is attacked as sent (its own mask, its own kept
  fraction): the gradient attacks read it as ``-update / lr`` (exact for one plain SGD step; a
  warning otherwise), ``multistep`` simulates the client's optimizer.

Each (target, pruned share, attack, attacker, seed) is one run and one row of ``runs.csv``; each
image of each run is one row of ``images.csv``. The naive attacker matches the zero-filled
observation everywhere; the mask-aware one matches only the kept entries.

Words: ``pruned_percent`` is the percent of each weight tensor's entries *zeroed* (0 = nothing
pruned). ``fed_avg_w_prune``'s ``prune_end_rate`` is the opposite, the fraction *kept*.
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
from sf_ext.dlg.captured import CapturedRound, load_capture, load_round
from sf_ext.dlg.gradients import (
    masks_kept_fraction,
    observe_gradient,
    prune_gradient,
    rate_to_keep_fraction,
)
from sf_ext.dlg.labels import LABEL_METHODS
from sf_ext.dlg.local_training import OptimizerSpec
from sf_ext.dlg.metrics import aggregate_rows, score_reconstruction
from sf_ext.dlg.options import DISTANCES, AttackOptions
from sf_ext.outputs import prepare_output_dir

ATTACKERS = ("naive", "mask-aware")
DEFAULT_PRUNED = (0, 10, 20, 30, 50, 70, 90)
SUCCESS_PSNR = 40.0
FAILURE_PSNR = 15.0
SOURCES = ("gradient", "update")
CSV_FIELDS = [
    "setting",
    "dataset",
    "target",
    "seed",
    "pruned_percent",
    "keep_fraction",
    "attack",
    "attacker",
    "mse",
    "psnr",
    "ssim",
    "label_acc",
    "recognized",
    "specific",
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
    """What to sweep; every field is a command-line flag of ``dlg attack`` / ``dlg sweep``.

    Attributes:
        dataset: Dataset of the ``dlg`` setting (``fashion-mnist``, ``mnist``, ``cifar10``,
            ``digits``, ...).
        data_root: Data folder (default ``$SF_EXT_DATA`` and the system folders).
        pruned_percent: Percent of each weight tensor's entries zeroed (magnitude pruning of
            the observed gradient): 0 is unpruned, 90 keeps a tenth. Note the opposite sense of
            fed_avg_w_prune's prune_end_rate (fraction kept).
        attacks: Attacks to run (``dlg``, ``idlg``, ``ig``, ``multistep``).
        attackers: ``naive`` and/or ``mask-aware``.
        seeds: Seeds: model initialization and image choice in the ``dlg`` setting, the dummy's
            initialization everywhere.
        iters: Iterations per run (default: 300 L-BFGS steps for dlg/idlg, 1000 Adam steps for
            ig/multistep).
        restarts: Restarts per run (default: 3 extra L-BFGS starts within the budget for
            dlg/idlg, 2 independent restarts for ig/multistep; 0 is DLG's single start).
        distance: Gradient distance for every attack: l2 (DLG), l2-layer (per-tensor
            normalized), cosine (Inverting Gradients) or cosine-layer (per-tensor cosine).
            Default: l2 for dlg/idlg, cosine-layer for ig/multistep.
        label_method: How idlg/ig/multistep read batch labels: count (class counts from the
            output-bias gradient, repeated and missing classes included) or sign.
        snapshot_every: Keep the dummy every this many iterations (for the progress grids).
        batch_size: Images per attacked gradient in the dlg setting.
        image_index: First test image of every seed (default: seed s uses images from
            s * batch_size).
        captures: Captured rounds (folders written by the capture, or single client captures)
            to attack instead of the dlg setting.
        party: Client of a captured round whose side is attacked (default: the first).
        source: Captured setting: gradient (prune the client's first-batch gradient at every
            share) or update (attack the upload as sent).
        device: cpu or cuda.
        threads: Torch CPU threads.
        out: Output folder.
        overwrite: Replace an earlier sweep with other settings in out.
        grid_columns: Snapshot columns in the progress grids.
    """

    dataset: str = "fashion-mnist"
    data_root: Optional[str] = None
    pruned_percent: Sequence[float] = DEFAULT_PRUNED
    attacks: Sequence[str] = ("dlg",)
    attackers: Sequence[str] = ATTACKERS
    seeds: Sequence[int] = (0, 1, 2)
    iters: Optional[int] = None
    restarts: Optional[int] = None
    distance: Optional[str] = None
    label_method: str = "count"
    snapshot_every: int = 10
    batch_size: int = 1
    image_index: Optional[int] = None
    captures: Sequence[str] = ()
    party: Optional[str] = None
    source: str = "gradient"
    device: str = "cpu"
    threads: int = 1
    out: str = "runs/dlg_sweep"
    overwrite: bool = False
    grid_columns: int = 10

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        unknown = [a for a in self.attacks if a not in ATTACKS]
        if unknown or not self.attacks:
            raise ValueError(f"attacks: unknown {unknown}; choose from {sorted(ATTACKS)}")
        bad = [a for a in self.attackers if a not in ATTACKERS]
        if bad or not self.attackers:
            raise ValueError(f"attackers: unknown {bad}; choose from {list(ATTACKERS)}")
        for share in self.pruned_percent:
            try:
                rate_to_keep_fraction(share)
            except ValueError:
                raise ValueError(
                    f"pruned_percent must lie in [0, 100) (percent zeroed), got {share!r}"
                ) from None
        if self.distance is not None and self.distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {self.distance!r}")
        if self.label_method not in LABEL_METHODS:
            raise ValueError(f"label_method must be one of {LABEL_METHODS}")
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.seeds:
            raise ValueError("seeds: at least one seed is needed")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.threads < 1 or self.snapshot_every < 1 or self.grid_columns < 1:
            raise ValueError("threads, snapshot_every and grid_columns must be >= 1")
        AttackOptions(iters=self.iters, restarts=self.restarts)  # validates both

    def options(self, seed: int) -> AttackOptions:
        """The attack options of one run."""
        return AttackOptions(
            iters=self.iters,
            restarts=self.restarts,
            distance=self.distance,
            seed=seed,
            device=self.device,
            snapshot_every=self.snapshot_every,
            label_method=self.label_method,
        )

    def iters_for(self, attack: str) -> int:
        return int(AttackOptions(iters=self.iters).resolved(attack).iters)

    def settings(self) -> Dict[str, object]:
        """What determines the results (for the output folder's manifest)."""
        values = asdict(self)
        for key in ("overwrite", "threads", "out"):
            values.pop(key)
        return values


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
    optimizer: Optional[OptimizerSpec] = None  # update mode: the client's optimizer
    steps: int = 1
    update: Optional[List[Optional[torch.Tensor]]] = None  # update mode: as sent
    extra: Dict[str, object] = field(default_factory=dict)


@dataclass
class SweepResult:
    """Rows of every run, their summary and where the outputs went."""

    rows: List[Dict[str, object]]
    summary: List[Dict[str, object]]
    out: Path
    wall_time_s: float
    files: List[Path]
    resumed: bool = False


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


def _load_client(folder: str, party: Optional[str]) -> CapturedRound:
    path = Path(folder)
    if (path / "round.json").is_file():
        round_ = load_round(path)
        name = party or next(iter(round_.clients))
        if name not in round_.clients:
            raise ValueError(f"{folder}: no client {name!r}; it holds {sorted(round_.clients)}")
        return round_.clients[name]
    return load_capture(path)


def captured_targets(config: SweepConfig) -> List[Target]:
    """Targets from captures (one per capture and seed; the seed only moves the dummy)."""
    device = torch.device(config.device)
    targets = []
    for folder in config.captures:
        capture = _load_client(folder, config.party)
        model = capture.build_model().to(device)
        num_classes = [p for p in model.parameters() if p.dim() == 2][-1].shape[0]
        extra = {"kept_fraction": capture.kept_fraction(), "optimizer": capture.meta["optimizer"]}
        if config.source == "gradient":
            x, y = capture.batches[0]
            observed, real_masks, update = capture.gradient, None, None
            truth, labels = x, (y.argmax(-1) if y.dim() > 1 else y.long())
        else:
            update = capture.update()
            if any(a != "multistep" for a in config.attacks):
                observed = capture.update_as_gradient()  # warns unless one plain SGD step
            else:
                observed = update
            real_masks, truth, labels = capture.masks(), capture.x, capture.labels
        for seed in config.seeds:
            targets.append(
                Target(
                    name=Path(folder).name,
                    seed=int(seed),
                    model=model,
                    observed=[None if g is None else g.to(device) for g in observed],
                    truth=truth.cpu(),
                    labels=labels.cpu(),
                    num_classes=int(num_classes),
                    loss_fn=capture.loss,
                    real_masks=real_masks,
                    optimizer=capture.optimizer(),
                    steps=capture.local_steps,
                    update=update,
                    extra=extra,
                )
            )
    return targets


def _observations(config: SweepConfig, target: Target):
    """(pruned percent, keep, observed, masks) per share, or the upload's own in update mode."""
    if target.update is not None:
        masks = target.real_masks or []
        has_mask = any(m is not None for m in masks)
        keep = masks_kept_fraction(masks) if has_mask else 1.0
        yield round(100 * (1 - keep), 2), keep, target.observed, target.real_masks
        return
    for share in config.pruned_percent:
        keep = rate_to_keep_fraction(share)
        pruned, masks = prune_gradient(target.model, target.observed, keep)
        yield float(share), keep, pruned, masks


def run_one(
    config: SweepConfig, target: Target, attack: str, attacker: str, observed, masks
) -> AttackResult:
    """One attack run on one (possibly pruned) observation."""
    options = config.options(target.seed)
    shape = tuple(target.truth.shape)
    kwargs: Dict[str, object] = {
        "masks": masks if attacker == "mask-aware" else None,
        "options": options,
    }
    if target.loss_fn is not None:
        kwargs["loss_fn"] = target.loss_fn
    if attack == "multistep":
        if target.update is not None:
            # The upload as sent: simulate the client's own optimizer over its local steps.
            shape = (shape[0] // target.steps,) + shape[1:]
            kwargs["optimizer"] = target.optimizer
            kwargs["steps"] = target.steps
            observed = target.update
        else:
            # A gradient is the update of one SGD step with lr 1, sign flipped.
            kwargs["optimizer"] = OptimizerSpec("sgd", lr=1.0)
            observed = [None if g is None else -g for g in observed]
    return run_attack(attack, target.model, observed, shape, target.num_classes, **kwargs)


def _row(config, setting, target, share, keep, attack, attacker, result, score):
    return {
        "setting": setting,
        "dataset": config.dataset if setting == "dlg" else "captured",
        "target": target.name,
        "seed": target.seed,
        "pruned_percent": share,
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


def _read_csv(path: Path) -> List[Dict[str, object]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def run_sweep(config: SweepConfig, progress: bool = True, judge=None) -> SweepResult:
    """Run every (target, share, attack, attacker) and write CSVs, figures and a summary.

    Outputs in ``config.out`` (guarded by :func:`sf_ext.outputs.prepare_output_dir`: a finished
    sweep with the same settings is read back, not rerun; other settings are refused unless
    ``overwrite``): ``runs.csv`` (one row per run, written as runs finish), ``images.csv`` (one
    row per image per run), ``summary.csv`` (mean and spread over seeds), ``sweep.json``,
    ``final_<attack>.png`` (final reconstructions, rows attacker x seed, columns shares; with
    batches, ``batch_<attack>_<attacker>_seed<k>.png`` shows every image),
    ``grid_<attack>_<attacker>_seed<k>.png`` (the dummy over iterations) and
    ``psnr_vs_pruned_<attack>.png``.

    Args:
        config: What to sweep.
        progress: Show a progress bar.
        judge: A :class:`sf_ext.dlg.judge.Judge` for the ``recognized`` column (``None``: the
            column is empty).
    """
    config.validate()
    torch.set_num_threads(max(1, int(config.threads)))
    folder = prepare_output_dir(config.out, config.settings(), config.overwrite)
    out = folder.path
    if folder.complete_before and (out / "runs.csv").is_file():
        rows = _read_csv(out / "runs.csv")
        summary = _read_csv(out / "summary.csv")
        meta = json.loads((out / "sweep.json").read_text())
        files = [out / f for f in folder.files]
        return SweepResult(rows, summary, out, float(meta["wall_time_s"]), files, resumed=True)
    started = time.perf_counter()
    setting = "captured" if config.captures else "dlg"
    targets = captured_targets(config) if config.captures else dlg_setting_targets(config)

    jobs = []
    for target in targets:
        for share, keep, observed, masks in _observations(config, target):
            for attack in config.attacks:
                for attacker in config.attackers:
                    jobs.append((target, share, keep, observed, masks, attack, attacker))

    rows: List[Dict[str, object]] = []
    image_rows: List[Dict[str, object]] = []
    kept_images: Dict[Tuple, Dict[str, object]] = {}
    csv_path = out / "runs.csv"
    folder.record(csv_path)
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        bar = tqdm(jobs, desc=f"{setting} sweep", unit="run", disable=not progress)
        for target, share, keep, observed, masks, attack, attacker in bar:
            result = run_one(config, target, attack, attacker, observed, masks)
            score = score_reconstruction(
                result.reconstruction,
                target.truth,
                result.label.tolist(),
                target.labels.tolist(),
                judge,
            )
            row = _row(config, setting, target, share, keep, attack, attacker, result, score)
            rows.append(row)
            writer.writerow(row)
            handle.flush()
            for image in score.image_rows(target.labels.tolist()):
                image_rows.append(
                    {k: row[k] for k in ("target", "seed", "pruned_percent", "attack", "attacker")}
                    | image
                )
            kept_images[(attack, attacker, target.name, target.seed, share)] = {
                "snapshots": result.snapshots,
                "final": result.reconstruction,
                "score": score,
                "psnr": row["psnr"],
                "truth": target.truth,
                "labels": target.labels.tolist(),
            }
            bar.set_postfix(attack=attack, who=attacker, pruned=share, psnr=f"{row['psnr']:.1f}")

    summary = summarize(rows)
    _write_csv(out / "summary.csv", summary)
    _write_csv(out / "images.csv", image_rows)
    files = [csv_path, out / "summary.csv", out / "images.csv"]
    folder.record(*files)
    files += _figures(config, rows, kept_images, out)
    wall = time.perf_counter() - started
    meta = {"config": asdict(config), "setting": setting, "runs": len(rows), "wall_time_s": wall}
    (out / "sweep.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    files.append(out / "sweep.json")
    folder.complete(*files)
    return SweepResult(rows=rows, summary=summary, out=out, wall_time_s=wall, files=files)


def summarize(rows: Sequence[Dict[str, object]]) -> List[Dict[str, object]]:
    """Mean and spread over seeds per (setting, attack, attacker, share), with success counts."""
    return aggregate_rows(
        rows, ("setting", "attack", "attacker", "pruned_percent"), success_psnr=SUCCESS_PSNR
    )


def breakdown_shares(summary: Sequence[Dict[str, object]], level: float = FAILURE_PSNR):
    """Per (attack, attacker), the lowest pruned share whose mean PSNR is below ``level``."""
    out: Dict[Tuple[str, str], Optional[float]] = {}
    for row in sorted(summary, key=lambda r: float(r["pruned_percent"])):
        key = (str(row["attack"]), str(row["attacker"]))
        out.setdefault(key, None)
        if out[key] is None and float(row["psnr_mean"]) < level:
            out[key] = float(row["pruned_percent"])
    return out


def format_summary(summary: Sequence[Dict[str, object]]) -> str:
    """Plain-text table of the summary (one line per attack, attacker and pruned share)."""
    header = (
        f"{'attack':<9} {'attacker':<10} {'pruned%':>7} {'PSNR dB (mean±std)':>20} "
        f"{'min':>6} {'SSIM':>6} {'recog':>6} {'label':>6} {f'>={SUCCESS_PSNR:g}dB':>7}"
    )
    lines = [header, "-" * len(header)]
    for row in summary:
        recognized = float(row.get("recognized_mean", math.nan))
        lines.append(
            f"{row['attack']:<9} {row['attacker']:<10} {float(row['pruned_percent']):>7g} "
            f"{_pm(row['psnr_mean'], row['psnr_std']):>20} {float(row['psnr_min']):>6.1f} "
            f"{float(row['ssim_mean']):>6.3f} "
            f"{'   n/a' if math.isnan(recognized) else f'{recognized:>6.2f}'} "
            f"{float(row['label_acc_mean']):>6.2f} {row['successes']:>4}/{row['n']}"
        )
    lines.append("")
    for (attack, attacker), share in breakdown_shares(summary).items():
        where = f"from {share:g}% pruned" if share is not None else "at no pruned share tried"
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
    """PSNR plot, final-reconstruction grids and progress grids per attack.

    Rows of the grids are (attacker, seed); columns (final grid) or rows (progress grids) are
    pruned shares. In update mode each capture brings its own share, so captures line up by it.
    With batches, one more figure per (attack, attacker, seed) shows every image of the batch.
    """
    files = []
    shares = sorted({float(r["pruned_percent"]) for r in rows})
    seeds = sorted({k[3] for k in kept_images})
    for attack in config.attacks:
        attack_rows = [r for r in rows if r["attack"] == attack]
        if not attack_rows:
            continue
        files.append(
            plots.psnr_vs_rate(
                [{**r, "rate": r["pruned_percent"]} for r in attack_rows],
                out / f"psnr_vs_pruned_{attack}.png",
                title=f"{attack.upper()} vs. pruning ({attack_rows[0]['dataset']}, "
                f"{len(config.seeds)} seeds)",
            )
        )
        by_cell: Dict[Tuple[str, int, float], Dict[str, object]] = {}
        for (att, attacker, _name, seed, share), entry in kept_images.items():
            if att == attack:
                by_cell[(attacker, seed, share)] = entry
        cells, truths, row_keys = {}, {}, []
        for attacker in config.attackers:
            for seed in seeds:
                key = f"{attacker} s{seed}"
                row_keys.append(key)
                for share in shares:
                    entry = by_cell.get((attacker, seed, share))
                    if entry is not None:
                        matched = entry["score"].assignment[0]
                        cells[(key, share)] = (entry["final"][matched : matched + 1], entry["psnr"])
                        truths[key] = entry["truth"][:1]
        files.append(
            plots.final_grid(
                cells,
                truths,
                [k for k in row_keys if k in truths],
                shares,
                out / f"final_{attack}.png",
                title=f"{attack.upper()}: final reconstructions (columns: % pruned)"
                + (" - image 0 of each batch" if config.batch_size > 1 else ""),
            )
        )
        for attacker in config.attackers:
            for seed in seeds:
                entries = [
                    (s, by_cell[(attacker, seed, s)])
                    for s in shares
                    if (attacker, seed, s) in by_cell
                ]
                if not entries:
                    continue
                if entries[0][1]["truth"].shape[0] > 1:
                    files.append(
                        plots.batch_rows(
                            [(f"{s:g}%", e["final"], e["score"]) for s, e in entries],
                            entries[0][1]["truth"],
                            out / f"batch_{attack}_{attacker}_seed{seed}.png",
                            title=f"{attack.upper()} ({attacker}), seed {seed}: every image; "
                            "rows = % pruned",
                        )
                    )
                grid_rows = []
                for s, e in entries:
                    matched = e["score"].assignment[0]
                    grid_rows.append(
                        {
                            "label": f"{s:g}%",
                            "snapshots": [
                                (it, im[matched : matched + 1]) for it, im in e["snapshots"]
                            ],
                            "final": e["final"][matched : matched + 1],
                            "psnr": e["score"].psnr_per_image[0],
                            "truth": e["truth"][:1],
                        }
                    )
                files.append(
                    plots.progress_grid(
                        grid_rows,
                        grid_rows[0]["truth"][0],
                        out / f"grid_{attack}_{attacker}_seed{seed}.png",
                        iters=config.iters_for(attack),
                        every=config.snapshot_every,
                        columns=config.grid_columns,
                        title=f"{attack.upper()} ({attacker}), seed {seed}: rows = % pruned",
                    )
                )
    return files


__all__ = [
    "ATTACKERS",
    "DEFAULT_PRUNED",
    "SweepConfig",
    "SweepResult",
    "Target",
    "breakdown_shares",
    "captured_targets",
    "dlg_setting_targets",
    "format_summary",
    "run_one",
    "run_sweep",
    "summarize",
]
