"""Targeted (backdoor) client behaviours: black-box, PGD and PGD with model replacement.

A backdoor attacker trains locally like a benign client, but on poisoned data
(:func:`attacker_indices` mixes its poisoned and clean samples, 80 % / 20 % by default) and, for
the PGD variants, keeps its model inside an L2 ball around the last global model
(:func:`project_to_ball`, applied every ``pgd_every`` local steps and at the end). With model
replacement the final update is first scaled by ``|D| / |D_i|`` (round total over own samples,
Bagdasaryan et al.) and then projected onto the same ball (Wang et al.'s PGDMR).

:class:`BackdoorBehaviour` holds these settings; :func:`backdoor_behaviour` returns the paper's
presets (delta 1.5 for 28x28 inputs, 2 for CIFAR-10). The simulator applies them to a whole batch of
clients at once, so the helpers here work on stacked ``[k, d]`` deltas with a per-client radius
(``inf`` for clients that do not project).
"""

from dataclasses import dataclass, replace
from typing import Optional, Sequence, Union

import numpy as np
import torch

__all__ = [
    "BackdoorBehaviour",
    "backdoor_behaviour",
    "default_pgd_radius",
    "attacker_indices",
    "ball_scale",
    "project_to_ball",
    "model_replacement",
    "finish_backdoor_update",
    "TARGETED_ATTACKS",
    "blackbox",
    "pgd",
    "pgd_mr",
    "pixel",
    "scaling",
]

#: The built-in backdoor behaviours (the registry may hold more: ``sf_ext.attacks.ATTACKS``).
TARGETED_ATTACKS = ("blackbox", "pgd", "pgd_mr", "pixel", "scaling")


@dataclass(frozen=True)
class BackdoorBehaviour:
    """How a backdoor attacker deviates from benign local training.

    Attributes:
        name: Preset name (``blackbox``, ``pgd``, ``pgd_mr``, ``pixel``).
        data: Which poisoned set it trains on: ``edge_case`` or ``pixel``.
        poison_fraction: Share of poisoned samples in the attacker's local data (0.8: the mix that
            Wang et al. found strongest).
        pgd_radius: L2 radius ``delta`` around the last global model; ``None`` = no projection.
        pgd_every: Project every this many local steps (and always after the last one).
        model_replacement: Scale the final update by ``|D| / |D_i|`` before the last projection.
        boost: Explicit scale factor of the final update (overrides the ``|D| / |D_i|`` factor of
            model replacement; ``None`` = that factor, or no scaling without model replacement).
        local_epochs: Attacker's own number of local epochs (``None`` = same as benign clients).
        lr: Attacker's own learning rate (``None`` = same as benign clients).
    """

    name: str
    data: str = "edge_case"
    poison_fraction: float = 0.8
    pgd_radius: Optional[float] = None
    pgd_every: int = 10
    model_replacement: bool = False
    boost: Optional[float] = None
    local_epochs: Optional[int] = None
    lr: Optional[float] = None

    def __post_init__(self):
        if not 0 < self.poison_fraction <= 1:
            raise ValueError(f"poison_fraction must lie in (0, 1], got {self.poison_fraction}")
        if self.pgd_radius is not None and self.pgd_radius <= 0:
            raise ValueError(f"pgd_radius must be positive, got {self.pgd_radius}")
        if self.pgd_every < 1:
            raise ValueError(f"pgd_every must be >= 1, got {self.pgd_every}")
        if self.boost is not None and not self.boost > 0:
            raise ValueError(f"boost must be positive, got {self.boost}")
        if self.data not in ("edge_case", "pixel"):
            raise ValueError(f"data must be 'edge_case' or 'pixel', got {self.data!r}")


def default_pgd_radius(input_shape: Sequence[int]) -> float:
    """The paper's delta: 2 for CIFAR-sized (32x32 colour) inputs, 1.5 for 28x28 ones."""
    return 2.0 if tuple(input_shape)[-2:] == (32, 32) else 1.5


def backdoor_behaviour(name: str, input_shape: Sequence[int] = (1, 28, 28), **overrides):
    """The registered backdoor behaviour ``name`` with its preset parameters, optionally
    overridden (see :func:`sf_ext.attacks.register_backdoor`)."""
    from sf_ext.attacks.registry import get_attack

    spec = get_attack(name)
    if spec.kind != "backdoor":
        raise ValueError(f"{name!r} is an update attack, not a backdoor behaviour")
    return spec.fn(input_shape, **overrides)


def _preset(base: BackdoorBehaviour, input_shape, overrides, uses_radius: bool):
    overrides = dict(overrides)
    if uses_radius and overrides.get("pgd_radius") is None:
        overrides["pgd_radius"] = default_pgd_radius(input_shape)
    unknown = sorted(set(overrides) - {f for f in BackdoorBehaviour.__dataclass_fields__})
    if unknown:
        raise ValueError(
            f"unknown options {unknown} for backdoor {base.name!r}; known: "
            f"{sorted(BackdoorBehaviour.__dataclass_fields__)}"
        )
    return replace(base, **overrides)


def blackbox(input_shape=(1, 28, 28), **overrides) -> BackdoorBehaviour:
    """Black-box edge-case backdoor: honest training on 80 % poisoned / 20 % clean data."""
    return _preset(BackdoorBehaviour("blackbox"), input_shape, overrides, False)


def pgd(input_shape=(1, 28, 28), **overrides) -> BackdoorBehaviour:
    """Edge-case backdoor with projected gradient descent onto an L2 ball around the global
    model (delta 1.5 for 28x28 inputs, 2 for 32x32; Wang et al. 2020)."""
    return _preset(BackdoorBehaviour("pgd"), input_shape, overrides, True)


def pgd_mr(input_shape=(1, 28, 28), **overrides) -> BackdoorBehaviour:
    """PGD edge-case backdoor with model replacement (scale by ``|D| / |D_i|``, then project)."""
    base = BackdoorBehaviour("pgd_mr", model_replacement=True)
    return _preset(base, input_shape, overrides, True)


def pixel(input_shape=(1, 28, 28), **overrides) -> BackdoorBehaviour:
    """Pixel-pattern (BadNets) backdoor: half triggered samples relabelled to the target."""
    base = BackdoorBehaviour("pixel", data="pixel", poison_fraction=0.5)
    return _preset(base, input_shape, overrides, False)


def scaling(input_shape=(1, 28, 28), **overrides) -> BackdoorBehaviour:
    """Model boosting (Bhagoji et al. 2019; Bagdasaryan et al. 2020's model replacement without
    a norm bound): edge-case training, then the update is scaled by ``boost`` (default
    ``|D| / |D_i|``, the round's samples over the attacker's, so that FedAvg would replace the
    global model by the attacker's)."""
    base = BackdoorBehaviour("scaling", model_replacement=True)
    return _preset(base, input_shape, overrides, False)


def attacker_indices(
    clean_indices: np.ndarray,
    poison_indices: np.ndarray,
    poison_fraction: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """An attacker's local index list: all poisoned samples plus enough of its clean ones.

    The clean share is drawn from the attacker's own partition (with replacement only when it
    holds too few) so that poisoned samples make up ``poison_fraction`` of the result.
    """
    poison_indices = np.asarray(poison_indices, dtype=np.int64)
    clean_indices = np.asarray(clean_indices, dtype=np.int64)
    n_clean = int(round(len(poison_indices) * (1 - poison_fraction) / poison_fraction))
    if n_clean > 0 and len(clean_indices) == 0:
        raise ValueError("attacker holds no clean samples to mix in")
    clean = rng.choice(clean_indices, size=n_clean, replace=n_clean > len(clean_indices))
    return np.concatenate([poison_indices, clean.astype(np.int64)])


def ball_scale(norms: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Factor that brings vectors of the given norms inside balls of the given radii (<= 1)."""
    return torch.clamp(radius / norms.clamp_min(1e-12), max=1.0)


def project_to_ball(deltas: torch.Tensor, radius: Union[float, torch.Tensor]) -> torch.Tensor:
    """Project each row of ``deltas`` (model minus centre) onto the L2 ball of its radius.

    Rows already inside stay unchanged; ``inf`` radius means no projection.
    """
    squeeze = deltas.ndim == 1
    rows = deltas.reshape(1, -1) if squeeze else deltas
    radius = torch.as_tensor(radius, dtype=rows.dtype).reshape(-1)
    out = rows * ball_scale(rows.norm(dim=1), radius).unsqueeze(1)
    return out.reshape(-1) if squeeze else out


def model_replacement(delta: torch.Tensor, total_samples: float, own_samples: float):
    """Scale an update by ``|D| / |D_i|`` so that averaging would replace the global model."""
    if own_samples <= 0:
        raise ValueError("own_samples must be positive")
    return delta * (float(total_samples) / float(own_samples))


def finish_backdoor_update(
    delta: torch.Tensor,
    behaviour: BackdoorBehaviour,
    total_samples: Optional[float] = None,
    own_samples: Optional[float] = None,
) -> torch.Tensor:
    """Final manipulation of an attacker's trained update: boosting (an explicit ``boost``, or
    model replacement's ``|D| / |D_i|``), then projection onto the PGD ball."""
    if behaviour.boost is not None:
        delta = delta * float(behaviour.boost)
    elif behaviour.model_replacement:
        if total_samples is None or own_samples is None:
            raise ValueError("model replacement needs total_samples and own_samples")
        delta = model_replacement(delta, total_samples, own_samples)
    if behaviour.pgd_radius is not None:
        delta = project_to_ball(delta, behaviour.pgd_radius)
    return delta
