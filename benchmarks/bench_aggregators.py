"""Server-side cost of the robust-aggregation core, as ratios to floors measured in the same run.

For every (n clients, d parameters) the script builds one float32 update matrix and times, on that
same matrix: the floors (the plain mean over clients, one Gram matrix ``X @ X.T``, ``torch.median``
and ``torch.sort`` along the client axis) and every aggregator. It prints a Markdown table of
seconds and ratios with the targets of issue 4:

* FLAME, Krum, Multi-Krum: at most 1.5x one Gram matrix at n = 100;
* median / trimmed mean: at most 1.2x ``torch.median`` / ``torch.sort``;
* NDC, RSA: at most 3x the mean;
* RFA: per Weiszfeld iteration against the mean (direct solver), and in total (Gram solver);
* matrix mapping: detection time per client (one forward pass of one input each);
* Bulyan, centered clipping, DnC, SignGuard, FoolsGold, FLTrust: seconds and ratios to the mean and
  to one Gram matrix (issue 8), no targets.

Peak memory (``--memory``, on by default for the largest case) runs each aggregator in its own
subprocess and reads the peak resident size (torch allocations are invisible to tracemalloc): the
peak above the pre-allocation baseline, in units of the update matrix (target <= 3x, the matrix
itself included).

Usage:
    python benchmarks/bench_aggregators.py                      # n 10 30 100 x d 62k 1M 3.5M
    python benchmarks/bench_aggregators.py --n 100 --d 3500000  # the headline case
    python benchmarks/bench_aggregators.py --quick              # seconds, for CI smoke runs
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from sf_ext.aggregators import ServerContext, call_rule, map_updates
from sf_ext.params import ParamLayout

METHODS = [
    "fedavg",
    "krum",
    "multi_krum",
    "median",
    "trimmed_mean",
    "ndc",
    "rfa",
    "rfa_direct",
    "rsa",
    "flame",
    "matrix_mapping",
    "xmam",
    "bulyan",
    "centered_clipping",
    "dnc",
    "signguard",
    "foolsgold",
    "fltrust",
    "shield",
]
INPUT_SHAPE = (1, 28, 28)


class MappedMLP(nn.Module):
    """A 784-h-10 MLP with exactly ``num_params`` parameters (a spare, unused tensor pads the
    count), so that matrix mapping can run on a matrix of any width."""

    def __init__(self, num_params: int):
        super().__init__()
        inputs = int(torch.tensor(INPUT_SHAPE).prod())
        hidden = max((num_params - 10) // (inputs + 11), 1)
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, 10)
        )
        used = sum(p.numel() for p in self.net.parameters())
        if used > num_params:
            raise ValueError(f"d={num_params} is too small for the mapped MLP ({used} parameters)")
        self.spare = nn.Parameter(torch.zeros(num_params - used))

    def forward(self, x):
        return self.net(x)


def flat_layout(num_params: int) -> ParamLayout:
    """A weight matrix plus a bias-like remainder, for FLAME's weight-only noise."""
    cols = 1000 if num_params >= 2000 else 1
    rows = num_params // cols
    names, shapes = ["fc.weight"], [(rows, cols)]
    if num_params - rows * cols:
        names.append("fc.bias")
        shapes.append((num_params - rows * cols,))
    return ParamLayout(tuple(names), tuple(shapes))


def update_matrix(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Updates sharing a common direction plus client noise, with the last 30 % sign-flipped x4
    (so that the clustering, Krum and Weiszfeld do real work, as in an attacked round)."""
    gen = torch.Generator().manual_seed(seed)
    matrix = torch.randn(n, d, generator=gen)
    matrix.add_(torch.randn(d, generator=gen))
    matrix[n - (3 * n) // 10 :].mul_(-4.0)
    return matrix.mul_(0.01)


def method_call(name: str, matrix: torch.Tensor) -> Callable[[], object]:
    """One aggregation as the simulator runs it: the rule through the registry with a full
    server context (a global model 20x an update's norm, FLTrust's root update, fresh memory)."""
    n, d = matrix.shape
    counts = torch.full((n,), 100.0)
    rule, options = ("rfa", {"solver": "direct"}) if name == "rfa_direct" else (name, {})
    if name == "centered_clipping":
        options = {"tau": 0.05}  # about the benign spread of these updates, so clipping bites
    if name == "bulyan":
        options = {"f": (n - 3) // 4}
    model = MappedMLP(d) if name in ("matrix_mapping", "xmam") else None
    layout = ParamLayout.from_module(model) if model is not None else flat_layout(d)
    gen = torch.Generator().manual_seed(1)
    global_params = torch.randn(d, generator=gen) * 0.2
    root_update = matrix[: n // 2].mean(dim=0) if name == "fltrust" else None

    def call():
        context = ServerContext(
            layout=layout,
            global_params=global_params,
            model=model,
            input_shape=INPUT_SHAPE,
            round_index=0,
            generator=torch.Generator().manual_seed(0),
            client_ids=list(range(n)),
            state={},
            root_update=root_update,
        )
        return call_rule(rule, matrix, counts, context, **options)

    return call


def best_time(fn: Callable[[], object], repeats: int, budget_s: float = 2.0):
    """Minimum wall time over ``repeats`` runs (one run only when a run exceeds ``budget_s``)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - start
        best = min(best, elapsed)
        if elapsed > budget_s:
            break
    return best, result


def warm_up(methods: List[str]) -> None:
    """One untimed call per method on a small matrix: lazy imports (hdbscan, scikit-learn) and
    first-call initialization stay out of the timings."""
    matrix = update_matrix(12, 8_000)
    for name in methods:
        method_call(name, matrix)()


def run_case(n: int, d: int, methods: List[str], repeats: int) -> List[Dict]:
    matrix = update_matrix(n, d)
    floors = {
        "mean": best_time(lambda: matrix.mean(dim=0), repeats)[0],
        "gram": best_time(lambda: matrix @ matrix.T, repeats)[0],
    }
    if {"median"} & set(methods):
        floors["torch.median"] = best_time(lambda: torch.median(matrix, dim=0), repeats)[0]
    if {"trimmed_mean"} & set(methods):
        floors["torch.sort"] = best_time(lambda: torch.sort(matrix, dim=0), repeats)[0]
    rows = [{"n": n, "d": d, "method": f"floor: {k}", "seconds": v} for k, v in floors.items()]
    for name in methods:
        seconds, (_, report) = best_time(method_call(name, matrix), repeats)
        row = {"n": n, "d": d, "method": name, "seconds": seconds, "notes": ""}
        row["x_mean"] = seconds / floors["mean"]
        row["x_gram"] = seconds / floors["gram"]
        if name == "median":
            row["x_select"] = seconds / floors["torch.median"]
        if name == "trimmed_mean":
            row["x_select"] = seconds / floors["torch.sort"]
        if name.startswith("rfa"):
            iterations = report.details["iterations"]
            row["notes"] = f"{iterations} iterations"
            if name == "rfa_direct":
                # Each iteration makes two passes; the start and the final sum add about one more.
                per_iteration = seconds / (iterations + 1.5)
                row["notes"] += f", {per_iteration / floors['mean']:.2f}x mean per iteration"
        if report.selects:
            row["notes"] = f"kept {report.num_kept}/{n}"
        if name in ("matrix_mapping", "xmam"):
            model = MappedMLP(d)
            detect, _ = best_time(lambda: map_updates(model, matrix, INPUT_SHAPE), repeats)
            per_client_ms = detect / n * 1e3
            versus_mean = detect / floors["mean"]
            row["notes"] += f"; detection {per_client_ms:.2f} ms/client ({versus_mean:.2f}x mean)"
        rows.append(row)
    del matrix
    return rows


TARGETS = {
    "krum": ("x_gram", 1.5),
    "multi_krum": ("x_gram", 1.5),
    "flame": ("x_gram", 1.5),
    "median": ("x_select", 1.2),
    "trimmed_mean": ("x_select", 1.2),
    "ndc": ("x_mean", 3.0),
    "rsa": ("x_mean", 3.0),
}


def markdown(rows: List[Dict]) -> str:
    lines = [
        "| n | d | method | seconds | x mean | x Gram | x torch.median/sort | target | notes |",
        "|---:|---:|---|---:|---:|---:|---:|---|---|",
    ]
    for row in rows:

        def ratio(key):
            return f"{row[key]:.2f}" if key in row else ""

        target = ""
        if row["method"] in TARGETS:
            key, limit = TARGETS[row["method"]]
            verdict = "ok" if row[key] <= limit else "MISSED"
            scope = " (n=100)" if key == "x_gram" else ""
            target = f"<= {limit}x{scope}: {verdict}" if key != "x_gram" or row["n"] >= 100 else ""
        lines.append(
            f"| {row['n']} | {row['d']:,} | {row['method']} | {row['seconds']:.4f} | "
            f"{ratio('x_mean')} | {ratio('x_gram')} | {ratio('x_select')} | {target} | "
            f"{row.get('notes', '')} |"
        )
    return "\n".join(lines)


def _max_rss_bytes() -> int:
    """This process's peak resident size. ``VmHWM`` belongs to the process image, whereas
    ``ru_maxrss`` carries the parent's peak over fork and exec (a child of a big run would report
    the parent's peak)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def memory_child(name: str, n: int, d: int) -> None:
    """Runs in a fresh process: one aggregation, peak RSS relative to the matrix size."""
    call = None
    before = _max_rss_bytes()
    matrix = update_matrix(n, d)
    after_matrix = _max_rss_bytes()
    if name == "floor: torch.sort":
        call = lambda: torch.sort(matrix, dim=0)  # noqa: E731
    elif name == "floor: torch.median":
        call = lambda: torch.median(matrix, dim=0)  # noqa: E731
    else:
        call = method_call(name, matrix)
    call()
    peak = _max_rss_bytes()
    size = matrix.numel() * matrix.element_size()
    stats = {
        "peak_x_matrix": (peak - before) / size,
        "extra_x_matrix": (peak - after_matrix) / size,
    }
    print(json.dumps(stats))


def memory_table(n: int, d: int, methods: List[str]) -> str:
    lines = [
        f"Peak memory at n={n}, d={d:,} (matrix {n * d * 4 / 2**30:.2f} GiB), "
        "one process per method:",
        "",
        "| method | peak / matrix (matrix included) | beyond the matrix / matrix | target <= 3x |",
        "|---|---:|---:|---|",
    ]
    for name in ["floor: torch.median", "floor: torch.sort"] + methods:
        command = [sys.executable, __file__, "--memory-child", name, "--n", str(n), "--d", str(d)]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        stats = json.loads(out.strip().splitlines()[-1])
        verdict = "ok" if stats["peak_x_matrix"] <= 3 else "MISSED"
        verdict = "" if name.startswith("floor") else verdict
        lines.append(
            f"| {name} | {stats['peak_x_matrix']:.2f} | {stats['extra_x_matrix']:.2f} | {verdict} |"
        )
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[10, 30, 100], help="client counts")
    parser.add_argument(
        "--d", type=int, nargs="+", default=[62_000, 1_000_000, 3_500_000], help="parameter counts"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes only (n 10 30, d 62k)")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (minimum is kept)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--memory",
        choices=["auto", "on", "off", "only"],
        default="auto",
        help="peak-memory subprocesses for the largest case (auto: only when n>=100, d>=3.5M; "
        "only: skip the timings)",
    )
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        if args.threads:
            torch.set_num_threads(args.threads)
        memory_child(args.memory_child, args.n[0], args.d[0])
        return
    if args.quick:
        args.n, args.d = [10, 30], [62_000]

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.memory != "only":
        warm_up(args.methods)
        rows = []
        for d in args.d:
            for n in args.n:
                rows.extend(run_case(n, d, args.methods, args.repeats))
        print(markdown(rows))
    n_max, d_max = max(args.n), max(args.d)
    big = n_max >= 100 and d_max >= 3_500_000
    if args.memory in ("on", "only") or (args.memory == "auto" and big):
        print()
        print(memory_table(n_max, d_max, args.methods))


if __name__ == "__main__":
    main()
