"""Read what an sf-ext strategy holds on each client of a SecretFlow ``FLModel``.

SecretFlow 1.11 keeps each client's strategy object in ``FLModel._workers`` (a private mapping
from PYU to a device proxy) and offers no public accessor; these helpers are the one place sf-ext
reaches into it, so user code does not have to.

Example::

    fl = FLModel(..., strategy="fed_avg_w_prune", prune_percent=5, prune_end_rate=0.1)
    fl.fit(...)
    sf_ext.inspect.kept_fraction(fl)           # {'alice': 0.63, 'bob': 0.63}
    sf_ext.inspect.kept_fraction(fl, alice)    # 0.63
"""

from typing import Any, Dict, Optional, Union

__all__ = ["client_strategy", "kept_fraction", "prune_masks"]


def _workers(fl_model) -> Dict[str, Any]:
    workers = getattr(fl_model, "_workers", None)
    if not isinstance(workers, dict) or not workers:
        raise TypeError(
            f"expected a SecretFlow FLModel with clients, got {type(fl_model).__name__}"
        )
    return {device.party: worker for device, worker in workers.items()}


def client_strategy(fl_model, device: Union[str, Any]):
    """The device proxy of one client's strategy object (its methods run on that client).

    Args:
        fl_model: A SecretFlow ``FLModel``.
        device: The client's PYU or its party name.

    Returns:
        The proxy; calling one of its methods returns a ``PYUObject`` to ``sf.reveal``.

    Raises:
        TypeError: ``fl_model`` is not an ``FLModel``.
        ValueError: ``device`` is not one of the model's clients (the message lists them).
    """
    party = device if isinstance(device, str) else getattr(device, "party", None)
    workers = _workers(fl_model)
    if party not in workers:
        raise ValueError(f"{device!r} is not a client of this FLModel; clients: {sorted(workers)}")
    return workers[party]


def _reveal_from(fl_model, device, method: str):
    import secretflow as sf

    if device is not None:
        worker = client_strategy(fl_model, device)
        _require(worker, method, fl_model)
        return sf.reveal(getattr(worker, method)())
    result = {}
    for party, worker in _workers(fl_model).items():
        _require(worker, method, fl_model)
        result[party] = sf.reveal(getattr(worker, method)())
    return result


def _require(worker, method: str, fl_model) -> None:
    if not hasattr(worker, method):
        raise ValueError(
            f"this FLModel's strategy has no {method}(); it needs strategy='fed_avg_w_prune' "
            f"(got {getattr(fl_model, 'strategy', '?')!r})"
        )


def kept_fraction(fl_model, device: Optional[Union[str, Any]] = None):
    """Fraction of prunable weights each client still keeps (1.0 before any pruning).

    Args:
        fl_model: An ``FLModel(strategy="fed_avg_w_prune")``.
        device: One client (PYU or party name); ``None`` for all of them.

    Returns:
        A float for one client, else ``{party: float}``.

    Raises:
        ValueError: Unknown client, or a strategy other than ``fed_avg_w_prune``.
    """
    return _reveal_from(fl_model, device, "get_kept_fraction")


def prune_masks(fl_model, device: Union[str, Any]) -> Dict[str, Any]:
    """One client's pruning masks: parameter name -> boolean array (True where kept).

    Args:
        fl_model: An ``FLModel(strategy="fed_avg_w_prune")``.
        device: The client (PYU or party name).

    Raises:
        ValueError: Unknown client, or a strategy other than ``fed_avg_w_prune``.
    """
    return _reveal_from(fl_model, device, "get_masks")
