"""Plain ``torch.nn.Module`` models and their SecretFlow ``BaseModule`` flavour.

The small models (ConvNet, LeNet, DLGLeNet, VGG9, MLP) have no BatchNorm; :class:`ResNet18`
(torchvision's, adapted to 32x32) has BatchNorm throughout and works with every sf-ext strategy
and aggregator through :func:`as_secretflow_module`.

Importing this package does not import SecretFlow; :func:`as_secretflow_module` does, when called.
"""

from sf_ext.models.registry import MODELS, build_model, model_class, model_names
from sf_ext.models.resnet import ResNet18
from sf_ext.models.secretflow_adapter import as_secretflow_module
from sf_ext.models.vision import MLP, VGG9, ConvNet, DLGLeNet, LeNet, uniform_init_

__all__ = [
    "MODELS",
    "MLP",
    "ResNet18",
    "VGG9",
    "ConvNet",
    "DLGLeNet",
    "LeNet",
    "as_secretflow_module",
    "build_model",
    "model_class",
    "model_names",
    "uniform_init_",
]
