"""Making plain ``nn.Module`` classes usable as SecretFlow ``TorchModel(model_fn=...)`` models.

:func:`as_secretflow_module` derives a class from both the user's model and SecretFlow's
``BaseModule``. The derived class is reachable by name from this module (see ``__getattr__``
below), so ``pickle``/``cloudpickle`` send it by reference and any process (SecretFlow's
production mode runs one per party) rebuilds the same class on unpickling. SecretFlow is imported
only when a class is built.

The derived class also replaces ``BaseModule``'s weight transport with sf-ext's
(:func:`sf_ext.params.export_weights` / :func:`~sf_ext.params.import_weights`), which SecretFlow
calls for every strategy (``fed_avg_w`` included): BatchNorm's integer ``num_batches_tracked`` and
any 0-d entry travel as float arrays of shape ``(1,)`` (SecretFlow 1.11's ``SecureAggregator``
refuses both), and ``skip_bn=True`` keeps every BatchNorm layer local wherever it sits in the model
(SecretFlow 1.11 only recognizes top-level BatchNorm attributes, and loads the remaining weights
into the wrong entries when a BatchNorm layer is not last).
"""

import importlib
from typing import Dict, Type

from torch import nn

from sf_ext.params import export_weights, import_weights, transported_names

# Between the readable prefix and the hex-encoded "module:qualname" of the wrapped class.
_NAME_SEPARATOR = "__sf_"
_CLASS_CACHE: Dict[type, type] = {}


def _encode_name(model_cls: type) -> str:
    target = f"{model_cls.__module__}:{model_cls.__qualname__}".encode()
    return f"{model_cls.__name__}{_NAME_SEPARATOR}{target.hex()}"


def _importable(model_cls: type) -> bool:
    """Whether another process can import ``model_cls`` by module and qualified name."""
    return model_cls.__module__ != "__main__" and "<locals>" not in model_cls.__qualname__


def _decode_class(name: str) -> type:
    """Import the class whose module and qualified name are encoded in ``name``."""
    _, _, hex_target = name.rpartition(_NAME_SEPARATOR)
    try:
        module_name, qualname = bytes.fromhex(hex_target).decode().split(":", 1)
    except ValueError as exc:
        raise AttributeError(name) from exc
    if module_name == "__main__" or "<locals>" in qualname:
        raise AttributeError(name)
    target = importlib.import_module(module_name)
    for part in qualname.split("."):
        target = getattr(target, part)
    return target


def __getattr__(name: str):
    # Unpickling a derived class by reference lands here in a process that has not built it yet.
    if _NAME_SEPARATOR not in name:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        model_cls = _decode_class(name)
    except (ImportError, AttributeError) as exc:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from exc
    return as_secretflow_module(model_cls)


def _state_subset(module: nn.Module, skip_bn: bool) -> dict:
    state = module.state_dict()
    return {n: state[n].detach().cpu().clone() for n in transported_names(module, skip_bn)}


def _get_weights(self, return_numpy=False):
    """Weight list for SecretFlow (numpy) or a name -> tensor copy (``return_numpy=False``)."""
    return export_weights(self) if return_numpy else _state_subset(self, skip_bn=False)


def _update_weights(self, weights):
    """Load a weight list from :meth:`get_weights` (or a name -> array mapping)."""
    import_weights(self, weights)


def _get_weights_not_bn(self, return_numpy=False):
    """As :meth:`get_weights` without any BatchNorm layer's tensors (they stay local)."""
    return export_weights(self, skip_bn=True) if return_numpy else _state_subset(self, True)


def _update_weights_not_bn(self, weights):
    """Load a weight list from :meth:`get_weights_not_bn`; BatchNorm tensors are left alone."""
    import_weights(self, weights, skip_bn=True)


def as_secretflow_module(model_cls: Type[nn.Module]) -> type:
    """Return a subclass of SecretFlow's ``BaseModule`` and ``model_cls`` for ``TorchModel``.

    Usage::

        TorchModel(model_fn=as_secretflow_module(ConvNet), loss_fn=nn.CrossEntropyLoss,
                   optim_fn=optim_wrapper(optim.Adam, lr=1e-2), metrics=[...],
                   in_channels=1, image_size=28, num_classes=10)

    ``model_cls`` comes first in the bases, so its ``__init__`` receives every constructor
    keyword (``TorchModel`` passes its extra keywords to ``model_fn``) and its
    ``super().__init__()`` runs ``BaseModule``'s set-up without arguments. ``BaseModule.__init__``
    forwards its arguments to ``ParametersMixin.__init__``, which takes none, so putting
    ``BaseModule`` first would break every model with constructor arguments.

    The result is cached: repeated calls with one class return one derived class. A class that
    already derives from ``BaseModule`` gets the same fixed weight transport (see the module
    docstring); ``BaseModule`` itself is returned unchanged.

    Raises:
        TypeError: ``model_cls`` is not an ``nn.Module`` subclass.
    """
    if not isinstance(model_cls, type) or not issubclass(model_cls, nn.Module):
        raise TypeError(f"model_cls must be an nn.Module subclass, got {model_cls!r}")
    cached = _CLASS_CACHE.get(model_cls)
    if cached is not None:
        return cached

    from secretflow_fl.ml.nn.core.torch import BaseModule

    if model_cls is BaseModule or getattr(model_cls, "_sf_ext_transport", False):
        return model_cls

    def __init__(self, *args, **kwargs):
        model_cls.__init__(self, *args, **kwargs)
        # A model whose __init__ calls nn.Module.__init__ directly skips BaseModule's set-up.
        defaults = {"automatic_optimization": True, "loss": None, "metrics": [], "logs": {}}
        for attribute, value in defaults.items():
            if not hasattr(self, attribute):
                setattr(self, attribute, value)
        if not hasattr(self, "_optimizers"):
            self._optimizers = []

    def _get_name(self) -> str:
        # nn.Module's repr prints this; the encoded class name is for pickling, not for people.
        return model_cls.__name__

    name = _encode_name(model_cls)
    namespace = {
        "__init__": __init__,
        "_get_name": _get_name,
        "_sf_ext_transport": True,
        "get_weights": _get_weights,
        "update_weights": _update_weights,
        "get_weights_not_bn": _get_weights_not_bn,
        "update_weights_not_bn": _update_weights_not_bn,
        "__module__": __name__,
        "__qualname__": name if _importable(model_cls) else f"<locals>.{name}",
        "__doc__": model_cls.__doc__,
    }
    derived = type(name, (model_cls, BaseModule), namespace)
    _CLASS_CACHE[model_cls] = derived
    return derived
