"""Plain ``torch.nn.Module`` models (no BatchNorm) and their SecretFlow ``BaseModule`` flavour.

Importing this package does not import SecretFlow; :func:`as_secretflow_module` does, when called.
"""

from sf_ext.models.registry import MODELS, build_model, model_class, model_names
from sf_ext.models.secretflow_adapter import as_secretflow_module
from sf_ext.models.vision import MLP, VGG9, ConvNet, DLGLeNet, LeNet, uniform_init_

__all__ = [
    "MODELS",
    "MLP",
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
