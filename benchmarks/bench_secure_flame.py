"""SecureFlameAggregator against the plaintext FlameAggregator on the same updates, in SecretFlow.

For every (n clients, d parameters) one Ray-simulation session holds n client PYUs, the server
charlie and the helpers hugo and ivy (the SPU: charlie, hugo, ivy with ABY3, or charlie and hugo
with CHEETAH / SEMI2K). Both aggregators receive the same client weights (n - 1 honest updates
around one direction, one sign-flipping client) and run one warm-up round and ``--rounds`` timed
rounds; the report gives, per round:

* seconds: wall time of ``aggregator.average(...)`` until its result is on the server, for both,
  and their ratio;
* bytes moved between parties: plaintext = the n float32 weight vectors sent to the server;
  secure = the clients' secret shares sent to the SPU parties (sizes of the real share chunks),
  the public global model sent to the other SPU parties, the noise party's shares, the SPU
  parties' own traffic (SPU's link counters, read from per-party SPU logs with profiling on) and
  the opened results' shares sent to the server; and their ratio;
* whether both chose the same kept set.

The starting model is the server's own (``initial="server"``): the one-time median of the clients'
initial weights (a sorting network over the client axis) is not part of a round. Each case runs in
its own process (a fresh Ray instance, so nothing accumulates between cases); the table also
gives the peak resident memory of the largest SPU party. Cases whose SPU state would exceed
``--max-elements`` (n * d) are skipped and listed, so that a shared machine is not driven out of
memory (n = 20, d = 1M needs roughly 3.5 GB per SPU party).

Usage:
    python benchmarks/bench_secure_flame.py                      # n 4 10 20 x d 62k 1M
    python benchmarks/bench_secure_flame.py --n 10 --d 62000     # the issue's headline case
    python benchmarks/bench_secure_flame.py --quick              # seconds, a smoke run
"""

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from tqdm import tqdm

LINK = re.compile(r"Link details: total send bytes (\d+), recv bytes (\d+)")
SERVER, HELPERS = "charlie", ["hugo", "ivy"]


class _FlatModel(torch.nn.Module):
    """A model whose only tensor is the flat parameter vector (seeded, so every run starts the
    same)."""

    def __init__(self, d: int):
        super().__init__()
        generator = torch.Generator().manual_seed(1)
        self.w = torch.nn.Parameter(torch.randn(d, generator=generator) / 10)


def _metered_spu(cluster_def: Dict, log_dir: Path):
    """An SPU device whose parties log SPU's link counters to one file each."""
    import secretflow.distributed as sfd
    import spu.libspu.logging as spu_logging
    from secretflow.device import SPU
    from secretflow.device.device.spu import SPURuntime

    class MeteredSPU(SPU):
        def init(self):
            for rank, node in enumerate(self.cluster_def["nodes"]):
                options = spu_logging.LogOptions()
                options.system_log_path = str(log_dir / f"{node['party']}.log")
                options.enable_console_logger = False
                self.actors[node["party"]] = (
                    sfd.remote(SPURuntime)
                    .party(node["party"])
                    .remote(rank, self.cluster_def, self.link_desc, options, self.id)
                )

    return MeteredSPU(cluster_def)


def _link_bytes(log_dir: Path, offsets: Dict[str, int]) -> int:
    """Bytes the SPU parties sent each other since ``offsets`` (updated in place)."""
    total = 0
    for path in sorted(log_dir.glob("*.log")):
        with open(path, "rb") as f:
            f.seek(offsets.get(path.name, 0))
            text = f.read().decode(errors="replace")
            offsets[path.name] = f.tell()
        total += sum(int(sent) for sent, _ in LINK.findall(text))
    return total


def _share_bytes(conf, world_size: int, d: int, public: bool) -> List[int]:
    """Bytes of the share chunks one party makes of a float32 d-vector, per SPU party."""
    import spu
    from secretflow.device import SPUIO

    io = SPUIO(conf, world_size)
    vis = spu.Visibility.VIS_PUBLIC if public else spu.Visibility.VIS_SECRET
    _, _, *chunks = io.make_shares(np.zeros(d, np.float32), vis)
    per_party = len(chunks) // world_size
    return [
        sum(len(c) for c in chunks[i * per_party : (i + 1) * per_party]) for i in range(world_size)
    ]


def _spu_peak_rss() -> int:
    """Largest peak resident set (bytes) among this process's SPU runtime actors."""
    import psutil

    peak = 0
    for proc in psutil.Process().children(recursive=True):
        try:
            if "SPURuntime" not in " ".join(proc.cmdline()):
                continue
            with open(f"/proc/{proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]) * 1024)
        except (psutil.Error, OSError):
            continue
    return peak


def _updates(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    direction = rng.standard_normal(d)
    direction /= np.linalg.norm(direction)
    updates = 0.05 * (direction + 0.5 * rng.standard_normal((n, d)) / np.sqrt(d))
    updates[-1] *= -4.0  # the sign flipper
    return updates.astype(np.float32)


def run_case(sf, n: int, d: int, protocol: str, rounds: int, log_dir: Path, bound) -> Dict:
    from sf_ext.aggregators.robust_secretflow import FlameAggregator
    from sf_ext.aggregators.secure_flame import SecureFlameAggregator, spu_runtime_config

    clients = [sf.PYU(f"c{i:02d}") for i in range(n)]
    server = sf.PYU(SERVER)
    helpers = HELPERS if protocol == "ABY3" else HELPERS[:1]
    config = {**spu_runtime_config(protocol), "enable_pphlo_profile": True}
    case_logs = log_dir / f"n{n}_d{d}"
    case_logs.mkdir(parents=True, exist_ok=True)
    spu = _metered_spu(sf.utils.testing.cluster_def([SERVER] + helpers, config), case_logs)
    model_fn = lambda: _FlatModel(d)  # noqa: E731
    secure = SecureFlameAggregator(
        server,
        clients,
        spu,
        initial="server",
        model_fn=model_fn,
        input_bound=bound,
        allow_trusted_dealer=protocol == "SEMI2K",
    )
    plain = FlameAggregator(server, clients, model_fn=model_fn, initial="server")
    start = _FlatModel(d).w.detach().numpy()
    bases = {}
    for name, aggregator in (("secure", secure), ("plain", plain)):
        bases[name] = sf.reveal(aggregator.average([c(lambda: [start])() for c in clients], axis=0))
    times = {"secure": [], "plain": []}
    link, offsets = 0, {}
    _link_bytes(case_logs, offsets)
    kept_equal = True
    for r in range(rounds + 1):  # round 0 warms up (worker imports, first compilations)
        updates = _updates(n, d, seed=r)
        for name, aggregator in (("secure", secure), ("plain", plain)):
            # The same updates on each aggregator's own global model (their noises differ).
            base = np.asarray(bases[name][0], np.float32)
            sent = [c(lambda u=u: [base + u])() for c, u in zip(clients, updates)]
            sf.wait(sent)
            began = time.perf_counter()
            bases[name] = sf.reveal(aggregator.average(sent, axis=0))
            if r > 0:
                times[name].append(time.perf_counter() - began)
        spent = _link_bytes(case_logs, offsets)
        if r > 0:
            link += spent
            kept_equal &= secure.reports()[-1]["kept"] == plain.reports()[-1]["kept"]
    world = len(helpers) + 1
    client_shares = sum(_share_bytes(spu.conf, world, d, public=False))  # one client, all parties
    public_share = _share_bytes(spu.conf, world, d, public=True)[0]
    opened = _share_bytes(spu.conf, world, d, public=False)[0] * (world - 1)
    noise = _share_bytes(spu.conf, world, d, public=False)[0] * (world - 1)
    secure_bytes = {
        "client_shares": n * client_shares,
        "public_global": (world - 1) * public_share,
        "noise_shares": noise,
        "spu_links": link // rounds,
        "opened": opened,
    }
    plain_bytes = n * d * 4
    secure_total = sum(secure_bytes.values())
    return {
        "n": n,
        "d": d,
        "spu_peak_rss": _spu_peak_rss(),
        "protocol": protocol,
        "input_bound": bound,
        "plain_s": float(np.median(times["plain"])),
        "secure_s": float(np.median(times["secure"])),
        "time_ratio": float(np.median(times["secure"]) / np.median(times["plain"])),
        "plain_bytes": plain_bytes,
        "secure_bytes": secure_bytes,
        "secure_bytes_total": secure_total,
        "bytes_ratio": secure_total / plain_bytes,
        "same_kept": bool(kept_equal),
    }


def _table(rows: List[Dict]) -> str:
    lines = [
        "| n | d | protocol | plain s | secure s | ratio | plain MB | secure MB "
        "(shares / SPU links / other) | ratio | same kept | SPU party peak GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        b = row["secure_bytes"]
        other = b["public_global"] + b["noise_shares"] + b["opened"]
        lines.append(
            f"| {row['n']} | {row['d']:,} | {row['protocol']} | {row['plain_s']:.2f} | "
            f"{row['secure_s']:.1f} | {row['time_ratio']:.0f}x | {row['plain_bytes'] / 1e6:.1f} | "
            f"{row['secure_bytes_total'] / 1e6:.0f} ({b['client_shares'] / 1e6:.0f} / "
            f"{b['spu_links'] / 1e6:.0f} / {other / 1e6:.0f}) | {row['bytes_ratio']:.0f}x | "
            f"{'yes' if row['same_kept'] else 'NO'} | {row['spu_peak_rss'] / 2**30:.1f} |"
        )
    return "\n".join(lines)


def _run_one(args, n: int, d: int, bound) -> Dict:
    """One case in this process: its own Ray instance, shut down at the end."""
    import secretflow as sf

    parties = [f"c{i:02d}" for i in range(n)] + [SERVER] + HELPERS
    with tempfile.TemporaryDirectory() as logs:
        sf.init(parties, address="local", num_cpus=32, log_to_driver=False)
        try:
            return run_case(sf, n, d, args.protocol, args.rounds, Path(logs), bound)
        finally:
            sf.shutdown()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--n", type=int, nargs="+", default=[4, 10, 20], help="client counts")
    parser.add_argument("--d", type=int, nargs="+", default=[62_000, 1_000_000], help="sizes")
    parser.add_argument("--protocol", default="ABY3", choices=["ABY3", "CHEETAH", "SEMI2K"])
    parser.add_argument("--rounds", type=int, default=1, help="timed rounds per case")
    parser.add_argument(
        "--input-bound", type=float, default=100.0, help="clamp in SPU; 0 turns it off"
    )
    parser.add_argument(
        "--max-elements", type=int, default=12_000_000, help="skip cases with n * d above this"
    )
    parser.add_argument("--quick", action="store_true", help="n 4, d 10000: a smoke run")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    parser.add_argument("--case", type=int, nargs=2, help=argparse.SUPPRESS)  # n d, internal
    parser.add_argument("--case-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.d = [4], [10_000]
    if min(args.n) < 3 or min(args.d) < 1 or args.rounds < 1:
        parser.error("--n must be >= 3 (FLAME clusters), --d >= 1 and --rounds >= 1")
    if args.json is not None and args.json.exists():
        parser.error(f"{args.json} exists; choose another file")
    bound = args.input_bound if args.input_bound > 0 else None
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    logging.getLogger().setLevel(logging.WARNING)
    if args.case is not None:
        row = _run_one(args, args.case[0], args.case[1], bound)
        args.case_out.write_text(json.dumps(row))
        return 0

    rows, skipped = [], []
    cases = [(n, d) for d in args.d for n in args.n]
    with tempfile.TemporaryDirectory() as tmp:
        for n, d in tqdm(cases, desc="cases", file=sys.stderr):
            if n * d > args.max_elements:
                skipped.append((n, d))
                continue
            out = Path(tmp) / f"{n}_{d}.json"
            command = [sys.executable, __file__, "--case", str(n), str(d), "--case-out", str(out)]
            command += ["--protocol", args.protocol, "--rounds", str(args.rounds)]
            command += ["--input-bound", str(args.input_bound)]
            done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            if done.returncode != 0 or not out.exists():
                tail = done.stdout.decode(errors="replace")[-3000:]
                print(f"case n={n} d={d} failed ({done.returncode}):\n{tail}", file=sys.stderr)
                return 1
            rows.append(json.loads(out.read_text()))
            print(_table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    print(_table(rows))
    for n, d in skipped:
        print(f"skipped n={n} d={d:,}: n * d above --max-elements={args.max_elements:,}")
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": rows, "skipped": skipped}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
