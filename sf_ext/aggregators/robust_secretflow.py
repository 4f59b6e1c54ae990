"""SecretFlow ``Aggregator`` adapters for the robust aggregation core.

Each class is a thin shell: clients' weight lists move to the server PYU, where an actor keeps the
previous global model, turns the weights into updates (client weights minus that global model),
calls the pure core (:func:`sf_ext.aggregators.aggregate`) and returns the new global weights. The
actor also keeps every round's :class:`~sf_ext.aggregators.report.AggregationReport`, labelled
with the parties, so detection can be inspected (``aggregator.reports()``).

Robust rules must see individual updates, so unlike ``SecureAggregator`` the server holds each
client's plaintext weights: these aggregators trade confidentiality towards the server for
robustness against malicious clients.

Usage::

    FLModel(server=charlie, device_list=[alice, bob, carol], strategy="fed_avg_w", backend="torch",
            aggregator=FlameAggregator(charlie, [alice, bob, carol]), model=model_def)
"""

import logging
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from secretflow.device import PYU, DeviceObject, PYUObject, proxy, reveal
from secretflow.security.aggregation import Aggregator
from torch import nn

from sf_ext.aggregators.core import get_aggregator
from sf_ext.aggregators.server import server_options
from sf_ext.params import ParamLayout

logger = logging.getLogger(__name__)


def _build_model(model_fn) -> Optional[nn.Module]:
    """An ``nn.Module`` from a class/factory or a SecretFlow ``TorchModel`` builder."""
    if model_fn is None:
        return None
    if hasattr(model_fn, "model_fn"):  # TorchModel: its factory plus constructor kwargs
        return model_fn.model_fn(**getattr(model_fn, "kwargs", {}))
    return model_fn()


@proxy(PYUObject)
class _RobustAggregationServer:
    """Server-side state: previous global model, round counter and reports."""

    def __init__(
        self,
        method: str,
        options: Dict[str, Any],
        model_fn: Optional[Callable[[], nn.Module]],
        input_shape: Optional[Sequence[int]],
        seed: Optional[int],
    ):
        self.method = method
        self.options = dict(options)
        self.model = _build_model(model_fn)
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)
        self.global_vector: Optional[torch.Tensor] = None
        self.layout: Optional[ParamLayout] = None
        self.round = 0
        self.history: List[Dict[str, Any]] = []

    def aggregate(self, weight_lists, sample_counts, parties) -> List[np.ndarray]:
        if not weight_lists:
            raise ValueError("no client weights to aggregate")
        if self.layout is None:
            names = list(self.model.state_dict()) if self.model is not None else None
            if names is not None and len(names) != len(weight_lists[0]):
                raise ValueError(
                    f"model_fn builds a model with {len(names)} tensors, the clients send "
                    f"{len(weight_lists[0])}"
                )
            self.layout = ParamLayout.from_arrays(weight_lists[0], names)
        for party, weights in zip(parties, weight_lists):
            if len(weights) != len(self.layout.names):
                raise ValueError(
                    f"{party} sent {len(weights)} tensors, expected {len(self.layout.names)}"
                )
        vectors = torch.stack([self.layout.flatten(w) for w in weight_lists])
        counts = None
        if sample_counts:
            counts = torch.as_tensor([float(c) for c in sample_counts], dtype=torch.float64)
        if self.global_vector is None:
            # FLModel's first call averages the clients' initial models: nothing to defend yet,
            # and no earlier global model to take updates against.
            finite = torch.isfinite(vectors).all(dim=1)
            if not bool(finite.any()):
                raise ValueError("every client's initial weights contain NaN or inf")
            self.global_vector = vectors[finite].mean(dim=0)
            return self.layout.unflatten_numpy(self.global_vector)

        updates = vectors - self.global_vector
        options = server_options(
            get_aggregator(self.method),
            self.options,
            layout=self.layout,
            model=self.model,
            input_shape=self.input_shape,
            round_index=self.round,
            global_params=self.global_vector,
            generator=self.generator,
        )
        update, report = get_aggregator(self.method)(updates, counts, **options)
        new_global = self.global_vector + update
        if not bool(torch.isfinite(new_global).all()):
            raise ValueError(
                f"{self.method} produced a non-finite global model in round {self.round}"
            )
        self.global_vector = new_global
        entry = {"round": self.round, "parties": list(parties), **report.to_dict()}
        entry["details"] = {k: v for k, v in entry["details"].items() if _is_small(v)}
        self.history.append(entry)
        dropped = [p for p, kept in zip(parties, report.kept.tolist()) if not kept]
        logger.info("%s round %d: dropped %s", self.method, self.round, dropped or "nobody")
        self.round += 1
        return self.layout.unflatten_numpy(self.global_vector)

    def reports(self) -> List[Dict[str, Any]]:
        return list(self.history)


def _is_small(value) -> bool:
    """Keep scalars and short lists in the per-round log, not mapped outputs or matrices."""
    if isinstance(value, torch.Tensor):
        return value.numel() <= 1024
    if isinstance(value, (list, tuple)):
        return len(value) <= 1024
    return True


class RobustAggregator(Aggregator):
    """Base adapter: runs the core aggregator ``method`` on the server PYU across rounds.

    Args:
        device: The server PYU.
        participants: The client PYUs (used to check where data comes from).
        model_fn: Model class/factory or ``TorchModel`` (needed by matrix mapping; gives FLAME
            the tensor names). Optional for the other rules.
        input_shape: Shape of one training input without the batch dimension (matrix mapping).
        seed: Seed of the server's random generator (FLAME's noise).
        **options: Options of the core function (e.g. ``f`` for Krum, ``noise_lambda`` for FLAME).
    """

    method = "fedavg"

    def __init__(
        self,
        device: PYU,
        participants: List[PYU],
        model_fn=None,
        input_shape: Optional[Sequence[int]] = None,
        seed: Optional[int] = 0,
        **options,
    ):
        if not participants:
            raise ValueError("participants must name at least one client PYU")
        get_aggregator(self.method)  # unknown names fail here, not in the first round
        self._device = device
        self._participants = list(participants)
        self._server = _RobustAggregationServer(
            self.method, options, model_fn, input_shape, seed, device=device
        )

    def _check(self, data: List[DeviceObject]) -> List[str]:
        if not data:
            raise ValueError("no client data to aggregate")
        parties = [d.device.party for d in data]
        unknown = [p for p in parties if p not in {d.party for d in self._participants}]
        if unknown:
            raise ValueError(f"data from {unknown}, which are not participants of this aggregator")
        return parties

    def average(self, data: List[DeviceObject], axis=0, weights=None) -> PYUObject:
        """Robust aggregate of the clients' weight lists (``FLModel`` passes sample counts)."""
        if axis not in (0, None):
            raise ValueError(f"{type(self).__name__} aggregates over clients (axis=0), got {axis}")
        parties = self._check(data)
        moved = [d.to(self._device) for d in data]
        counts = None
        if weights is not None:
            if len(weights) != len(data):
                raise ValueError(f"{len(weights)} weights for {len(data)} clients")
            counts = [w.to(self._device) if isinstance(w, DeviceObject) else w for w in weights]
        return self._server.aggregate(moved, counts, parties)

    def sum(self, data: List[DeviceObject], axis=0) -> PYUObject:
        """Plain element-wise sum on the server (not robust; part of the Aggregator interface)."""
        self._check(data)
        moved = [d.to(self._device) for d in data]

        def _sum(*items):
            if isinstance(items[0], (list, tuple)):
                return [np.sum(group, axis=0) for group in zip(*items)]
            return np.sum(items, axis=0)

        return self._device(_sum)(*moved)

    def reports(self) -> List[Dict[str, Any]]:
        """Every robust round so far: parties, kept flags, weights, scores, details."""
        return reveal(self._server.reports())


class FedAvgAggregator(RobustAggregator):
    """Sample-weighted mean of the updates (refuses NaN/inf updates with an error)."""

    method = "fedavg"


class KrumAggregator(RobustAggregator):
    """Krum: the update closest to its n - f - 2 nearest neighbours (option ``f``)."""

    method = "krum"


class MultiKrumAggregator(RobustAggregator):
    """Multi-Krum: average of the m updates with the best Krum scores (options ``f``, ``m``)."""

    method = "multi_krum"


class MedianAggregator(RobustAggregator):
    """Coordinate-wise median of the updates."""

    method = "median"


class TrimmedMeanAggregator(RobustAggregator):
    """Coordinate-wise trimmed mean of the updates."""

    method = "trimmed_mean"


class NormClippingAggregator(RobustAggregator):
    """NDC: updates clipped to an L2 norm threshold (default 2), then averaged."""

    method = "ndc"


class GeometricMedianAggregator(RobustAggregator):
    """RFA: smoothed-Weiszfeld geometric median of the updates."""

    method = "rfa"


class SignAggregator(RobustAggregator):
    """RSA: step * sum of update signs, the step decaying per round."""

    method = "rsa"


class FlameAggregator(RobustAggregator):
    """FLAME: majority cosine cluster (HDBSCAN), median-norm clipping, weight-only noise."""

    method = "flame"


class MatrixMappingAggregator(RobustAggregator):
    """Matrix mapping: softmax output of each update on an all-ones input; drop far-off clients.

    Needs ``model_fn`` (the network whose weights the updates are) and ``input_shape``;
    ``variant="xmam"`` selects the PCA + HDBSCAN variant of the paper's public code.
    """

    method = "matrix_mapping"

    def __init__(self, device, participants, model_fn=None, input_shape=None, **kwargs):
        if model_fn is None or input_shape is None:
            raise ValueError("MatrixMappingAggregator needs model_fn and input_shape")
        super().__init__(device, participants, model_fn, input_shape, **kwargs)


ROBUST_AGGREGATORS = {
    cls.method: cls
    for cls in (
        FedAvgAggregator,
        KrumAggregator,
        MultiKrumAggregator,
        MedianAggregator,
        TrimmedMeanAggregator,
        NormClippingAggregator,
        GeometricMedianAggregator,
        SignAggregator,
        FlameAggregator,
        MatrixMappingAggregator,
    )
}
