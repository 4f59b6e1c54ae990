"""Command line: ``python -m sf_ext.dlg {attack,sweep,capture} ...``.

``attack`` and ``sweep`` share their flags and differ in defaults: ``attack`` runs one DLG on one
image (rate 0, seed 0, naive attacker) unless told otherwise, ``sweep`` runs the full grid (rates
0-90 %, seeds 0-2, naive and mask-aware). Both print the summary table and write CSV and figures
to ``--out``. ``capture`` runs a small SecretFlow job and records one client's round.

:func:`main` takes ``argv`` so it can back a console script (``sf-ext dlg ...``).
"""

import argparse
import sys
from typing import List, Optional, Sequence

from sf_ext.dlg.attacks import ATTACKS
from sf_ext.dlg.sweep import ATTACKERS, DEFAULT_RATES, SweepConfig, format_summary, run_sweep

QUICK_ITERS = 50
QUICK_RATES = (0, 50, 90)


def _floats(text: str) -> List[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


def _ints(text: str) -> List[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected integers like 0,1,2, got {text!r}") from exc


def _names(choices: Sequence[str]):
    def parse(text: str) -> List[str]:
        names = [v.strip() for v in text.split(",") if v.strip()]
        bad = [n for n in names if n not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(choices)}")
        return names

    return parse


def _add_attack_flags(parser: argparse.ArgumentParser, defaults: dict) -> None:
    parser.add_argument("--dataset", default="fashion-mnist", help="test images to attack")
    parser.add_argument("--data-root", default=None, help="data folder (default: SF_EXT_DATA)")
    parser.add_argument(
        "--rates", type=_floats, default=defaults["rates"], help="pruning rates in %% (e.g. 0,50)"
    )
    parser.add_argument(
        "--attacks",
        type=_names(sorted(ATTACKS)),
        default=defaults["attacks"],
        help=f"comma-separated, from {', '.join(sorted(ATTACKS))}",
    )
    parser.add_argument(
        "--attackers",
        type=_names(ATTACKERS),
        default=defaults["attackers"],
        help="naive and/or mask-aware",
    )
    parser.add_argument("--seeds", type=_ints, default=defaults["seeds"], help="e.g. 0,1,2")
    parser.add_argument(
        "--iters", type=int, default=None, help="iterations per run (default 300; ig 1000)"
    )
    parser.add_argument("--batch-size", type=int, default=1, help="images per gradient")
    parser.add_argument("--image-index", type=int, default=None, help="fixed test image index")
    parser.add_argument(
        "--restarts",
        type=int,
        default=3,
        help="extra L-BFGS starts of dlg/idlg within --iters (0: original single start)",
    )
    parser.add_argument(
        "--distance",
        choices=("l2", "l2-layer"),
        default="l2",
        help="dlg/idlg gradient distance: l2 (original) or l2-layer (per-tensor normalized)",
    )
    parser.add_argument("--ig-restarts", type=int, default=2, help="restarts of the ig attack")
    parser.add_argument(
        "--capture",
        nargs="+",
        default=(),
        help="capture folders to attack instead of DLG's own setting",
    )
    parser.add_argument(
        "--source",
        choices=("gradient", "update"),
        default="gradient",
        help="captured: prune the first-batch gradient, or attack the upload as sent",
    )
    parser.add_argument("--snapshot-every", type=int, default=10)
    parser.add_argument("--out", default=defaults["out"], help="output folder")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {QUICK_ITERS} iterations, rates {QUICK_RATES}, first seed only",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sf_ext.dlg", description="Gradient-inversion (DLG) audits of pruned FL uploads."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    attack = sub.add_parser("attack", help="attack one image (or capture) and report")
    _add_attack_flags(
        attack,
        {
            "rates": [0.0],
            "attacks": ["dlg"],
            "attackers": ["naive"],
            "seeds": [0],
            "out": "runs/dlg_attack",
        },
    )
    sweep = sub.add_parser("sweep", help="pruning rates x attacks x attackers x seeds")
    _add_attack_flags(
        sweep,
        {
            "rates": list(DEFAULT_RATES),
            "attacks": ["dlg"],
            "attackers": list(ATTACKERS),
            "seeds": [0, 1, 2],
            "out": "runs/dlg_sweep",
        },
    )
    capture = sub.add_parser("capture", help="record one client's round from a SecretFlow run")
    capture.add_argument("--strategy", choices=("fed_avg_w", "fed_avg_w_prune"), required=True)
    capture.add_argument("--out", default="runs", help="base folder (capture goes in a subfolder)")
    capture.add_argument("--name", default=None, help="capture subfolder name")
    capture.add_argument("--dataset", default="fashion-mnist")
    capture.add_argument("--data-root", default=None)
    capture.add_argument("--model", default="dlg-lenet", help="model name from sf_ext.models")
    capture.add_argument("--samples", type=int, default=32, help="training images, both clients")
    capture.add_argument("--batch-size", type=int, default=1)
    capture.add_argument("--epochs", type=int, default=2)
    capture.add_argument("--capture-epoch", type=int, default=1)
    capture.add_argument("--capture-step", type=int, default=0)
    capture.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    capture.add_argument("--lr", type=float, default=0.01)
    capture.add_argument("--prune-percent", type=float, default=50.0)
    capture.add_argument("--prune-end-rate", type=float, default=0.1)
    capture.add_argument("--seed", type=int, default=0)
    capture.add_argument("--party", default="alice")
    return parser


def _sweep_config(args: argparse.Namespace) -> SweepConfig:
    config = SweepConfig(
        dataset=args.dataset,
        data_root=args.data_root,
        rates=tuple(args.rates),
        attacks=tuple(args.attacks),
        attackers=tuple(args.attackers),
        seeds=tuple(args.seeds),
        iters=args.iters,
        snapshot_every=args.snapshot_every,
        batch_size=args.batch_size,
        image_index=args.image_index,
        restarts=args.restarts,
        distance=args.distance,
        ig_restarts=args.ig_restarts,
        captures=tuple(args.capture),
        source=args.source,
        device=args.device,
        threads=args.threads,
        out=args.out,
    )
    if args.quick:
        config.iters = QUICK_ITERS if args.iters is None else args.iters
        config.rates = QUICK_RATES if args.command == "sweep" else config.rates
        config.seeds = tuple(config.seeds[:1])
        config.ig_restarts = 1
    return config


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "capture":
        from sf_ext.dlg.capture import run_capture

        folder = run_capture(
            strategy=args.strategy,
            out_dir=args.out,
            name=args.name,
            dataset=args.dataset,
            data_root=args.data_root,
            model=args.model,
            samples=args.samples,
            batch_size=args.batch_size,
            epochs=args.epochs,
            capture_epoch=args.capture_epoch,
            capture_step=args.capture_step,
            optimizer=args.optimizer,
            lr=args.lr,
            prune_percent=args.prune_percent,
            prune_end_rate=args.prune_end_rate,
            seed=args.seed,
            party=args.party,
        )
        print(f"capture written to {folder}")
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("error: --device cuda but CUDA is not available", file=sys.stderr)
            return 2
    config = _sweep_config(args)
    try:
        result = run_sweep(config, progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(result.summary))
    print(f"\n{len(result.rows)} runs in {result.wall_time_s:.1f} s; outputs in {result.out}/")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
