"""Train one :class:`~sf_ext.dlg.settings.FLSetting` in SecretFlow and capture chosen rounds.

The run is a real ``FLModel.fit`` in SecretFlow's debug mode (one process): the clients use the
capture strategies (training unchanged), the server a recording aggregator, and
:class:`~sf_ext.dlg.capture.RoundCapture` writes every client's side and the server's side of the
chosen rounds to disk. It returns the validation accuracy per epoch, so one run gives both sides
of the question: what the defence costs and what the server can still reconstruct.

This module imports SecretFlow.
"""

import contextlib
import io
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import secretflow as sf
import torch
from secretflow.device import global_state
from secretflow_fl.ml.nn import FLModel
from secretflow_fl.ml.nn.callbacks.callback import Callback
from secretflow_fl.ml.nn.core.torch import TorchModel, metric_wrapper, optim_wrapper
from torch import nn
from torchmetrics import Accuracy
from tqdm.auto import tqdm

from sf_ext.dlg.capture import (
    CAPTURE_SUFFIX,
    RoundCapture,
    recording_aggregator,
    register_capture_strategies,
)
from sf_ext.dlg.captured import import_class
from sf_ext.dlg.settings import FLSetting

log = logging.getLogger(__name__)
SERVER = "charlie"
_OWNED = {"initialized": False, "shut_down": False}


@dataclass
class FLRun:
    """Outcome of one training run.

    Attributes:
        setting: What was trained.
        val_accuracy: Validation accuracy after each epoch.
        kept_fraction: Mean kept fraction of the clients' weights at the end (1.0 unpruned).
        wall_time_s: Seconds of ``FLModel.fit``.
        rounds: Round folders written (see :mod:`sf_ext.dlg.captured`).
        dataset: The dataset actually used (``"arrays"`` for user data).
        train_accuracy: Training accuracy per epoch (SecretFlow's naive aggregate).
        epoch_seconds: Wall time per epoch.
        kept_per_epoch: Mean kept fraction of the clients after each epoch (pruning only).
    """

    setting: FLSetting
    val_accuracy: List[float]
    kept_fraction: float
    wall_time_s: float
    rounds: List[Path] = field(default_factory=list)
    dataset: str = ""
    train_accuracy: List[float] = field(default_factory=list)
    epoch_seconds: List[float] = field(default_factory=list)
    kept_per_epoch: List[float] = field(default_factory=list)

    @property
    def final_accuracy(self) -> float:
        return self.val_accuracy[-1] if self.val_accuracy else float("nan")


@contextlib.contextmanager
def secretflow_session(parties: Sequence[str]):
    """SecretFlow in debug mode with these parties; reuses an active session that has them."""
    active = global_state.parties()
    if _OWNED["initialized"] or (
        # Someone else (a test session, the caller) initialized it and has not shut it down.
        active is not None
        and all(p in active for p in parties)
        and not _OWNED["shut_down"]
    ):
        yield
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sf.init(list(parties), debug_mode=True, logging_level="warning")
    logging.getLogger().setLevel(logging.WARNING)
    _OWNED["initialized"] = True
    try:
        yield
    finally:
        _OWNED["initialized"] = False
        _OWNED["shut_down"] = True
        sf.shutdown()


def model_class_for(name: str):
    """A model class by registry name (``lenet``, ``convnet``, ...) or ``module:Class``."""
    from sf_ext.models import model_class

    if ":" in name:
        try:
            return import_class(name)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"cannot import model {name!r}: {exc}") from exc
    return model_class(name)


def load_arrays(path: Union[str, os.PathLike]):
    """``((x_train, y_train), (x_test, y_test))`` from a user's ``.npz`` file, checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"arrays file {path} does not exist")
    with np.load(path) as data:
        missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in data]
        if missing:
            raise ValueError(f"{path} lacks {missing}; it needs x_train, y_train, x_test, y_test")
        arrays = [np.asarray(data[k]) for k in ("x_train", "y_train", "x_test", "y_test")]
    for x, y, split in ((arrays[0], arrays[1], "train"), (arrays[2], arrays[3], "test")):
        if x.ndim != 4 or x.shape[2] != x.shape[3]:
            raise ValueError(f"x_{split} must be [N, C, H, W] with square images, got {x.shape}")
        if len(x) != len(y):
            raise ValueError(f"x_{split} has {len(x)} rows but y_{split} {len(y)}")
        if x.min() < 0 or x.max() > 1:
            raise ValueError(f"x_{split} must lie in [0, 1] (got {x.min():.3g}..{x.max():.3g})")
    return (arrays[0].astype(np.float32), arrays[1].astype(np.int64)), (
        arrays[2].astype(np.float32),
        arrays[3].astype(np.int64),
    )


def _data(setting: FLSetting, devices):
    """Federated train/test data and ``(in_channels, image_size, num_classes, name)``."""
    from sf_ext.data import dataset_spec, federated_dataset, one_hot, to_fed_ndarray
    from sf_ext.data.partition import split_by_fractions

    fractions = dict(zip(devices, setting.split))
    if setting.arrays:
        train, test = load_arrays(setting.arrays)
        num_classes = int(max(train[1].max(), test[1].max())) + 1
        rng = np.random.default_rng(setting.seed)
        if setting.samples and setting.samples < len(train[1]):
            keep = np.sort(rng.choice(len(train[1]), setting.samples, replace=False))
            train = (train[0][keep], train[1][keep])
        parts = []
        for x, y in (train, test):
            pieces = split_by_fractions(
                x, one_hot(y, num_classes), setting.split, seed=setting.seed
            )
            parts.append(
                (
                    to_fed_ndarray({d: px for d, (px, _) in zip(devices, pieces)}),
                    to_fed_ndarray({d: py for d, (_, py) in zip(devices, pieces)}),
                )
            )
        shape = train[0].shape
        return parts[0], parts[1], (shape[1], shape[2], num_classes, "arrays")
    spec = dataset_spec(setting.dataset)
    train, test = federated_dataset(
        setting.dataset,
        fractions,
        root=setting.data_root,
        seed=setting.seed,
        limit=setting.samples or None,
    )
    return train, test, (spec.in_channels, spec.image_size, spec.num_classes, spec.name)


class _EpochBar(Callback):
    """Progress bar over epochs; also times epochs and reads the kept fraction after each."""

    def __init__(self, epochs: int, desc: str, enabled: bool, pruned: bool):
        super().__init__()
        self.bar = tqdm(total=epochs, desc=desc, unit="epoch", disable=not enabled, leave=False)
        self.pruned = pruned
        self.seconds: List[float] = []
        self.kept: List[float] = []
        self._started = 0.0

    def on_epoch_begin(self, epoch=None, logs=None):
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch=None, logs=None):
        self.seconds.append(time.perf_counter() - self._started)
        if self.pruned:
            kept = [sf.reveal(w.get_kept_fraction()) for w in self._workers.values()]
            self.kept.append(float(np.mean(kept)))
        self.bar.update(1)

    def on_train_end(self, logs=None):
        self.bar.close()


def default_rounds(setting: FLSetting) -> List[Tuple[int, int]]:
    """The first round (fresh optimizer, nothing pruned yet) and the first round of the last
    epoch (the most pruned); the same round once for a one-epoch run."""
    return sorted({(0, 0), (setting.epochs - 1, 0)})


def run_setting(
    setting: FLSetting,
    out_dir: Union[str, os.PathLike],
    rounds: Optional[Sequence[Tuple[int, int]]] = None,
    progress: bool = True,
    device: str = "cpu",
) -> FLRun:
    """Train ``setting`` in SecretFlow (debug mode) and capture ``rounds`` of every client.

    Args:
        setting: What to train.
        out_dir: Folder for the round captures (``out_dir/e<epoch>_s<step>``).
        rounds: ``(epoch, step)`` pairs to capture (default :func:`default_rounds`).
        progress: Show a progress bar over epochs.
        device: ``"cpu"`` or ``"cuda"`` (clients train on the GPU through ``use_gpu``).

    Returns:
        :class:`FLRun` with accuracies and the round folders.
    """
    setting.validate()
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    rounds = default_rounds(setting) if rounds is None else list(rounds)
    for epoch, step in rounds:
        if not 0 <= epoch < setting.epochs or step < 0 or step % setting.local_steps:
            raise ValueError(
                f"round (epoch {epoch}, step {step}) is not a round start of this run "
                f"({setting.epochs} epochs, {setting.local_steps} local steps per round)"
            )
    model_cls = model_class_for(setting.model)
    register_capture_strategies()
    parties = list(setting.parties) + [SERVER]
    with secretflow_session(parties):
        devices = [sf.PYU(p) for p in setting.parties]
        server = sf.PYU(SERVER)
        train, test, (channels, size, classes, name) = _data(setting, devices)
        optimizer_cls = torch.optim.SGD if setting.optimizer == "sgd" else torch.optim.Adam
        optim_kwargs = {"lr": setting.lr}
        if setting.optimizer == "sgd" and setting.momentum:
            optim_kwargs["momentum"] = setting.momentum
        from sf_ext.models import as_secretflow_module

        torch_model = TorchModel(
            model_fn=as_secretflow_module(model_cls),
            loss_fn=nn.CrossEntropyLoss,
            optim_fn=optim_wrapper(optimizer_cls, **optim_kwargs),
            metrics=[
                metric_wrapper(Accuracy, task="multiclass", num_classes=classes, average="micro")
            ],
            in_channels=channels,
            image_size=size,
            num_classes=classes,
        )
        aggregator = recording_aggregator(setting.aggregator, server, devices)
        extra: Dict[str, object] = {"update_keep": setting.update_keep}
        if device == "cuda":
            extra["use_gpu"] = True
        if setting.pruned:
            extra.update(
                prune_percent=setting.prune_percent,
                prune_end_rate=setting.prune_end_rate,
                prune_scope=setting.prune_scope,
            )
        if setting.dp_noise_multiplier > 0:
            from secretflow_fl.security.privacy.mechanism.mechanism_fl import GaussianModelDP
            from secretflow_fl.security.privacy.strategy_fl import DPStrategyFL

            extra["dp_strategy"] = DPStrategyFL(
                model_gdp=GaussianModelDP(
                    noise_multiplier=setting.dp_noise_multiplier,
                    num_clients=len(devices),
                    l2_norm_clip=setting.dp_clip,
                )
            )
        fl_model = FLModel(
            server=server,
            device_list=devices,
            model=torch_model,
            aggregator=aggregator,
            strategy=setting.strategy + CAPTURE_SUFFIX,
            backend="torch",
            random_seed=setting.seed,
            **extra,
        )
        recorder = RoundCapture(
            setting.parties, rounds, out_dir, aggregator, meta={"dataset": name}
        )
        bar = _EpochBar(setting.epochs, setting.label()[:40], progress, setting.pruned)
        np.random.seed(setting.seed)  # GaussianModelDP draws from numpy's global generator
        started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            history = fl_model.fit(
                train[0],
                train[1],
                validation_data=test,
                epochs=setting.epochs,
                batch_size=setting.batch_size,
                aggregate_freq=setting.local_steps,
                callbacks=[recorder, bar],
                verbose=0,
                random_seed=setting.seed,
            )
        wall = time.perf_counter() - started
        kept = 1.0
        if setting.pruned:
            kept = float(
                np.mean([sf.reveal(w.get_kept_fraction()) for w in fl_model._workers.values()])
            )
    accuracy = [float(a) for a in history["global_history"]["val_multiclassaccuracy"]]
    train_accuracy = [float(a) for a in history["global_history"]["multiclassaccuracy"]]
    return FLRun(
        setting,
        accuracy,
        kept,
        wall,
        list(recorder.saved),
        name,
        train_accuracy=train_accuracy,
        epoch_seconds=bar.seconds,
        kept_per_epoch=bar.kept,
    )


__all__ = [
    "FLRun",
    "default_rounds",
    "load_arrays",
    "model_class_for",
    "run_setting",
    "secretflow_session",
]
