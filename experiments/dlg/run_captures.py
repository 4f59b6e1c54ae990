"""Record real client rounds for the captured-upload experiments (SecretFlow debug mode).

One ``fed_avg_w`` run and one ``fed_avg_w_prune`` run per ``prune_percent``. In every run two
clients (alice 40 %, bob 60 % of 32 Fashion-MNIST training images) train DLGLeNet with batch size 1
and plain SGD (lr 0.01), one aggregation per batch (plain aggregation: the server sees each
upload); the first round of epoch 1 is recorded for both clients. Under ``fed_avg_w_prune`` each
client prunes ``p`` % of its weights at the end of epoch 0, so that round is sent with
``1 - p/100`` of the weights kept (per-layer weight-magnitude masks).

Run from the repository root: ``python experiments/dlg/run_captures.py [--out runs/captures]``.
Attack a round with ``python -m sf_ext.dlg sweep --captures runs/captures/<name>/e1_s0 ...``.
"""

import argparse
import time

from sf_ext.dlg.fl_run import run_setting
from sf_ext.dlg.settings import FLSetting

PERCENTS = (10, 20, 30, 50, 70, 90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/captures")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--samples", type=int, default=32)
    args = parser.parse_args()
    base = FLSetting(
        dataset="fashion-mnist",
        data_root=args.data_root,
        samples=args.samples,
        model="dlg-lenet",
        optimizer="sgd",
        lr=0.01,
        batch_size=1,
        epochs=2,
        aggregator="plain",
    )
    start = time.perf_counter()
    run = run_setting(base, f"{args.out}/fed_avg_w_rate0", [(1, 0)], progress=False)
    print(run.rounds[0])
    for percent in PERCENTS:
        setting = base.replace(strategy="fed_avg_w_prune", prune_percent=percent)
        run = run_setting(setting, f"{args.out}/fed_avg_w_prune_rate{percent}", [(1, 0)], False)
        print(run.rounds[0])
    print(f"captures done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
