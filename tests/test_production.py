"""Production mode: three processes on loopback, as SecretFlow runs across machines."""

import json
import random
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from sf_ext.production import PartiesFailed, reserve_ports, run_parties

PARTY_PROGRAM = Path(__file__).with_name("production_party.py")
PARTIES = ["alice", "bob", "charlie"]


@pytest.mark.secretflow
@pytest.mark.needs_data
@pytest.mark.slow
def test_three_parties_train_fed_avg_w_prune(tmp_path):
    result_path = tmp_path / "result.json"
    run_parties(
        [sys.executable, str(PARTY_PROGRAM), str(result_path)],
        PARTIES,
        log_dir=tmp_path / "logs",
        timeout_s=420,
    )
    result = json.loads(result_path.read_text())
    assert result["val_accuracy"][-1] > 0.6
    # Both clients pruned twice: kept fraction max(0.5, 0.8 ** 2) = 0.64 (per-layer rounding).
    assert set(result["kept"]) == {"alice", "bob"}
    for kept in result["kept"].values():
        assert kept == pytest.approx(0.64, abs=0.02)


@pytest.mark.secretflow
@pytest.mark.slow
def test_launcher_stops_everyone_when_a_party_fails(tmp_path):
    started = time.monotonic()
    with pytest.raises(PartiesFailed, match="bob: exit 3") as failure:
        run_parties(
            [sys.executable, str(PARTY_PROGRAM), str(tmp_path / "r.json"), "crash-bob"],
            PARTIES,
            log_dir=tmp_path / "logs",
            timeout_s=300,
            grace_s=10,
        )
    # alice and charlie wait for bob forever; the launcher must not.
    assert time.monotonic() - started < 120
    assert all(r.returncode is not None for r in failure.value.results.values())
    assert "fails on purpose" in failure.value.results["bob"].tail()


# --- ports ---------------------------------------------------------------------------------------


def _free_range(width=60):
    """A random range of mostly free ports below the ephemeral range."""
    first = random.Random().randrange(20000, 30000 - width)
    return first, first + width - 1


def test_reservations_started_at_once_never_share_a_port():
    port_range = _free_range()
    held, errors, barrier = [], [], threading.Barrier(8)

    def reserve():
        barrier.wait()
        try:
            held.append(reserve_ports(3, port_range))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=reserve) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == []
        ports = [p for r in held for p in r.ports]
        assert len(ports) == 24 and len(set(ports)) == 24
        assert all(port_range[0] <= p <= port_range[1] for p in ports)
    finally:
        for r in held:
            r.release()
    # Released claims can be taken again.
    with reserve_ports(3, port_range) as again:
        assert len(again.ports) == 3


def test_ports_in_use_or_claimed_elsewhere_are_skipped(tmp_path):
    first, last = _free_range(20)
    listener = socket.socket()
    listener.bind(("127.0.0.1", first))
    listener.listen()
    # Another process claims ports of the same range and holds them until told to stop.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from sf_ext.production import reserve_ports\n"
            f"r = reserve_ports(4, ({first}, {last}))\n"
            "print(' '.join(map(str, r.ports)), flush=True)\n"
            "sys.stdin.readline()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        theirs = [int(p) for p in holder.stdout.readline().split()]
        assert len(theirs) == 4 and first not in theirs
        with reserve_ports(4, (first, last)) as mine:
            assert first not in mine.ports  # bound by a listening socket
            assert not set(mine.ports) & set(theirs)  # claimed by the other process
    finally:
        holder.kill()
        holder.wait()
        listener.close()
    # The dead process's claims are gone with it.
    with reserve_ports(5, (first + 1, first + 5)) as after:
        assert after.ports == list(range(first + 1, first + 6))
    with pytest.raises(RuntimeError, match="found only 0 of 1 free, unclaimed ports"):
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", first))
            busy.listen()
            reserve_ports(1, (first, first))
    with pytest.raises(ValueError, match="port_range must satisfy"):
        reserve_ports(1, (10, 5))


TAKE_OWN_PORT_ONCE = textwrap.dedent("""
    import json, os, socket, sys
    from pathlib import Path

    import secretflow as sf
    from sf_ext.production import CLUSTER_ENV, init_from_env

    config = json.loads(os.environ[CLUSTER_ENV])
    marker = Path(sys.argv[1])
    blocker = None
    if config["self_party"] == "alice" and not marker.exists():
        marker.write_text("taken once")
        # Someone else grabs alice's port between the reservation and SecretFlow's bind.
        port = int(config["parties"]["alice"]["listen_addr"].rsplit(":", 1)[1])
        blocker = socket.socket()
        blocker.bind(("", port))
        blocker.listen()
    party = init_from_env()
    alice, bob = sf.PYU("alice"), sf.PYU("bob")
    answer = sf.reveal(bob(lambda x: x + 1)(alice(lambda: 41)().to(bob)))
    if party == "alice":
        Path(sys.argv[2]).write_text(str(answer))
    sf.shutdown()
    """)


@pytest.mark.secretflow
@pytest.mark.slow
def test_a_taken_port_makes_the_run_start_again(tmp_path):
    program = tmp_path / "party.py"
    program.write_text(TAKE_OWN_PORT_ONCE)
    answer = tmp_path / "answer.txt"
    results = run_parties(
        [sys.executable, str(program), str(tmp_path / "marker"), str(answer)],
        ["alice", "bob"],
        log_dir=tmp_path / "logs",
        timeout_s=300,
    )
    assert answer.read_text() == "42"
    assert {r.attempt for r in results.values()} == {2}
    # The failed first attempt's logs are kept, and say why it failed.
    first = (tmp_path / "logs" / "alice.attempt1.log").read_text()
    assert "Failed to bind to address" in first
    assert (tmp_path / "logs" / "bob.attempt1.log").exists()
