"""Network in Network (Lin, Chen & Yan 2014).

An mlpconv block is a spatial convolution followed by 1x1 convolutions (a small
MLP shared across positions), each with a ReLU.  The network stacks mlpconv
blocks with pooling and dropout between them and ends with global average
pooling over a final block that has one channel per class: no dense layers.

``input_size=32`` is the paper's CIFAR-10 network (192-160-96, 192-192-192,
192-192-classes; 966,986 parameters at 10 classes); ``input_size=224`` the
ImageNet model of the authors' Caffe release (96-96-96, 256-256-256, 384-384-384,
1024-1024-classes).  As in the paper the class block also ends with a ReLU
before the global pooling.  No batch norm (the paper predates it); He normal
(fan_in) initialisation, zero biases.
"""
from .. import init, nn
from ._registry import check_input_size, named, register_model, zero_bias_


class MLPConv(nn.Sequential):
    """conv kxk -> ReLU -> (1x1 conv -> ReLU) for each width in ``mlp_widths``."""

    def __init__(self, in_channels, out_channels, kernel_size, mlp_widths, stride=1, padding=0):
        layers = [("conv", nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding)),
                  ("relu", nn.ReLU())]
        width = out_channels
        for i, w in enumerate(mlp_widths, start=1):
            layers += [(f"cccp{i}", nn.Conv2d(width, w, 1)), (f"relu{i}", nn.ReLU())]
            width = w
        super().__init__(dict(layers))
        self.out_channels = width


@register_model
def nin(num_classes=None, in_channels=3, input_size=32, dropout=0.5):
    """Network in Network; ``num_classes`` defaults to 10 at 32 and 1000 at 224."""
    check_input_size("nin", input_size, (32, 224))
    if num_classes is None:
        num_classes = 1000 if input_size == 224 else 10
    if input_size == 32:
        model = named(
            ("block1", MLPConv(in_channels, 192, 5, (160, 96), padding=2)),
            ("pool1", nn.MaxPool2d(3, 2, padding=1)),                        # 16x16
            ("drop1", nn.Dropout(dropout)),
            ("block2", MLPConv(96, 192, 5, (192, 192), padding=2)),
            ("pool2", nn.AvgPool2d(3, 2, padding=1)),                        # 8x8
            ("drop2", nn.Dropout(dropout)),
            ("block3", MLPConv(192, 192, 3, (192, num_classes), padding=1)),
            ("pool3", nn.GlobalAvgPool2d()),
            ("flatten", nn.Flatten()),
        )
    else:
        model = named(
            ("block1", MLPConv(in_channels, 96, 11, (96, 96), stride=4)),   # 54x54
            ("pool1", nn.MaxPool2d(3, 2)),                                   # 26x26
            ("block2", MLPConv(96, 256, 5, (256, 256), padding=2)),
            ("pool2", nn.MaxPool2d(3, 2)),                                   # 12x12
            ("block3", MLPConv(256, 384, 3, (384, 384), padding=1)),
            ("pool3", nn.MaxPool2d(3, 2)),                                   # 5x5
            ("drop3", nn.Dropout(dropout)),
            ("block4", MLPConv(384, 1024, 3, (1024, num_classes), padding=1)),
            ("pool4", nn.GlobalAvgPool2d()),
            ("flatten", nn.Flatten()),
        )
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            zero_bias_(m)
    return model
