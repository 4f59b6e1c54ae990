"""``fed_avg_w_attack``: ``fed_avg_w`` where chosen parties manipulate their uploads.

Every client runs honest FedAvg-on-weights until it is told to attack (remotely, per party, with
:func:`enable_attack`). An attacking client trains as usual, takes its update against the global
weights it last received, replaces it with a registered update attack (the same registry the
simulator reads, :data:`sf_ext.attacks.ATTACKS`, so attacks users register with
:func:`sf_ext.attacks.register_attack` work here too) and uploads ``global + attacked update``. This
puts the attacks of the robustness experiments inside a real ``FLModel`` run, so the robust
aggregators can be checked against them in SecretFlow itself.

Only attacks registered as ``single_client=True`` (they read nothing but the attacker's own
update) can run inside one client; the others (LIE, min-max, IPM, Fang's, the adaptive attack)
need other clients' updates and are refused: use the simulator for those. Data-poisoning backdoors
need no strategy: give the attacking party a poisoned partition (see
:mod:`sf_ext.attacks.backdoor_data`).
"""

from typing import Optional, Tuple

import numpy as np
import torch
from secretflow_fl.ml.nn.fl.backend.torch.strategy.fed_avg_w import FedAvgW

from sf_ext.params import ParamLayout
from sf_ext.strategies.fed_avg_w_prune import FedAvgWPrune


def single_client_attacks() -> Tuple[str, ...]:
    """Registered update attacks one client can mount alone (no view of other clients')."""
    from sf_ext.attacks.registry import ATTACKS

    return tuple(sorted(n for n, s in ATTACKS.items() if s.kind == "update" and s.single_client))


def _check_attack(name: str, options: dict) -> None:
    import sf_ext.attacks  # noqa: F401  (registers the built-in attacks)
    from sf_ext.attacks.registry import get_attack
    from sf_ext.simulator.config import option_names

    spec = get_attack(name)
    if spec.kind != "update" or not spec.single_client:
        raise ValueError(
            f"attack {name!r} cannot run inside one client; choose one of "
            f"{single_client_attacks()} (or use the simulator)"
        )
    known = option_names(spec.fn, exclude=("global_params", "generator", "return_details"))
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown options {unknown} for attack {name!r}; known: {known}")


class AttackMixin:
    """Turns a FedAvg-on-weights client into one that can be switched to a Byzantine upload.

    The client trains honestly; when told to attack it measures its update against the global
    weights it last received, replaces it with the registered attack's output and uploads
    ``global + attacked update``. Under pruning (an upload carrying masks) the result is masked
    again with the client's own mask, so the attacker still looks like a pruning client.
    """

    def _init_attack(self, random_seed) -> None:
        self._attack: Optional[Tuple[str, dict]] = None
        self._received: Optional[torch.Tensor] = None
        self._generator = torch.Generator().manual_seed(0 if random_seed is None else random_seed)

    def set_attack(self, name: str, **options) -> None:
        """Make this client attack with the registered update attack ``name`` (None: honest)."""
        if name is not None:
            _check_attack(name, options)
        self._attack = None if name is None else (name, options)

    def _layout(self) -> ParamLayout:
        return ParamLayout.from_arrays(self.get_weights(return_numpy=True))

    def set_weights(self, weights):
        super().set_weights(weights)
        # What the server sent: the reference an update is measured against.
        self._received = self._layout().flatten(list(weights))

    def train_step(
        self, weights, cur_steps: int, train_steps: int, **kwargs
    ) -> Tuple[np.ndarray, int]:
        """Train honestly, then replace the update if this client attacks."""
        if self._received is None:  # first round before any aggregate: own initial weights
            self._received = self._layout().flatten(self.get_weights(return_numpy=True))
        honest, num_sample = super().train_step(weights, cur_steps, train_steps, **kwargs)
        if self._attack is None:
            return honest, num_sample
        from sf_ext.attacks.registry import AttackContext, run_update_attack

        name, options = self._attack
        layout = ParamLayout.from_arrays(list(honest))
        update = (layout.flatten(list(honest)) - self._received).unsqueeze(0)
        # What one client knows: the global model it received and its own random stream.
        context = AttackContext(global_params=self._received, generator=self._generator)
        attacked, _ = run_update_attack(name, update, [True], context, **options)
        weights_out = layout.unflatten_numpy(self._received + attacked[0])
        masks = getattr(honest, "masks", None)
        if masks is None:
            return weights_out, num_sample
        from sf_ext.pruning import MaskedWeights

        remasked = [w if m is None else w * m for w, m in zip(weights_out, masks)]
        return MaskedWeights(remasked, masks), num_sample


class FedAvgWAttack(AttackMixin, FedAvgW):
    """FedAvg-on-weights client that can be switched to a Byzantine upload."""

    def __init__(self, builder_base, random_seed=None, skip_bn=False, **kwargs):
        super().__init__(builder_base, random_seed=random_seed, skip_bn=skip_bn, **kwargs)
        self._init_attack(random_seed)


class FedAvgWPruneAttack(AttackMixin, FedAvgWPrune):
    """``fed_avg_w_prune`` client that can be switched to a Byzantine upload (its attacked
    weights are masked again with its own pruning mask): robust aggregation under pruning."""

    def __init__(self, builder_base, random_seed=None, skip_bn=False, **kwargs):
        super().__init__(builder_base, random_seed=random_seed, skip_bn=skip_bn, **kwargs)
        self._init_attack(random_seed)


def enable_attack(fl_model, party: str, name: str, **options) -> None:
    """Switch the client ``party`` of an ``FLModel(strategy="fed_avg_w_attack")`` (or
    ``"fed_avg_w_prune_attack"``) to attack (``name=None`` switches it back to honest)."""
    import secretflow as sf

    if name is not None:
        _check_attack(name, options)
    workers = {device.party: worker for device, worker in fl_model._workers.items()}
    if party not in workers:
        raise ValueError(f"{party!r} is not a client of this FLModel; clients: {sorted(workers)}")
    sf.wait(workers[party].set_attack(name, **options))
