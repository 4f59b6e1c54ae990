"""SecretFlow strategies contributed by sf-ext, registered with SecretFlow on import.

Importing this package imports SecretFlow. Registration is idempotent, so importing sf-ext from
several places (or reloading it) never trips SecretFlow's duplicate-registration error.

``FLModel(strategy="fed_avg_w_prune", ...)`` checks the strategy's parameters when it is built, in
the driver, before any client exists: SecretFlow builds clients as actors in Ray mode, where an
error inside the client's constructor would only surface at the first ``fit``. The check runs
inside SecretFlow's strategy dispatcher (:func:`install_parameter_checks`), which ``FLModel``
calls synchronously for each client.

Reading a trained model: :func:`kept_fraction`, :func:`prune_masks`, :func:`prune_epochs`.
"""

from secretflow_fl.ml.nn.fl.strategy_dispatcher import _strategy_dispatcher, register_strategy

from sf_ext.strategies.fed_avg_w_attack import FedAvgWAttack, FedAvgWPruneAttack, enable_attack
from sf_ext.strategies.fed_avg_w_prune import (
    FedAvgWPrune,
    UnknownParameterWarning,
    UnmaskedAverageWarning,
    check_aggregator,
    check_parameters,
    kept_fraction,
    misspelled_parameters,
    prune_epochs,
    prune_masks,
)

__all__ = [
    "FedAvgWAttack",
    "FedAvgWPrune",
    "FedAvgWPruneAttack",
    "PARAMETER_CHECKS",
    "STRATEGIES",
    "UnknownParameterWarning",
    "UnmaskedAverageWarning",
    "check_aggregator",
    "check_parameters",
    "enable_attack",
    "install_parameter_checks",
    "kept_fraction",
    "misspelled_parameters",
    "prune_epochs",
    "prune_masks",
]

#: Strategy name -> (backend, class) of everything sf-ext registers.
STRATEGIES = {
    "fed_avg_w_prune": ("torch", FedAvgWPrune),
    "fed_avg_w_attack": ("torch", FedAvgWAttack),
    "fed_avg_w_prune_attack": ("torch", FedAvgWPruneAttack),
}

#: ``"<strategy>_<backend>"`` -> function called with the strategy's keyword arguments when
#: ``FLModel`` builds a client of that strategy (raises on bad values, warns on misspellings).
PARAMETER_CHECKS = {
    "fed_avg_w_prune_torch": check_parameters,
    "fed_avg_w_prune_attack_torch": check_parameters,
}
#: Strategies whose uploads carry pruning masks: their aggregator must be mask-aware.
PRUNING_STRATEGIES = ("fed_avg_w_prune", "fed_avg_w_prune_attack")

for _name, (_backend, _cls) in STRATEGIES.items():
    if f"{_name}_{_backend}" not in _strategy_dispatcher._ops:
        register_strategy(strategy_name=_name, backend=_backend)(_cls)


def install_parameter_checks(dispatcher=_strategy_dispatcher) -> None:
    """Make SecretFlow's strategy dispatcher run :data:`PARAMETER_CHECKS` before building a client.

    ``FLModel.__init__`` calls ``dispatch_strategy(name, backend, builder_base=..., device=...,
    **kwargs)`` once per client, in the calling process, whatever the run mode; in Ray mode the
    client itself is then an actor whose constructor errors would only appear at the first remote
    call. Wrapping the dispatcher instance's ``dispatch`` (idempotent; other strategies pass
    through untouched) moves the check to ``FLModel(...)``.
    """
    if getattr(dispatcher.dispatch, "_sf_ext_checks", False):
        return
    original = dispatcher.dispatch

    def dispatch(name, backend, *args, **kwargs):
        check = PARAMETER_CHECKS.get(f"{name}_{backend}")
        if check is not None:
            check(**kwargs)
            if name in PRUNING_STRATEGIES:
                found, aggregator = _calling_flmodel_aggregator()
                if found:
                    check_aggregator(aggregator, kwargs.get("allow_unmasked_average", False))
        return original(name, backend, *args, **kwargs)

    dispatch._sf_ext_checks = True
    dispatch.__wrapped__ = original
    dispatcher.dispatch = dispatch


def _calling_flmodel_aggregator(max_depth: int = 12):
    """``(True, aggregator)`` of the ``FLModel`` being constructed up the call stack, or
    ``(False, None)``. ``FLModel.__init__`` builds its clients before it stores its aggregator,
    so the argument is read from the constructor's frame; when it cannot be found the strategy's
    own check on the first aggregate it receives still applies."""
    import inspect

    frame = inspect.currentframe()
    try:
        for _ in range(max_depth):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                break
            owner = frame.f_locals.get("self")
            if frame.f_code.co_name == "__init__" and type(owner).__name__ == "FLModel":
                return True, frame.f_locals.get("aggregator")
    finally:
        del frame
    return False, None


install_parameter_checks()
