"""The seed experiment end to end in SecretFlow: what pruning costs, and what it protects.

alice holds 40 % and bob 60 % of Fashion-MNIST (scikit-learn's digits when the files are absent,
with a loud notice), charlie aggregates. The same model trains once with ``fed_avg_w`` +
``SecureAggregator`` and once with ``fed_avg_w_prune`` + ``SecurePruneAggregator``. The demo
prints a table (final accuracy, kept fraction, time per epoch) and a privacy panel: what a server
reconstructs from alice's upload in the first round of the last epoch (the most pruned one) with
the optimizer-aware attack, for ``fed_avg_w`` and for ``fed_avg_w_prune`` with a naive and a
mask-aware attacker (the view of a server without secure aggregation: with it, the server holds
only the aggregate, see ``sf-ext audit``). It saves ``demo.png`` (accuracy beside the
reconstructions), ``accuracy_per_epoch.png``, ``privacy_panel.png`` and ``results.json``.

Run ``python -m sf_ext.demo --out runs/demo`` (``make demo`` does). An identical rerun into the same
folder reads the results back; other settings there are refused unless ``--overwrite``.
"""

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STRATEGIES = (("fed_avg_w", "secure"), ("fed_avg_w_prune", "secure_prune"))
log = logging.getLogger("sf_ext.demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sf_ext.demo",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --out")
    parser.add_argument(
        "--data-root",
        default=None,
        help="data folder (default: $SF_EXT_DATA, ../shared/data, /usr/share/datasets)",
    )
    parser.add_argument(
        "--dataset", default="fashion-mnist", help="dataset; falls back to digits if absent"
    )
    parser.add_argument("--limit", type=int, default=12000, help="training samples (0: all)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--aggregate-freq", type=int, default=2, help="local steps per round")
    parser.add_argument(
        "--prune-percent", type=float, default=5, help="%% of alive weights pruned per epoch"
    )
    parser.add_argument(
        "--prune-end-rate", type=float, default=0.1, help="fraction of weights kept at the end"
    )
    parser.add_argument("--prune-scope", choices=["layer", "global"], default="layer")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--attack-iters",
        type=int,
        default=150,
        help="iterations of each privacy-panel attack (0: no privacy panel)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (SecretFlow's debug mode is overhead-bound; more threads rarely help)",
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    return parser


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from sf_ext.pruning import validate_prune_params

    try:
        validate_prune_params(args.prune_percent, args.prune_end_rate)
    except ValueError as exc:
        parser.error(str(exc))
    for name in ("epochs", "batch_size", "aggregate_freq", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.limit < 0 or args.attack_iters < 0:
        parser.error("--limit and --attack-iters must be >= 0")
    if args.lr <= 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda, but torch sees no CUDA device here")


def _dataset(args) -> str:
    from sf_ext.data import resolve_dataset

    # Falls back to scikit-learn's digits when the files are missing, and says so loudly.
    return resolve_dataset(args.dataset, root=args.data_root, fallback="digits")


def _settings(args) -> Dict[str, object]:
    values = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    for key in ("out", "overwrite", "threads", "device"):
        values.pop(key)
    return values


def _print_tables(record: dict) -> None:
    print(
        f"\nDataset: {record['dataset']}, model: {record['model']}, alice 40 % / bob 60 %, "
        "server charlie"
    )
    print(f"{'strategy':<18}{'final val acc':>14}{'kept fraction':>15}{'s / epoch':>11}")
    for strategy, r in record["results"].items():
        per_epoch = sum(r["epoch_seconds"]) / max(1, len(r["epoch_seconds"]))
        print(
            f"{strategy:<18}{r['val_accuracy'][-1]:>14.4f}{r['final_kept_fraction']:>15.3f}"
            f"{per_epoch:>11.2f}"
        )
    panel = record.get("privacy")
    if panel:
        print(
            f"\nPrivacy panel: what a server reconstructs from alice's upload in round "
            f"{panel['round']} ({panel['images']} images, optimizer-aware attack, "
            f"{panel['iters']} iterations)"
        )
        print(f"{'upload':<40}{'PSNR dB':>9}{'SSIM':>7}{'specific':>10}{'class only':>12}")
        for row in panel["rows"]:
            print(
                f"{row['label']:<40}{row['psnr']:>9.1f}{row['ssim']:>7.2f}"
                f"{row['specific']:>6}/{panel['images']}"
                f"{row['recognized'] - row['specific']:>8}/{panel['images']}"
            )
        print(
            f"(recognizable: the judge classifier, accuracy {panel['judge_accuracy']:.3f} on "
            f"real images, names the true class and SSIM >= {panel.get('ssim_floor', 0.3):g}; "
            "specific: also closer to its own image than to 90 % of images of its class)"
        )


def _accuracy_axes(ax, runs: dict, name: str) -> None:
    for strategy, run in runs.items():
        epochs = range(1, len(run.val_accuracy) + 1)
        ax.plot(epochs, run.val_accuracy, marker="o", label=f"{strategy} (validation)")
        ax.plot(epochs, run.train_accuracy, linestyle="--", label=f"{strategy} (train)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.set_title(f"FLModel on {name}: fed_avg_w vs fed_avg_w_prune", fontsize=9)
    ax.grid(alpha=0.3)
    pruned = runs["fed_avg_w_prune"]
    kept_axis = ax.twinx()
    kept_axis.plot(
        range(1, len(pruned.kept_per_epoch) + 1),
        pruned.kept_per_epoch,
        color="gray",
        linestyle=":",
        marker=".",
        label="kept fraction (prune)",
    )
    kept_axis.set_ylabel("kept fraction of weights")
    kept_axis.set_ylim(0, 1.05)
    lines, labels = ax.get_legend_handles_labels()
    more_lines, more_labels = kept_axis.get_legend_handles_labels()
    ax.legend(lines + more_lines, labels + more_labels, loc="lower right", fontsize=7)


def _privacy_axes(fig, spec, panel_rows, truth, show: int = 8) -> None:
    from sf_ext.dlg.plots import _mark, _show

    grid = spec.subgridspec(len(panel_rows) + 1, show, hspace=0.5, wspace=0.1)
    for c in range(min(show, truth.shape[0])):
        ax = fig.add_subplot(grid[0, c])
        _show(ax, truth[c], "true" if c == 0 else None)
    for r, row in enumerate(panel_rows, start=1):
        score, recon = row["score"], row["reconstruction"]
        for c in range(min(show, truth.shape[0])):
            ax = fig.add_subplot(grid[r, c])
            mark, color = _mark(score, c)
            _show(ax, recon[score.assignment[c]], f"{score.psnr_per_image[c]:.0f}dB{mark}", 6)
            ax.title.set_color(color)
            if c == 0:
                ax.set_ylabel(
                    row["label"].replace(", ", "\n"),
                    fontsize=6,
                    rotation=0,
                    ha="right",
                    va="center",
                )


def _privacy_panel(runs: dict, iters: int, dataset: str, progress: bool):
    """Attack alice's upload of the recorded round in both runs; rows for the panel."""
    from sf_ext.dlg.audit import attack_view, score_view
    from sf_ext.dlg.captured import load_round
    from sf_ext.dlg.judge import load_judge
    from sf_ext.dlg.options import AttackOptions
    from sf_ext.dlg.views import upload_view

    judge = load_judge(dataset, "train", runs["fed_avg_w"].setting.data_root, progress=progress)
    rows, truth, round_name = [], None, ""
    jobs = [("fed_avg_w", "naive"), ("fed_avg_w_prune", "naive"), ("fed_avg_w_prune", "mask-aware")]
    for strategy, attacker in jobs:
        round_ = load_round(runs[strategy].rounds[0])
        capture = round_.clients["alice"]
        view = upload_view(capture, attacker)
        options = AttackOptions(iters=iters, restarts=1, seed=0)
        started = time.perf_counter()
        result = attack_view(view, "multistep", options)
        score = score_view(view, result, judge)
        truth, round_name = view.truth, round_.path.name
        kept = view.notes.get("kept_fraction", 1.0)
        label = f"{strategy}, {attacker}" + (f", {kept:.0%} kept" if kept < 1 else "")
        rows.append(
            {
                "label": label,
                "score": score,
                "reconstruction": result.reconstruction,
                "psnr": score.psnr,
                "ssim": score.ssim,
                "recognized": sum(score.recognized or []),
                "specific": sum(score.specific or []),
                "seconds": time.perf_counter() - started,
            }
        )
    return rows, truth, round_name, judge


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit code (2 for a user's mistake, with a message)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check(parser, args)
    from sf_ext.outputs import OutputDirError, prepare_output_dir

    try:
        folder = prepare_output_dir(args.out, _settings(args), args.overwrite)
    except OutputDirError as exc:
        parser.error(str(exc))
    results_file = folder.path / "results.json"
    if folder.complete_before and results_file.is_file():
        print(f"[demo] {folder.path} already holds this demo's results; reading them back")
        _print_tables(json.loads(results_file.read_text()))
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import torch

    torch.set_num_threads(args.threads)
    from sf_ext.dlg.fl_run import run_setting
    from sf_ext.dlg.metrics import recognized_min_ssim
    from sf_ext.dlg.settings import FLSetting

    started = time.perf_counter()
    name = _dataset(args)
    model = "mlp" if name == "digits" else "lenet"
    base = FLSetting(
        dataset=name,
        data_root=args.data_root,
        samples=args.limit if name != "digits" else 0,
        split=(0.4, 0.6),
        model=model,
        optimizer="adam",
        lr=args.lr,
        batch_size=args.batch_size,
        local_steps=args.aggregate_freq,
        epochs=args.epochs,
        prune_percent=args.prune_percent,
        prune_end_rate=args.prune_end_rate,
        prune_scope=args.prune_scope,
        seed=args.seed,
    )
    runs = {}
    last_round = [(args.epochs - 1, 0)]
    for strategy, aggregator in STRATEGIES:
        setting = base.replace(strategy=strategy, aggregator=aggregator, name=strategy)
        runs[strategy] = run_setting(
            setting, folder.path / "rounds" / strategy, last_round, True, args.device
        )
    record = {
        "dataset": name,
        "model": "MLP" if model == "mlp" else "LeNet",
        "args": _settings(args),
        "results": {
            s: {
                "val_accuracy": r.val_accuracy,
                "train_accuracy": r.train_accuracy,
                "epoch_seconds": r.epoch_seconds,
                "kept_fraction": r.kept_per_epoch,
                "final_kept_fraction": r.kept_fraction,
            }
            for s, r in runs.items()
        },
    }
    panel_rows: List[dict] = []
    if args.attack_iters:
        panel_rows, truth, round_name, judge = _privacy_panel(
            runs, args.attack_iters, name, progress=True
        )
        record["privacy"] = {
            "round": round_name,
            "images": int(truth.shape[0]),
            "iters": args.attack_iters,
            "judge_accuracy": judge.held_out_accuracy,
            "ssim_floor": recognized_min_ssim(truth.shape[-1]),
            "rows": [
                {k: v for k, v in row.items() if k not in ("score", "reconstruction")}
                for row in panel_rows
            ],
        }
    files = []
    fig, ax = plt.subplots(figsize=(6, 4))
    _accuracy_axes(ax, runs, name)
    fig.tight_layout()
    files.append(folder.path / "accuracy_per_epoch.png")
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)
    if panel_rows:
        fig = plt.figure(figsize=(13, 4.6))
        outer = fig.add_gridspec(1, 2, width_ratios=[1.0, 1.25], wspace=0.4)
        _accuracy_axes(fig.add_subplot(outer[0]), runs, name)
        _privacy_axes(fig, outer[1], panel_rows, truth)
        fig.suptitle(
            f"Accuracy (left) and what the server reconstructs from alice's upload in round "
            f"{round_name} (right, first 8 of {truth.shape[0]} images)",
            fontsize=9,
        )
        files.append(folder.path / "demo.png")
        fig.savefig(files[-1], dpi=110, bbox_inches="tight")
        plt.close(fig)
        from sf_ext.dlg.plots import batch_rows

        files.append(
            batch_rows(
                [(row["label"], row["reconstruction"], row["score"]) for row in panel_rows],
                truth,
                folder.path / "privacy_panel.png",
                title=f"alice's upload, round {round_name}: first 16 of {truth.shape[0]} images",
                limit=16,
            )
        )
    record["wall_time_s"] = time.perf_counter() - started
    record["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    results_file.write_text(json.dumps(record, indent=2) + "\n")
    files.append(results_file)
    files += [p for p in (folder.path / "rounds").rglob("*") if p.is_file()]
    folder.complete(*files)
    _print_tables(record)
    print(
        f"\nSaved {', '.join(p.name for p in files if p.parent == folder.path)} "
        f"in {folder.path} ({record['wall_time_s']:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
