"""Secure aggregation of pruned (masked) weights on top of SecretFlow's ``SecureAggregator``.

Plain averaging of pruned models drags every weight that some client pruned towards zero. The
correct average of coordinate ``j`` runs over the clients that kept it::

    w_j = sum_i(n_i * m_ij * w_ij) / sum_i(n_i * m_ij)        (0 where no client kept j)

Both sums are computed with SecretFlow's own pairwise-masking secure sum (``SecureAggregator.sum``):
each client multiplies locally, the masker adds its one-time pads, and the server only ever holds
masked fixed-point vectors and the two totals. It never receives a client's plaintext weights or
mask.

Fixed point: SecretFlow encodes every value as an integer multiple of ``2**-fxp_bits`` (truncating
the rest). Where nobody kept a coordinate every client sends an exact 0, the one-time pads cancel
exactly, and the decoded count is exactly 0; any client that kept it adds at least one resolution
step. So "kept" means a count of at least one step, whatever the weights. Fractional weights are
first multiplied by a common power of two that lifts the smallest positive weight to at least 1,
so that a light client's values keep the same relative precision as a sample count's (the average
does not change under a common factor). Sample counts (integers) are never rescaled.

What the totals still reveal: the denominator is the sample-weighted count of clients that kept
each coordinate, and where exactly one client kept a coordinate the average *is* that client's
weight. That is inherent in the function being computed (any protocol that reveals this average
reveals it), not a leak of the protocol; deployments with two clients of distinct sizes should
bear it in mind. As in ``SecureAggregator``, the weights themselves reach the server in plaintext;
with fractional weights below 1 the clients also learn the common power of two, that is, the
order of magnitude of the smallest weight.
"""

import math
from typing import List, Optional, Sequence

import numpy as np
from secretflow.device import PYU, DeviceObject, PYUObject
from secretflow.security.aggregation import SecureAggregator

# Headroom below 2**63 for the sum over clients of SecretFlow's int64 fixed-point values.
_ENCODING_LIMIT_BITS = 62


def _as_vector(array) -> np.ndarray:
    """A float32 array of at least one dimension (SecretFlow's secure sum rejects 0-d arrays)."""
    return np.atleast_1d(np.asarray(array, dtype=np.float32))


def _masks_of(weights) -> list:
    masks = getattr(weights, "masks", None)
    if masks is None:
        return [None] * len(weights)
    for i, (w, m) in enumerate(zip(weights, masks)):
        if m is not None and np.shape(m) != np.shape(w):
            raise ValueError(
                f"mask {i} has shape {np.shape(m)} but its weight array has shape {np.shape(w)}"
            )
    return list(masks)


def _check_range(values: np.ndarray, fxp_bits: int, clients: int, what: str) -> None:
    limit = 2.0 ** (_ENCODING_LIMIT_BITS - fxp_bits) / clients
    largest = float(np.max(np.abs(values))) if values.size else 0.0
    if largest >= limit:
        raise ValueError(
            f"{what} reaches {largest:.3g}, beyond what {fxp_bits}-bit fixed point can sum over "
            f"{clients} clients (limit {limit:.3g}); use fewer fxp_bits or weights of a "
            "narrower range"
        )


def _weighted_numerator(weights, sample_weight, scale, fxp_bits, clients):
    """Client side: s * n_i * m_i * w_i per tensor (the upload is already masked)."""
    factor = np.float64(scale) * (1.0 if sample_weight is None else float(sample_weight))
    out = []
    for w, m in zip(weights, _masks_of(weights)):
        w = _as_vector(w)
        if not np.all(np.isfinite(w)):
            raise ValueError("a client's weights contain NaN or inf; refusing to aggregate them")
        if m is not None:
            w = w * _as_vector(m).astype(np.float32)
        value = (w.astype(np.float64) * factor).astype(np.float32)
        _check_range(value, fxp_bits, clients, "a weighted client weight")
        out.append(value)
    return out


def _weighted_mask(weights, sample_weight, scale, fxp_bits, clients):
    """Client side: s * n_i * m_i per tensor (all ones where the tensor is never pruned)."""
    factor = np.float64(scale) * (1.0 if sample_weight is None else float(sample_weight))
    out = []
    for w, m in zip(weights, _masks_of(weights)):
        kept = np.ones(np.shape(_as_vector(w)), np.float32) if m is None else _as_vector(m)
        value = (kept.astype(np.float64) * factor).astype(np.float32)
        _check_range(value, fxp_bits, clients, "a client's weight")
        out.append(value)
    return out


def _shapes(weights) -> List[tuple]:
    return [tuple(np.shape(w)) for w in weights]


def _common_scale(*sample_weights) -> float:
    """Power of two that lifts the smallest positive weight to at least 1 (1.0 for counts)."""
    values = np.asarray([float(w) for w in sample_weights], dtype=np.float64)
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ValueError(f"weights must be finite and >= 0, got {values.tolist()}")
    positive = values[values > 0]
    if positive.size == 0:
        raise ValueError(f"weights must not all be 0, got {values.tolist()}")
    smallest = float(positive.min())
    return 1.0 if smallest >= 1.0 else 2.0 ** math.ceil(-math.log2(smallest))


def _masked_ratio(numerators, denominators, shapes, fxp_bits):
    """Server side: the per-coordinate average over the clients that kept each coordinate
    (marked as a :class:`~sf_ext.aggregators.masking.MaskAwareAggregate`)."""
    from sf_ext.aggregators.masking import MaskAwareAggregate

    # Counts are exact multiples of the resolution; nobody kept -> exactly 0 (see module doc).
    half_step = 0.5 * 2.0**-fxp_bits
    out = []
    for num, den, shape in zip(numerators, denominators, shapes):
        num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
        kept = den > half_step
        ratio = np.zeros(den.shape, dtype=np.float64)
        np.divide(num, den, out=ratio, where=kept)
        out.append(ratio.astype(np.float32).reshape(shape))
    return MaskAwareAggregate(out, "SecurePruneAggregator")


class SecurePruneAggregator(SecureAggregator):
    """Secure aggregator that averages masked weights over the clients that kept each entry.

    ``fed_avg_w_prune`` accepts it (``mask_aware = True``); SecretFlow's own aggregators average a
    pruned weight as 0 and are refused by the strategy.

    A drop-in for :class:`secretflow.security.aggregation.SecureAggregator`: with uploads that
    carry no masks (plain weight lists) it computes the ordinary weighted average, for integer and
    fractional weights alike. It also accepts what ``SecureAggregator`` refuses in a model's weight
    list: 0-dimensional arrays and integer buffers (BatchNorm's ``num_batches_tracked``), which it
    averages as float32 and returns in their original shapes.

    Args:
        device: The server PYU that receives the masked sums.
        participants: The client PYUs; every call must include all of them.
        fxp_bits: Fixed-point fraction bits of SecretFlow's encoding (2^-fxp_bits resolution).

    Examples:
        Two clients, weights 1 and 3; bob pruned the second entry, so it is alice's value alone:

        >>> import numpy as np
        >>> import secretflow as sf
        >>> from sf_ext.aggregators import SecurePruneAggregator
        >>> from sf_ext.pruning import MaskedWeights
        >>> sf.init(["alice", "bob", "charlie"], debug_mode=True)
        >>> alice, bob, charlie = sf.PYU("alice"), sf.PYU("bob"), sf.PYU("charlie")
        >>> def upload(values, kept):
        ...     return MaskedWeights([np.float32(values) * kept], [np.array(kept)])
        >>> uploads = [alice(upload)([1.0, 2.0], [True, True]),
        ...            bob(upload)([3.0, 5.0], [True, False])]
        >>> aggregator = SecurePruneAggregator(charlie, [alice, bob])
        >>> mean = aggregator.average(uploads, axis=0, weights=[1, 3])
        >>> np.round(sf.reveal(mean)[0], 4)
        array([2.5, 2. ], dtype=float32)
        >>> sf.shutdown()

        In training, pass it to ``FLModel(..., aggregator=SecurePruneAggregator(server, clients),
        strategy="fed_avg_w_prune", backend="torch")`` (see :mod:`sf_ext.strategies`).
    """

    mask_aware = True

    def __init__(self, device: PYU, participants: List[PYU], fxp_bits: int = 18):
        if not participants:
            raise ValueError("participants must name at least one client PYU")
        if not isinstance(fxp_bits, int) or not 1 <= fxp_bits <= 40:
            raise ValueError(f"fxp_bits must be an integer in [1, 40], got {fxp_bits!r}")
        super().__init__(device, participants, fxp_bits=fxp_bits)

    def average(
        self, data: List[PYUObject], axis=0, weights: Optional[Sequence] = None
    ) -> PYUObject:
        """Mask-aware weighted average of the clients' weight lists, as a PYUObject on the server.

        Args:
            data: One weight list per participant (``MaskedWeights`` or plain lists of arrays).
            axis: Must be 0 (the client axis), as ``FLModel`` passes.
            weights: Non-negative weights per client, not all 0 (sample counts as ints or
                PYUObjects on the clients, or fractions), or ``None`` for equal weights.

        Returns:
            A list of float32 arrays in the shapes of the clients' arrays, on the server.
        """
        if axis not in (0, None):
            raise ValueError(
                f"SecurePruneAggregator averages over clients (axis=0), got axis={axis}"
            )
        self._check_data(data)
        if weights is not None and len(weights) != len(data):
            raise ValueError(f"{len(weights)} weights for {len(data)} clients")
        for i, weight in enumerate(weights or []):
            if isinstance(weight, DeviceObject) and weight.device != data[i].device:
                raise ValueError(
                    f"weight {i} lives on {weight.device}, its data on {data[i].device}"
                )
        scale = self._scale(weights)
        clients = len(data)
        numerators, denominators = [], []
        for i, datum in enumerate(data):
            weight = None if weights is None else weights[i]
            local_scale = scale.to(datum.device) if isinstance(scale, DeviceObject) else scale
            numerators.append(
                datum.device(_weighted_numerator)(
                    datum, weight, local_scale, self._fxp_bits, clients
                )
            )
            denominators.append(
                datum.device(_weighted_mask)(datum, weight, local_scale, self._fxp_bits, clients)
            )
        # Array shapes are structure, not secrets: the server needs them to restore 0-d arrays.
        shapes = data[0].device(_shapes)(data[0]).to(self._device)
        total = super().sum(numerators, axis=0)
        count = super().sum(denominators, axis=0)
        return self._device(_masked_ratio)(total, count, shapes, self._fxp_bits)

    def _scale(self, weights):
        """The common power-of-two factor for the weights (a float, or a PYUObject on the server)."""
        if weights is None:
            return 1.0
        if not any(isinstance(w, DeviceObject) for w in weights):
            return _common_scale(*weights)
        # Like SecureAggregator.average, the server sees the weights (sample counts).
        on_server = [w.to(self._device) if isinstance(w, DeviceObject) else w for w in weights]
        return self._device(_common_scale)(*on_server)
