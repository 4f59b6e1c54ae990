"""SecureFlameAggregator and SecureClippingAggregator: FLAME and norm clipping inside SPU.

Three layers:

* the SPU kernels run as plain JAX (no MPC) against ``hdbscan`` and ``torch`` on the same
  numbers, and inside SPU's own simulator (ABY3 and SEMI2K, no Ray) against the plaintext rules;
* one Ray-simulation run (a subprocess: SecretFlow keeps global state and the rest of the suite
  runs in debug mode) with the real devices: four clients (dave flips signs), the server charlie and
  the helpers hugo and ivy forming a 3-party ABY3 SPU; direct rounds against the plaintext rules,
  then ``FLModel`` training against the plaintext ``FlameAggregator``; every transfer to the server
  is recorded;
* one production-mode run (one process per party, ``sf_ext.production.run_parties``).

Run as a program (``python tests/test_secure_flame.py ray OUT`` or ``party OUT``) this file is the
scenario the tests start.
"""

import functools
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))  # _rounds, when run as a program

from _rounds import planted_round  # noqa: E402

# The module under test imports SecretFlow (its aggregators subclass SecretFlow's).
pytestmark = pytest.mark.secretflow

CLIENTS = ["alice", "bob", "carol", "dave"]
SERVER = "charlie"
HELPERS = ["hugo", "ivy"]
SHAPES = [(30, 40), (30,), (10, 30), (10,)]  # 1,540 parameters in four tensors


# ---------------------------------------------------------------------------------------------
# Kernels as plain JAX: the algorithms, without fixed point.


def test_sorting_network_median_equals_torch_median():
    import jax

    from sf_ext.aggregators.secure_flame import lower_median_rows

    median = jax.jit(lambda x: lower_median_rows(*list(x), bound=None))
    rng = np.random.default_rng(0)
    for n in range(1, 14):
        x = rng.standard_normal((n, 9)).astype(np.float32)
        x[:, 0] = 1.0  # all tied
        x[: n // 2, 1] = -2.0  # half tied
        got = np.asarray(median(x))
        np.testing.assert_array_equal(got, torch.tensor(x).median(dim=0).values.numpy())


def test_prim_edges_give_hdbscan_labels():
    """The opened Prim edge list is all HDBSCAN needs: same labels as hdbscan.HDBSCAN on the full
    matrix, for random matrices with and without clusters, duplicates and min_samples 1 and 2."""
    import hdbscan
    import jax

    from sf_ext.aggregators.secure_flame import (
        labels_from_prim_edges,
        mutual_reachability,
        prim_edges,
    )

    opened = jax.jit(lambda d, k: prim_edges(mutual_reachability(d, k)), static_argnums=1)
    rng = np.random.default_rng(1)
    outcomes = set()
    for trial in range(100):
        n = int(rng.integers(3, 14))
        points = rng.standard_normal((n, 4))
        if trial % 3 == 0:
            points[: n // 2] += 4.0  # two groups
        if trial % 5 == 0:
            points[1] = points[0]  # a duplicate: zero distance, ties
        dist = np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1))
        dist = (2.0 * dist / dist.max()).astype(np.float32)  # cosine distances lie in [0, 2]
        for min_samples in (1, 2):
            mcs = n // 2 + 1
            edges = np.asarray(opened(dist, min_samples))
            assert edges.shape == (n - 1, 3)
            labels = labels_from_prim_edges(edges, mcs)
            reference = hdbscan.HDBSCAN(
                metric="precomputed",
                min_cluster_size=mcs,
                min_samples=min_samples,
                allow_single_cluster=True,
            ).fit(dist.astype(np.float64))
            np.testing.assert_array_equal(labels, reference.labels_)
            outcomes.add(int((labels >= 0).sum()) == n)
    assert outcomes == {True, False}  # both "everyone clustered" and "some noise" occurred


def test_model_distances_avoid_cancellation():
    """The identity used in SPU gives the cosine distances of the models from update statistics
    alone, to float32 rounding of the distance itself (not of 1 - cos)."""
    from sf_ext.aggregators._linalg import cosine_distances, gram_matrix64
    from sf_ext.aggregators.secure_flame import model_cosine_distances

    rnd = planted_round("sign_flip", seed=2, n_benign=5, n_attack=2, dim=3000)
    u, g = rnd.updates.double(), rnd.global_params.double()
    got = np.asarray(
        model_cosine_distances(
            np.asarray(u @ u.T, np.float32),
            np.asarray(u @ g, np.float32),
            np.float32(g @ g),
        )
    )
    want = cosine_distances(gram_matrix64(rnd.updates, None, rnd.global_params)).numpy()
    off = ~np.eye(7, dtype=bool)
    assert want[off].max() < 0.05  # the models are nearly parallel: 1 - cos is small
    np.testing.assert_allclose(got[off], want[off], rtol=2e-3)


def test_unsafe_spu_configurations_are_refused():
    import spu

    from sf_ext.aggregators.secure_flame import check_spu_for_filter, spu_runtime_config

    def conf(**kwargs):
        return spu.RuntimeConfig(**{**spu_runtime_config(), **kwargs})

    assert check_spu_for_filter(conf(), ["charlie", "hugo", "ivy"], "charlie", False) == "ABY3"
    cheetah = conf(protocol=spu.ProtocolKind.CHEETAH)
    assert check_spu_for_filter(cheetah, ["charlie", "hugo"], "charlie", False) == "CHEETAH"
    with pytest.raises(ValueError, match="REF2K computes in the clear"):
        check_spu_for_filter(conf(protocol=spu.ProtocolKind.REF2K), ["a", "b"], "a", False)
    with pytest.raises(ValueError, match="needs the FM128 field"):
        check_spu_for_filter(conf(field=spu.FieldType.FM64), ["a", "b", "c"], "a", False)
    with pytest.raises(ValueError, match="fxp_fraction_bits"):
        check_spu_for_filter(conf(fxp_fraction_bits=18), ["a", "b", "c"], "a", False)
    semi2k = conf(protocol=spu.ProtocolKind.SEMI2K)
    # The trusted first party is the first SPU party by name: here the server itself.
    with pytest.raises(ValueError, match="must not be the server"):
        check_spu_for_filter(semi2k, ["charlie", "hugo"], "charlie", True)
    with pytest.raises(ValueError, match="allow_trusted_dealer=True"):
        check_spu_for_filter(semi2k, ["alice", "charlie"], "charlie", False)
    with pytest.warns(UserWarning, match="alice can read every client's model"):
        assert check_spu_for_filter(semi2k, ["alice", "charlie"], "charlie", True) == "SEMI2K"


# ---------------------------------------------------------------------------------------------
# Kernels inside SPU's simulator (real MPC protocols, one process): fixed point vs plaintext.


def _simulator(protocol: str):
    import spu
    import spu.utils.simulation as simulation

    from sf_ext.aggregators.secure_flame import spu_runtime_config

    config = spu.RuntimeConfig(**spu_runtime_config(protocol))
    return simulation.Simulator(3 if protocol == "ABY3" else 2, config)


def _secure_flame_round(sim, models, global_params, reveal, bound=100.0):
    """The two SPU stages of one round, with the server's clustering in between."""
    import spu.utils.simulation as simulation

    from sf_ext.aggregators.flame import majority_cluster
    from sf_ext.aggregators.secure_flame import clipped_sum, flame_filter, labels_from_prim_edges

    n = models.shape[0]
    stage = functools.partial(flame_filter, bound=bound, reveal=reveal, min_samples=1)

    def first(*rows, g):
        opened, median_norm, clip, _ = stage(*rows, global_params=g)
        return opened, median_norm, clip

    opened, median_norm, clip = simulation.sim_jax(sim, first)(*list(models), g=global_params)
    if reveal == "mst":
        labels = labels_from_prim_edges(opened, n // 2 + 1)
    else:
        labels, _ = majority_cluster(np.asarray(opened, np.float64), n // 2 + 1, 1)
    kept = labels == 0
    shares = (kept / max(kept.sum(), 1)).astype(np.float32)

    def second(*rows, g, shares):
        _, _, clip, updates = stage(*rows, global_params=g)
        return clipped_sum(updates, clip, shares, None, None, g, noise_mode="paper", noise_spans=())

    aggregate = simulation.sim_jax(sim, second)(*list(models), g=global_params, shares=shares)
    return kept, float(median_norm), np.asarray(clip), np.asarray(aggregate)


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["ABY3", "SEMI2K"])
def test_spu_filter_equals_plaintext_flame(protocol):
    """Same kept set, median norm, clip factors and aggregate as the plaintext rule, for
    sign-flipping, scaled and same-value attackers, with either opening."""
    from sf_ext.aggregators.flame import flame

    sim = _simulator(protocol)
    attacks = ["sign_flip", "scaled", "same_value"] if protocol == "ABY3" else ["sign_flip"]
    for seed, attack in enumerate(attacks):
        rnd = planted_round(attack, seed=seed, n_benign=6, n_attack=3, dim=2000)
        updates = rnd.updates.clone()
        if attack == "same_value":
            updates[rnd.is_attacker] = 0.5  # inside the clamp, so both sides see the same input
        models = (rnd.global_params + updates).numpy()
        reference, report = flame(
            torch.tensor(models) - rnd.global_params,
            global_params=rnd.global_params,
            noise_lambda=0,
        )
        assert report.kept[rnd.is_attacker].sum() == 0  # the case is not trivial: FLAME drops them
        for reveal in ("mst", "distances"):
            kept, median_norm, clip, aggregate = _secure_flame_round(
                sim, models, rnd.global_params.numpy(), reveal
            )
            assert kept.tolist() == report.kept.tolist(), (attack, reveal)
            assert median_norm == pytest.approx(report.details["median_norm"], rel=1e-6)
            np.testing.assert_allclose(clip, report.details["clip_factors"], rtol=1e-6)
            np.testing.assert_allclose(aggregate, reference.numpy(), rtol=0, atol=1e-7)


def test_clamp_keeps_an_overflowing_client_from_wrapping_around():
    """A client uploading 1e20 per entry: its squares overflow the ring unless clamped. With the
    clamp the SPU result equals plaintext FLAME on the clamped models, and the client is out."""
    from sf_ext.aggregators.flame import flame

    sim = _simulator("ABY3")
    rnd = planted_round("sign_flip", seed=4, n_benign=4, n_attack=1, dim=1000)
    models = (rnd.global_params + rnd.updates).numpy()
    attacker = int(np.flatnonzero(rnd.is_attacker.numpy())[0])
    models[attacker] = 1e20
    kept, median_norm, _, aggregate = _secure_flame_round(
        sim, models, rnd.global_params.numpy(), "mst", bound=100.0
    )
    clamped = torch.tensor(np.clip(models, -100.0, 100.0))
    reference, report = flame(
        clamped - rnd.global_params, global_params=rnd.global_params, noise_lambda=0
    )
    assert not kept[attacker] and kept.tolist() == report.kept.tolist()
    assert median_norm == pytest.approx(report.details["median_norm"], rel=1e-6)
    np.testing.assert_allclose(aggregate, reference.numpy(), rtol=0, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Ray simulation: the real devices. The scenario runs in a subprocess and pickles what it saw.


def _flat(weights) -> np.ndarray:
    return np.concatenate([np.asarray(w, np.float64).reshape(-1) for w in weights])


def _unflat(vector, shapes=SHAPES):
    out, start = [], 0
    for shape in shapes:
        size = int(np.prod(shape))
        out.append(np.asarray(vector[start : start + size], np.float32).reshape(shape))
        start += size
    return out


def _tiny_model():
    """The server's own starting model for ``initial="server"`` (tensors of SHAPES, seeded)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.ReLU(), torch.nn.Linear(30, 10))


class _Recorder:
    """Records every object moved to the server device (revealed at the end, in the driver)."""

    def __init__(self, server):
        from secretflow.device.device.base import DeviceObject

        self.server, self.moved, self._cls = server, [], DeviceObject
        self._original = DeviceObject.to

    def __enter__(self):
        recorder, original = self, self._original

        def recording_to(obj, device, *args, **kwargs):
            moved = original(obj, device, *args, **kwargs)
            if device == recorder.server and obj.device != recorder.server:
                recorder.moved.append((type(obj.device).__name__, moved))
            return moved

        self._cls.to = recording_to
        return self

    def __exit__(self, *exc):
        self._cls.to = self._original

    def revealed(self):
        import secretflow as sf

        return [(source, sf.reveal(obj)) for source, obj in self.moved]


def _direct_rounds(sf, clients, server, spu):
    """Initial weights, then rounds where dave flips signs or scales x10, through
    SecureFlameAggregator (two rounds, Prim-edge opening; the distance opening is checked in SPU's
    simulator), SecureClippingAggregator (NDC, and median threshold from the server's own start;
    one round each) and the plaintext rules on the same numbers."""
    from sf_ext.aggregators.flame import flame
    from sf_ext.aggregators.norm_clipping import norm_clipping
    from sf_ext.aggregators.secure_clipping import SecureClippingAggregator
    from sf_ext.aggregators.secure_flame import SecureFlameAggregator
    from sf_ext.params import ParamLayout

    layout = ParamLayout.from_arrays([np.zeros(s) for s in SHAPES])
    rng = np.random.default_rng(3)
    starts = [rng.normal(0, 0.1, layout.num_params).astype(np.float32) for _ in clients]
    counts = [1000.0, 1500.0, 2000.0, 2500.0]
    rounds = []
    for seed, attack in enumerate(["sign_flip", "scaled"]):
        rnd = planted_round(attack, seed=10 + seed, n_benign=3, n_attack=1, dim=layout.num_params)
        order = np.argsort(rnd.is_attacker.numpy(), kind="stable")  # dave (last) attacks
        rounds.append(0.05 * rnd.updates.numpy()[order])
    aggregators = {
        "flame": SecureFlameAggregator(server, clients, spu, noise="paper", noise_seed=5),
        "ndc": SecureClippingAggregator(server, clients, spu, threshold=0.05),
        "median_clip": SecureClippingAggregator(
            server, clients, spu, threshold="median", initial="server", model_fn=_tiny_model
        ),
    }
    out = {"starts": starts, "rounds": rounds, "counts": counts, "results": {}, "reference": {}}
    with _Recorder(server) as recorder:
        for name, aggregator in aggregators.items():
            sent = [c(lambda w=_unflat(s): w)() for c, s in zip(clients, starts)]
            results = [sf.reveal(aggregator.average(sent, axis=0))]
            for updates in rounds[: 2 if name == "flame" else 1]:
                base = _flat(results[-1]).astype(np.float32)
                sent = [c(lambda w=_unflat(base + u): w)() for c, u in zip(clients, updates)]
                weights = [c(lambda n=n: n)() for c, n in zip(clients, counts)]
                results.append(sf.reveal(aggregator.average(sent, axis=0, weights=weights)))
            out["results"][name] = {"weights": results, "reports": aggregator.reports()}
    out["moved"] = recorder.revealed()
    # The plaintext rules on the same inputs (the secure global model before each round); the
    # FLAME aggregator's noise party drew from its own generator seeded 5, round after round.
    for name in aggregators:
        generator, refs = torch.Generator().manual_seed(5), []
        for r, updates in enumerate(rounds[: 2 if name == "flame" else 1]):
            base = torch.tensor(_flat(out["results"][name]["weights"][r]), dtype=torch.float32)
            u = (base + torch.tensor(updates)) - base
            if name.startswith("flame"):
                update, report = flame(
                    u, global_params=base, layout=layout, generator=generator, noise="paper"
                )
            else:
                norms = torch.linalg.vector_norm(u, dim=1).double()
                threshold = 0.05 if name == "ndc" else float(torch.quantile(norms, 0.5))
                update, report = norm_clipping(u, torch.tensor(counts), threshold=threshold)
            refs.append({"update": update.numpy(), "kept": report.kept.tolist()})
        out["reference"][name] = refs
    return out


def _fit_with_a_sign_flipper(server, clients, aggregator, train, test):
    """Two epochs of LeNet with ``aggregator``, dave flipping signs (x4); validation accuracies."""
    from secretflow_fl.ml.nn import FLModel

    from sf_ext.models import LeNet
    from sf_ext.strategies import enable_attack
    from sf_ext.training import build_torch_model

    fl = FLModel(
        server=server,
        device_list=clients,
        model=build_torch_model(LeNet, lr=3e-3),
        aggregator=aggregator,
        strategy="fed_avg_w_attack",
        backend="torch",
        random_seed=0,
    )
    enable_attack(fl, "dave", "sign_flip", scale=-4.0)
    history = fl.fit(
        *train, validation_data=test, epochs=2, batch_size=64, aggregate_freq=8, verbose=0
    )
    return [float(a) for a in history["global_history"]["val_multiclassaccuracy"]]


def _training(sf, clients, server, spu):
    """Fashion-MNIST LeNet, dave flips signs (x4): plaintext FlameAggregator, then
    SecureFlameAggregator (default relative noise, same draws) with every transfer to the server
    recorded."""
    from sf_ext.aggregators.robust_secretflow import FlameAggregator
    from sf_ext.aggregators.secure_flame import SecureFlameAggregator
    from sf_ext.data import federated_dataset

    (train_x, train_y), test = federated_dataset(
        "fashion-mnist", {c: 0.25 for c in clients}, limit=4000, seed=0
    )

    def fit(aggregator):
        return _fit_with_a_sign_flipper(server, clients, aggregator, (train_x, train_y), test)

    plain = FlameAggregator(server, clients)
    out = {"plain_accuracy": fit(plain), "plain_reports": plain.reports()}
    # The noise party draws the same standard normals as the plaintext server's generator (seed
    # 0, its default): what differs between the two runs is the secure computation itself.
    secure = SecureFlameAggregator(server, clients, spu, noise_seed=0)
    uploads, results = [], []
    average = secure.average

    def capturing_average(data, axis=0, weights=None):
        uploads.append(sf.reveal(data))  # test-only: the driver of a simulation sees everything
        result = average(data, axis=axis, weights=weights)
        results.append(result)
        return result

    secure.average = capturing_average
    with _Recorder(server) as recorder:
        out["secure_accuracy"] = fit(secure)
    out["secure_reports"] = secure.reports()
    out["uploads"] = uploads
    out["results"] = sf.reveal(results)
    out["moved"] = recorder.revealed()
    return out


def _spu_log(folder: Path, party: str = "spu"):
    """SPU logs into the run's folder (by default every SPU party writes spu.log into the
    working directory, i.e. the user's checkout)."""
    import spu.libspu.logging as spu_logging

    options = spu_logging.LogOptions()
    options.system_log_path = str(folder / f"{party}.spu.log")
    options.enable_console_logger = False
    return options


def _prune_construction_checks(clients, server) -> dict:
    """``fed_avg_w_prune``'s parameter checks in Ray mode, where the strategy is built inside
    the parties' actors: errors and typo warnings must still reach the user's FLModel line.
    (Run in this scenario's Ray instance to save a Ray start-up in the suite.)"""
    import warnings

    from secretflow_fl.ml.nn import FLModel

    from sf_ext.aggregators import SecurePruneAggregator
    from sf_ext.models import MLP
    from sf_ext.training import build_torch_model

    def build(**kwargs):
        return FLModel(
            server=server,
            device_list=list(clients),
            model=build_torch_model(MLP, 1e-2),
            aggregator=SecurePruneAggregator(server, list(clients)),
            strategy="fed_avg_w_prune",
            backend="torch",
            **kwargs,
        )

    out = {}
    try:
        build(prune_percent=0)
        out["error"] = None
    except ValueError as exc:
        out["error"] = str(exc)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build(prune_precent=5)
    out["warnings"] = [str(w.message) for w in caught if "prune_precent" in str(w.message)]
    return out


def _ray_scenario(path: str) -> None:
    import secretflow as sf

    import sf_ext
    from sf_ext.aggregators.secure_flame import spu_runtime_config

    # Every party gets num_cpus units of its own Ray resource and every actor holds one for its
    # lifetime: with few units the server runs out of them and the run waits forever.
    sf.init(CLIENTS + [SERVER] + HELPERS, address="local", num_cpus=32, log_to_driver=False)
    try:
        sf_ext.register_strategies()
        clients, server = [sf.PYU(c) for c in CLIENTS], sf.PYU(SERVER)
        cluster = sf.utils.testing.cluster_def([SERVER] + HELPERS, spu_runtime_config("ABY3"))
        spu = sf.SPU(cluster, log_options=_spu_log(Path(path).parent))
        started = time.monotonic()
        out = {"direct": _direct_rounds(sf, clients, server, spu)}
        out["seconds"] = {"direct": time.monotonic() - started}
        out["training"] = _training(sf, clients, server, spu)
        out["seconds"]["training"] = time.monotonic() - started - out["seconds"]["direct"]
        out["construction"] = _prune_construction_checks(clients[:2], server)
    finally:
        sf.shutdown()
    with open(path, "wb") as f:
        pickle.dump(out, f)


def _party_program(path: str) -> None:
    """One party of the production-mode run: alice, bob and dave (who flips signs) train; charlie
    aggregates; the SPU is alice, bob and charlie (clients as SPU parties, as SecretFlow allows)."""
    import json

    import secretflow as sf

    import sf_ext
    from sf_ext.aggregators.secure_flame import SecureFlameAggregator, spu_runtime_config
    from sf_ext.production import init_from_env

    self_party = init_from_env()
    from sf_ext.data import federated_dataset

    sf_ext.register_strategies()
    ports = json.loads(os.environ["SF_EXT_SPU_PORTS"])
    spu_parties = ["alice", "bob", SERVER]
    spu = sf.SPU(
        {
            "nodes": [{"party": p, "address": f"127.0.0.1:{ports[p]}"} for p in spu_parties],
            "runtime_config": spu_runtime_config("ABY3"),
        },
        log_options=_spu_log(Path(path).parent, self_party),
    )
    clients = [sf.PYU(p) for p in ("alice", "bob", "dave")]
    server = sf.PYU(SERVER)
    (train_x, train_y), test = federated_dataset(
        "fashion-mnist", {c: 1 / 3 for c in clients}, limit=3000, seed=0
    )
    aggregator = SecureFlameAggregator(server, clients, spu)
    accuracy = _fit_with_a_sign_flipper(server, clients, aggregator, (train_x, train_y), test)
    reports = aggregator.reports()
    if self_party == SERVER:
        with open(path, "w") as f:
            json.dump(
                {
                    "accuracy": accuracy,
                    "kept": [r["kept"] for r in reports],
                    "parties": [r["parties"] for r in reports],
                },
                f,
            )
    sf.shutdown()


@pytest.fixture(scope="module")
def ray_run(tmp_path_factory):
    """The Ray-simulation scenario, run once in its own process (its own Ray instance, shut
    down before it exits)."""
    path = tmp_path_factory.mktemp("secure_flame") / "ray.pkl"
    proc = subprocess.Popen(
        [sys.executable, str(HERE), "ray", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        log, _ = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        log, _ = proc.communicate()
        pytest.fail("the Ray scenario did not finish in 600 s:\n" + log[-4000:])
    if proc.returncode != 0:
        pytest.fail(f"the Ray scenario failed ({proc.returncode}):\n" + log[-4000:])
    with open(path, "rb") as f:
        return pickle.load(f)


@pytest.mark.slow
@pytest.mark.needs_data
def test_secure_aggregators_equal_the_plaintext_rules_in_secretflow(ray_run):
    """Through the real devices: the start is the clients' coordinate-wise median (or the server's
    own model), then every round keeps the same clients and yields the same global model as the
    plaintext rule on the same numbers (FLAME with the same paper-form noise draws)."""
    direct = ray_run["direct"]
    starts = torch.tensor(np.stack(direct["starts"]))
    results = direct["results"]
    median = starts.median(dim=0).values.numpy()
    for name in ("flame", "ndc"):  # the fixed-point encoding keeps 40 fraction bits
        np.testing.assert_allclose(_flat(results[name]["weights"][0]), median, rtol=0, atol=1e-11)
    own = np.concatenate(
        [t.detach().numpy().reshape(-1) for t in _tiny_model().state_dict().values()]
    )
    np.testing.assert_array_equal(_flat(results["median_clip"]["weights"][0]), own)
    for name, references in direct["reference"].items():
        reports = results[name]["reports"]
        assert len(reports) == len(references)
        for r, reference in enumerate(references):
            update = _flat(results[name]["weights"][r + 1]) - _flat(results[name]["weights"][r])
            assert reports[r]["kept"] == reference["kept"], (name, r)
            assert reports[r]["parties"] == CLIENTS and reports[r]["round"] == r
            np.testing.assert_allclose(update, reference["update"], rtol=0, atol=2e-8)
    flame_reports = results["flame"]["reports"]
    assert [r["kept"] for r in flame_reports] == [[True, True, True, False]] * 2
    assert all(r["details"]["protocol"] == "ABY3" for r in flame_reports)
    assert results["median_clip"]["reports"][0]["details"]["threshold"] > 0  # opened S_t


def _plaintexts(vectors, bases):
    """Every client's upload and update (upload minus the global model it started from)."""
    secrets = []
    for uploads, base in zip(vectors, bases):
        for upload in uploads:
            secrets.append(upload)
            if base is not None:
                secrets.append(upload - base)
    return secrets


def _assert_none_is_a_plaintext(moved, secrets):
    for index, (_, value) in enumerate(moved):
        array = np.asarray(value, np.float64)
        for secret in secrets:
            if array.shape == secret.shape:
                assert not np.allclose(array, secret, rtol=1e-3, atol=1e-5), index


@pytest.mark.slow
@pytest.mark.needs_data
def test_direct_rounds_send_the_server_only_what_is_opened(ray_run):
    """Every transfer to the server comes out of the SPU and is one of: a model-sized opened
    result (start or aggregate), Prim edges (3 x 3 for 4 clients) or a scalar (S_t)."""
    direct = ray_run["direct"]
    moved = direct["moved"]
    assert moved and {source for source, _ in moved} == {"SPU"}
    assert {np.shape(value) for _, value in moved} == {(1540,), (3, 3), ()}
    bases = [None]
    uploads = [[_flat(_unflat(s)) for s in direct["starts"]]]
    for name in ("flame", "ndc", "median_clip"):
        weights = direct["results"][name]["weights"]
        for r, updates in enumerate(direct["rounds"][: len(weights) - 1]):
            base = _flat(weights[r]).astype(np.float32).astype(np.float64)
            bases.append(base)
            uploads.append([(base.astype(np.float32) + u).astype(np.float64) for u in updates])
    _assert_none_is_a_plaintext(moved, _plaintexts(uploads, bases))


@pytest.mark.slow
@pytest.mark.needs_data
def test_secure_flame_drops_the_sign_flipper_and_trains_like_plaintext_flame(ray_run):
    training = ray_run["training"]
    plain, secure = training["plain_accuracy"][-1], training["secure_accuracy"][-1]
    assert plain > 0.6 and abs(secure - plain) <= 0.02, (plain, secure)
    for reports in (training["plain_reports"], training["secure_reports"]):
        assert len(reports) >= 4
        assert all(r["kept"] == [True, True, True, False] for r in reports)  # dave, always out
    assert training["secure_reports"][0]["details"]["reveal"] == "mst"


@pytest.mark.slow
@pytest.mark.needs_data
def test_training_sends_the_server_no_client_plaintext(ray_run):
    """In FLModel training every object reaching the server device comes out of the SPU, and
    none equals a client's upload or update. The one exception is the start: all clients begin
    from the same seeded model, so the median opened then *is* that (public) model."""
    training = ray_run["training"]
    moved = training["moved"]
    assert moved and {source for source, _ in moved} == {"SPU"}
    d = 61706  # LeNet
    assert {np.shape(value) for _, value in moved} == {(d,), (3, 3), ()}
    uploads = [[_flat(w) for w in call] for call in training["uploads"]]
    results = [_flat(r) for r in training["results"]]
    first = np.asarray(moved[0][1], np.float64)
    # identical starting models, up to the 2^-40 fixed-point encoding
    assert all(np.allclose(first, u, rtol=0, atol=1e-11) for u in uploads[0])
    bases = [None] + results[:-1]
    _assert_none_is_a_plaintext(moved, _plaintexts(uploads[1:], bases[1:]))


@pytest.mark.slow
@pytest.mark.needs_data
def test_ray_mode_reports_bad_prune_parameters_at_flmodel_construction(ray_run):
    construction = ray_run["construction"]
    assert construction["error"] is not None, "prune_percent=0 was accepted in Ray mode"
    assert "prune_percent must be in (0, 100)" in construction["error"]
    assert any(
        "did you mean the fed_avg_w_prune parameter 'prune_percent'?" in w
        for w in construction["warnings"]
    ), construction["warnings"]


@pytest.mark.slow
@pytest.mark.needs_data
def test_production_mode_one_process_per_party(tmp_path):
    """alice, bob, dave (sign flips) and charlie as four processes on loopback; the SPU (ABY3) is
    alice, bob and charlie. dave is dropped in every round and the model learns."""
    import json

    from sf_ext.production import reserve_ports, run_parties

    result = tmp_path / "result.json"
    with reserve_ports(3) as spu_ports:  # SPU's own links, claimed so run_parties skips them
        ports = dict(zip(["alice", "bob", SERVER], spu_ports.ports))
        run_parties(
            [sys.executable, str(HERE), "party", str(result)],
            ["alice", "bob", "dave", SERVER],
            log_dir=tmp_path / "logs",
            timeout_s=480,
            env={"SF_EXT_SPU_PORTS": json.dumps(ports), "OMP_NUM_THREADS": "1"},
        )
    outcome = json.loads(result.read_text())
    assert outcome["accuracy"][-1] > 0.6
    assert len(outcome["kept"]) >= 2
    assert all(p == ["alice", "bob", "dave"] for p in outcome["parties"])
    assert all(k == [True, True, False] for k in outcome["kept"])


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("SF_EXT_DATA", str(HERE.parents[2] / "shared" / "data"))  # as conftest
    torch.set_num_threads(1)
    {"ray": _ray_scenario, "party": _party_program}[sys.argv[1]](sys.argv[2])
