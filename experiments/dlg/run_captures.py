"""Record real client rounds for the captured-gradient experiments (SecretFlow debug mode).

One ``fed_avg_w`` run and one ``fed_avg_w_prune`` run per pruning rate. In every run two clients
(alice, bob) train DLGLeNet on 16 Fashion-MNIST training images each, batch size 1, plain SGD
(lr 0.01), one aggregation per batch; alice's first round of epoch 1 is recorded. Under
``fed_avg_w_prune`` each client prunes ``p`` % of its weights at the end of epoch 0, so that round
is sent with ``1 - p/100`` of the weights kept (per-layer magnitude masks).

Run from the repository root: ``python experiments/dlg/run_captures.py [--out runs/captures]``.
"""

import argparse
import time

from sf_ext.dlg.capture import run_capture

RATES = (10, 20, 30, 50, 70, 90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/captures")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--samples", type=int, default=32)
    args = parser.parse_args()
    common = dict(
        out_dir=args.out,
        data_root=args.data_root,
        model="dlg-lenet",
        samples=args.samples,
        batch_size=1,
        epochs=2,
        capture_epoch=1,
        optimizer="sgd",
        lr=0.01,
        seed=0,
    )
    start = time.perf_counter()
    print(run_capture("fed_avg_w", name="fed_avg_w_rate0", **common))
    for rate in RATES:
        folder = run_capture(
            "fed_avg_w_prune",
            name=f"fed_avg_w_prune_rate{rate}",
            prune_percent=rate,
            prune_end_rate=0.1,
            **common,
        )
        print(folder)
    print(f"captures done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
