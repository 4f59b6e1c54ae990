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
import statistics
import sys

import numpy as np


def upload_bytes(masks, dense_sizes):
    """Bytes of one upload: dense, bitmap + kept values, COO (int32 index + float32 value)."""
    dense = 4 * sum(dense_sizes)
    pruned_total = sum(m.size for m in masks)
    kept = sum(int(m.sum()) for m in masks)
    unpruned = sum(dense_sizes) - pruned_total  # biases etc. are always sent densely
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
    from sf_ext.training import build_torch_model, train_federated

    with contextlib.redirect_stdout(io.StringIO()):
        sf.init(["alice", "bob", "charlie"], debug_mode=True, logging_level="error")
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
    last_prune = None
    for _ in range(args.repeats):
        for strategy in times:
            result = run(strategy)
            times[strategy].extend(result.epoch_seconds)
            if strategy == "fed_avg_w_prune":
                last_prune = result
    sf.shutdown()

    base = statistics.median(times["fed_avg_w"])
    pruned = statistics.median(times["fed_avg_w_prune"])
    print("\n| strategy | median s/epoch | ratio to fed_avg_w |")
    print("|---|---|---|")
    print(f"| fed_avg_w | {base:.3f} | 1.00 |")
    print(f"| fed_avg_w_prune | {pruned:.3f} | {pruned / base:.2f} (target <= 1.10) |")

    layer_sizes = [p.numel() for p in LeNet().state_dict().values()]
    print("\n| epoch | kept fraction | dense bytes | bitmap+values | ratio | COO | ratio |")
    print("|---|---|---|---|---|---|---|")
    model = LeNet()
    from sf_ext.pruning import full_masks, magnitude_prune

    # Reproduce each epoch's mask sizes from the schedule the run followed (sizes only).
    weights = {n: p.detach() for n, p in model.named_parameters()}
    masks = full_masks(weights)
    for epoch, kept in enumerate(last_prune.kept_fraction, start=1):
        target = float(np.mean(list(kept.values())))
        masks = magnitude_prune(weights, masks, target)
        mask_arrays = [m.numpy() for m in masks.values()]
        dense, bitmap, coo = upload_bytes(mask_arrays, layer_sizes)
        print(
            f"| {epoch} | {target:.3f} | {dense:,} | {bitmap:,} | {bitmap / dense:.2f} "
            f"| {coo:,} | {coo / dense:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
