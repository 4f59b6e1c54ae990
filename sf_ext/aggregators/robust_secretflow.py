"""SecretFlow ``Aggregator`` adapters for the robust aggregation core.

Each class is a thin shell: clients' weight lists move to the server PYU, where an actor keeps the
previous global model, turns the weights into updates (client weights minus that global model),
fills a :class:`~sf_ext.aggregators.server.ServerContext` (layout, global model, round, the parties'
names as client ids, the rule's memory, FLTrust's root update) and calls the pure core through the
registry (:func:`sf_ext.aggregators.call_rule`), which hands the rule exactly the context it
declares. The actor keeps every round's :class:`~sf_ext.aggregators.report.AggregationReport`,
labelled with the parties (``aggregator.reports()``).

The starting model: ``FLModel`` opens every ``fit`` with one ``average`` call over the clients'
initial weights. The adapters never let a minority of clients choose that model: identical
starting weights are taken as they are; otherwise the server takes their coordinate-wise median
(or, with ``initial="server"`` and a ``model_fn``, its own freshly built model) and logs that the
clients disagreed.

Pruned uploads (``fed_avg_w_prune``'s ``MaskedWeights``): every adapter is mask-aware. Detection
runs on the masked updates ``m_i * (w_i - G)`` (a pruned coordinate counts as no change: FLAME
clusters ``G + m_i * u_i``, matrix mapping maps the masked update, Krum measures distances between
masked updates), and the result is renormalized per coordinate over the kept clients that kept it,
as ``SecurePruneAggregator`` averages (details in :mod:`sf_ext.aggregators.masking`). The returned
weights are a :class:`~sf_ext.aggregators.masking.MaskAwareAggregate`.

What the server learns: robust rules must see individual updates, so unlike ``SecureAggregator``
the server holds each client's plaintext weights (and sample counts). These aggregators trade
confidentiality towards the server for robustness against malicious clients; each rule's
docstring says what else it derives (distances, clusters, histories).

Usage::

    FLModel(server=charlie, device_list=[alice, bob, carol], strategy="fed_avg_w", backend="torch",
            aggregator=FlameAggregator(charlie, [alice, bob, carol]), model=model_def)
    # any registered rule, built-in or your own:
    RobustAggregator(charlie, [alice, bob, carol], method="my_rule", my_option=1.0)
"""

import difflib
import logging
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from secretflow.device import PYU, DeviceObject, PYUObject, proxy, reveal
from secretflow.security.aggregation import Aggregator
from torch import nn

from sf_ext.aggregators.masking import (
    MaskAwareAggregate,
    coordinatewise_over_keepers,
    mask_aware_update,
    mask_matrix,
)
from sf_ext.aggregators.registry import call_rule, get_rule
from sf_ext.aggregators.server import CONTEXT_FIELDS, ServerContext
from sf_ext.params import ParamLayout

logger = logging.getLogger(__name__)

INITIAL_MODES = ("median", "server")


def _build_model(model_fn) -> Optional[nn.Module]:
    """An ``nn.Module`` from a class/factory or a SecretFlow ``TorchModel`` builder."""
    if model_fn is None:
        return None
    if hasattr(model_fn, "model_fn"):  # TorchModel: its factory plus constructor kwargs
        return model_fn.model_fn(**getattr(model_fn, "kwargs", {}))
    return model_fn()


def check_rule_options(method: str, options: Dict[str, Any]) -> None:
    """Reject option names the rule does not take (typos), naming the closest valid one."""
    import inspect

    spec = get_rule(method)
    params = inspect.signature(spec.fn).parameters
    known = [
        n
        for n, p in params.items()
        if n not in ("updates", "num_samples")
        and n not in CONTEXT_FIELDS
        and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    for key in options:
        if key in CONTEXT_FIELDS:
            raise ValueError(
                f"{key!r} is server context the adapter fills itself, not an option of {method!r}"
            )
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown option {key!r} for {method!r}{hint}; known: {known}")


def initial_global(vectors: torch.Tensor) -> Tuple[torch.Tensor, str]:
    """The starting model from the clients' initial weights ``[n, d]``: as they are when every
    usable row is identical, else their coordinate-wise median (a minority cannot set it)."""
    finite = torch.isfinite(vectors).all(dim=1)
    if not bool(finite.any()):
        raise ValueError("every client's initial weights contain NaN or inf")
    rows = vectors[finite]
    if bool((rows == rows[0]).all()):
        return rows[0].clone(), "identical"
    return rows.median(dim=0).values.clone(), "median"


def _train_root(model, layout, global_vector, data, lr, epochs, batch_size, seed) -> torch.Tensor:
    """FLTrust's server update: plain SGD on the root data from the global model."""
    x, y = data
    tensors = layout.unflatten(global_vector.clone())
    model.load_state_dict({n: t.clone() for n, t in tensors.items()})
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    y = torch.as_tensor(np.asarray(y)).long().reshape(-1)
    if y.numel() != x.shape[0]:
        raise ValueError(f"root data: {x.shape[0]} inputs but {y.numel()} labels")
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=generator)
        for start in range(0, x.shape[0], batch_size):
            idx = order[start : start + batch_size]
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
    return layout.flatten(model.state_dict()) - global_vector


@proxy(PYUObject)
class _RobustAggregationServer:
    """Server-side state: previous global model, round counter, the rule's memory, reports."""

    def __init__(
        self,
        method: str,
        options: Dict[str, Any],
        model_fn: Optional[Callable[[], nn.Module]],
        input_shape: Optional[Sequence[int]],
        seed: Optional[int],
        initial: str,
        root: Optional[Dict[str, Any]],
        label: str = "RobustAggregator",
    ):
        self.method = method
        self.label = label
        self.options = dict(options)
        self.model = _build_model(model_fn)
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.seed = 0 if seed is None else int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.initial = initial
        self.root = root
        self.global_vector: Optional[torch.Tensor] = None
        self.layout: Optional[ParamLayout] = None
        self.round = 0
        self.state: Dict[str, Any] = {}
        self.history: List[Dict[str, Any]] = []

    def _set_layout(self, weight_lists) -> None:
        names = list(self.model.state_dict()) if self.model is not None else None
        if names is not None and len(names) != len(weight_lists[0]):
            raise ValueError(
                f"model_fn builds a model with {len(names)} tensors, the clients send "
                f"{len(weight_lists[0])}"
            )
        self.layout = ParamLayout.from_arrays(weight_lists[0], names)

    def aggregate(self, weight_lists, sample_counts, parties) -> List[np.ndarray]:
        if not weight_lists:
            raise ValueError("no client weights to aggregate")
        if self.layout is None:
            self._set_layout(weight_lists)
        for party, weights in zip(parties, weight_lists):
            if len(weights) != len(self.layout.names):
                raise ValueError(
                    f"{party} sent {len(weights)} tensors, expected {len(self.layout.names)}"
                )
        vectors = torch.stack([self.layout.flatten(w) for w in weight_lists])
        masks = mask_matrix(weight_lists, self.layout)
        counts = None
        if sample_counts:
            counts = torch.as_tensor([float(c) for c in sample_counts], dtype=torch.float64)
        if self.global_vector is None:
            # FLModel's first call averages the clients' initial models: nothing to defend yet,
            # and no earlier global model to take updates against.
            if self.initial == "server":
                self.global_vector = self.layout.flatten(self.model.state_dict())
                how = "server"
            else:
                self.global_vector, how = initial_global(vectors)
            if how != "identical":
                logger.warning(
                    "%s: the clients started from different models; the server starts from %s",
                    self.method,
                    "its own model" if how == "server" else "their coordinate-wise median",
                )
            return self._result(self.global_vector)

        updates = vectors - self.global_vector
        if masks is not None:
            # A pruned coordinate is "no change" for detection (see sf_ext.aggregators.masking).
            updates = updates * masks
        root_update = None
        if self.root is not None:
            root_update = _train_root(
                self.model,
                self.layout,
                self.global_vector,
                self.root["data"],
                self.root["lr"],
                self.root["epochs"],
                self.root["batch_size"],
                self.seed + self.round,
            )
        context = ServerContext(
            layout=self.layout,
            global_params=self.global_vector,
            model=self.model,
            input_shape=self.input_shape,
            round_index=self.round,
            generator=self.generator,
            client_ids=list(parties),
            state=self.state,
            root_update=root_update,
        )
        update, report = call_rule(self.method, updates, counts, context, **self.options)
        nobody = None
        if masks is not None:
            if self.method in ("median", "trimmed_mean"):
                # Coordinate-wise rules: the statistic over the clients that kept each coordinate.
                update = coordinatewise_over_keepers(
                    updates,
                    masks,
                    ~report.non_finite,
                    self.method,
                    self.options.get("f"),
                    self.options.get("trim_ratio", 0.1),
                )
            update, nobody = mask_aware_update(update, report, masks, get_rule(self.method).linear)
        new_global = self.global_vector + update
        if nobody is not None:
            new_global[nobody] = 0.0  # pruned by every kept client, as in SecurePruneAggregator
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
        return self._result(self.global_vector)

    def _result(self, vector: torch.Tensor) -> MaskAwareAggregate:
        """The new global weights, marked as averaged with pruning masks taken into account."""
        return MaskAwareAggregate(self.layout.unflatten_numpy(vector), self.label)

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
    """Runs a registered rule of the aggregation core on the server PYU across rounds.

    Args:
        device: The server PYU.
        participants: The client PYUs (used to check where data comes from).
        model_fn: Model class/factory or ``TorchModel`` (matrix mapping and FLTrust need it; it
            gives every rule the tensor names). Optional for the other rules.
        input_shape: Shape of one training input without the batch dimension (matrix mapping).
        seed: Seed of the server's random generator (noise, subsampling).
        initial: How the starting model is chosen when the clients' initial weights differ:
            ``"median"`` (coordinate-wise median, the default) or ``"server"`` (the server's own
            ``model_fn()``).
        method: Registry name of the rule (subclasses fix it; pass it to use your own rule).
        **options: Options of the core rule (e.g. ``f`` for Krum); unknown names are an error.

    Raises:
        ValueError: Unknown rule or option, no participants, or a rule whose needs the adapter
            cannot meet (matrix mapping without ``model_fn``/``input_shape``).
    """

    method = "fedavg"
    #: Averages pruned uploads correctly (``fed_avg_w_prune`` accepts it).
    mask_aware = True

    def __init__(
        self,
        device: PYU,
        participants: List[PYU],
        model_fn=None,
        input_shape: Optional[Sequence[int]] = None,
        seed: Optional[int] = 0,
        initial: str = "median",
        method: Optional[str] = None,
        **options,
    ):
        if not participants:
            raise ValueError("participants must name at least one client PYU")
        method = method or type(self).method
        spec = get_rule(method)  # unknown names fail here, not in the first round
        check_rule_options(method, options)
        if initial not in INITIAL_MODES:
            raise ValueError(f"initial must be one of {INITIAL_MODES}, got {initial!r}")
        if initial == "server" and model_fn is None:
            raise ValueError("initial='server' needs model_fn (the server builds the model)")
        needed = spec.needed(options)
        if ("model" in needed or "input_shape" in needed) and (
            model_fn is None or input_shape is None
        ):
            raise ValueError(
                f"{method} maps updates through the network: pass model_fn and input_shape"
            )
        self.method = method
        self._device = device
        self._participants = list(participants)
        self._server = _RobustAggregationServer(
            method,
            options,
            model_fn,
            input_shape,
            seed,
            initial,
            self._root(),
            type(self).__name__,
            device=device,
        )

    def _root(self) -> Optional[Dict[str, Any]]:
        """FLTrust's root-data settings (None for every other rule)."""
        return None

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
    """Coordinate-wise trimmed mean of the updates (options ``f`` or ``trim_ratio``)."""

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
    """FLAME: majority cosine cluster of the local models, median-norm clipping, noise."""

    method = "flame"


class MatrixMappingAggregator(RobustAggregator):
    """Matrix mapping (the paper's rule): softmax output of each update on an all-ones input;
    clients whose output is far from the others' are dropped.

    Needs ``model_fn`` (the network whose weights the updates are) and ``input_shape``;
    ``variant="xmam"`` selects the public code's PCA + HDBSCAN selection (or use
    :class:`XmamAggregator`).
    """

    method = "matrix_mapping"


class XmamAggregator(RobustAggregator):
    """XMAM, matrix mapping's public code (PCA(3) + HDBSCAN on the mapped outputs); needs
    ``model_fn`` and ``input_shape``; ``exact=True`` reproduces its majority rule."""

    method = "xmam"


class BulyanAggregator(RobustAggregator):
    """Bulyan: iterated Krum selection, then a coordinate-wise mean around the median (``f``)."""

    method = "bulyan"


class CenteredClippingAggregator(RobustAggregator):
    """Centered clipping around the previous aggregate (options ``tau``, ``iterations``)."""

    method = "centered_clipping"


class DncAggregator(RobustAggregator):
    """DnC: spectral outlier removal on random coordinate subsets (options ``f``, ``niters``)."""

    method = "dnc"


class SignGuardAggregator(RobustAggregator):
    """SignGuard: norm filter plus sign-statistics clustering, then clipped mean."""

    method = "signguard"


class FoolsGoldAggregator(RobustAggregator):
    """FoolsGold: down-weights parties whose update histories are too alike (sybils); keeps a
    summed history per party on the server."""

    method = "foolsgold"


class ShieldAggregator(RobustAggregator):
    """Shield, sf-ext's own rule: median-norm clipping and bound, near-duplicate groups,
    consensus-direction outliers, then the mean (see :mod:`sf_ext.aggregators.shield`)."""

    method = "shield"


class FLTrustAggregator(RobustAggregator):
    """FLTrust: trust-weighted, norm-rescaled mean against the server's own update on a small
    clean root dataset it holds.

    Args:
        device: The server PYU.
        participants: The client PYUs.
        model_fn: The model class/factory or ``TorchModel`` (the server trains it).
        root_data: ``(x, y)`` arrays of the server's root dataset (Cao et al. use 100 samples).
        root_lr: SGD learning rate of the server's local training (use the clients').
        root_epochs: Local epochs of the server's training each round.
        root_batch_size: Minibatch size of that training.
        **kwargs: As :class:`RobustAggregator`.

    What the server learns, beyond every client's plaintext update: their trust scores; it must
    hold clean data of its own.
    """

    method = "fltrust"

    def __init__(
        self,
        device,
        participants,
        model_fn=None,
        root_data=None,
        root_lr: float = 0.05,
        root_epochs: int = 1,
        root_batch_size: int = 32,
        **kwargs,
    ):
        if model_fn is None or root_data is None:
            raise ValueError("FLTrustAggregator needs model_fn and root_data=(x, y)")
        if not root_lr > 0 or int(root_epochs) < 1 or int(root_batch_size) < 1:
            raise ValueError("root_lr must be > 0, root_epochs and root_batch_size >= 1")
        x, y = root_data
        if len(x) != len(y) or len(x) == 0:
            raise ValueError(f"root_data needs as many labels as inputs, got {len(x)}, {len(y)}")
        self._root_settings = {
            "data": (np.asarray(x, dtype=np.float32), np.asarray(y)),
            "lr": float(root_lr),
            "epochs": int(root_epochs),
            "batch_size": int(root_batch_size),
        }
        super().__init__(device, participants, model_fn=model_fn, **kwargs)

    def _root(self):
        return self._root_settings


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
        XmamAggregator,
        BulyanAggregator,
        CenteredClippingAggregator,
        DncAggregator,
        SignGuardAggregator,
        FoolsGoldAggregator,
        FLTrustAggregator,
        ShieldAggregator,
    )
}
