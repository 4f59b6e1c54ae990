"""Run SecretFlow's production mode on one machine: one process per party, on loopback.

Production mode (``sf.init(cluster_config=..., ray_mode=False)``) is how SecretFlow spans machines:
every party runs the same program and only executes what happens on its own PYU. This module
starts those processes for local runs and tests, and guarantees they stop: if one party fails or
the deadline passes, the others (which would otherwise wait for their peer forever) are killed.

A party program calls :func:`init_from_env` instead of ``sf.init``.
"""

import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

CLUSTER_ENV = "SF_EXT_CLUSTER_CONFIG"


def free_ports(count: int) -> List[int]:
    """Ask the OS for ``count`` distinct free TCP ports on loopback."""
    sockets, ports = [], []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in sockets:
            s.close()
    return ports


def loopback_cluster_config(parties: Sequence[str], self_party: str, ports: Mapping[str, int]):
    """SecretFlow ``cluster_config`` for parties that all listen on 127.0.0.1."""
    if self_party not in parties:
        raise ValueError(f"self_party {self_party!r} is not one of {list(parties)}")
    return {
        "parties": {
            p: {"address": f"127.0.0.1:{ports[p]}", "listen_addr": f"127.0.0.1:{ports[p]}"}
            for p in parties
        },
        "self_party": self_party,
    }


def init_from_env(**init_kwargs) -> str:
    """``sf.init`` in production mode from the config :func:`run_parties` put in the environment.

    Returns:
        The name of this process's party.
    """
    raw = os.environ.get(CLUSTER_ENV)
    if raw is None:
        raise RuntimeError(f"{CLUSTER_ENV} is not set: start this program with run_parties()")
    config = json.loads(raw)
    import secretflow as sf

    sf.init(
        cluster_config=config,
        ray_mode=False,
        **init_kwargs,
    )
    return config["self_party"]


@dataclass
class PartyResult:
    party: str
    returncode: Optional[int]
    log_path: Path
    timed_out: bool = False

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class PartiesFailed(RuntimeError):
    """Raised when a party exits with an error or the deadline passes; carries every result."""

    def __init__(self, message: str, results: Dict[str, PartyResult]):
        super().__init__(message)
        self.results = results


def run_parties(
    argv: Sequence[str],
    parties: Sequence[str],
    log_dir: Path,
    timeout_s: float = 300.0,
    grace_s: float = 20.0,
    env: Optional[Mapping[str, str]] = None,
) -> Dict[str, PartyResult]:
    """Run ``argv`` once per party (production mode on loopback) and wait for all of them.

    Args:
        argv: The party program's command line; each copy finds its party in the environment
            (see :func:`init_from_env`).
        parties: Party names, e.g. ``["alice", "bob", "charlie"]``.
        log_dir: Folder for one log file per party (created if missing).
        timeout_s: Deadline for the whole run; then every party still running is killed.
        grace_s: After one party fails, how long the others get before they are killed.
        env: Extra environment variables for every party.

    Returns:
        Each party's result, when all exited with status 0.

    Raises:
        PartiesFailed: a party failed or the deadline passed (all processes are gone by then).
    """
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    ports = dict(zip(parties, free_ports(len(parties))))
    procs, logs = {}, {}
    try:
        for party in parties:
            party_env = dict(os.environ, **(env or {}))
            party_env[CLUSTER_ENV] = json.dumps(loopback_cluster_config(parties, party, ports))
            logs[party] = open(log_dir / f"{party}.log", "w")
            procs[party] = subprocess.Popen(
                list(argv),
                env=party_env,
                stdout=logs[party],
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # own process group: kill its children too
            )
        deadline = time.monotonic() + timeout_s
        failed_at = None
        while True:
            # Poll every process (not any(): it would stop at the first one still running).
            codes = [p.poll() for p in procs.values()]
            if all(code is not None for code in codes):
                break
            now = time.monotonic()
            if any(p.returncode not in (None, 0) for p in procs.values()) and failed_at is None:
                failed_at = now
            if now > deadline or (failed_at is not None and now > failed_at + grace_s):
                break
            time.sleep(0.2)
    finally:
        timed_out = {party: _stop(proc) for party, proc in procs.items()}
        for f in logs.values():
            f.close()
    results = {
        party: PartyResult(party, proc.returncode, log_dir / f"{party}.log", timed_out[party])
        for party, proc in procs.items()
    }
    bad = [r for r in results.values() if r.returncode != 0]
    if bad:
        detail = "\n".join(
            f"--- {r.party}: {'killed (still running)' if r.timed_out else f'exit {r.returncode}'}"
            f"\n{r.tail()}"
            for r in bad
        )
        raise PartiesFailed(f"{len(bad)} of {len(results)} parties failed:\n{detail}", results)
    return results


def _stop(proc: subprocess.Popen) -> bool:
    """Stop a party's whole process group; True if it had to be killed."""
    if proc.poll() is not None:
        return False
    for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    return True
