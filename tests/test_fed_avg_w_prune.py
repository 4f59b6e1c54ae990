"""fed_avg_w_prune in real SecretFlow (debug mode): the schedule on real Fashion-MNIST, BatchNorm
models (nested, ResNet-18), DP, dataset builders, parameter checks and the public readers."""

import importlib
import warnings
from pathlib import Path

import numpy as np
import pytest
import secretflow as sf
import torch
from secretflow.security.aggregation import SecureAggregator
from secretflow_fl.ml.nn import FLModel
from secretflow_fl.ml.nn.callbacks.callback import Callback
from secretflow_fl.ml.nn.core.torch import TorchModel, metric_wrapper, optim_wrapper
from secretflow_fl.ml.nn.fl.strategy_dispatcher import _strategy_dispatcher
from torch import nn, optim
from torchmetrics import Accuracy

import sf_ext
from sf_ext.aggregators.secure_prune import SecurePruneAggregator
from sf_ext.data import federated_dataset, load_dataset
from sf_ext.data.federated import to_fed_ndarray
from sf_ext.models import MLP, LeNet, ResNet18, as_secretflow_module
from sf_ext.params import batchnorm_state_names, is_weight_tensor, transported_names
from sf_ext.pruning import scheduled_kept_fraction
from sf_ext.strategies import UnknownParameterWarning, kept_fraction, prune_epochs, prune_masks

pytestmark = pytest.mark.secretflow

PRUNE_PERCENT, PRUNE_END_RATE, EPOCHS = 20, 0.5, 3


def _model_def(model_cls=LeNet, lr=3e-3, optimizer=optim.Adam, **model_kwargs):
    return TorchModel(
        model_fn=as_secretflow_module(model_cls),
        loss_fn=nn.CrossEntropyLoss,
        optim_fn=optim_wrapper(optimizer, lr=lr),
        metrics=[metric_wrapper(Accuracy, task="multiclass", num_classes=10, average="micro")],
        **model_kwargs,
    )


def _expected_kept(epochs_done, model=None, percent=PRUNE_PERCENT, end_rate=PRUNE_END_RATE):
    """Exact kept fraction under per-layer pruning: each layer keeps round(f * size) entries."""
    model = LeNet() if model is None else model
    sizes = [p.numel() for n, p in model.named_parameters() if is_weight_tensor(n, p.shape)]
    f = scheduled_kept_fraction(epochs_done, percent, end_rate)
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
def trained(sf_parties, fashion_mnist_root):  # tests using it need the Fashion-MNIST files
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


@pytest.mark.needs_data
@pytest.mark.slow
def test_reaches_80_percent_on_fashion_mnist(trained):
    _, history, _ = trained
    assert history["global_history"]["val_multiclassaccuracy"][-1] >= 0.80


@pytest.mark.needs_data
@pytest.mark.slow
def test_kept_fraction_follows_schedule_exactly(trained):
    _, _, probe = trained
    assert len(probe.kept_per_epoch) == EPOCHS
    fl, _, _ = trained
    assert prune_epochs(fl) == {"alice": EPOCHS, "bob": EPOCHS}
    for epoch, kept in enumerate(probe.kept_per_epoch, start=1):
        assert set(kept) == {"alice", "bob"}
        for fraction in kept.values():
            assert fraction == pytest.approx(_expected_kept(epoch), abs=1e-12)


@pytest.mark.needs_data
@pytest.mark.slow
def test_pruned_weights_stay_exactly_zero(trained):
    fl, _, probe = trained
    assert any(kind == "batch" for kind, _ in probe.pruned_max_abs)
    assert any(kind == "epoch_end" for kind, _ in probe.pruned_max_abs)
    for kind, per_client in probe.pruned_max_abs:
        assert per_client == {"alice": 0.0, "bob": 0.0}, kind
    # The clients pruned different entries, so the aggregated model is non-zero at entries a
    # client pruned: the zeros above come from re-masking, not from identical masks.
    masks = {party: prune_masks(fl, party) for party in ("alice", "bob")}
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


@pytest.mark.needs_data
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
    masks = prune_masks(fl, alice)
    total = sum(m.size for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(0.5 * total)
    per_layer = [m.mean() for m in masks.values()]
    assert max(per_layer) - min(per_layer) > 0.01  # layers pruned unevenly, unlike "layer" scope


# ---------------------------------------------------------------------------------------------
# Small real runs on scikit-learn's digits (no data files needed)


class BNNet(nn.Module):
    """BatchNorm at three places: inside a Sequential, two levels deep, and top-level (not last)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
        )
        self.norm = nn.BatchNorm1d(8 * 4 * 4)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(self.norm(self.features(x).flatten(1)))


def _recording(base):
    class Recording(base):
        """``base`` that also keeps, for the test, every upload and result (revealed)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.uploads, self.results = [], []

        def average(self, data, axis=None, weights=None):
            result = super().average(data, axis=axis, weights=weights)
            self.uploads.append({d.device.party: sf.reveal(d) for d in data})
            self.results.append(sf.reveal(result))
            return result

    return Recording


@pytest.fixture(scope="module")
def digits(sf_parties):
    alice, bob, _ = sf_parties
    return federated_dataset("digits", {alice: 0.5, bob: 0.5}, seed=0)


def _fit_digits(
    sf_parties,
    digits,
    model_cls,
    strategy="fed_avg_w_prune",
    aggregator_cls=SecurePruneAggregator,
    epochs=2,
    aggregate_freq=6,
    **strategy_kwargs,
):
    alice, bob, charlie = sf_parties
    (train_x, train_y), validation = digits
    aggregator = _recording(aggregator_cls)(charlie, [alice, bob])
    if strategy == "fed_avg_w_prune":
        strategy_kwargs = {"prune_percent": 50, "prune_end_rate": 0.1, **strategy_kwargs}
    fl = FLModel(
        server=charlie,
        device_list=[alice, bob],
        model=_model_def(model_cls, lr=1e-2),
        aggregator=aggregator,
        strategy=strategy,
        backend="torch",
        random_seed=0,
        **strategy_kwargs,
    )
    history = fl.fit(
        train_x,
        train_y,
        validation_data=validation,
        epochs=epochs,
        batch_size=64,  # 719 samples per client: 12 steps per epoch
        aggregate_freq=aggregate_freq,
        verbose=0,
    )
    return fl, history, aggregator


def _saved_states(fl, folder):
    """Each client's full state_dict, through FLModel.save_model (BatchNorm buffers included)."""
    paths = {pyu: str(Path(folder) / pyu.party / "model") for pyu in fl._workers}
    fl.save_model(paths)
    return {
        pyu.party: torch.load(path, map_location="cpu")["model_state_dict"]
        for pyu, path in paths.items()
    }


BN_CONFIGS = [
    ("fed_avg_w_prune", SecurePruneAggregator),
    ("fed_avg_w", SecureAggregator),
    ("fed_avg_w", SecurePruneAggregator),
]


@pytest.mark.parametrize("skip_bn", [False, True], ids=["bn-shared", "bn-local"])
@pytest.mark.parametrize(
    "strategy, aggregator_cls", BN_CONFIGS, ids=[f"{s}+{a.__name__}" for s, a in BN_CONFIGS]
)
def test_batchnorm_model_trains_two_rounds(
    sf_parties, digits, tmp_path, strategy, aggregator_cls, skip_bn
):
    pruned = strategy == "fed_avg_w_prune"
    fl, history, aggregator = _fit_digits(
        sf_parties,
        digits,
        BNNet,
        strategy,
        aggregator_cls,
        skip_bn=skip_bn,
        **({"prune_percent": 20} if pruned else {}),
    )
    assert len(aggregator.results) == 1 + 2 * 2  # initial average + 2 rounds in each of 2 epochs
    # Unpruned this net reaches about 0.91 after 2 epochs, at 64 % kept about 0.85.
    assert history["global_history"]["val_multiclassaccuracy"][-1] > 0.75

    model = BNNet()
    names = transported_names(model, skip_bn)
    local = batchnorm_state_names(model) if skip_bn else set()
    assert len(local) == (15 if skip_bn else 0)  # 3 BatchNorm layers x 5 entries
    states = _saved_states(fl, tmp_path)
    masks = {p: prune_masks(fl, p) for p in ("alice", "bob")} if pruned else {}
    last = aggregator.results[-1]
    assert len(last) == len(names)
    for name, aggregate in zip(names, last):
        for party in ("alice", "bob"):
            # Each client holds the last aggregate, entry for entry (times its own mask).
            expected = np.asarray(aggregate, np.float64).reshape(states[party][name].shape)
            if name in masks.get(party, {}):
                expected = expected * masks[party][name]
            np.testing.assert_allclose(
                states[party][name].double().numpy(), expected, rtol=1e-6, atol=1e-6, err_msg=name
            )
    for name in sorted(local):
        a, b = states["alice"][name], states["bob"][name]
        if name.endswith("num_batches_tracked"):
            assert int(a) == int(b) == 2 * 12  # only local steps: never averaged
        else:  # trained or accumulated on each client's own data
            assert not torch.allclose(a.float(), b.float()), name
    if not skip_bn:
        assert int(states["alice"]["features.1.num_batches_tracked"]) == 24
    if pruned:
        assert kept_fraction(fl) == pytest.approx(
            {p: _expected_kept(2, model, 20, 0.1) for p in ("alice", "bob")}, abs=1e-12
        )


def test_uploads_carry_masks_aligned_with_skip_bn(sf_parties, digits):
    _, _, aggregator = _fit_digits(sf_parties, digits, BNNet, skip_bn=True, epochs=1)
    model = BNNet()
    names = transported_names(model, skip_bn=True)
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    weights = {n for n in names if is_weight_tensor(n, shapes[n])}
    assert weights == {"features.0.weight", "features.4.0.weight", "fc.weight"}
    uploads = [u for round_ in aggregator.uploads[1:] for u in round_.values()]
    assert len(uploads) == 2 * 2
    for upload in uploads:
        assert len(upload) == len(upload.masks) == len(names)
        for name, array, mask in zip(names, upload, upload.masks):
            assert array.shape == (shapes[name] or (1,))
            assert (mask is not None) == (name in weights), name
            if mask is not None:
                assert mask.shape == array.shape and mask.dtype == bool
                assert np.all(array[~mask] == 0)
    # The epoch-end upload is pruned by half; the one before is not pruned yet.
    assert uploads[0].masks[names.index("fc.weight")].mean() == 1.0
    assert uploads[-1].masks[names.index("fc.weight")].mean() == pytest.approx(0.5)


@pytest.mark.slow
def test_resnet18_for_32x32_trains_two_rounds(sf_parties, tmp_path):
    alice, bob, charlie = sf_parties
    rng = np.random.default_rng(0)
    images = rng.random((32, 3, 32, 32), dtype=np.float32)
    labels = np.eye(10, dtype=np.float32)[rng.integers(0, 10, 32)]
    x = to_fed_ndarray({alice: images[:16], bob: images[16:]})
    y = to_fed_ndarray({alice: labels[:16], bob: labels[16:]})
    aggregator = _recording(SecurePruneAggregator)(charlie, [alice, bob])
    fl = FLModel(
        server=charlie,
        device_list=[alice, bob],
        model=_model_def(ResNet18, lr=1e-2, optimizer=optim.SGD),
        aggregator=aggregator,
        strategy="fed_avg_w_prune",
        backend="torch",
        prune_percent=50,
        prune_end_rate=0.1,
        random_seed=0,
    )
    fl.fit(x, y, epochs=2, batch_size=8, aggregate_freq=2, verbose=0)  # 1 round per epoch
    assert len(aggregator.results) == 3
    model = ResNet18()
    assert kept_fraction(fl, "alice") == pytest.approx(_expected_kept(2, model, 50, 0.1))
    states = _saved_states(fl, tmp_path)
    masks = {p: prune_masks(fl, p) for p in ("alice", "bob")}
    names = transported_names(model)
    assert len(aggregator.results[-1]) == len(names) == len(model.state_dict())
    for name, aggregate in zip(names, aggregator.results[-1]):
        for party in ("alice", "bob"):
            expected = np.asarray(aggregate, np.float64).reshape(states[party][name].shape)
            if name in masks[party]:
                expected = expected * masks[party][name]
            np.testing.assert_allclose(
                states[party][name].double().numpy(), expected, rtol=1e-5, atol=1e-6, err_msg=name
            )
    assert int(states["alice"]["layer4.1.bn2.num_batches_tracked"]) == 4


def test_dp_noise_never_reappears_on_pruned_weights(sf_parties, digits):
    from secretflow_fl.security.privacy import DPStrategyFL, GaussianModelDP

    def last_uploads(dp_strategy):
        kwargs = {} if dp_strategy is None else {"dp_strategy": dp_strategy}
        # One round per epoch: the epoch's only upload comes right after pruning.
        _, _, aggregator = _fit_digits(
            sf_parties, digits, MLP, epochs=1, aggregate_freq=12, **kwargs
        )
        return list(aggregator.uploads[-1].values())

    dp = DPStrategyFL(GaussianModelDP(noise_multiplier=1.0, num_clients=2, l2_norm_clip=1.0))
    noisy, clean = last_uploads(dp), last_uploads(None)
    for upload, plain in zip(noisy, clean):
        assert len(upload) == len(plain) == 4  # two linear layers: weight, bias each
        for array, mask, reference in zip(upload, upload.masks, plain):
            if mask is None:
                continue  # biases: noised, never pruned
            assert mask.mean() == pytest.approx(0.5, abs=0.01)
            assert np.all(array[~mask] == 0.0)  # noise was added, then masked away again
            # Kept entries carry noise of std 1/sqrt(2) (clipped weights are far smaller).
            assert array[mask].std() > 0.4
            assert np.asarray(reference)[mask].std() < 0.2


def _write_client_files(folder, x, y):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "data.npz"
    np.savez(path, x=x, y=np.eye(10, dtype=np.float32)[y])
    return str(path)


def _builder(path, stage="train"):
    """A party's dataset builder: a DataLoader of 40-image batches and its steps per epoch."""
    data = np.load(path)
    dataset = torch.utils.data.TensorDataset(
        torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=40, shuffle=False)
    return loader, len(loader)


def test_epoch_length_is_learnt_from_the_dataset_builder(sf_parties, tmp_path):
    alice, bob, charlie = sf_parties
    x, y = load_dataset("digits", split="train")
    paths = {
        alice: _write_client_files(tmp_path / "alice", x[:200], y[:200]),  # 5 batches of 40
        bob: _write_client_files(tmp_path / "bob", x[200:400], y[200:400]),
    }
    fl = FLModel(
        server=charlie,
        device_list=[alice, bob],
        model=_model_def(MLP, lr=1e-2),
        aggregator=SecurePruneAggregator(charlie, [alice, bob]),
        strategy="fed_avg_w_prune",
        backend="torch",
        prune_percent=50,
        prune_end_rate=0.1,
        random_seed=0,
    )
    builders = {alice: _builder, bob: _builder}
    # batch_size would mean 7 steps per epoch; the builder's 5 steps are what FLModel runs.
    fl.fit(paths, None, epochs=3, batch_size=32, dataset_builder=builders, verbose=0)
    assert prune_epochs(fl) == {"alice": 3, "bob": 3}
    assert kept_fraction(fl, bob) == pytest.approx(_expected_kept(3, MLP(), 50, 0.1), abs=1e-12)


# ---------------------------------------------------------------------------------------------
# Parameter checks at FLModel(...) and the public readers


def _build(sf_parties, **kwargs):
    alice, bob, charlie = sf_parties
    return FLModel(
        server=charlie,
        device_list=[alice, bob],
        model=_model_def(MLP),
        aggregator=SecurePruneAggregator(charlie, [alice, bob]),
        strategy="fed_avg_w_prune",
        backend="torch",
        **kwargs,
    )


@pytest.mark.parametrize(
    "typo, nearest",
    [
        ("prune_precent", "prune_percent"),
        ("prune_end_rat", "prune_end_rate"),
        ("prune_rate", "prune_end_rate"),
        ("prun_scope", "prune_scope"),
        ("prunepercent", "prune_percent"),
        ("skip_nb", "skip_bn"),
        ("random_sed", "random_seed"),
        ("agregator", "aggregator"),
    ],
)
def test_misspelled_parameter_warns_with_the_nearest_name(sf_parties, typo, nearest):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _build(sf_parties, **{typo: 5})
    ours = [w for w in caught if issubclass(w.category, UnknownParameterWarning)]
    assert ours, f"no warning for {typo!r}"
    message = str(ours[0].message)
    assert f"{typo!r}" in message and f"did you mean" in message and f"{nearest!r}" in message
    # The warning points at the user's FLModel(...) line, not at SecretFlow's internals.
    assert ours[0].filename == __file__


def test_secretflow_and_unrelated_kwargs_do_not_warn(sf_parties):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _build(
            sf_parties,
            prune_percent=10,
            prune_end_rate=0.5,
            prune_scope="global",
            skip_bn=True,
            random_seed=1,
            dp_strategy=None,
            simulation=False,
            server_agg_method=None,
            sparsity=0.1,
            mu=0.01,
            threshold=0.5,
            use_gpu=False,
            my_experiment_tag="run-7",
        )
    assert [str(w.message) for w in caught if w.category is UnknownParameterWarning] == []


def test_prune_params_are_checked_before_any_client_is_built(sf_parties, monkeypatch):
    from sf_ext.strategies import FedAvgWPrune

    built = []
    original = FedAvgWPrune.__init__

    def counting_init(self, *args, **kwargs):
        built.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(FedAvgWPrune, "__init__", counting_init)
    with pytest.raises(ValueError, match="prune_end_rate must be in"):
        _build(sf_parties, prune_end_rate=10)
    assert built == []  # refused in FLModel's dispatcher call, before a client exists
    _build(sf_parties, prune_end_rate=0.5)
    assert len(built) == 2


@pytest.fixture(scope="module")
def mlp_run(sf_parties, digits):
    return _fit_digits(sf_parties, digits, MLP, epochs=2, prune_percent=20, prune_end_rate=0.5)[0]


def test_public_readers(sf_parties, mlp_run):
    alice, bob, charlie = sf_parties
    expected = _expected_kept(2, MLP(), 20, 0.5)
    assert kept_fraction(mlp_run) == pytest.approx({"alice": expected, "bob": expected})
    assert kept_fraction(mlp_run, alice) == kept_fraction(mlp_run, "alice")
    assert prune_epochs(mlp_run, "bob") == 2
    masks = prune_masks(mlp_run, bob)
    assert set(masks) == {"layers.0.weight", "layers.2.weight"}
    total = sum(m.size for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) / total == pytest.approx(expected)
    assert all(m.dtype == bool for m in masks.values())
    with pytest.raises(ValueError, match=r"'charlie' is not one of this FLModel's clients"):
        kept_fraction(mlp_run, "charlie")
    plain = FLModel(
        server=charlie,
        device_list=[alice, bob],
        model=_model_def(MLP),
        aggregator=SecureAggregator(charlie, [alice, bob]),
        strategy="fed_avg_w",
        backend="torch",
    )
    with pytest.raises(ValueError, match="strategy='fed_avg_w_prune', got 'fed_avg_w'"):
        kept_fraction(plain)


# fed_avg_w_prune's checks in Ray mode (strategy built inside the actors) are tested in
# tests/test_secure_flame.py::test_ray_mode_reports_bad_prune_parameters_at_flmodel_construction,
# inside that module's Ray scenario, to save a Ray start-up.


# ------------------------------------------------------------- the guard against zero-averaging


@pytest.mark.secretflow
def test_an_aggregator_that_averages_pruned_weights_as_zeros_is_refused(sf_parties):
    from secretflow.security.aggregation import PlainAggregator

    alice, bob, charlie = sf_parties
    for aggregator in (SecureAggregator(charlie, [alice, bob]), PlainAggregator(charlie)):
        name = type(aggregator).__name__
        with pytest.raises(ValueError, match=f"cannot use {name}.*SecurePruneAggregator"):
            FLModel(
                server=charlie,
                device_list=[alice, bob],
                model=_model_def(MLP),
                aggregator=aggregator,
                strategy="fed_avg_w_prune",
                backend="torch",
            )
    with pytest.raises(ValueError, match="allow_unmasked_average must be True or False"):
        FLModel(
            server=charlie,
            device_list=[alice, bob],
            model=_model_def(MLP),
            aggregator=SecurePruneAggregator(charlie, [alice, bob]),
            strategy="fed_avg_w_prune",
            backend="torch",
            allow_unmasked_average="yes",
        )


@pytest.mark.secretflow
def test_the_client_refuses_an_unmasked_aggregate_it_was_not_told_about(sf_parties):
    """Backstop when the aggregator is not visible at construction (server_agg_method, or a
    client built directly): the first aggregate the client receives is checked."""
    from sf_ext.aggregators.masking import MaskAwareAggregate
    from sf_ext.strategies.fed_avg_w_prune import FedAvgWPrune

    client = FedAvgWPrune(_model_def(MLP, in_channels=1, image_size=8), random_seed=0)
    weights = client.get_weights()
    with pytest.raises(ValueError, match="not mask-aware.*allow_unmasked_average=True"):
        client.set_weights([np.asarray(w) for w in weights])
    client.set_weights(
        MaskAwareAggregate([np.asarray(w) for w in weights], "SecurePruneAggregator")
    )
    lenient = FedAvgWPrune(
        _model_def(MLP, in_channels=1, image_size=8), random_seed=0, allow_unmasked_average=True
    )
    lenient.set_weights([np.asarray(w) for w in weights])


@pytest.mark.secretflow
def test_opting_out_warns_and_shows_the_zero_averaging(sf_parties):
    """allow_unmasked_average=True: training runs, with a warning, and a weight one client
    pruned comes out at a fraction of the other's (what the guard prevents by default)."""
    from sf_ext.strategies import UnmaskedAverageWarning

    alice, bob, charlie = sf_parties
    aggregator = SecureAggregator(charlie, [alice, bob])
    with pytest.warns(UnmaskedAverageWarning, match="averaged as 0"):
        FLModel(
            server=charlie,
            device_list=[alice, bob],
            model=_model_def(MLP),
            aggregator=aggregator,
            strategy="fed_avg_w_prune",
            backend="torch",
            allow_unmasked_average=True,
        )
    from sf_ext.pruning import MaskedWeights

    w = np.array([[2.0, 1.0]], np.float32)
    uploads = [
        alice(lambda: MaskedWeights([w], [np.array([[True, True]])]))(),
        bob(
            lambda: MaskedWeights(
                [w * 0 + np.array([[0.0, 3.0]], np.float32)], [np.array([[False, True]])]
            )
        )(),
    ]
    zeroed = sf.reveal(aggregator.average(uploads, axis=0, weights=[1, 1]))[0]
    correct = sf.reveal(SecurePruneAggregator(charlie, [alice, bob]).average(uploads, 0, [1, 1]))[0]
    assert zeroed[0, 0] == pytest.approx(1.0) and correct[0, 0] == pytest.approx(2.0)
