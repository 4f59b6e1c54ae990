"""Secure aggregation of pruned (masked) weights on top of SecretFlow's ``SecureAggregator``.

Plain averaging of pruned models drags every weight that some client pruned towards zero. The
correct average of coordinate ``j`` runs over the clients that kept it::

    w_j = sum_i(n_i * m_ij * w_ij) / sum_i(n_i * m_ij)        (0 where no client kept j)

Both sums are computed with SecretFlow's own pairwise-masking secure sum (``SecureAggregator.sum``):
each client multiplies locally, the masker adds its one-time pads, and the server only ever holds
masked fixed-point vectors and the two totals. It never receives a client's plaintext weights or
mask.

What the totals still reveal: the denominator is the sample-weighted count of clients that kept
each coordinate, and where exactly one client kept a coordinate the average *is* that client's
weight. That is inherent in the function being computed (any protocol that reveals this average
reveals it), not a leak of the protocol; deployments with two clients of distinct sizes should
bear it in mind.
"""

from typing import List, Optional, Sequence

import numpy as np
from secretflow.device import PYU, DeviceObject, PYUObject
from secretflow.security.aggregation import SecureAggregator


def _weighted_numerator(weights, sample_weight):
    """Client side: n_i * m_i * w_i per tensor (the upload is already masked: m_i * w_i = w_i)."""
    masks = getattr(weights, "masks", [None] * len(weights))
    factor = 1.0 if sample_weight is None else float(sample_weight)
    out = []
    for w, m in zip(weights, masks):
        w = np.asarray(w, dtype=np.float32)
        if not np.all(np.isfinite(w)):
            raise ValueError("a client's weights contain NaN or inf; refusing to aggregate them")
        out.append((w * m if m is not None else w) * np.float32(factor))
    return out


def _weighted_mask(weights, sample_weight):
    """Client side: n_i * m_i per tensor (all ones where the tensor is never pruned)."""
    masks = getattr(weights, "masks", [None] * len(weights))
    factor = np.float32(1.0 if sample_weight is None else float(sample_weight))
    return [
        (np.ones(np.shape(w), np.float32) if m is None else np.asarray(m, np.float32)) * factor
        for w, m in zip(weights, masks)
    ]


def _masked_ratio(numerators: List[np.ndarray], denominators: List[np.ndarray]):
    """Server side: the per-coordinate average over the clients that kept each coordinate."""
    out = []
    for num, den in zip(numerators, denominators):
        # Fixed-point decoding leaves ~2^-fxp noise on integer counts: anything below half a
        # sample weight is "nobody kept it".
        kept = den > 0.5
        ratio = np.zeros_like(num, dtype=np.float32)
        np.divide(num, den, out=ratio, where=kept, casting="unsafe")
        out.append(ratio)
    return out


class SecurePruneAggregator(SecureAggregator):
    """Secure aggregator that averages masked weights over the clients that kept each entry.

    A drop-in for :class:`secretflow.security.aggregation.SecureAggregator`: with uploads that
    carry no masks (plain weight lists) it computes the ordinary sample-weighted average.

    Args:
        device: The server PYU that receives the masked sums.
        participants: The client PYUs; every call must include all of them.
        fxp_bits: Fixed-point fraction bits of SecretFlow's encoding (2^-fxp_bits resolution).

    Examples:
        >>> aggregator = SecurePruneAggregator(charlie, [alice, bob])
        >>> FLModel(server=charlie, device_list=[alice, bob], aggregator=aggregator,
        ...         strategy="fed_avg_w_prune", backend="torch", model=model_def,
        ...         prune_percent=5, prune_end_rate=0.1)
    """

    def __init__(self, device: PYU, participants: List[PYU], fxp_bits: int = 18):
        if not participants:
            raise ValueError("participants must name at least one client PYU")
        super().__init__(device, participants, fxp_bits=fxp_bits)

    def average(
        self, data: List[PYUObject], axis=0, weights: Optional[Sequence] = None
    ) -> PYUObject:
        """Mask-aware weighted average of the clients' weight lists, as a PYUObject on the server.

        Args:
            data: One weight list per participant (``MaskedWeights`` or plain lists of arrays).
            axis: Must be 0 (the client axis), as ``FLModel`` passes.
            weights: Sample counts per client (ints or PYUObjects on the clients), or ``None``.
        """
        if axis not in (0, None):
            raise ValueError(
                f"SecurePruneAggregator averages over clients (axis=0), got axis={axis}"
            )
        self._check_data(data)
        if weights is not None and len(weights) != len(data):
            raise ValueError(f"{len(weights)} weights for {len(data)} clients")
        numerators, denominators = [], []
        for i, datum in enumerate(data):
            weight = None if weights is None else weights[i]
            if isinstance(weight, DeviceObject) and weight.device != datum.device:
                raise ValueError(f"weight {i} lives on {weight.device}, its data on {datum.device}")
            numerators.append(datum.device(_weighted_numerator)(datum, weight))
            denominators.append(datum.device(_weighted_mask)(datum, weight))
        total = super().sum(numerators, axis=0)
        count = super().sum(denominators, axis=0)
        return self._device(_masked_ratio)(total, count)
