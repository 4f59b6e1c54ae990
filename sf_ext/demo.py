"""The seed experiment end to end in SecretFlow: does pruning cost accuracy, and what does it save?

alice holds 40 % and bob 60 % of Fashion-MNIST (scikit-learn's digits when the files are absent),
charlie aggregates. The same model trains once with ``fed_avg_w`` + ``SecureAggregator`` and once
with ``fed_avg_w_prune`` + ``SecurePruneAggregator``; the demo prints a table (final accuracy, kept
fraction, wall time per epoch) and saves an accuracy-per-epoch plot and a JSON record.

Run ``python -m sf_ext.demo --out runs/demo`` (``make demo`` does).
"""

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m sf_ext.demo", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder")
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
    parser.add_argument("--prune-percent", type=float, default=5, help="as in the seed")
    parser.add_argument("--prune-end-rate", type=float, default=0.1, help="as in the seed")
    parser.add_argument("--prune-scope", choices=["layer", "global"], default="layer")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (SecretFlow's debug mode is overhead-bound; more threads rarely help)",
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    return parser.parse_args(argv)


def _load_parties_data(args, alice, bob):
    from sf_ext.data import dataset_spec, federated_dataset, resolve_dataset

    # Falls back to scikit-learn's digits when the files are missing, and says so loudly.
    name = resolve_dataset(args.dataset, root=args.data_root, fallback="digits")
    data = federated_dataset(
        name,
        {alice: 0.4, bob: 0.6},
        root=args.data_root,
        seed=args.seed,
        limit=args.limit or None,
    )
    return name, dataset_spec(name), data


def main(argv=None) -> int:
    args = parse_args(argv)
    from sf_ext.pruning import validate_prune_params

    validate_prune_params(args.prune_percent, args.prune_end_rate)
    args.out.mkdir(parents=True, exist_ok=True)
    logging.getLogger().setLevel(logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    import secretflow as sf
    import torch

    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")

    from sf_ext.models import MLP, LeNet
    from sf_ext.training import build_torch_model, train_federated

    sf.init(["alice", "bob", "charlie"], debug_mode=True, logging_level="warning")
    logging.getLogger().setLevel(logging.WARNING)  # sf.init resets it; keep the bar readable
    try:
        alice, bob, charlie = sf.PYU("alice"), sf.PYU("bob"), sf.PYU("charlie")
        name, spec, (train, test) = _load_parties_data(args, alice, bob)
        small = spec.image_size < 12
        model_cls = MLP if small else LeNet
        model_kwargs = dict(in_channels=spec.in_channels, image_size=spec.image_size)
        results = {}
        for strategy in ("fed_avg_w", "fed_avg_w_prune"):
            results[strategy] = train_federated(
                strategy,
                charlie,
                [alice, bob],
                build_torch_model(model_cls, args.lr, spec.num_classes, **model_kwargs),
                train,
                test,
                epochs=args.epochs,
                batch_size=args.batch_size,
                aggregate_freq=args.aggregate_freq,
                prune_percent=args.prune_percent,
                prune_end_rate=args.prune_end_rate,
                prune_scope=args.prune_scope,
                random_seed=args.seed,
                device=args.device,
            )
    finally:
        sf.shutdown()

    print(f"\nDataset: {name}, model: {model_cls.__name__}, alice 40 % / bob 60 %, server charlie")
    print(f"{'strategy':<18}{'final val acc':>14}{'kept fraction':>15}{'s / epoch':>11}")
    for strategy, r in results.items():
        per_epoch = sum(r.epoch_seconds) / len(r.epoch_seconds)
        print(
            f"{strategy:<18}{r.val_accuracy[-1]:>14.4f}{r.final_kept_fraction:>15.3f}{per_epoch:>11.2f}"
        )

    fig, ax = plt.subplots(figsize=(6, 4))
    for strategy, r in results.items():
        epochs = range(1, len(r.val_accuracy) + 1)
        ax.plot(epochs, r.val_accuracy, marker="o", label=f"{strategy} (validation)")
        ax.plot(epochs, r.train_accuracy, linestyle="--", label=f"{strategy} (train)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.set_title(f"FLModel on {name}: fed_avg_w vs fed_avg_w_prune")
    ax.grid(alpha=0.3)
    pruned = results["fed_avg_w_prune"]
    kept_axis = ax.twinx()
    kept_axis.plot(
        range(1, len(pruned.kept_fraction) + 1),
        [sum(k.values()) / len(k) for k in pruned.kept_fraction],
        color="gray",
        linestyle=":",
        marker=".",
        label="kept fraction (prune)",
    )
    kept_axis.set_ylabel("kept fraction of weights")
    kept_axis.set_ylim(0, 1.05)
    lines, labels = ax.get_legend_handles_labels()
    more_lines, more_labels = kept_axis.get_legend_handles_labels()
    ax.legend(lines + more_lines, labels + more_labels, loc="lower right", fontsize=8)
    fig.tight_layout()
    plot_path = args.out / "accuracy_per_epoch.png"
    fig.savefig(plot_path, dpi=120)
    record = {
        "dataset": name,
        "args": {k: str(v) for k, v in vars(args).items()},
        "results": {s: vars(r) for s, r in results.items()},
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    (args.out / "results.json").write_text(json.dumps(record, indent=2))
    print(f"\nSaved {plot_path} and {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
