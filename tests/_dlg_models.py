"""The tiny network the gradient-inversion tests attack."""

import torch
from torch import nn


def tiny_model(seed: int) -> nn.Module:
    """A 16-8-4 sigmoid MLP, seeded. The first layer is linear with a bias, so its gradient
    determines a single input exactly (dL/dW1 = delta x^T and dL/db1 = delta): an attack has a
    unique answer to find."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Sigmoid(), nn.Linear(8, 4))
