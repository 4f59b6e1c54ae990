"""Cost of pruning in SecretFlow: epoch time of fed_avg_w_prune vs fed_avg_w, and upload bytes.

Both strategies train the same model on the same data in the same process (SecretFlow debug mode),
alternating runs so that machine noise hits both; the figure is the ratio of median epoch times
(target: at most 1.10). Upload size compares the dense float32 weights a client sends with two
sparse encodings of its masked weights (bitmap + kept values; COO int32 index + value), at the kept
fraction each epoch reached.

    python benchmarks/bench_prune.py [--repeats 3] [--epochs 3] [--limit 12000]
"""

import argparse
import contextlib
import io
import logging
import statistics
import sys


def upload_bytes(tensor_sizes, weight_sizes, kept_counts):
    """Bytes of one upload: dense, bitmap + kept values, COO (int32 index + float32 value)."""
    dense = 4 * sum(tensor_sizes)
    pruned_total = sum(weight_sizes)
    kept = sum(kept_counts)
    unpruned = sum(tensor_sizes) - pruned_total  # biases etc. are always sent densely
    bitmap = 4 * unpruned + (pruned_total + 7) // 8 + 4 * kept
    coo = 4 * unpruned + 8 * kept
    return dense, bitmap, coo


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--limit", type=int, default=12000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--aggregate-freq", type=int, default=4)
    parser.add_argument("--prune-percent", type=float, default=20)
    parser.add_argument("--prune-end-rate", type=float, default=0.1)
    args = parser.parse_args(argv)

    import secretflow as sf

    from sf_ext.data import DatasetNotFoundError, federated_dataset
    from sf_ext.models import LeNet
    from sf_ext.params import is_weight_tensor
    from sf_ext.pruning import scheduled_kept_fraction
    from sf_ext.training import build_torch_model, train_federated

    with contextlib.redirect_stdout(io.StringIO()):
        sf.init(["alice", "bob", "charlie"], debug_mode=True, logging_level="error")
    logging.getLogger().setLevel(logging.WARNING)  # sf.init resets it
    alice, bob, charlie = sf.PYU("alice"), sf.PYU("bob"), sf.PYU("charlie")
    try:
        data = federated_dataset("fashion-mnist", {alice: 0.4, bob: 0.6}, limit=args.limit)
    except DatasetNotFoundError as missing:
        sys.exit(f"bench_prune needs Fashion-MNIST: {missing}")
    train, test = data

    def run(strategy):
        return train_federated(
            strategy,
            charlie,
            [alice, bob],
            build_torch_model(LeNet, 3e-3),
            train,
            test,
            epochs=args.epochs,
            batch_size=args.batch_size,
            aggregate_freq=args.aggregate_freq,
            prune_percent=args.prune_percent,
            prune_end_rate=args.prune_end_rate,
            progress_desc=f"{strategy}",
        )

    run("fed_avg_w")  # warm-up: first-call costs (imports, allocator) would bias one side
    times = {"fed_avg_w": [], "fed_avg_w_prune": []}
    for _ in range(args.repeats):
        for strategy in times:
            result = run(strategy)
            times[strategy].extend(result.epoch_seconds)
    sf.shutdown()

    base = statistics.median(times["fed_avg_w"])
    pruned = statistics.median(times["fed_avg_w_prune"])
    print("\n| strategy | median s/epoch | ratio to fed_avg_w |")
    print("|---|---|---|")
    print(f"| fed_avg_w | {base:.3f} | 1.00 |")
    print(f"| fed_avg_w_prune | {pruned:.3f} | {pruned / base:.2f} (target <= 1.10) |")

    # Upload size depends only on how many entries each layer keeps, which the schedule fixes.
    model = LeNet()
    sizes = [p.numel() for p in model.state_dict().values()]
    weight_sizes = [
        p.numel() for n, p in model.state_dict().items() if is_weight_tensor(n, p.shape)
    ]
    print("\n| epoch | kept fraction | dense bytes | bitmap+values | ratio | COO | ratio |")
    print("|---|---|---|---|---|---|---|")
    epoch, kept = 0, 1.0
    while kept > args.prune_end_rate:
        epoch += 1
        kept = scheduled_kept_fraction(epoch, args.prune_percent, args.prune_end_rate)
        dense, bitmap, coo = upload_bytes(
            sizes, weight_sizes, [round(kept * s) for s in weight_sizes]
        )
        print(
            f"| {epoch} | {kept:.3f} | {dense:,} | {bitmap:,} | {bitmap / dense:.2f} "
            f"| {coo:,} | {coo / dense:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
