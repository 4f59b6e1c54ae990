"""Command line: ``python -m sf_ext.dlg {attack,sweep,capture} ...`` (also ``sf-ext dlg ...``).

``attack`` and ``sweep`` take the same flags, generated from :class:`~sf_ext.dlg.sweep.SweepConfig`
(one flag per field), and differ in defaults: ``attack`` runs one DLG on one image (nothing
pruned, seed 0, naive attacker) unless told otherwise, ``sweep`` the whole grid (0-90 % pruned,
seeds 0-2, naive and mask-aware). Both print the summary table and write CSVs and figures to
``--out``. ``capture`` trains a small SecretFlow job (flags generated from
:class:`~sf_ext.dlg.settings.FLSetting`) and records chosen rounds of every client and of the
server. A mistake in a flag is reported with a message and exit code 2.
"""

import argparse
import logging
import sys
from typing import List, Optional, Sequence

from sf_ext.dlg.flags import add_dataclass_arguments, dataclass_from_args
from sf_ext.dlg.labels import LABEL_METHODS
from sf_ext.dlg.options import DISTANCES
from sf_ext.dlg.settings import FLSetting, add_setting_arguments
from sf_ext.dlg.sweep import ATTACKERS, DEFAULT_PRUNED, SOURCES, SweepConfig

QUICK_ITERS = 50
QUICK_PRUNED = (0, 50, 90)

_SWEEP_DEFAULTS = {
    "attack": {
        "pruned_percent": (0.0,),
        "attacks": ("dlg",),
        "attackers": ("naive",),
        "seeds": (0,),
        "out": "runs/dlg_attack",
    },
    "sweep": {
        "pruned_percent": DEFAULT_PRUNED,
        "attacks": ("dlg",),
        "attackers": ATTACKERS,
        "seeds": (0, 1, 2),
        "out": "runs/dlg_sweep",
    },
}


class _Renamed(argparse.Action):
    """A flag that no longer exists: say what replaced it (exit 2)."""

    def __init__(self, option_strings, dest, replacement: str = "", **kwargs):
        self.replacement = replacement
        super().__init__(option_strings, dest, nargs="?", help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} was renamed: {self.replacement}")


def _sweep_parser(sub, name: str, help_text: str):
    parser = sub.add_parser(
        name, help=help_text, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    names = add_dataclass_arguments(
        parser,
        SweepConfig,
        defaults=_SWEEP_DEFAULTS[name],
        choices={
            "distance": DISTANCES,
            "label_method": LABEL_METHODS,
            "source": SOURCES,
            "device": ("cpu", "cuda"),
        },
    )
    parser.add_argument(
        "--rates",
        action=_Renamed,
        replacement="use --pruned-percent (percent of weight entries zeroed; note that "
        "fed_avg_w_prune's prune_end_rate is the fraction kept)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {QUICK_ITERS} iterations, pruned {QUICK_PRUNED} (sweep), first seed",
    )
    parser.add_argument(
        "--judge",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="score recognizability with an independently trained classifier (trained once "
        "per dataset and cached)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(config_fields=names)
    return parser


def _rounds(text: str):
    pairs = []
    for item in (v.strip() for v in text.split(",") if v.strip()):
        if item in ("first", "last"):
            pairs.append(item)
            continue
        try:
            epoch, step = (int(v) for v in item.split(":"))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"rounds are 'first', 'last' or EPOCH:STEP pairs like 0:0,2:4; got {item!r}"
            ) from None
        pairs.append((epoch, step))
    if not pairs:
        raise argparse.ArgumentTypeError("give at least one round")
    return pairs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sf_ext.dlg",
        description="Gradient-inversion (DLG) audits of pruned FL uploads.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _sweep_parser(sub, "attack", "attack one image (or capture) and report")
    _sweep_parser(sub, "sweep", "pruned shares x attacks x attackers x seeds")
    capture = sub.add_parser(
        "capture",
        help="train a SecretFlow job and record chosen rounds (clients and server)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    names = add_setting_arguments(capture)
    capture.add_argument(
        "--rounds",
        type=_rounds,
        default=["first", "last"],
        help="rounds to record: first, last, or EPOCH:STEP pairs",
    )
    capture.add_argument("--out", default="runs/captures", help="output folder")
    capture.add_argument("--overwrite", action="store_true", help="replace an earlier capture")
    capture.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    capture.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    capture.set_defaults(setting_fields=names)
    return parser


def _sweep_config(args: argparse.Namespace) -> SweepConfig:
    config = dataclass_from_args(SweepConfig, args, args.config_fields)
    if args.quick:
        config.iters = QUICK_ITERS if config.iters is None else config.iters
        if args.command == "sweep":
            config.pruned_percent = QUICK_PRUNED
        config.seeds = tuple(config.seeds[:1])
        config.restarts = 1 if config.restarts is None else config.restarts
    return config


def _check_cuda(parser: argparse.ArgumentParser, device: str) -> None:
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda, but torch sees no CUDA device here")


def _capture(parser, args) -> int:
    from sf_ext.outputs import prepare_output_dir

    try:
        setting = dataclass_from_args(FLSetting, args, args.setting_fields)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    # Imports SecretFlow: only once the flags are known to be valid.
    from sf_ext.dlg.fl_run import default_rounds

    rounds = []
    for item in args.rounds:
        if item == "first":
            rounds.append((0, 0))
        elif item == "last":
            rounds.append(default_rounds(setting)[-1])
        else:
            rounds.append(item)
    _check_cuda(parser, args.device)
    from sf_ext.dlg.fl_run import run_setting

    folder = prepare_output_dir(
        args.out, {"setting": setting.as_dict(), "rounds": sorted(set(rounds))}, args.overwrite
    )
    run = run_setting(setting, folder.path, sorted(set(rounds)), not args.no_progress, args.device)
    folder.complete(*[p / "round.json" for p in run.rounds])
    accuracy = " ".join(f"{a:.3f}" for a in run.val_accuracy)
    print(f"validation accuracy per epoch: {accuracy}; kept fraction {run.kept_fraction:.3f}")
    for path in run.rounds:
        print(f"round written to {path}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the process exit code (2 for a user's mistake)."""
    from sf_ext.outputs import OutputDirError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "capture":
        try:
            return _capture(parser, args)
        except (ValueError, FileNotFoundError, OutputDirError) as exc:
            parser.error(str(exc))
    try:
        config = _sweep_config(args)
        config.validate()
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    _check_cuda(parser, config.device)
    from sf_ext.dlg.sweep import format_summary, run_sweep

    try:
        judge = None
        if args.judge:
            from sf_ext.dlg.judge import load_judge

            split = "train" if config.captures else "test"
            dataset = config.dataset
            if config.captures:
                from sf_ext.dlg.sweep import _load_client

                meta = _load_client(config.captures[0], config.party).meta
                dataset = meta.get("dataset", dataset)
            judge = load_judge(dataset, split, config.data_root, progress=not args.no_progress)
        result = run_sweep(config, progress=not args.no_progress, judge=judge)
    except (ValueError, FileNotFoundError, OutputDirError) as exc:
        parser.error(str(exc))
    print(format_summary(result.summary))
    what = "read back from" if result.resumed else "outputs in"
    print(f"\n{len(result.rows)} runs in {result.wall_time_s:.1f} s; {what} {result.out}/")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


__all__: List[str] = ["build_parser", "main"]
