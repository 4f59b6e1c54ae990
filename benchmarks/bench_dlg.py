"""Benchmark: sf_ext.dlg's DLG against the reference loop of Zhu et al., the optimizer-aware
attack's cost per step against DLG's, a full sweep, and the audit of the seed's setting.

1. One 300-step DLG run on one 28x28 Fashion-MNIST test image (DLGLeNet, sigmoid, U(-0.5, 0.5)
   weights), timed side by side in this process for each seed: the reference loop as the DLG
   paper's code runs it (``torch.optim.LBFGS`` with default parameters, a closure summing squared
   gradient differences per layer and calling ``backward()``, an extra closure call and snapshot
   every 10 steps) and :func:`sf_ext.dlg.dlg` with the same starting point. Target: ratio <= 1.
2. Per step: one evaluation of the optimizer-aware multi-step attack (simulating the client's
   local SGD or Adam steps, then differentiating through them) against one evaluation of DLG's
   gradient-matching objective (what an L-BFGS closure computes), on the same model and batch,
   timed in the same run. Reported as ratios.
3. Optionally (``--sweep``) the full 7-share x 3-seed naive + mask-aware DLG sweep. Target:
   < 15 min on 2 cores.
4. Optionally (``--audit``) ``sf-ext audit`` of the seed's own setting (ConvNet, Adam 1e-2,
   batch 32, 5 %/epoch to 0.1 kept, SecurePruneAggregator; Fashion-MNIST). Target: < 10 min.

Run: ``python benchmarks/bench_dlg.py [--sweep] [--audit] [--out runs/bench_dlg]``. Threads are set to 1
(``--threads``) so other work on the machine disturbs the comparison less.
"""

import argparse
import json
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


VARIANTS = {
    # name -> keyword arguments of sf_ext.dlg.dlg
    "ours_same_algorithm": {"restarts": 0},  # one start, like the reference; stops when stuck
    "ours_all_steps": {"restarts": 0, "stop_when_stuck": False},  # every one of the 300 steps
    "ours_default": {},  # with restarts (up to 3) inside the same 300-step budget
}


def time_seed(seed: int, repeats: int, data_root=None):
    """Best-of-``repeats`` wall time of the reference and each variant (interleaved runs)."""
    model, x, y, grad = make_target(seed, data_root)
    shape = tuple(x.shape)
    times = {name: [] for name in ["reference", *VARIANTS]}
    results = {}
    for _ in range(repeats):
        start = time.perf_counter()
        results["reference"] = reference_dlg(model, grad, shape, 10, seed)
        times["reference"].append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
        for name, options in VARIANTS.items():
            start = time.perf_counter()
            results[name] = dlg(model, grad, shape, 10, iters=ITERS, seed=seed, **options)
            times[name].append(time.perf_counter() - start)
    row = {"seed": seed, "reference_psnr": float(psnr(results["reference"], x))}
    row["reference_s"] = min(times["reference"])
    for name in VARIANTS:
        row[f"{name}_s"] = min(times[name])
        row[f"{name}_ratio"] = row[f"{name}_s"] / row["reference_s"]
        row[f"{name}_psnr"] = float(psnr(results[name].reconstruction, x))
        row[f"{name}_steps"] = results[name].iterations
    return row


def _best_time(fn, repeats: int = 3, calls: int = 10) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def time_per_step(data_root=None) -> list:
    """Seconds per objective evaluation (value + gradient w.r.t. the dummy): DLG's gradient
    matching against the multi-step attack's simulated local training, same model and data."""
    from sf_ext.dlg import OptimizerSpec, simulate_update
    from sf_ext.dlg.attacks import GradientMatcher
    from sf_ext.dlg.distance import TensorDistance
    from sf_ext.models import LeNet

    x_all, y_all = load_dataset("fashion-mnist", data_root, split="test")
    rows = []
    cases = [("DLGLeNet", 1), ("LeNet", 4), ("LeNet", 32)]
    for name, batch in cases:
        torch.manual_seed(0)
        model = (
            uniform_init_(DLGLeNet(1, 28, 10), seed=0) if name == "DLGLeNet" else LeNet(1, 28, 10)
        )
        x = torch.as_tensor(x_all[:batch])
        y = torch.as_tensor(y_all[:batch]).long()
        dummy = torch.rand_like(x).requires_grad_(True)
        grad = observe_gradient(model, x, y)
        matcher = GradientMatcher(model, grad, distance="l2")

        def dlg_eval():
            loss = matcher(dummy, y)
            torch.autograd.grad(loss, [dummy])

        row = {"model": name, "batch": batch, "dlg_s": _best_time(dlg_eval)}
        for label, spec, steps in (
            ("sgd_1step", OptimizerSpec("sgd", lr=0.01), 1),
            ("adam_1step", OptimizerSpec("adam", lr=0.01), 1),
            ("adam_4steps", OptimizerSpec("adam", lr=0.01), 4),
        ):
            batches = [(x, y)] * steps
            observed = simulate_update(model, batches, spec, create_graph=False)
            distance = TensorDistance(observed, distance="cosine")
            dummies = [torch.rand_like(x).requires_grad_(True) for _ in range(steps)]

            def multistep_eval():
                update = simulate_update(
                    model, list(zip(dummies, [y] * steps)), spec, soft_sign=1.0
                )
                torch.autograd.grad(distance(update), dummies)

            row[f"{label}_s"] = _best_time(multistep_eval, calls=max(2, 10 // steps))
            row[f"{label}_ratio"] = row[f"{label}_s"] / row["dlg_s"]
        rows.append(row)
    return rows


def time_seed_audit(out: Path, data_root=None) -> float:
    """Wall time of ``sf-ext audit`` on the seed's setting (the recorded experiment's command)."""
    from sf_ext.dlg.audit import main as audit_main

    argv = [
        "--model", "convnet", "--optimizer", "adam", "--lr", "0.01", "--batch-size", "32",
        "--strategy", "fed_avg_w_prune", "--prune-percent", "5", "--prune-end-rate", "0.1",
        "--aggregator", "secure_prune", "--samples", "6000", "--epochs", "10",
        "--out", str(out), "--overwrite", "--no-progress",
    ]  # fmt: skip
    if data_root:
        argv += ["--data-root", str(data_root)]
    start = time.perf_counter()
    audit_main(argv)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="best-of-N timing")
    parser.add_argument("--sweep", action="store_true", help="also time the full sweep")
    parser.add_argument("--audit", action="store_true", help="also time the seed-setting audit")
    parser.add_argument("--skip-reference", action="store_true", help="skip part 1")
    parser.add_argument("--out", default="runs/bench_dlg")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    report = {"threads": args.threads, "repeats": args.repeats}
    steps = time_per_step(args.data_root)
    report["per_step"] = steps
    print(
        f"{'model':<9} {'batch':>5} {'DLG eval ms':>12} {'SGD 1 step':>11} {'Adam 1':>8} {'Adam 4':>8}"
    )
    for row in steps:
        print(
            f"{row['model']:<9} {row['batch']:>5} {1000 * row['dlg_s']:>12.1f} "
            f"{row['sgd_1step_ratio']:>10.2f}x {row['adam_1step_ratio']:>7.2f}x "
            f"{row['adam_4steps_ratio']:>7.2f}x"
        )
    if args.audit:
        report["seed_audit_s"] = time_seed_audit(out / "seed_audit", args.data_root)
        print(f"seed-setting audit: {report['seed_audit_s']:.0f} s (target < 600 s)")
    if args.skip_reference:
        (out / "bench_dlg.json").write_text(json.dumps(report, indent=2) + "\n")
        return 0
    rows = [time_seed(int(s), args.repeats, args.data_root) for s in args.seeds.split(",")]
    print(f"{'seed':>4} {'variant':<20} {'time s':>7} {'ratio':>6} {'PSNR dB':>8} {'steps':>5}")
    for row in rows:
        print(
            f"{row['seed']:>4} {'reference':<20} {row['reference_s']:>7.2f} {1:>6.2f} "
            f"{row['reference_psnr']:>8.1f} {ITERS:>5}"
        )
        for name in VARIANTS:
            print(
                f"{row['seed']:>4} {name:<20} {row[name + '_s']:>7.2f} "
                f"{row[name + '_ratio']:>6.2f} {row[name + '_psnr']:>8.1f} "
                f"{row[name + '_steps']:>5}"
            )
    total_ref = sum(r["reference_s"] for r in rows)
    report["single_run"] = rows
    for name in VARIANTS:
        report[f"{name}_ratio_total"] = sum(r[f"{name}_s"] for r in rows) / total_ref
        print(f"{name}: total time ratio ours/reference = {report[f'{name}_ratio_total']:.2f}")
    if args.sweep:
        config = SweepConfig(
            data_root=args.data_root,
            threads=args.threads,
            out=str(out / "sweep"),
            attacks=("dlg",),
            overwrite=True,
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
