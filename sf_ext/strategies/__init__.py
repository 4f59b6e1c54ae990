"""SecretFlow strategies contributed by sf-ext, registered with SecretFlow on import.

Importing this package imports SecretFlow. Registration is idempotent, so importing sf-ext from
several places (or reloading it) never trips SecretFlow's duplicate-registration error.
"""

from secretflow_fl.ml.nn.fl.strategy_dispatcher import _strategy_dispatcher, register_strategy

from sf_ext.strategies.fed_avg_w_attack import FedAvgWAttack, enable_attack
from sf_ext.strategies.fed_avg_w_prune import FedAvgWPrune

__all__ = ["FedAvgWAttack", "FedAvgWPrune", "STRATEGIES", "enable_attack"]

#: Strategy name -> (backend, class) of everything sf-ext registers.
STRATEGIES = {
    "fed_avg_w_prune": ("torch", FedAvgWPrune),
    "fed_avg_w_attack": ("torch", FedAvgWAttack),
}

for _name, (_backend, _cls) in STRATEGIES.items():
    if f"{_name}_{_backend}" not in _strategy_dispatcher._ops:
        register_strategy(strategy_name=_name, backend=_backend)(_cls)
