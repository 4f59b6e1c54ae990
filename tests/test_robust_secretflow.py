"""Robust aggregators inside SecretFlow's FLModel (debug mode, real Fashion-MNIST)."""

import numpy as np
import pytest
import secretflow as sf
import torch
from secretflow.security.aggregation import SecureAggregator
from secretflow_fl.ml.nn import FLModel

from sf_ext.aggregators.robust_secretflow import (
    ROBUST_AGGREGATORS,
    FlameAggregator,
    KrumAggregator,
    MatrixMappingAggregator,
    MedianAggregator,
)
from sf_ext.data import federated_dataset
from sf_ext.models import LeNet
from sf_ext.training import build_torch_model

pytestmark = pytest.mark.secretflow


@pytest.fixture(scope="module")
def four_client_data(sf_clients, fashion_mnist_root):
    clients, _ = sf_clients
    return federated_dataset(
        "fashion-mnist", {c: 0.25 for c in clients}, root=fashion_mnist_root, limit=12000, seed=0
    )


def _fit(aggregator, clients, server, data, epochs=3, attacker=None):
    """Train LeNet with ``fed_avg_w``, or with ``fed_avg_w_attack`` and dave sending ``attacker``."""
    from sf_ext.strategies import enable_attack

    (train_x, train_y), test = data
    fl = FLModel(
        server=server,
        device_list=clients,
        model=build_torch_model(LeNet, lr=3e-3),
        aggregator=aggregator,
        strategy="fed_avg_w" if attacker is None else "fed_avg_w_attack",
        backend="torch",
        random_seed=0,
    )
    if attacker is not None:
        enable_attack(fl, "dave", attacker, scale=-4.0)
    history = fl.fit(
        train_x,
        train_y,
        validation_data=test,
        epochs=epochs,
        batch_size=64,
        aggregate_freq=4,
        verbose=0,
    )
    return history["global_history"]["val_multiclassaccuracy"][-1]


@pytest.fixture(scope="module")
def secure_baseline(sf_clients, four_client_data):
    clients, server = sf_clients
    return _fit(SecureAggregator(server, clients), clients, server, four_client_data)


@pytest.mark.needs_data
@pytest.mark.slow
@pytest.mark.parametrize(
    "make_aggregator",
    [
        lambda server, clients: FlameAggregator(server, clients),
        lambda server, clients: MatrixMappingAggregator(
            server, clients, model_fn=LeNet, input_shape=(1, 28, 28)
        ),
    ],
    ids=["flame", "matrix_mapping"],
)
def test_within_two_points_of_secure_aggregator_without_attack(
    sf_clients, four_client_data, secure_baseline, make_aggregator
):
    clients, server = sf_clients
    aggregator = make_aggregator(server, clients)
    accuracy = _fit(aggregator, clients, server, four_client_data)
    assert accuracy >= secure_baseline - 0.02, (accuracy, secure_baseline)
    reports = aggregator.reports()
    assert reports and all(r["parties"] == [c.party for c in clients] for r in reports)
    assert all(any(r["kept"]) for r in reports)


def test_krum_drops_a_party_sending_a_huge_update(sf_clients):
    """The server keeps the previous global model: an update far from it is what Krum rejects."""
    clients, server = sf_clients
    aggregator = KrumAggregator(server, clients[:4], f=0)
    rng = np.random.default_rng(0)
    start = [rng.normal(size=(3, 2)).astype(np.float32), rng.normal(size=3).astype(np.float32)]

    def client_weights(scale):
        return [w + scale * rng.normal(size=w.shape).astype(np.float32) for w in start]

    first = [c(lambda: client_weights(0.0))() for c in clients]
    initial = sf.reveal(aggregator.average(first, axis=0, weights=[1, 1, 1, 1]))
    honest = [c(lambda: client_weights(0.01))() for c in clients[:3]]
    attacker = clients[3](lambda: [w * 0 + 100 for w in start])()
    result = sf.reveal(aggregator.average(honest + [attacker], axis=0, weights=[1, 1, 1, 1]))
    assert all(r.dtype == np.float32 for r in result)
    assert max(np.abs(r - i).max() for r, i in zip(result, initial)) < 0.1
    report = aggregator.reports()[-1]
    assert report["parties"][3] == "dave" and report["kept"][3] is False


def test_nan_update_is_screened_not_averaged(sf_clients):
    clients, server = sf_clients
    aggregator = MedianAggregator(server, clients)
    ones = [np.ones((2, 2), np.float32)]
    sf.reveal(aggregator.average([c(lambda: ones)() for c in clients], axis=0))
    data = [c(lambda: [np.full((2, 2), 1.1, np.float32)])() for c in clients[:3]]
    data.append(clients[3](lambda: [np.full((2, 2), np.nan, np.float32)])())
    result = sf.reveal(aggregator.average(data, axis=0))
    assert np.all(np.isfinite(result[0])) and np.allclose(result[0], 1.1)
    assert aggregator.reports()[-1]["non_finite"] == [False, False, False, True]


def test_configuration_errors_are_clear(sf_clients):
    clients, server = sf_clients
    with pytest.raises(ValueError, match="model_fn and input_shape"):
        MatrixMappingAggregator(server, clients)
    with pytest.raises(ValueError, match="participants"):
        FlameAggregator(server, [])
    aggregator = FlameAggregator(server, clients[:2])
    with pytest.raises(ValueError, match="not participants"):
        aggregator.average([c(lambda: [np.ones(2)])() for c in clients[2:]], axis=0)


def test_every_core_rule_has_an_adapter():
    from sf_ext.aggregators import AGGREGATORS

    assert set(AGGREGATORS) == set(ROBUST_AGGREGATORS)


def _tiny_net():
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 5))


ADAPTER_OPTIONS = {
    "krum": {"f": 0},
    "multi_krum": {"f": 0},
    "bulyan": {"f": 0},
    "dnc": {"f": 1},
    "centered_clipping": {"tau": 0.5},
}


@pytest.mark.parametrize("method", sorted(ROBUST_AGGREGATORS))
def test_every_adapter_matches_its_core_rule_for_two_rounds(sf_clients, method):
    """Each SecretFlow adapter, fed the same client weights, equals the core rule called with
    the same server context (global model, round, generator, party names, memory)."""
    from sf_ext.aggregators import ServerContext, call_rule
    from sf_ext.aggregators.robust_secretflow import _train_root
    from sf_ext.params import ParamLayout

    clients, server = sf_clients
    parties = [c.party for c in clients]
    options = ADAPTER_OPTIONS.get(method, {})
    kwargs = dict(model_fn=_tiny_net, input_shape=(1, 4, 4), **options)
    rng = np.random.default_rng(1)
    root_x = rng.normal(size=(20, 1, 4, 4)).astype(np.float32)
    root_y = rng.integers(0, 5, size=20)
    if method == "fltrust":
        kwargs.update(root_data=(root_x, root_y), root_lr=0.1)
    aggregator = ROBUST_AGGREGATORS[method](server, clients, **kwargs)
    torch.manual_seed(0)
    model = _tiny_net()
    layout = ParamLayout.from_module(model)
    start = layout.flatten(model.state_dict())
    first = [c(lambda w=layout.unflatten_numpy(start): w)() for c in clients]
    initial = sf.reveal(aggregator.average(first, axis=0, weights=[1, 1, 1, 1]))
    np.testing.assert_array_equal(layout.flatten(initial).numpy(), start.numpy())
    generator = torch.Generator().manual_seed(0)
    state, global_vec = {}, start.clone()
    counts = [5.0, 10.0, 20.0, 40.0]
    for round_index in range(2):
        updates = torch.tensor(
            rng.normal(0, 0.05, size=(4, layout.num_params)), dtype=torch.float32
        )
        updates[3] *= -4  # dave misbehaves a little
        sent = [
            c(lambda w=layout.unflatten_numpy(global_vec + u): w)()
            for c, u in zip(clients, updates)
        ]
        result = sf.reveal(aggregator.average(sent, axis=0, weights=counts))
        vectors = torch.stack(
            [layout.flatten(layout.unflatten_numpy(global_vec + u)) for u in updates]
        )
        root_update = None
        if method == "fltrust":
            root_update = _train_root(
                _tiny_net(), layout, global_vec, (root_x, root_y), 0.1, 1, 32, 0 + round_index
            )
        context = ServerContext(
            layout=layout,
            global_params=global_vec,
            model=_tiny_net(),
            input_shape=(1, 4, 4),
            round_index=round_index,
            generator=generator,
            client_ids=parties,
            state=state,
            root_update=root_update,
        )
        expected, report = call_rule(
            method,
            vectors - global_vec,
            torch.tensor(counts, dtype=torch.float64),
            context,
            **options,
        )
        global_vec = global_vec + expected
        np.testing.assert_allclose(
            layout.flatten(result).numpy(), global_vec.numpy(), rtol=1e-6, atol=1e-6
        )
        logged = aggregator.reports()[-1]
        assert logged["kept"] == report.kept.tolist() and logged["parties"] == parties
        assert logged["round"] == round_index and logged["method"] == report.method


def test_one_client_cannot_choose_the_starting_model(sf_clients):
    clients, server = sf_clients
    for cls in (KrumAggregator, MedianAggregator, FlameAggregator):
        aggregator = cls(server, clients, **({"f": 0} if cls is KrumAggregator else {}))
        sent = [
            c(lambda v=v: [np.full((2, 3), v, np.float32)])()
            for c, v in zip(clients, [0, 0, 0, 100])
        ]
        start = sf.reveal(aggregator.average(sent, axis=0, weights=[1, 1, 1, 1]))
        np.testing.assert_array_equal(start[0], np.zeros((2, 3), np.float32))


def test_adapters_reject_misspelled_options(sf_clients):
    clients, server = sf_clients
    with pytest.raises(
        ValueError, match="unknown option 'noise_lamda'.*did you mean 'noise_lambda'"
    ):
        FlameAggregator(server, clients, noise_lamda=0.0)
    with pytest.raises(ValueError, match="server context the adapter fills itself"):
        FlameAggregator(server, clients, global_params=np.zeros(3))
    from sf_ext.aggregators.robust_secretflow import FLTrustAggregator, RobustAggregator

    with pytest.raises(ValueError, match="needs model_fn and root_data"):
        FLTrustAggregator(server, clients)
    with pytest.raises(ValueError, match="unknown aggregator 'flme'"):
        RobustAggregator(server, clients, method="flme")


@pytest.mark.needs_data
@pytest.mark.slow
def test_attacking_party_breaks_fedavg_but_not_flame(sf_clients, four_client_data):
    """dave uploads -4x his honest update every round (the paper's sign flip)."""
    clients, server = sf_clients
    data = four_client_data
    plain = _fit(SecureAggregator(server, clients), clients, server, data, 2, "sign_flip")
    flame = FlameAggregator(server, clients)
    defended = _fit(flame, clients, server, data, 2, "sign_flip")
    assert defended >= 0.75 and plain <= defended - 0.2, (plain, defended)
    dave_kept = [r["kept"][r["parties"].index("dave")] for r in flame.reports()]
    assert sum(dave_kept) <= 0.1 * len(dave_kept)


def test_enable_attack_refuses_what_one_client_cannot_do(sf_clients):
    from sf_ext.strategies import enable_attack

    clients, server = sf_clients
    fl = FLModel(
        server=server,
        device_list=clients,
        model=build_torch_model(LeNet, lr=3e-3),
        aggregator=SecureAggregator(server, clients),
        strategy="fed_avg_w_attack",
        backend="torch",
    )
    with pytest.raises(ValueError, match="cannot run inside one client"):
        enable_attack(fl, "dave", "min_max")
    with pytest.raises(ValueError, match="cannot run inside one client"):
        enable_attack(fl, "dave", "ipm")
    with pytest.raises(ValueError, match="not a client"):
        enable_attack(fl, "mallory", "sign_flip")
    with pytest.raises(ValueError, match="unknown options \\['scal'\\]"):
        enable_attack(fl, "dave", "sign_flip", scal=2.0)


@pytest.mark.needs_data
@pytest.mark.slow
def test_every_single_client_attack_runs_inside_a_client_and_can_be_switched_off(
    sf_clients, four_client_data
):
    """dave attacks with each registered single-client attack for one round, then turns honest:
    what the server receives from him is the attack's output, then his honest weights."""
    from sf_ext.aggregators.robust_secretflow import RobustAggregator
    from sf_ext.attacks import ATTACKS
    from sf_ext.strategies import enable_attack
    from sf_ext.strategies.fed_avg_w_attack import single_client_attacks

    assert set(single_client_attacks()) >= {"sign_flip", "same_value", "gaussian"}
    clients, server = sf_clients
    (train_x, train_y), _ = four_client_data
    for name in single_client_attacks():
        spec = ATTACKS[name]
        aggregator = RobustAggregator(server, clients, method="median")
        fl = FLModel(
            server=server,
            device_list=clients,
            model=build_torch_model(LeNet, lr=3e-3),
            aggregator=aggregator,
            strategy="fed_avg_w_attack",
            backend="torch",
            random_seed=0,
        )
        enable_attack(fl, "dave", name)
        fl.fit(train_x, train_y, epochs=1, batch_size=256, aggregate_freq=1, verbose=0)
        attacked = aggregator.reports()[-1]
        enable_attack(fl, "dave", None)
        fl.fit(train_x, train_y, epochs=1, batch_size=256, aggregate_freq=1, verbose=0)
        honest = aggregator.reports()[-1]
        dave = attacked["parties"].index("dave")
        # Scores measure the distance to the median: the attack makes dave the farthest party
        # by far; once honest he looks like the others again.
        others = [s for i, s in enumerate(attacked["scores"]) if i != dave]
        assert attacked["scores"][dave] > 3 * max(others), (name, attacked["scores"])
        others_h = [s for i, s in enumerate(honest["scores"]) if i != dave]
        assert honest["scores"][dave] < 3 * max(others_h), (name, honest["scores"])
        assert spec.single_client


def _masked_uploads(rng, global_vec, n=4, d=12, prune=0.4):
    from sf_ext.pruning import MaskedWeights

    updates = rng.normal(0, 0.1, size=(n, d)).astype(np.float32)
    masks = rng.random((n, d)) > prune
    masks[:, 0] = [True, False, False, False]  # kept by one client only
    masks[:, 1] = False  # pruned by everyone
    weights = (global_vec + updates) * masks
    uploads = [MaskedWeights([w.reshape(3, 4)], [m.reshape(3, 4)]) for w, m in zip(weights, masks)]
    return uploads, weights, masks


@pytest.mark.parametrize("method", ["fedavg", "flame", "multi_krum", "median", "shield"])
def test_mask_aware_adapters_average_each_coordinate_over_its_keepers(sf_clients, method):
    from sf_ext.aggregators.masking import MaskAwareAggregate
    from sf_ext.aggregators.robust_secretflow import RobustAggregator

    clients, server = sf_clients
    rng = np.random.default_rng(3)
    start = rng.normal(size=12).astype(np.float32)
    options = (
        {"noise_lambda": 0.0} if method == "flame" else ({"f": 0} if method == "multi_krum" else {})
    )
    aggregator = RobustAggregator(server, clients, method=method, **options)
    sf.reveal(aggregator.average([c(lambda: [start.reshape(3, 4)])() for c in clients], axis=0))
    uploads, weights, masks = _masked_uploads(rng, start)
    counts = [1.0, 2.0, 3.0, 4.0]
    sent = [c(lambda u=u: u)() for c, u in zip(clients, uploads)]
    result = sf.reveal(aggregator.average(sent, axis=0, weights=counts))
    assert isinstance(result, MaskAwareAggregate) and result.aggregator == "RobustAggregator"
    new = result[0].reshape(-1).astype(np.float64)
    report = aggregator.reports()[-1]
    kept = np.array(report["kept"])
    e = (weights - start) * masks  # what the rule saw: masked updates
    if method == "fedavg":
        expected = (np.array(counts)[:, None] * weights).sum(0) / (
            np.array(counts)[:, None] * masks
        ).sum(0).clip(1e-30)
        expected[masks.sum(0) == 0] = 0
        np.testing.assert_allclose(new, expected, rtol=1e-5, atol=1e-6)
        # A weight only one client kept is that client's weight, not a fraction of it.
        assert new[0] == pytest.approx(weights[0, 0], rel=1e-5)
    elif method == "median":
        expected = np.zeros(12)
        for j in range(12):
            keepers = np.sort(e[masks[:, j], j])  # the lower median over the clients that kept j
            expected[j] = start[j] + keepers[(len(keepers) - 1) // 2] if len(keepers) else 0.0
        np.testing.assert_allclose(new, expected, rtol=1e-5, atol=1e-6)
        assert new[0] == pytest.approx(weights[0, 0], rel=1e-5)  # one keeper: its own value
    else:
        clip = np.array(report["details"].get("clip_factors", [1.0] * 4))
        share = np.array(report["weights"]) / np.where(clip > 0, clip, 1)
        keepers = share[:, None] * masks
        expected = start + (share[:, None] * clip[:, None] * e).sum(0) / keepers.sum(0).clip(1e-30)
        expected[keepers.sum(0) <= 0] = 0
        np.testing.assert_allclose(new, expected, rtol=1e-5, atol=1e-6)
    assert new[1] == 0.0  # pruned by everyone


@pytest.mark.slow
@pytest.mark.needs_data
def test_pruning_with_a_robust_aggregator_matches_secure_prune_and_drops_the_attacker(
    sf_clients, four_client_data
):
    """Issue 12: fed_avg_w_prune + a mask-aware robust aggregator trains like
    SecurePruneAggregator without attack, and drops a sign-flipping pruning client."""
    from sf_ext.aggregators import SecurePruneAggregator
    from sf_ext.aggregators.robust_secretflow import ShieldAggregator
    from sf_ext.strategies import enable_attack

    clients, server = sf_clients
    (train_x, train_y), test = four_client_data

    def fit(aggregator, attacker=None):
        fl = FLModel(
            server=server,
            device_list=clients,
            model=build_torch_model(LeNet, lr=3e-3),
            aggregator=aggregator,
            strategy="fed_avg_w_prune_attack",
            backend="torch",
            random_seed=0,
            prune_percent=20,
            prune_end_rate=0.5,
        )
        if attacker is not None:
            enable_attack(fl, "dave", attacker, scale=-4.0)
        history = fl.fit(
            train_x,
            train_y,
            validation_data=test,
            epochs=3,
            batch_size=64,
            aggregate_freq=4,
            verbose=0,
        )
        return history["global_history"]["val_multiclassaccuracy"][-1]

    secure = fit(SecurePruneAggregator(server, clients))
    robust = ShieldAggregator(server, clients)
    clean = fit(robust)
    assert abs(clean - secure) <= 0.02, (clean, secure)
    benign_kept = [all(r["kept"][i] for i in range(3)) for r in robust.reports()]
    print([r["details"].get("dropped_by") for r in robust.reports()])
    assert sum(benign_kept) >= 0.9 * len(benign_kept)
    defended = ShieldAggregator(server, clients)
    attacked = fit(defended, "sign_flip")
    dave = [r["kept"][r["parties"].index("dave")] for r in defended.reports()]
    assert sum(dave) <= 0.1 * len(dave)
    assert attacked >= secure - 0.03, (attacked, secure)
