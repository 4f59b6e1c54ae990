"""sf_ext.inspect: public reads of what each client's strategy holds in a real FLModel."""

import numpy as np
import pytest

pytestmark = pytest.mark.secretflow

PRUNE_PERCENT = 30


@pytest.fixture(scope="module")
def fitted(sf_parties):
    """Two FLModels on digits, one epoch each: fed_avg_w_prune and plain fed_avg_w."""
    from secretflow.security.aggregation import SecureAggregator
    from secretflow_fl.ml.nn import FLModel

    from sf_ext.aggregators import SecurePruneAggregator
    from sf_ext.data import federated_dataset
    from sf_ext.models import MLP
    from sf_ext.training import build_torch_model

    alice, bob, charlie = sf_parties
    (train_x, train_y), _ = federated_dataset("digits", {alice: 0.5, bob: 0.5}, seed=0)
    models = {}
    for strategy, aggregator in (
        ("fed_avg_w_prune", SecurePruneAggregator(charlie, [alice, bob])),
        ("fed_avg_w", SecureAggregator(charlie, [alice, bob])),
    ):
        extra = {"prune_percent": PRUNE_PERCENT} if strategy == "fed_avg_w_prune" else {}
        fl = FLModel(
            server=charlie,
            device_list=[alice, bob],
            model=build_torch_model(MLP, 3e-3, 10, in_channels=1, image_size=8),
            aggregator=aggregator,
            strategy=strategy,
            backend="torch",
            random_seed=0,
            **extra,
        )
        fl.fit(train_x, train_y, epochs=1, batch_size=64, aggregate_freq=4, verbose=0)
        models[strategy] = fl
    return models, (alice, bob, charlie)


def test_kept_fraction_and_masks_match_the_clients(fitted):
    import secretflow as sf

    from sf_ext.inspect import client_strategy, kept_fraction, prune_masks

    models, (alice, bob, _) = fitted
    fl = models["fed_avg_w_prune"]
    direct = {d.party: sf.reveal(w.get_kept_fraction()) for d, w in fl._workers.items()}
    assert kept_fraction(fl) == direct
    assert set(direct) == {"alice", "bob"}
    for fraction in direct.values():  # one epoch pruned 30 % of the weights
        assert fraction == pytest.approx(1 - PRUNE_PERCENT / 100, abs=0.01)
    assert kept_fraction(fl, alice) == direct["alice"]
    assert kept_fraction(fl, "bob") == direct["bob"]
    masks = prune_masks(fl, bob)
    kept = sum(int(m.sum()) for m in masks.values()) / sum(m.size for m in masks.values())
    assert kept == direct["bob"]
    assert all(m.dtype == np.bool_ for m in masks.values())
    assert client_strategy(fl, alice) is fl._workers[alice]


def test_mistakes_are_named(fitted):
    from sf_ext.inspect import kept_fraction, prune_masks

    models, (_, _, charlie) = fitted
    with pytest.raises(ValueError, match=r"'carol' is not a client of this FLModel; clients: "):
        kept_fraction(models["fed_avg_w_prune"], "carol")
    with pytest.raises(ValueError, match=r"PYU.*charlie.*not a client.*\['alice', 'bob'\]"):
        prune_masks(models["fed_avg_w_prune"], charlie)  # the server holds no strategy
    with pytest.raises(ValueError, match="needs strategy='fed_avg_w_prune' .got 'fed_avg_w'."):
        kept_fraction(models["fed_avg_w"])
    with pytest.raises(TypeError, match="expected a SecretFlow FLModel with clients, got dict"):
        kept_fraction({"alice": 1})
