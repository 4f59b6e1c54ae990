"""Production mode: three processes on loopback, as SecretFlow runs across machines."""

import json
import sys
import time
from pathlib import Path

import pytest

from sf_ext.production import PartiesFailed, run_parties

PARTY_PROGRAM = Path(__file__).with_name("production_party.py")
PARTIES = ["alice", "bob", "charlie"]


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
