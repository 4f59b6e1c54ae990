"""One options object for every gradient-inversion attack (how it optimizes, not what it attacks).

The attacks take what they attack (model, observation, shapes, masks, labels) as arguments and
everything about *how* they search as an :class:`AttackOptions`. Fields left at ``None`` take
the attack's own default (:data:`ATTACK_DEFAULTS`), so one options object can be passed to every
attack of a sweep.
"""

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional

#: Gradient/update distances (see :class:`sf_ext.dlg.distance.TensorDistance`).
DISTANCES = ("l2", "l2-layer", "cosine", "cosine-layer")

#: Per-attack defaults for the options left at ``None``.
ATTACK_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "dlg": {"iters": 300, "restarts": 3, "distance": "l2", "tv_weight": 0.0},
    "idlg": {"iters": 300, "restarts": 3, "distance": "l2", "tv_weight": 0.0},
    "ig": {"iters": 1000, "restarts": 2, "distance": "cosine", "tv_weight": 1e-2},
    "multistep": {"iters": 1000, "restarts": 2, "distance": "cosine", "tv_weight": 1e-2},
}


@dataclass
class AttackOptions:
    """How an attack searches.

    Attributes:
        iters: Optimizer steps: L-BFGS steps shared by all starts (``dlg``, ``idlg``), or Adam
            steps per restart (``ig``, ``multistep``). ``None``: the attack's default.
        restarts: Extra L-BFGS starts within ``iters`` (``dlg``/``idlg``; 0 is the original single
            start), or independent restarts (``ig``/``multistep``). ``None``: default.
        distance: ``"l2"``, ``"l2-layer"``, ``"cosine"`` or ``"cosine-layer"`` (see
            :class:`~sf_ext.dlg.distance.TensorDistance`). ``None``: default.
        seed: Seed of the dummy initializations (``None``: random).
        device: Where to run (``None``: the model's device).
        snapshot_every: Keep the dummy input every this many iterations (for progress figures).
        lbfgs_options: Keyword arguments of ``torch.optim.LBFGS`` (``dlg``/``idlg``).
        stop_when_stuck: End an L-BFGS start once two steps in a row leave every variable
            unchanged (later steps would repeat them exactly).
        restart_above: An L-BFGS start that stops with a loss above this fraction of the loss of
            an all-zero dummy gradient counts as failed (and is restarted while budget remains).
        plateau_window: Abandon an L-BFGS start whose loss stays above that level and does not
            halve within this many steps (0: never).
        lr: Adam learning rate on the dummy input (``ig``/``multistep``), divided by 10 at 3/8,
            5/8 and 7/8 of the run.
        tv_weight: Weight of the total-variation image prior (``ig``/``multistep``; default
            1e-2, which suits 28x28 grayscale images in [0, 1]).
        boxed: Keep the dummy input in ``[0, 1]`` (``ig``/``multistep``).
        signed: Step along the sign of the input gradient, as Inverting Gradients does.
        label_method: How ``idlg``, ``ig`` and ``multistep`` read a batch's labels: ``"count"``
            (class counts from the output layer, repeats and missing classes included) or
            ``"sign"`` (classes with a negative output-bias gradient, iDLG's rule).
        soft_sign: Adam simulation only: the denominator ``sqrt(v)`` becomes ``sqrt(v + c^2)``
            with ``c`` this multiple of the tensor's mean ``sqrt(v)``, which turns Adam's
            near-sign update into a smooth function of the input (exact Adam has almost zero
            derivative there). 0 simulates Adam exactly.
    """

    iters: Optional[int] = None
    restarts: Optional[int] = None
    distance: Optional[str] = None
    seed: Optional[int] = None
    device: Optional[str] = None
    snapshot_every: int = 10
    lbfgs_options: Optional[Dict[str, Any]] = None
    stop_when_stuck: bool = True
    restart_above: float = 1e-3
    plateau_window: int = 50
    lr: float = 0.1
    tv_weight: Optional[float] = None
    boxed: bool = True
    signed: bool = True
    label_method: str = "count"
    soft_sign: float = 1.0

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field with an impossible value."""
        if self.iters is not None and (not isinstance(self.iters, int) or self.iters < 1):
            raise ValueError(f"iters must be a positive integer, got {self.iters!r}")
        if self.restarts is not None and (not isinstance(self.restarts, int) or self.restarts < 0):
            raise ValueError(f"restarts must be an integer >= 0, got {self.restarts!r}")
        if self.distance is not None and self.distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {self.distance!r}")
        if self.label_method not in ("count", "sign"):
            raise ValueError(f"label_method must be 'count' or 'sign', got {self.label_method!r}")
        if self.snapshot_every < 1:
            raise ValueError(f"snapshot_every must be >= 1, got {self.snapshot_every!r}")
        for name in ("lr", "restart_above"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.tv_weight is not None and self.tv_weight < 0:
            raise ValueError(f"tv_weight must be >= 0, got {self.tv_weight!r}")
        for name in ("soft_sign", "plateau_window"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")

    def resolved(self, attack: str) -> "AttackOptions":
        """A copy with every ``None`` default filled in for ``attack``."""
        if attack not in ATTACK_DEFAULTS:
            raise ValueError(f"unknown attack {attack!r}; choose from {sorted(ATTACK_DEFAULTS)}")
        filled = {k: v for k, v in ATTACK_DEFAULTS[attack].items() if getattr(self, k) is None}
        return dataclasses.replace(self, **filled)

    def with_overrides(self, **overrides) -> "AttackOptions":
        """A copy with some fields changed; an unknown name raises ``TypeError`` naming it."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown attack option(s) {unknown}; known: {sorted(names)}")
        return dataclasses.replace(self, **overrides)


def options_from(options: Optional[AttackOptions], overrides: Dict[str, Any]) -> AttackOptions:
    """``options`` (or the defaults) with keyword overrides applied."""
    base = AttackOptions() if options is None else options
    if not isinstance(base, AttackOptions):
        raise TypeError(f"options must be an AttackOptions, got {type(base).__name__}")
    return base.with_overrides(**overrides) if overrides else base


__all__ = ["ATTACK_DEFAULTS", "AttackOptions", "DISTANCES", "options_from"]
