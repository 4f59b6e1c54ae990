"""Benchmark: sf_ext.dlg's DLG against the reference loop of Zhu et al., and a full sweep.

1. One 300-step DLG run on one 28x28 Fashion-MNIST test image (DLGLeNet, sigmoid, U(-0.5, 0.5)
   weights), timed side by side in this process for each seed: the reference loop as the DLG
   paper's code runs it (``torch.optim.LBFGS`` with default parameters, a closure summing squared
   gradient differences per layer and calling ``backward()``, an extra closure call and snapshot
   every 10 steps) and :func:`sf_ext.dlg.dlg` with the same starting point. Target: ratio <= 1.
2. Optionally (``--sweep``) the full 7-rate x 3-seed naive + mask-aware DLG sweep. Target: < 15 min
   on 2 cores.

Run: ``python benchmarks/bench_dlg.py [--sweep] [--out runs/bench_dlg]``. Threads are set to 1
(``--threads``) so other work on the machine disturbs the comparison less.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sf_ext.data import load_dataset
from sf_ext.dlg import dlg, observe_gradient, psnr
from sf_ext.dlg.sweep import SweepConfig, format_summary, run_sweep
from sf_ext.models import DLGLeNet, uniform_init_

ITERS = 300


def make_target(seed: int, data_root=None):
    x_all, y_all = load_dataset("fashion-mnist", data_root, split="test")
    x = torch.as_tensor(x_all[seed : seed + 1])
    y = torch.as_tensor(y_all[seed : seed + 1]).long()
    model = uniform_init_(DLGLeNet(1, 28, 10), seed=seed)
    return model, x, y, observe_gradient(model, x, y)


def reference_dlg(model, true_grad, shape, num_classes, seed, iters=ITERS):
    """The DLG paper's loop, written out plainly; the start matches sf_ext.dlg.dlg's for a seed."""
    gen = torch.Generator().manual_seed(seed)
    dummy_data = torch.randn(shape, generator=gen).requires_grad_(True)
    dummy_label = torch.randn((shape[0], num_classes), generator=gen).requires_grad_(True)
    optimizer = torch.optim.LBFGS([dummy_data, dummy_label])
    history = []
    for it in range(iters):

        def closure():
            optimizer.zero_grad()
            pred = model(dummy_data)
            onehot = F.softmax(dummy_label, dim=-1)
            loss = torch.mean(torch.sum(-onehot * F.log_softmax(pred, dim=-1), 1))
            dummy_grad = torch.autograd.grad(loss, model.parameters(), create_graph=True)
            grad_diff = 0
            for gx, gy in zip(dummy_grad, true_grad):
                grad_diff += ((gx - gy) ** 2).sum()
            grad_diff.backward()
            return grad_diff

        optimizer.step(closure)
        if it % 10 == 0:
            closure()
            history.append(dummy_data.detach().clone())
    return dummy_data.detach()


def time_pair(seed: int, data_root=None):
    model, x, y, grad = make_target(seed, data_root)
    start = time.perf_counter()
    ref = reference_dlg(model, grad, tuple(x.shape), 10, seed)
    ref_s = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    ours = dlg(model, grad, tuple(x.shape), 10, iters=ITERS, seed=seed)
    full = dlg(model, grad, tuple(x.shape), 10, iters=ITERS, seed=seed, stop_when_stuck=False)
    return {
        "seed": seed,
        "reference_s": ref_s,
        "ours_s": ours.wall_time_s,
        "ours_all_300_steps_s": full.wall_time_s,
        "ratio": ours.wall_time_s / ref_s,
        "ratio_all_300_steps": full.wall_time_s / ref_s,
        "reference_psnr": float(psnr(ref, x)),
        "ours_psnr": float(psnr(ours.reconstruction, x)),
        "ours_steps": ours.iterations,
        "ours_status": ours.status,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sweep", action="store_true", help="also time the full sweep")
    parser.add_argument("--out", default="runs/bench_dlg")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    pairs = [time_pair(int(s), args.data_root) for s in args.seeds.split(",")]
    print(
        f"{'seed':>4} {'reference s':>12} {'ours s':>8} {'ours 300 s':>10} {'ratio':>6} "
        f"{'ratio 300':>9} {'ref dB':>7} {'ours dB':>7} {'steps':>5}"
    )
    for p in pairs:
        print(
            f"{p['seed']:>4} {p['reference_s']:>12.2f} {p['ours_s']:>8.2f} "
            f"{p['ours_all_300_steps_s']:>10.2f} {p['ratio']:>6.2f} {p['ratio_all_300_steps']:>9.2f} "
            f"{p['reference_psnr']:>7.1f} {p['ours_psnr']:>7.1f} {p['ours_steps']:>5}"
        )
    total_ref = sum(p["reference_s"] for p in pairs)
    report = {
        "single_run": pairs,
        "ratio_total": sum(p["ours_s"] for p in pairs) / total_ref,
        "ratio_total_all_300_steps": sum(p["ours_all_300_steps_s"] for p in pairs) / total_ref,
        "ratio_median": statistics.median(p["ratio"] for p in pairs),
        "threads": args.threads,
    }
    print(
        f"ratio ours/reference (total over seeds): {report['ratio_total']:.2f} "
        f"(without the early stop: {report['ratio_total_all_300_steps']:.2f})"
    )
    if args.sweep:
        config = SweepConfig(
            data_root=args.data_root, threads=args.threads, out=str(out / "sweep"), attacks=("dlg",)
        )
        result = run_sweep(config)
        print(format_summary(result.summary))
        report["sweep_wall_s"] = result.wall_time_s
        report["sweep_runs"] = len(result.rows)
        print(f"sweep: {len(result.rows)} runs in {result.wall_time_s / 60:.1f} min")
    (out / "bench_dlg.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
