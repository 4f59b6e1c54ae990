"""One call to train a SecretFlow ``FLModel`` and record what a pruning study needs per epoch.

Shared by the demo, the benchmark and the notebook: it builds the ``TorchModel``, the aggregator
and the ``FLModel``, shows a progress bar, and returns accuracy, wall time and (for
``fed_avg_w_prune``) every client's kept fraction per epoch.
"""

import contextlib
import io
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Type

import secretflow as sf
from secretflow.security.aggregation import SecureAggregator
from secretflow_fl.ml.nn import FLModel
from secretflow_fl.ml.nn.callbacks.callback import Callback
from secretflow_fl.ml.nn.core.torch import TorchModel, metric_wrapper, optim_wrapper
from torch import nn, optim
from torchmetrics import Accuracy
from tqdm.auto import tqdm

import sf_ext
from sf_ext.aggregators.secure_prune import SecurePruneAggregator
from sf_ext.models import as_secretflow_module

PRUNE_STRATEGY = "fed_avg_w_prune"


@dataclass
class FLRunResult:
    """Per-epoch record of one ``FLModel.fit``."""

    strategy: str
    val_accuracy: List[float] = field(default_factory=list)
    train_accuracy: List[float] = field(default_factory=list)
    epoch_seconds: List[float] = field(default_factory=list)
    kept_fraction: List[Dict[str, float]] = field(default_factory=list)

    @property
    def final_kept_fraction(self) -> float:
        """Mean over clients of the last kept fraction (1.0 when nothing is pruned)."""
        if not self.kept_fraction:
            return 1.0
        last = self.kept_fraction[-1]
        return sum(last.values()) / len(last)


class _EpochRecorder(Callback):
    """Times epochs, reads kept fractions from the clients and drives a progress bar."""

    def __init__(self, result: FLRunResult, epochs: int, desc: str):
        super().__init__()
        self.result = result
        self.bar = tqdm(total=epochs, desc=desc, unit="epoch", leave=True)
        self._started = None

    def on_epoch_begin(self, epoch=None, logs=None):
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch=None, logs=None):
        self.result.epoch_seconds.append(time.perf_counter() - self._started)
        if self.result.strategy == PRUNE_STRATEGY:
            self.result.kept_fraction.append(
                {d.party: sf.reveal(w.get_kept_fraction()) for d, w in self._workers.items()}
            )
        self.bar.update(1)

    def on_train_end(self, logs=None):
        self.bar.close()


def build_torch_model(model_cls: Type[nn.Module], lr: float, num_classes: int = 10, **model_kwargs):
    """SecretFlow ``TorchModel`` for a plain sf-ext model class, Adam and accuracy.

    ``num_classes`` sizes both the model's output and the accuracy metric; other keyword
    arguments go to the model's constructor.
    """
    return TorchModel(
        model_fn=as_secretflow_module(model_cls),
        loss_fn=nn.CrossEntropyLoss,
        optim_fn=optim_wrapper(optim.Adam, lr=lr),
        metrics=[
            metric_wrapper(Accuracy, task="multiclass", num_classes=num_classes, average="micro")
        ],
        num_classes=num_classes,
        **model_kwargs,
    )


def train_federated(
    strategy: str,
    server,
    clients: Sequence,
    model_def: TorchModel,
    train_data,
    test_data,
    epochs: int,
    batch_size: int = 32,
    aggregate_freq: int = 1,
    prune_percent: float = 5,
    prune_end_rate: float = 0.1,
    prune_scope: str = "layer",
    random_seed: Optional[int] = 0,
    progress_desc: Optional[str] = None,
    device: str = "cpu",
) -> FLRunResult:
    """Train with ``fed_avg_w`` (+ ``SecureAggregator``) or ``fed_avg_w_prune`` (+ ``SecurePruneAggregator``).

    Args:
        strategy: ``"fed_avg_w"`` or ``"fed_avg_w_prune"``.
        server: The aggregating PYU.
        clients: The training PYUs.
        model_def: A ``TorchModel`` (see :func:`build_torch_model`).
        train_data: ``(x, y)`` FedNdarrays.
        test_data: ``(x, y)`` FedNdarrays for per-epoch validation.
        epochs, batch_size, aggregate_freq: As in ``FLModel.fit``.
        prune_percent, prune_end_rate, prune_scope: The pruning schedule (prune strategy only).
        random_seed: Model initialization seed (the same for both strategies).
        progress_desc: Progress-bar label (default: the strategy name).
        device: ``"cpu"`` or ``"cuda"`` (clients train on the GPU through SecretFlow's
            ``use_gpu``).
    """
    if strategy not in ("fed_avg_w", PRUNE_STRATEGY):
        raise ValueError(f"strategy must be 'fed_avg_w' or {PRUNE_STRATEGY!r}, got {strategy!r}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    sf_ext.register_strategies()
    clients = list(clients)
    extra = {"use_gpu": True} if device == "cuda" else {}
    if strategy == PRUNE_STRATEGY:
        aggregator = SecurePruneAggregator(server, clients)
        extra.update(
            prune_percent=prune_percent, prune_end_rate=prune_end_rate, prune_scope=prune_scope
        )
    else:
        aggregator = SecureAggregator(server, clients)
    fl_model = FLModel(
        server=server,
        device_list=clients,
        model=model_def,
        aggregator=aggregator,
        strategy=strategy,
        backend="torch",
        random_seed=random_seed,
        **extra,
    )
    result = FLRunResult(strategy)
    recorder = _EpochRecorder(result, epochs, progress_desc or strategy)
    # SecretFlow 1.11 prints every client's metric dict each epoch; the progress bar replaces it.
    with contextlib.redirect_stdout(io.StringIO()):
        history = fl_model.fit(
            train_data[0],
            train_data[1],
            validation_data=test_data,
            epochs=epochs,
            batch_size=batch_size,
            aggregate_freq=aggregate_freq,
            callbacks=[recorder],
            verbose=0,
        )
    result.val_accuracy = [float(a) for a in history["global_history"]["val_multiclassaccuracy"]]
    result.train_accuracy = [float(a) for a in history["global_history"]["multiclassaccuracy"]]
    return result
