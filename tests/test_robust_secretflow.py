"""Robust aggregators inside SecretFlow's FLModel (debug mode, real Fashion-MNIST)."""

import numpy as np
import pytest
import secretflow as sf
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

    assert set(AGGREGATORS) - {"xmam"} == set(ROBUST_AGGREGATORS)


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
    with pytest.raises(ValueError, match="not a client"):
        enable_attack(fl, "mallory", "sign_flip")
