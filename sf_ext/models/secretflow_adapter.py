"""Making plain ``nn.Module`` classes usable as SecretFlow ``TorchModel(model_fn=...)`` models.

:func:`as_secretflow_module` derives a class from both the user's model and SecretFlow's
``BaseModule``. The derived class is reachable by name from this module (see ``__getattr__``
below), so ``pickle``/``cloudpickle`` send it by reference and any process (SecretFlow's
production mode runs one per party) rebuilds the same class on unpickling. SecretFlow is imported
only when a class is built.
"""

import importlib
from typing import Dict, Type

from torch import nn

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
    already derives from ``BaseModule`` is returned unchanged.

    Raises:
        TypeError: ``model_cls`` is not an ``nn.Module`` subclass.
    """
    if not isinstance(model_cls, type) or not issubclass(model_cls, nn.Module):
        raise TypeError(f"model_cls must be an nn.Module subclass, got {model_cls!r}")
    cached = _CLASS_CACHE.get(model_cls)
    if cached is not None:
        return cached

    from secretflow_fl.ml.nn.core.torch import BaseModule

    if issubclass(model_cls, BaseModule):
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
        "__module__": __name__,
        "__qualname__": name if _importable(model_cls) else f"<locals>.{name}",
        "__doc__": model_cls.__doc__,
    }
    derived = type(name, (model_cls, BaseModule), namespace)
    _CLASS_CACHE[model_cls] = derived
    return derived
