"""ResNeXt (Xie et al. 2017): bottleneck blocks whose 3x3 convolution is split
into ``cardinality`` groups (split-transform-merge as one grouped convolution).

- ``resnext29_8x64d`` / ``resnext29_16x64d``: the paper's CIFAR networks
  (Sec. 5.3): a 3x3, 64 stem, three stages of three bottleneck blocks with 256,
  512, 1024 output channels, grouped widths ``cardinality * d`` doubling per
  stage (8x64d: 512, 1024, 2048), global average pooling, a linear classifier
  (34.4M and 68.1M parameters at 10 classes, as published).  Projection (B)
  shortcuts where the shape changes.
- ``resnext50_32x4d``: torchvision's ImageNet network (25,028,904 parameters).

Initialisation as the ResNets (He normal fan_out, BN 1/0).
"""
from .. import nn
from ._registry import named, register_model
from .resnet import Bottleneck, conv3x3, init_resnet_, make_stage, resnet


class ResNeXtBlock(Bottleneck):
    """A ResNeXt bottleneck: ``cardinality`` groups of ``base_width`` channels
    (times the stage multiplier ``planes / 64``) in the grouped 3x3 conv."""

    def __init__(self, in_channels, planes, stride=1, cardinality=32, base_width=4, shortcut="B"):
        super().__init__(in_channels, planes, stride, groups=cardinality, base_width=base_width,
                         shortcut=shortcut)


def resnext_cifar(depth=29, cardinality=8, base_width=64, num_classes=10, in_channels=3,
                  zero_init_residual=False):
    """CIFAR ResNeXt of depth 9n+2 (three stages of n blocks)."""
    if (depth - 2) % 9 or depth < 11:
        raise ValueError(f"resnext_cifar: depth must be 9n+2 (29, ...), got {depth}")
    n = (depth - 2) // 9
    kw = {"cardinality": cardinality, "base_width": base_width}
    layer1, c = make_stage(ResNeXtBlock, 64, 64, n, 1, **kw)      # 256 out, 32x32
    layer2, c = make_stage(ResNeXtBlock, c, 128, n, 2, **kw)      # 512 out, 16x16
    layer3, c = make_stage(ResNeXtBlock, c, 256, n, 2, **kw)      # 1024 out, 8x8
    model = named(
        ("conv1", conv3x3(in_channels, 64)), ("bn1", nn.BatchNorm2d(64)), ("relu", nn.ReLU()),
        ("layer1", layer1), ("layer2", layer2), ("layer3", layer3),
        ("avgpool", nn.GlobalAvgPool2d()), ("flatten", nn.Flatten()),
        ("fc", nn.Linear(c, num_classes)))
    return init_resnet_(model, zero_init_residual)


@register_model
def resnext29_8x64d(num_classes=10, in_channels=3, zero_init_residual=False):
    """ResNeXt-29, 8x64d for 32x32 inputs (34.4M parameters)."""
    return resnext_cifar(29, 8, 64, num_classes, in_channels, zero_init_residual)


@register_model
def resnext29_16x64d(num_classes=10, in_channels=3, zero_init_residual=False):
    """ResNeXt-29, 16x64d for 32x32 inputs (68.1M parameters)."""
    return resnext_cifar(29, 16, 64, num_classes, in_channels, zero_init_residual)


@register_model
def resnext50_32x4d(num_classes=None, in_channels=3, input_size=224, zero_init_residual=False):
    """ResNeXt-50, 32x4d as torchvision (25,028,904 parameters at 1000 classes);
    ``input_size=32`` uses a 3x3/1 stem without max-pool."""
    return resnet(Bottleneck, [3, 4, 6, 3], num_classes, in_channels, input_size,
                  zero_init_residual, groups=32, width_per_group=4)
