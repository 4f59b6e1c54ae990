"""fed_avg_w_prune in real SecretFlow (debug mode) on real Fashion-MNIST."""

import importlib

import numpy as np
import pytest
import secretflow as sf
from secretflow_fl.ml.nn import FLModel
from secretflow_fl.ml.nn.callbacks.callback import Callback
from secretflow_fl.ml.nn.core.torch import TorchModel, metric_wrapper, optim_wrapper
from secretflow_fl.ml.nn.fl.strategy_dispatcher import _strategy_dispatcher
from torch import nn, optim
from torchmetrics import Accuracy

import sf_ext
from sf_ext.aggregators.secure_prune import SecurePruneAggregator
from sf_ext.data import federated_dataset
from sf_ext.models import LeNet, as_secretflow_module
from sf_ext.params import is_weight_tensor
from sf_ext.pruning import scheduled_kept_fraction

PRUNE_PERCENT, PRUNE_END_RATE, EPOCHS = 20, 0.5, 3


def _model_def():
    return TorchModel(
        model_fn=as_secretflow_module(LeNet),
        loss_fn=nn.CrossEntropyLoss,
        optim_fn=optim_wrapper(optim.Adam, lr=3e-3),
        metrics=[metric_wrapper(Accuracy, task="multiclass", num_classes=10, average="micro")],
    )


def _expected_kept(epochs_done):
    """Exact kept fraction under per-layer pruning: each layer keeps round(f * size) entries."""
    sizes = [p.numel() for n, p in LeNet().named_parameters() if is_weight_tensor(n, p.shape)]
    f = scheduled_kept_fraction(epochs_done, PRUNE_PERCENT, PRUNE_END_RATE)
    return sum(round(f * s) for s in sizes) / sum(sizes)


class PruneProbe(Callback):
    """Reads each client's kept fraction and the magnitude of its pruned weights during fit."""

    def __init__(self):
        super().__init__()
        self.kept_per_epoch, self.pruned_max_abs = [], []

    def _read(self, method):
        return {d.party: sf.reveal(getattr(w, method)()) for d, w in self._workers.items()}

    def on_train_batch_end(self, batch=None, logs=None):
        if batch % 40 == 4:  # after a round's aggregated weights were loaded and trained on
            self.pruned_max_abs.append(("batch", self._read("get_pruned_max_abs")))

    def on_epoch_end(self, epoch=None, logs=None):  # after apply_weights at the epoch boundary
        self.kept_per_epoch.append(self._read("get_kept_fraction"))
        self.pruned_max_abs.append(("epoch_end", self._read("get_pruned_max_abs")))


@pytest.fixture(scope="module")
def trained(sf_parties, fashion_mnist_root):
    alice, bob, charlie = sf_parties
    (train_x, train_y), (test_x, test_y) = federated_dataset(
        "fashion-mnist", {alice: 0.4, bob: 0.6}, root=fashion_mnist_root, limit=20000, seed=0
    )
    probe = PruneProbe()
    fl = FLModel(
        server=charlie,
        device_list=[alice, bob],
        model=_model_def(),
        aggregator=SecurePruneAggregator(charlie, [alice, bob]),
        strategy="fed_avg_w_prune",
        backend="torch",
        prune_percent=PRUNE_PERCENT,
        prune_end_rate=PRUNE_END_RATE,
        random_seed=0,
    )
    history = fl.fit(
        train_x,
        train_y,
        validation_data=(test_x, test_y),
        epochs=EPOCHS,
        batch_size=64,
        aggregate_freq=4,  # secure aggregation every 4 local steps keeps the test short
        callbacks=[probe],
        verbose=0,
    )
    return fl, history, probe


def test_reaches_80_percent_on_fashion_mnist(trained):
    _, history, _ = trained
    assert history["global_history"]["val_multiclassaccuracy"][-1] >= 0.80


def test_kept_fraction_follows_schedule_exactly(trained):
    _, _, probe = trained
    assert len(probe.kept_per_epoch) == EPOCHS
    fl, _, _ = trained
    assert {d.party: sf.reveal(w.get_prune_epochs()) for d, w in fl._workers.items()} == {
        "alice": EPOCHS,
        "bob": EPOCHS,
    }
    for epoch, kept in enumerate(probe.kept_per_epoch, start=1):
        assert set(kept) == {"alice", "bob"}
        for fraction in kept.values():
            assert fraction == pytest.approx(_expected_kept(epoch), abs=1e-12)


def test_pruned_weights_stay_exactly_zero(trained):
    fl, _, probe = trained
    assert any(kind == "batch" for kind, _ in probe.pruned_max_abs)
    assert any(kind == "epoch_end" for kind, _ in probe.pruned_max_abs)
    for kind, per_client in probe.pruned_max_abs:
        assert per_client == {"alice": 0.0, "bob": 0.0}, kind
    # The clients pruned different entries, so the aggregated model is non-zero at entries a
    # client pruned: the zeros above come from re-masking, not from identical masks.
    masks = {d.party: sf.reveal(w.get_masks()) for d, w in fl._workers.items()}
    assert any(
        not np.array_equal(masks["alice"][name], masks["bob"][name]) for name in masks["alice"]
    )


@pytest.mark.parametrize(
    "kwargs, parameter",
    [
        ({"prune_percent": 0}, "prune_percent"),
        ({"prune_percent": 100}, "prune_percent"),
        ({"prune_end_rate": 0}, "prune_end_rate"),
        ({"prune_end_rate": 1.5}, "prune_end_rate"),
        ({"prune_scope": "channel"}, "prune_scope"),
    ],
)
def test_invalid_parameters_name_the_parameter(sf_parties, kwargs, parameter):
    alice, bob, charlie = sf_parties
    params = {"prune_percent": 5, "prune_end_rate": 0.1, **kwargs}
    with pytest.raises(ValueError, match=parameter):
        FLModel(
            server=charlie,
            device_list=[alice, bob],
            model=_model_def(),
            aggregator=SecurePruneAggregator(charlie, [alice, bob]),
            strategy="fed_avg_w_prune",
            backend="torch",
            **params,
        )


def test_registration_is_idempotent(sf_parties):
    importlib.reload(importlib.import_module("sf_ext.strategies"))
    importlib.reload(sf_ext)
    sf_ext.register_strategies()
    assert "fed_avg_w_prune_torch" in _strategy_dispatcher._ops


def test_global_scope_prunes_across_layers(sf_parties, fashion_mnist_root):
    alice, bob, charlie = sf_parties
    (train_x, train_y), _ = federated_dataset(
        "fashion-mnist", {alice: 0.5, bob: 0.5}, root=fashion_mnist_root, limit=1000, seed=1
    )
    fl = FLModel(
        server=charlie,
        device_list=[alice, bob],
        model=_model_def(),
        aggregator=SecurePruneAggregator(charlie, [alice, bob]),
        strategy="fed_avg_w_prune",
        backend="torch",
        prune_percent=50,
        prune_end_rate=0.1,
        prune_scope="global",
    )
    fl.fit(train_x, train_y, epochs=1, batch_size=50, verbose=0)
    masks = sf.reveal(fl._workers[alice].get_masks())
    total = sum(m.size for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(0.5 * total)
    per_layer = [m.mean() for m in masks.values()]
    assert max(per_layer) - min(per_layer) > 0.01  # layers pruned unevenly, unlike "layer" scope
