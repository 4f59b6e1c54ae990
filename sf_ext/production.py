"""Run SecretFlow's production mode on one machine: one process per party, on loopback.

Production mode (``sf.init(cluster_config=..., ray_mode=False)``) is how SecretFlow spans machines:
every party runs the same program and only executes what happens on its own PYU. This module
starts those processes for local runs and tests, and guarantees they stop: if one party fails or
the deadline passes, the others (which would otherwise wait for their peer forever) are killed.

A party program calls :func:`init_from_env` instead of ``sf.init``.

Ports: every party listens on its own TCP port, which it binds itself. :func:`reserve_ports` claims
free ports for the whole run (a lock file per port), so two runs started at once never pick the
same ones, and :func:`run_parties` starts everybody again on new ports if another program takes
a port before the party binds it.
"""

import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

logger = logging.getLogger(__name__)

CLUSTER_ENV = "SF_EXT_CLUSTER_CONFIG"


#: Where port claims live (one lock file per port while a run holds it).
PORT_LOCK_DIR = Path(tempfile.gettempdir()) / "sf-ext-ports"
#: What a party's log says when its listening port was taken (gRPC, SecretFlow 1.11).
BIND_FAILURE_MARKERS = ("Failed to bind to address", "Address already in use")


class PortReservation:
    """TCP ports claimed for one run until :meth:`release` (or the end of a ``with`` block).

    A port is *claimed* by holding an exclusive ``flock`` on ``PORT_LOCK_DIR/<port>.lock``: two
    runs that reserve at the same time (in one process or several) never get the same port, and a
    claim disappears with the process that held it. The sockets used to find free ports are closed
    before the parties start (they must bind the ports themselves), so a process outside sf-ext
    can still take one in between; :func:`run_parties` retries with new ports when that happens.
    """

    def __init__(self, ports: List[int], handles: List[int]):
        self.ports = list(ports)
        self._handles = list(handles)

    def release(self) -> None:
        """Give the ports back (idempotent)."""
        while self._handles:
            port, fd = self.ports[len(self._handles) - 1], self._handles.pop()
            try:
                os.unlink(PORT_LOCK_DIR / f"{port}.lock")  # unlink first, then unlock
            except OSError:
                pass
            os.close(fd)

    def __enter__(self) -> "PortReservation":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _claim(port: int) -> Optional[int]:
    """Lock ``port``'s claim file; the open descriptor, or None if another run holds it."""
    PORT_LOCK_DIR.mkdir(parents=True, exist_ok=True)
    path = PORT_LOCK_DIR / f"{port}.lock"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # The holder before us may have unlinked the file after we opened it: then our lock is
        # on a dead inode and someone else may hold a fresh file under the same name.
        if os.fstat(fd).st_ino != os.stat(path).st_ino:
            raise BlockingIOError
    except OSError:
        os.close(fd)
        return None
    return fd


def _bindable(port: int) -> bool:
    """Whether ``port`` is free on every interface (parties listen on ``[::]`` or ``0.0.0.0``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def reserve_ports(
    count: int, port_range: Optional[Tuple[int, int]] = None, attempts: int = 200
) -> PortReservation:
    """Claim ``count`` distinct free TCP ports for one run.

    Args:
        count: How many ports.
        port_range: ``(first, last)`` inclusive to pick from, in order (e.g. the ports a firewall
            opens); ``None`` lets the OS propose free ephemeral ports.
        attempts: How many OS proposals to try before giving up (``port_range=None``).

    Raises:
        RuntimeError: Not enough free, unclaimed ports.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    ports, handles = [], []

    def take(port: int) -> None:
        if port in ports or not _bindable(port):
            return
        fd = _claim(port)
        if fd is not None:
            ports.append(port)
            handles.append(fd)

    try:
        if port_range is not None:
            first, last = port_range
            if not 0 < first <= last < 65536:
                raise ValueError(
                    f"port_range must satisfy 0 < first <= last < 65536, got {port_range}"
                )
            for port in range(first, last + 1):
                if len(ports) == count:
                    break
                take(port)
        else:
            for _ in range(attempts):
                if len(ports) == count:
                    break
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.bind(("", 0))
                    proposal = s.getsockname()[1]
                take(proposal)
    except BaseException:
        PortReservation(ports, handles).release()
        raise
    reservation = PortReservation(ports, handles)
    if len(ports) < count:
        reservation.release()
        where = f"in {port_range[0]}-{port_range[1]}" if port_range else "from the OS"
        raise RuntimeError(f"found only {len(ports)} of {count} free, unclaimed ports {where}")
    return reservation


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
    """How one party's process ended."""

    party: str
    returncode: Optional[int]
    log_path: Path
    timed_out: bool = False
    #: Which start this was (> 1 after a retry because a port was taken).
    attempt: int = 1

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def lost_its_port(self) -> bool:
        """Whether the party failed because its listening port was taken."""
        return self.returncode not in (None, 0) and any(
            marker in self.tail(200) for marker in BIND_FAILURE_MARKERS
        )


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
    port_retries: int = 2,
    port_range: Optional[Tuple[int, int]] = None,
) -> Dict[str, PartyResult]:
    """Run ``argv`` once per party (production mode on loopback) and wait for all of them.

    Ports come from :func:`reserve_ports` and stay claimed until the parties exit, so concurrent
    runs never share one. If a party still fails to bind its port (another program took it in
    the meantime), every party is stopped at once and the run starts again on new ports; the
    failed attempt's logs are kept as ``<party>.attempt<N>.log``.

    Args:
        argv: The party program's command line; each copy finds its party in the environment
            (see :func:`init_from_env`).
        parties: Party names, e.g. ``["alice", "bob", "charlie"]``.
        log_dir: Folder for one log file per party (created if missing).
        timeout_s: Deadline for the whole run, retries included; then every party still running
            is killed.
        grace_s: After one party fails, how long the others get before they are killed.
        env: Extra environment variables for every party.
        port_retries: How many times to start again after a port was taken.
        port_range: Pick ports from this inclusive range (see :func:`reserve_ports`).

    Returns:
        Each party's result, when all exited with status 0.

    Raises:
        PartiesFailed: a party failed or the deadline passed (all processes are gone by then).
    """
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    for attempt in range(1, port_retries + 2):
        with reserve_ports(len(parties), port_range) as reservation:
            ports = dict(zip(parties, reservation.ports))
            results = _run_once(argv, parties, log_dir, ports, deadline, grace_s, env, attempt)
        if attempt <= port_retries and any(r.lost_its_port() for r in results.values()):
            for result in results.values():
                kept = log_dir / f"{result.party}.attempt{attempt}.log"
                result.log_path.replace(kept)
            lost = [r.party for r in results.values() if r.lost_its_port()]
            logger.warning(
                "port taken for %s (attempt %d); starting all parties again on new ports",
                ", ".join(lost),
                attempt,
            )
            continue
        break
    bad = [r for r in results.values() if r.returncode != 0]
    if bad:
        detail = "\n".join(
            f"--- {r.party}: {'killed (still running)' if r.timed_out else f'exit {r.returncode}'}"
            f"\n{r.tail()}"
            for r in bad
        )
        raise PartiesFailed(f"{len(bad)} of {len(results)} parties failed:\n{detail}", results)
    return results


def _run_once(argv, parties, log_dir, ports, deadline, grace_s, env, attempt):
    """Start every party on ``ports``, wait, stop the rest when one fails; the results."""
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
        failed_at = None
        while True:
            # Poll every process (not any(): it would stop at the first one still running).
            codes = [p.poll() for p in procs.values()]
            if all(code is not None for code in codes):
                break
            now = time.monotonic()
            failed = [party for party, p in procs.items() if p.returncode not in (None, 0)]
            if failed and failed_at is None:
                failed_at = now
                for f in logs.values():
                    f.flush()
                if any(
                    PartyResult(
                        party, procs[party].returncode, log_dir / f"{party}.log"
                    ).lost_its_port()
                    for party in failed
                ):
                    break  # the others wait for a peer that will never come: stop them now
            if now > deadline or (failed_at is not None and now > failed_at + grace_s):
                break
            time.sleep(0.2)
    finally:
        timed_out = {party: _stop(proc) for party, proc in procs.items()}
        for f in logs.values():
            f.close()
    return {
        party: PartyResult(
            party, proc.returncode, log_dir / f"{party}.log", timed_out[party], attempt
        )
        for party, proc in procs.items()
    }


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
