"""Small image classifiers as plain ``torch.nn.Module`` classes.

None uses BatchNorm: SecretFlow 1.11 moves weights as the ``state_dict`` values, and BatchNorm's
integer ``num_batches_tracked`` buffer breaks weight loading and secure aggregation there.
Every model takes ``in_channels``, ``image_size`` (square inputs) and ``num_classes`` and returns
logits (no softmax: ``nn.CrossEntropyLoss`` applies it).
"""

from typing import Optional, Sequence

import torch
from torch import nn


def _conv_out(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _check_dims(model: str, in_channels: int, image_size: int, num_classes: int, min_size: int):
    for name, value, least in (
        ("in_channels", in_channels, 1),
        ("image_size", image_size, min_size),
        ("num_classes", num_classes, 1),
    ):
        if not isinstance(value, int) or value < least:
            raise ValueError(f"{model}: {name} must be an integer >= {least}, got {value!r}")


class ConvNet(nn.Module):
    """The tiny CNN of SecretFlow's tutorials: one 3x3 convolution, 3x3 max-pool, one linear layer.

    For 28x28 grayscale input that is conv 1->3, pooled to 3x8x8 = 192 features, linear 192->10.

    Args:
        in_channels: Input channels.
        image_size: Input height and width (at least 5).
        num_classes: Output classes.
        channels: Convolution output channels.
    """

    def __init__(
        self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10, channels: int = 3
    ):
        super().__init__()
        _check_dims("ConvNet", in_channels, image_size, num_classes, min_size=5)
        self.conv = nn.Conv2d(in_channels, channels, kernel_size=3)
        self.pool = nn.MaxPool2d(3)
        pooled = _conv_out(image_size, 3) // 3
        self.fc_in_dim = channels * pooled * pooled
        self.fc = nn.Linear(self.fc_in_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.pool(self.conv(x)))
        return self.fc(x.flatten(1))


class LeNet(nn.Module):
    """LeNet-5 with ReLU and max-pooling.

    Inputs smaller than 32x32 (e.g. 28x28 MNIST) get 2 pixels of padding in the first
    convolution, as the original network saw 28x28 digits padded to 32x32.

    Args:
        in_channels: 1 for grayscale, 3 for RGB.
        image_size: Input height and width (at least 12).
        num_classes: Output classes.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10):
        super().__init__()
        _check_dims("LeNet", in_channels, image_size, num_classes, min_size=12)
        padding = 2 if image_size < 32 else 0
        size = _conv_out(image_size, 5, padding=padding) // 2
        size = _conv_out(size, 5) // 2
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5, padding=padding),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(16 * size * size, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class DLGLeNet(nn.Module):
    """The network attacked in Zhu et al. 2019, "Deep Leakage from Gradients".

    Three 5x5 convolutions with 12 channels, padding 2 and strides 2, 2, 1, each followed by a
    sigmoid (smooth, so the gradient-matching attack can differentiate twice), then one linear
    layer. For 32x32 input that is 12x8x8 = 768 features. Use :func:`uniform_init_` for the
    paper's initialisation.

    Args:
        in_channels: Input channels (3 in the paper).
        image_size: Input height and width.
        num_classes: Output classes (100 for CIFAR-100 in the paper).
    """

    def __init__(self, in_channels: int = 3, image_size: int = 32, num_classes: int = 10):
        super().__init__()
        _check_dims("DLGLeNet", in_channels, image_size, num_classes, min_size=1)
        layers, size, channels = [], image_size, in_channels
        for stride in (2, 2, 1):
            conv = nn.Conv2d(channels, 12, kernel_size=5, padding=2, stride=stride)
            layers += [conv, nn.Sigmoid()]
            size, channels = _conv_out(size, 5, stride, 2), 12
        self.features = nn.Sequential(*layers)
        self.fc_in_dim = 12 * size * size
        self.fc = nn.Linear(self.fc_in_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


def uniform_init_(
    model: nn.Module, low: float = -0.5, high: float = 0.5, seed: Optional[int] = None
) -> nn.Module:
    """Fill every weight and bias of ``model`` in place from ``U(low, high)``, as the DLG code does.

    Args:
        model: The module to initialise.
        low: Lower bound.
        high: Upper bound (> ``low``).
        seed: Seed of a private generator, so the global torch RNG is left untouched; ``None``
            draws from the global RNG.

    Returns:
        ``model`` itself.
    """
    if not high > low:
        raise ValueError(f"high must be greater than low, got low={low}, high={high}")
    generator = None
    if seed is not None:
        generator = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for param in model.parameters():
            # Draw on CPU with the private generator, then copy to wherever the model lives.
            values = torch.empty(param.shape, dtype=param.dtype)
            param.copy_(values.uniform_(low, high, generator=generator))
    return model


class VGG9(nn.Module):
    """VGG-9 without BatchNorm, as used on CIFAR-10 in the edge-case backdoor work (Wang et al.,
    NeurIPS 2020) and FedMA: six 3x3 convolutions (32, 64, 128, 128, 256, 256 channels, max-pool
    after every second one) and three linear layers (512, 512, classes), with light dropout.
    3,491,530 parameters for 32x32 RGB input and 10 classes.

    Args:
        in_channels: Input channels.
        image_size: Input height and width (multiple-of-8 sizes keep every pixel; at least 8).
        num_classes: Output classes.
        dropout: Dropout probability in the classifier (the conv block uses half of it).
    """

    CONV_CHANNELS: Sequence[int] = (32, 64, 128, 128, 256, 256)

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 32,
        num_classes: int = 10,
        dropout: float = 0.1,
    ):
        super().__init__()
        _check_dims("VGG9", in_channels, image_size, num_classes, min_size=8)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"VGG9: dropout must be in [0, 1), got {dropout}")
        layers, channels = [], in_channels
        for index, out_channels in enumerate(self.CONV_CHANNELS):
            layers += [nn.Conv2d(channels, out_channels, kernel_size=3, padding=1), nn.ReLU()]
            channels = out_channels
            if index % 2 == 1:
                layers.append(nn.MaxPool2d(2))
            if index == 3:
                layers.append(nn.Dropout2d(dropout / 2))
        self.features = nn.Sequential(*layers)
        size = image_size // 8
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(channels * size * size, 512),
            nn.ReLU(),
            nn.Linear(512, 512),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class MLP(nn.Module):
    """Fully connected network on flattened images (small enough for 8x8 digits).

    Args:
        in_channels: Input channels.
        image_size: Input height and width.
        num_classes: Output classes.
        hidden: Width of each hidden layer (ReLU between layers); empty for logistic regression.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 8,
        num_classes: int = 10,
        hidden: Sequence[int] = (64,),
    ):
        super().__init__()
        _check_dims("MLP", in_channels, image_size, num_classes, min_size=1)
        widths = [in_channels * image_size * image_size, *hidden]
        if any(not isinstance(w, int) or w < 1 for w in hidden):
            raise ValueError(f"MLP: hidden widths must be positive integers, got {list(hidden)}")
        layers = []
        for width_in, width_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(width_in, width_out), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.flatten(1))
