"""Shared test fixtures (where the real datasets live, SecretFlow parties) and marker checks.

Markers (registered in pyproject.toml, ``--strict-markers``): ``secretflow`` (imports or
initializes SecretFlow, here or in a child process), ``needs_data`` (reads the Fashion-MNIST files),
``slow`` (more than about 10 s). ``make test-fast`` runs ``-m "not secretflow and not slow"``.
The hooks below keep the first two honest: a test that uses the SecretFlow or data fixtures, or
imports SecretFlow while it runs, without the marker fails with a message saying which to add.
"""

import os
import sys
from pathlib import Path

# One compute thread per process: the suite runs SecretFlow parties as separate processes on a
# 2-core machine, and oversubscribed OpenMP threads slow torch down by an order of magnitude.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Every test starts with one torch thread, and a test that changes it cannot slow the rest."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)


REPO_ROOT = Path(__file__).resolve().parents[1]
# CI and developers keep the shared data folder beside the checkout.
DEFAULT_DATA_ROOT = REPO_ROOT.parent / "shared" / "data"
os.environ.setdefault("SF_EXT_DATA", str(DEFAULT_DATA_ROOT))


@pytest.fixture(scope="session")
def data_root() -> Path:
    return Path(os.environ["SF_EXT_DATA"])


@pytest.fixture(scope="session")
def fashion_mnist_root(data_root) -> Path:
    root = data_root / "fashion-mnist"
    if not (root / "train-images-idx3-ubyte.gz").exists():
        pytest.fail(
            f"Fashion-MNIST not found under {root}; set SF_EXT_DATA to the shared data folder"
        )
    return root


PARTIES = ("alice", "bob", "charlie", "carol", "dave")


@pytest.fixture(scope="session")
def sf_parties():
    """SecretFlow in debug mode (one process, no Ray) with PYUs alice, bob and charlie.

    One initialization per test session: SecretFlow keeps global state, so every test that needs
    PYUs shares these.
    """
    import secretflow as sf

    import sf_ext

    sf.init(list(PARTIES), debug_mode=True)
    sf_ext.register_strategies()
    yield sf.PYU("alice"), sf.PYU("bob"), sf.PYU("charlie")
    sf.shutdown()


@pytest.fixture(scope="session")
def sf_clients(sf_parties):
    """Four client PYUs (alice, bob, carol, dave) and the server PYU charlie, in debug mode."""
    import secretflow as sf

    return [sf.PYU(p) for p in ("alice", "bob", "carol", "dave")], sf.PYU("charlie")


# ---------------------------------------------------------------------------------------------
# Marker checks

FIXTURE_MARKERS = {
    "sf_parties": "secretflow",
    "sf_clients": "secretflow",
    "fashion_mnist_root": "needs_data",
    "data_root": "needs_data",
}


def _missing_marker(item, marker: str, reason: str) -> str:
    return (
        f"{item.nodeid} {reason} but is not marked @pytest.mark.{marker}; add the marker "
        "(pytestmark or a decorator) so that `make test-fast` can leave it out"
    )


_SECRETFLOW_BEFORE = pytest.StashKey[bool]()


def _secretflow_loaded() -> bool:
    return "secretflow" in sys.modules or "secretflow_fl" in sys.modules


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    for fixture, marker in FIXTURE_MARKERS.items():
        if fixture in item.fixturenames and item.get_closest_marker(marker) is None:
            pytest.fail(_missing_marker(item, marker, f"uses the fixture {fixture!r}"))
    item.stash[_SECRETFLOW_BEFORE] = _secretflow_loaded()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item):
    yield
    newly_imported = not item.stash.get(_SECRETFLOW_BEFORE, True) and _secretflow_loaded()
    if newly_imported and item.get_closest_marker("secretflow") is None:
        pytest.fail(_missing_marker(item, "secretflow", "imported SecretFlow"))
