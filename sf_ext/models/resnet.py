"""torchvision's ResNet-18 adapted to small images (CIFAR-style), a model with BatchNorm throughout.

The ImageNet stem (7x7 convolution with stride 2, then 3x3 max-pooling) shrinks a 32x32 image to
8x8 before the first residual stage; the usual adaptation for 32x32 inputs replaces it with one
3x3 convolution of stride 1 and no pooling. Everything else is torchvision's own ``ResNet`` with
``BasicBlock`` (11.2 M parameters for 10 classes; BatchNorm after every convolution, nested inside
the residual blocks and their downsampling ``Sequential``), so its ``state_dict`` names are
torchvision's.
"""

from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from sf_ext.models.vision import _check_dims


class ResNet18(ResNet):
    """ResNet-18 for small square images: 3x3 stride-1 stem, no max-pool.

    Args:
        in_channels: Input channels.
        image_size: Input height and width (at least 8: four stages halve it three times).
        num_classes: Output classes.
    """

    def __init__(self, in_channels: int = 3, image_size: int = 32, num_classes: int = 10):
        _check_dims("ResNet18", in_channels, image_size, num_classes, min_size=8)
        super().__init__(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.maxpool = nn.Identity()
