"""``sf-ext audit``: what can the server reconstruct in *your* SecretFlow setting?

Given a training setting (:class:`~sf_ext.dlg.settings.FLSetting`: data, model, optimizer, lr,
batch size, local steps, pruning schedule, aggregator), the audit

1. trains it for real in SecretFlow (debug mode), next to comparison settings (by default the
   same training without any defence, and with your strategy but plain aggregation, so the effect
   of each defence shows), and records chosen rounds: every client's side and what the server
   held (:mod:`sf_ext.dlg.fl_run`);
2. builds the server's views of each round (:mod:`sf_ext.dlg.views`): one client's upload under
   plain aggregation, the aggregate (with the per-coordinate counts) under secure aggregation,
   each for a naive and, where a mask exists, a mask-aware attacker;
3. runs the strongest applicable attacks on each view: the optimizer-aware multi-step inversion
   everywhere, and iDLG with a per-layer distance where the view is a single SGD step;
4. scores every image (PSNR, SSIM, best match over the batch, whether an independently trained
   classifier recognizes it) and writes ``report.md``, ``images.csv``, ``views.csv``, an overview
   PNG and one PNG per view with every image of the batch, and prints one verdict per setting.

The verdicts say what these attacks achieved, not a proof of safety: "nothing recognizable"
means none of the attacks here produced an image the judge recognizes.
"""

import csv
import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from sf_ext.dlg.attacks import AttackResult, idlg, multistep
from sf_ext.dlg.gradients import gradient_from_update
from sf_ext.dlg.metrics import ReconstructionScore, recognized_min_ssim, score_reconstruction
from sf_ext.dlg.options import AttackOptions
from sf_ext.dlg.settings import FLSetting
from sf_ext.dlg.views import ServerView

log = logging.getLogger(__name__)

AUDIT_ATTACKS = ("multistep", "idlg")
COMPARISONS = ("no-defence", "plain-aggregation", "no-prune")
ROUND_CHOICES = ("first", "last")


@dataclass
class AuditOptions:
    """How the audit attacks (the training setting is a :class:`FLSetting`).

    Attributes:
        compare: Settings trained next to yours: ``no-defence`` (``fed_avg_w``, plain
            aggregation), ``plain-aggregation`` (your strategy, plain aggregation: what pruning
            alone does to one upload), ``no-prune`` (your aggregator with ``fed_avg_w``).
        rounds: Rounds attacked: ``first`` (epoch 0, the client's optimizer fresh, nothing
            pruned yet) and/or ``last`` (first round of the last epoch, the most pruned).
        attacks: ``multistep`` (optimizer-aware, every view) and/or ``idlg`` (per-layer L2,
            only views that are one client's single plain SGD step).
        distances: Distances the multistep attack is run with (each is one attack): cosine
            (all tensors joined) and/or cosine-layer (every tensor counts equally); which one
            works better depends on the model.
        party: Client whose upload is attacked under plain aggregation.
        iters: Attack iterations (default: 600 for multistep, 300 for idlg).
        restarts: Attack restarts (default: 1 for multistep, 3 for idlg).
        attack_seed: Seed of the attacks' dummy initializations.
        device: ``cpu`` or ``cuda`` (training and attacks).
        threads: Torch CPU threads.
        out: Output folder.
        overwrite: Replace an earlier audit with other settings in ``out``.
        progress: Show progress bars.
    """

    compare: Tuple[str, ...] = ("no-defence", "plain-aggregation")
    rounds: Tuple[str, ...] = ROUND_CHOICES
    attacks: Tuple[str, ...] = AUDIT_ATTACKS
    distances: Tuple[str, ...] = ("cosine", "cosine-layer")
    party: str = "alice"
    iters: Optional[int] = None
    restarts: Optional[int] = None
    attack_seed: int = 0
    device: str = "cpu"
    threads: int = 1
    out: str = "runs/audit"
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        self.compare = tuple(self.compare)
        self.rounds = tuple(self.rounds)
        self.attacks = tuple(self.attacks)
        self.distances = tuple(self.distances)
        self.validate()

    def validate(self) -> None:
        for name, values, allowed in (
            ("compare", self.compare, COMPARISONS),
            ("rounds", self.rounds, ROUND_CHOICES),
            ("attacks", self.attacks, AUDIT_ATTACKS),
            ("distances", self.distances, ("cosine", "cosine-layer", "l2-layer")),
        ):
            bad = [v for v in values if v not in allowed]
            if bad:
                raise ValueError(f"{name}: unknown {bad}; choose from {', '.join(allowed)}")
        if not self.rounds or not self.attacks or not self.distances:
            raise ValueError("rounds, attacks and distances must each name at least one entry")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.iters is not None and self.iters < 1:
            raise ValueError(f"iters must be >= 1, got {self.iters}")


def audit_settings(user: FLSetting, compare: Sequence[str]) -> List[Tuple[str, FLSetting]]:
    """``(key, setting)`` pairs: yours first, then the comparisons that differ from it."""
    out = [("yours", user)]
    variants = {
        "no-defence": user.replace(
            strategy="fed_avg_w", aggregator="plain", dp_noise_multiplier=0.0, update_keep=1.0
        ),
        "plain-aggregation": user.replace(aggregator="plain"),
        "no-prune": user.replace(
            strategy="fed_avg_w",
            aggregator="secure" if user.aggregator == "secure_prune" else user.aggregator,
        ),
    }
    seen = [dataclasses.replace(user, name="")]
    for key in compare:
        setting = dataclasses.replace(variants[key], name="")
        if setting in seen:
            continue
        seen.append(setting)
        out.append((key, setting))
    return out


def round_pairs(setting: FLSetting, which: Sequence[str]) -> List[Tuple[int, int]]:
    pairs = set()
    if "first" in which:
        pairs.add((0, 0))
    if "last" in which:
        pairs.add((setting.epochs - 1, 0))
    return sorted(pairs)


# --- attacking one view -----------------------------------------------------------------------
def _to_device(view: ServerView, device: str) -> ServerView:
    if device == "cpu":
        return view
    dev = torch.device(device)

    def move(items):
        if items is None:
            return None
        return [None if t is None else t.to(dev) for t in items]

    clients = []
    for c in view.clients:
        weight = c.weight if isinstance(c.weight, (int, float)) else move(c.weight)
        clients.append(dataclasses.replace(c, weight=weight, train_masks=move(c.train_masks)))
    return dataclasses.replace(
        view,
        model=view.model.to(dev),
        observed=move(view.observed),
        masks=move(view.masks),
        clients=clients,
    )


def attack_view(
    view: ServerView,
    attack: str,
    options: Optional[AttackOptions] = None,
    device: str = "cpu",
) -> Optional[AttackResult]:
    """Run ``attack`` on a server view; ``None`` when the attack does not apply to it.

    ``multistep`` applies to every view. ``idlg`` applies only to one client's single plain-SGD
    step, read as a gradient (``-update / lr``), with the ``l2-layer`` distance by default.
    """
    options = options or AttackOptions()
    view = _to_device(view, device)
    if attack == "multistep":
        first = view.clients[0]
        shape = (first.batch_size,) + view.item_shape
        return multistep(
            view.model,
            view.observed,
            shape,
            view.num_classes,
            view.optimizer,
            steps=first.steps,
            masks=view.masks,
            options=options,
            loss_fn=view.loss_fn,
            clients=view.clients,
            device=device,
        )
    if attack == "idlg":
        if not view.single_sgd_step:
            return None
        opts = (
            options if options.distance is not None else options.with_overrides(distance="l2-layer")
        )
        gradient = gradient_from_update(view.observed, view.optimizer.lr)
        shape = (view.clients[0].batch_size,) + view.item_shape
        return idlg(
            view.model,
            gradient,
            shape,
            view.num_classes,
            masks=view.masks,
            options=opts,
            loss_fn=view.loss_fn,
            device=device,
        )
    raise ValueError(f"unknown audit attack {attack!r}; choose from {AUDIT_ATTACKS}")


@dataclass
class ViewOutcome:
    """One attack on one view of one round of one setting."""

    setting: str
    round: str
    view: str
    slug: str
    attacker: str
    attack: str
    items: int
    score: ReconstructionScore
    recovered_labels: List[int]
    true_labels: List[int]
    owners: List[str]
    seconds: float
    iterations: int
    notes: Dict[str, object] = field(default_factory=dict)

    @property
    def recognized(self) -> int:
        return sum(self.score.recognized or [])

    @property
    def specific(self) -> int:
        return sum(self.score.specific or [])

    def row(self) -> Dict[str, object]:
        return {
            "setting": self.setting,
            "round": self.round,
            "view": self.view,
            "attacker": self.attacker,
            "attack": self.attack,
            "items": self.items,
            "psnr_mean": round(self.score.psnr, 3),
            "psnr_max": round(max(self.score.psnr_per_image), 3),
            "ssim_mean": round(self.score.ssim, 4),
            "ssim_max": round(max(self.score.ssim_per_image), 4),
            "recognized": self.recognized,
            "specific": self.specific,
            "label_acc": round(self.score.label_accuracy, 4),
            "seconds": round(self.seconds, 1),
            "seconds_per_iter": round(self.seconds / max(1, self.iterations), 4),
        }


def score_view(view: ServerView, result: AttackResult, judge=None) -> ReconstructionScore:
    return score_reconstruction(
        result.reconstruction, view.truth, result.label.tolist(), view.labels.tolist(), judge
    )


#: A setting "leaks" when some attack reconstructs at least this share of a batch specifically
#: (recognizable and closer to its own image than to typical images of its class); fewer is a
#: partial leak.
LEAK_SHARE = 0.25


def _strength(o: "ViewOutcome"):
    return (o.specific / max(1, o.items), o.recognized / max(1, o.items), o.score.ssim)


def verdict(outcomes: Sequence[ViewOutcome]) -> str:
    """One line: the most revealing reconstruction this setting gave any attack.

    ``LEAKS`` / ``PARTIAL LEAK``: images reconstructed specifically (see
    :attr:`sf_ext.dlg.metrics.ReconstructionScore.specific`); ``CLASS-LEVEL ONLY``: shapes
    recognizable as the right class but no closer to the client's image than to other images of
    that class; ``nothing recognizable`` otherwise.
    """
    if not outcomes:
        return "no attack applied"
    best = max(outcomes, key=_strength)
    where = f"{best.round}, {best.view} ({best.attacker}, {best.attack})"
    numbers = (
        f"best PSNR {max(best.score.psnr_per_image):.1f} dB, mean SSIM {best.score.ssim:.2f}, "
        f"labels {best.score.label_accuracy:.0%}"
    )
    if best.specific > 0:
        level = "LEAKS" if best.specific >= LEAK_SHARE * best.items else "PARTIAL LEAK"
        return (
            f"{level}: {best.specific} of {best.items} images reconstructed recognizably "
            f"({where}; {best.recognized} recognizable as their class; {numbers})"
        )
    if best.recognized > 0:
        return (
            f"CLASS-LEVEL ONLY: {best.recognized} of {best.items} reconstructions show a shape "
            f"typical of the right class, none is specific to its image ({where}; {numbers})"
        )
    return (
        f"nothing recognizable: 0 of {best.items} images ({where} came closest: best PSNR "
        f"{max(best.score.psnr_per_image):.1f} dB, best SSIM {max(best.score.ssim_per_image):.2f}; "
        f"labels {best.score.label_accuracy:.0%})"
    )


# --- the whole audit --------------------------------------------------------------------------
@dataclass
class SettingOutcome:
    key: str
    setting: FLSetting
    accuracy: List[float]
    kept_fraction: float
    train_seconds: float
    outcomes: List[ViewOutcome]
    figures: List[Path] = field(default_factory=list)
    resumed: bool = False

    @property
    def verdict(self) -> str:
        return verdict(self.outcomes)


@dataclass
class AuditResult:
    settings: List[SettingOutcome]
    out: Path
    wall_time_s: float
    report: Path


def _judge_for(setting: FLSetting, progress: bool):
    from sf_ext.dlg.judge import judge_from_arrays, load_judge

    if setting.arrays:
        from sf_ext.dlg.fl_run import load_arrays

        _, (x_test, y_test) = load_arrays(setting.arrays)
        return judge_from_arrays(x_test, y_test)
    return load_judge(setting.dataset, "train", setting.data_root, progress=progress)


def _attack_options(options: AuditOptions, attack: str) -> AttackOptions:
    iters = options.iters or (600 if attack == "multistep" else 300)
    restarts = options.restarts
    if restarts is None and attack == "multistep":
        restarts = 1
    return AttackOptions(iters=iters, restarts=restarts, seed=options.attack_seed)


def run_audit(user: FLSetting, options: AuditOptions) -> AuditResult:
    """Train, capture, attack and report (see the module docstring)."""
    from sf_ext.dlg import plots
    from sf_ext.dlg.captured import load_round
    from sf_ext.dlg.fl_run import run_setting
    from sf_ext.dlg.views import server_views
    from sf_ext.outputs import prepare_output_dir

    options.validate()
    user.validate()
    torch.set_num_threads(options.threads)
    started = time.perf_counter()
    manifest = {
        "setting": user.as_dict(),
        "options": {k: v for k, v in dataclasses.asdict(options).items() if k != "progress"},
    }
    manifest["options"].pop("overwrite")
    folder = prepare_output_dir(options.out, manifest, options.overwrite)
    out = folder.path
    judge = _judge_for(user, options.progress)
    settings = audit_settings(user, options.compare)
    results: List[SettingOutcome] = []
    for key, setting in tqdm(settings, desc="audit settings", disable=not options.progress):
        train_file = out / key / "training.json"
        rounds = round_pairs(setting, options.rounds)
        resumed = train_file.is_file()
        if resumed:
            training = json.loads(train_file.read_text())  # already trained
            names = [Path(name).name for name in training["rounds"]]
            # Captures are large and not kept everywhere (e.g. in git): train again without them.
            resumed = all((out / key / "rounds" / n / "round.json").is_file() for n in names)
        if not resumed:
            run = run_setting(
                setting, out / key / "rounds", rounds, options.progress, options.device
            )
            training = {
                "accuracy": run.val_accuracy,
                "kept_fraction": run.kept_fraction,
                "seconds": run.wall_time_s,
                "rounds": [p.name for p in run.rounds],
            }
            train_file.write_text(json.dumps(training, indent=2) + "\n")
        round_dirs = [out / key / "rounds" / Path(name).name for name in training["rounds"]]
        folder.record(*[p for p in (out / key).rglob("*") if p.is_file()])
        outcomes: List[ViewOutcome] = []
        jobs = []
        for round_dir in round_dirs:
            round_ = load_round(round_dir)
            for view in server_views(round_, party=options.party):
                for attack in options.attacks:
                    for distance in options.distances if attack == "multistep" else ("l2-layer",):
                        jobs.append((round_dir.name, view, attack, distance))
        bar = tqdm(jobs, desc=f"attacks on {key}", disable=not options.progress, leave=False)
        for round_name, view, attack, distance in bar:
            outcome = _attack_or_resume(
                out, key, round_name, view, attack, distance, options, judge
            )
            if outcome is None:
                continue
            outcomes.append(outcome)
            bar.set_postfix(view=view.attacker, psnr=f"{outcome.score.psnr:.1f}")
        folder.record(*[p for p in (out / key / "attacks").rglob("*") if p.is_file()])
        results.append(
            SettingOutcome(
                key,
                setting,
                training["accuracy"],
                training["kept_fraction"],
                training["seconds"],
                outcomes,
                resumed=resumed,
            )
        )
    files = _write_outputs(out, results, judge, plots)
    wall = time.perf_counter() - started
    timing_file = out / "timing.json"
    if not timing_file.is_file():  # the run that trained and attacked
        timing_file.write_text(json.dumps({"first_run_wall_s": wall}) + "\n")
    first_wall = json.loads(timing_file.read_text())["first_run_wall_s"]
    report = _write_report(out, user, options, results, judge, wall, first_wall)
    folder.complete(*files, report, timing_file)
    return AuditResult(results, out, wall, report)


def view_digest(view: ServerView) -> str:
    """A fingerprint of everything an attack on ``view`` depends on: two settings that give the
    server the very same observation (e.g. the first round, before any pruning, with and without
    ``fed_avg_w_prune``) are attacked once."""
    digest = hashlib.sha1()

    def add(tensors):
        for t in tensors or []:
            if t is None:
                digest.update(b"none")
            elif isinstance(t, (int, float)):
                digest.update(repr(float(t)).encode())
            else:
                digest.update(t.detach().cpu().contiguous().float().numpy().tobytes())

    add(view.observed)
    add(view.masks)
    add([p for p in view.model.parameters()])
    add([view.truth])
    for c in view.clients:
        digest.update(f"{c.batch_size},{c.steps}".encode())
        add(c.weight if not isinstance(c.weight, (int, float)) else [c.weight])
        add(c.train_masks)
    digest.update(view.optimizer.describe().encode())
    return digest.hexdigest()


_RESULTS_BY_DIGEST: Dict[Tuple[str, str, str], AttackResult] = {}


def _attack_or_resume(
    out, key, round_name, view, attack, distance, options, judge
) -> Optional[ViewOutcome]:
    label = f"{attack}-{distance}"
    file = out / key / "attacks" / round_name / f"{view.slug}_{view.attacker}_{label}.pt"
    digest = (view_digest(view), attack, distance)
    if file.is_file():
        saved = torch.load(file, map_location="cpu")
        result = saved["result"]
    elif digest in _RESULTS_BY_DIGEST:
        result = _RESULTS_BY_DIGEST[digest]  # the same observation was attacked already
        file.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"result": result, "same_as_earlier": True}, file)
    else:
        attack_options = _attack_options(options, attack).with_overrides(distance=distance)
        result = attack_view(view, attack, attack_options, options.device)
        if result is None:
            return None
        file.parent.mkdir(parents=True, exist_ok=True)
        result = dataclasses.replace(result, snapshots=[], loss_history=result.loss_history[-1:])
        torch.save({"result": result}, file)
        _RESULTS_BY_DIGEST[digest] = result
    score = score_view(view, result, judge)
    return ViewOutcome(
        setting=key,
        round=round_name,
        view=view.name,
        slug=view.slug,
        attacker=view.attacker,
        attack=label,
        items=len(view.labels),
        score=score,
        recovered_labels=result.label.tolist(),
        true_labels=view.labels.tolist(),
        owners=view.owners,
        seconds=result.wall_time_s,
        iterations=result.iterations,
        notes={**view.notes, "reconstruction": result.reconstruction, "truth": view.truth},
    )


def _write_outputs(out: Path, results: Sequence[SettingOutcome], judge, plots) -> List[Path]:
    files = []
    views_csv = out / "views.csv"
    images_csv = out / "images.csv"
    view_rows, image_rows = [], []
    for s in results:
        for o in s.outcomes:
            view_rows.append({**o.row(), "verdict_setting": s.key})
            for row in o.score.image_rows(o.true_labels):
                image_rows.append(
                    {
                        "setting": s.key,
                        "round": o.round,
                        "view": o.view,
                        "attacker": o.attacker,
                        "attack": o.attack,
                        "owner": o.owners[row["image"]],
                        **row,
                    }
                )
            fig = plots.batch_grid(
                o.notes["truth"],
                o.notes["reconstruction"],
                o.score,
                out / "figures" / f"{s.key}_{o.round}_{o.slug}_{o.attacker}_{o.attack}.png",
                title=f"{s.key}: {o.round}, {o.view}, {o.attacker} attacker, {o.attack}",
                labels=o.true_labels,
            )
            s.figures.append(fig)
            files.append(fig)
    for path, rows in ((views_csv, view_rows), (images_csv, image_rows)):
        with path.open("w", newline="") as handle:
            if rows:
                writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
        files.append(path)
    overview = []
    for s in results:
        if not s.outcomes:
            continue
        overview.append((s.key, max(s.outcomes, key=_strength)))
    if overview:
        files.append(plots.audit_overview(overview, out / "overview.png"))
    return files


def _format_setting(setting: FLSetting) -> str:
    return setting.label()


def _write_report(out, user, options, results, judge, wall, first_wall=None) -> Path:
    sides = [o.notes["truth"].shape[-1] for s in results for o in s.outcomes]
    floor = recognized_min_ssim(min(sides) if sides else 28)
    lines = [
        "# Privacy audit",
        "",
        f"Your setting: {user.label()} ({user.dataset if not user.arrays else user.arrays}, "
        f"{user.model}, {user.samples or 'all'} training images split {list(user.split)}, "
        f"{user.epochs} epochs, seed {user.seed}).",
        "",
        "## Verdicts",
        "",
    ]
    base = next((s for s in results if s.key == "no-defence"), None)
    for s in results:
        cost = ""
        if base is not None and s is not base and s.accuracy and base.accuracy:
            cost = f"; accuracy {s.accuracy[-1]:.3f} vs {base.accuracy[-1]:.3f} without defence"
        elif s.accuracy:
            cost = f"; accuracy {s.accuracy[-1]:.3f}"
        lines.append(f"- **{s.key}** ({_format_setting(s.setting)}): {s.verdict}{cost}.")
    lines += [
        "",
        "Recognizable = an independently trained classifier (accuracy "
        f"{judge.held_out_accuracy:.3f} on real held-out images) names the true class and the "
        f"SSIM to the true image is at least {floor:g}; specific = recognizable and more similar "
        "to its own image than to 90 % of real images of its class (a class-typical shape is not"
        " a leak of one client's image). Attacks: "
        + ", ".join(options.attacks)
        + f"; rounds: {', '.join(options.rounds)}. The server is modelled as honest-but-curious:"
        " it knows the global model, the clients' optimizer and hyperparameters, batch sizes"
        " and local steps, never a client's data or optimizer state.",
        "",
        "![overview](overview.png)",
        "",
        "## Every attack",
        "",
        "| setting | round | view | attacker | attack | images | PSNR mean / max | SSIM mean / max "
        "| recognizable | specific | labels | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in results:
        for o in s.outcomes:
            r = o.row()
            lines.append(
                f"| {s.key} | {o.round} | {o.view} | {o.attacker} | {o.attack} | {o.items} | "
                f"{r['psnr_mean']:.1f} / {r['psnr_max']:.1f} | {r['ssim_mean']:.2f} / "
                f"{r['ssim_max']:.2f} | {o.recognized}/{o.items} | {o.specific}/{o.items} | "
                f"{r['label_acc']:.0%} | "
                f"{r['seconds']:.0f} |"
            )
    lines += [
        "",
        "## Training",
        "",
        "| setting | accuracy per epoch | kept | s |",
        "|---|---|---|---|",
    ]
    for s in results:
        acc = " ".join(f"{a:.3f}" for a in s.accuracy)
        lines.append(f"| {s.key} | {acc} | {s.kept_fraction:.3f} | {s.train_seconds:.0f} |")
    resumed = ""
    if any(s.resumed for s in results):
        took = f", which took {first_wall:.0f} s" if first_wall else ""
        resumed = f" (this run read trainings and attacks back from an earlier one{took})"
    lines += [
        "",
        f"Wall time of the audit: {wall:.0f} s{resumed}. Per-image scores: `images.csv`; per "
        "attack: `views.csv`; every image of every attacked batch: `figures/`.",
        "",
    ]
    notes = [
        (s.key, o.round, o.notes.get("single_keeper_share"))
        for s in results
        for o in s.outcomes
        if o.notes.get("single_keeper_share") is not None and o.attacker == "mask-aware"
    ]
    if notes:
        lines.append("What the SecurePruneAggregator counts reveal (share of weight coordinates")
        lines.append("that exactly one client kept, whose weight the server therefore reads):")
        lines.append("")
        for key, round_name, share in dict(((k, r), (k, r, v)) for k, r, v in notes).values():
            lines.append(f"- {key}, {round_name}: {share:.2%}")
        lines.append("")
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def format_verdicts(result: AuditResult) -> str:
    """The verdict lines as printed by the command."""
    width = max(len(s.key) for s in result.settings)
    lines = []
    for s in result.settings:
        acc = f"acc {s.accuracy[-1]:.3f}" if s.accuracy else "acc n/a"
        lines.append(f"{s.key:<{width}}  {acc}  {s.verdict}")
    return "\n".join(lines)


__all__ = [
    "AUDIT_ATTACKS",
    "AuditOptions",
    "AuditResult",
    "attack_view",
    "audit_settings",
    "format_verdicts",
    "run_audit",
    "verdict",
]


def build_parser():
    """``sf-ext audit`` flags: one per :class:`FLSetting` field, one per :class:`AuditOptions`."""
    import argparse

    from sf_ext.dlg.flags import add_dataclass_arguments
    from sf_ext.dlg.settings import add_setting_arguments

    parser = argparse.ArgumentParser(
        prog="sf-ext audit",
        description="What can the server reconstruct in your SecretFlow setting? Trains it, "
        "captures what the server holds, attacks it and writes report.md with a verdict per "
        "setting.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    training = parser.add_argument_group("your training setting")
    setting_fields = add_setting_arguments(training)
    audit = parser.add_argument_group("the audit")
    option_fields = add_dataclass_arguments(
        audit, AuditOptions, choices={"device": ("cpu", "cuda")}
    )
    parser.set_defaults(setting_fields=setting_fields, option_fields=option_fields)
    return parser


def main(argv=None) -> int:
    """Entry point of ``sf-ext audit``; exit code 2 for a user's mistake."""
    import sys

    from sf_ext.dlg.flags import dataclass_from_args
    from sf_ext.outputs import OutputDirError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        setting = dataclass_from_args(FLSetting, args, args.setting_fields)
        options = dataclass_from_args(AuditOptions, args, args.option_fields)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    if options.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device here")
    if setting.arrays is not None:
        from sf_ext.dlg.fl_run import load_arrays

        try:
            load_arrays(setting.arrays)
        except (FileNotFoundError, ValueError) as exc:
            parser.error(str(exc))
    elif setting.dataset != "digits":
        from sf_ext.data import DatasetNotFoundError, load_dataset

        try:
            load_dataset(setting.dataset, setting.data_root, "test")
        except (DatasetNotFoundError, ValueError) as exc:
            parser.error(str(exc))
    try:
        result = run_audit(setting, options)
    except (ValueError, FileNotFoundError, OutputDirError) as exc:
        parser.error(str(exc))
    print(format_verdicts(result))
    print(f"\nreport: {result.report} ({result.wall_time_s:.0f} s)", file=sys.stdout)
    return 0


if __name__ == "__main__":  # pragma: no cover
    import sys

    sys.exit(main())
