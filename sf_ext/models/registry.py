"""Name -> model class registry, so configs and CLIs can pick a model by string."""

from typing import Dict, List, Type

from torch import nn

from sf_ext.models.resnet import ResNet18
from sf_ext.models.vision import MLP, VGG9, ConvNet, DLGLeNet, LeNet

MODELS: Dict[str, Type[nn.Module]] = {
    "convnet": ConvNet,
    "lenet": LeNet,
    "dlg-lenet": DLGLeNet,
    "vgg9": VGG9,
    "mlp": MLP,
    "resnet18": ResNet18,
}


def _canonical(name: str) -> str:
    if not isinstance(name, str):
        raise ValueError(f"model name must be a string, got {name!r}")
    key = name.strip().lower().replace("_", "-")
    if key == "dlglenet":
        key = "dlg-lenet"
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(model_names())}")
    return key


def model_names() -> List[str]:
    """Every name :func:`build_model` accepts (aliases aside)."""
    return sorted(MODELS)


def model_class(name: str) -> Type[nn.Module]:
    """The class registered under ``name`` (case-insensitive; ``_`` and ``-`` are equivalent)."""
    return MODELS[_canonical(name)]


def build_model(
    name: str, in_channels: int, image_size: int, num_classes: int, **kwargs
) -> nn.Module:
    """Instantiate a registered model for the given input shape and class count.

    Args:
        name: ``convnet``, ``lenet``, ``dlg-lenet``, ``vgg9``, ``mlp`` or ``resnet18``.
        in_channels: Input channels.
        image_size: Input height and width.
        num_classes: Output classes.
        **kwargs: Model-specific options (e.g. ``hidden`` for ``mlp``, ``dropout`` for ``vgg9``).
    """
    cls = model_class(name)
    return cls(in_channels=in_channels, image_size=image_size, num_classes=num_classes, **kwargs)
