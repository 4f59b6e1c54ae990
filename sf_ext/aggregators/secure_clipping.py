"""Norm clipping in SecretFlow's SPU: the cheaper secure filter.

:class:`SecureClippingAggregator` computes the plaintext rule :func:`sf_ext.aggregators.
norm_clipping` (NDC: every update scaled to an L2 norm of at most a threshold, then the
sample-weighted mean) without the server seeing any client's weights, with the machinery of
:mod:`sf_ext.aggregators.secure_flame` (same SPU protocols, fixed-point ring, input clamp, starting
model and noise party). It skips FLAME's pairwise distances and clustering: its SPU work is one
norm per client and one weighted sum, linear in ``n`` instead of quadratic, and nothing but the
aggregate needs to be opened.

Thresholds:

* a number (NDC, default 2.0 as the matrix-mapping paper): fixed, public; the server learns only
  the aggregate;
* ``"median"`` (FLAME's clipping alone): each round's threshold is the median update norm
  ``S_t``, computed in the SPU and opened to the server (as FLAME opens it).

Sample counts (``FLModel`` passes them) are secret-shared into the SPU with the weights and turned
into shares there; the server never sees them (unlike SecretFlow's ``SecureAggregator``, which
sends them in the clear). A client can still claim a large count: that is the sample-weighted
mean's own weakness, plaintext or not; ``weighted=False`` averages equally.
"""

from typing import Any, Dict, List, Optional, Union

import numpy as np
from secretflow.device import PYU, SPU, DeviceObject, PYUObject, SPUCompilerNumReturnsPolicy

from sf_ext.aggregators.secure_flame import SecureFilterAggregator, _as_count, _clipping_stage


class SecureClippingAggregator(SecureFilterAggregator):
    """NDC (or FLAME's median-norm clipping alone) in SPU; only the aggregate is opened.

    Args:
        device, participants, spu: The server PYU, the client PYUs, the SPU device.
        threshold: Largest update norm kept (a positive number), or ``"median"`` for each
            round's median update norm (opened to the server).
        weighted: Weight clients by their sample counts (NDC) or equally.
        **kwargs: Noise (off by default: ``noise_lambda=0``), clamp, starting-model and protocol
            options of :class:`~sf_ext.aggregators.secure_flame.SecureFilterAggregator`.

    What the server learns per round: the aggregate (noised if noise is on) and, for
    ``threshold="median"``, the median update norm.
    """

    method = "secure_clipping"
    selects = False

    def __init__(
        self,
        device: PYU,
        participants: List[PYU],
        spu: SPU,
        threshold: Union[float, str] = 2.0,
        weighted: bool = True,
        **kwargs,
    ):
        if isinstance(threshold, str):
            if threshold != "median":
                raise ValueError(
                    f"threshold must be a positive number or 'median', got {threshold!r}"
                )
            self._threshold: Optional[float] = None
        else:
            if not float(threshold) > 0:
                raise ValueError(f"threshold must be positive, got {threshold}")
            self._threshold = float(threshold)
        self._weighted = bool(weighted)
        super().__init__(device, participants, spu, **kwargs)

    @staticmethod
    def _default_lambda(noise: str) -> float:
        return 0.0  # clipping alone adds no noise unless asked to

    def _counts(self, data: List[DeviceObject], weights):
        """Sample counts into the SPU: secret when the clients hold them, public when the caller
        passed plain numbers, equal when unweighted."""
        n = len(data)
        if not self._weighted or weights is None:
            return np.ones(n, dtype=np.float32)
        on_devices = [isinstance(w, DeviceObject) for w in weights]
        if not any(on_devices):
            counts = np.array([_as_count(w) for w in weights], dtype=np.float32)
            if not counts.sum() > 0:
                raise ValueError("the sample counts sum to 0")
            return counts
        if not all(on_devices):
            raise ValueError("weights must all be device objects or all be numbers")
        moved = []
        for i, (datum, weight) in enumerate(zip(data, weights)):
            if weight.device != datum.device:
                raise ValueError(f"weight {i} lives on {weight.device}, its data on {datum.device}")
            moved.append(weight.device(_as_count)(weight).to(self._spu))
        return moved

    def _round(self, shares, global_spu, parties, data, weights) -> PYUObject:
        used, clip, updates = self._spu(
            _clipping_stage,
            static_argnames=("bound", "threshold"),
            num_returns_policy=SPUCompilerNumReturnsPolicy.FROM_USER,
            user_specified_num_returns=3,
        )(*shares, global_params=global_spu, bound=self._bound, threshold=self._threshold)
        shares.clear()  # the uploads' shares are no longer needed: let the SPU parties free them
        details: Dict[str, Any] = {
            "threshold_mode": "median" if self._threshold is None else "fixed",
            "weighted": self._weighted,
            "weights_meaning": "1 = included; sample shares and clip factors stay secret",
        }
        if self._threshold is not None:
            details["threshold"] = self._threshold
        opened = used.to(self._device) if self._threshold is None else None
        self._server.note_threshold(opened, parties, details)
        aggregate = self._noised_sum(
            updates, clip, self._counts(data, weights), used, global_spu, weighted=True
        )
        return self._server.finish(aggregate.to(self._device), parties, self._noise_details())
