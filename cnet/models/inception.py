"""GoogLeNet / Inception v1 (Szegedy et al. 2015).

The Inception block runs four branches on the same input and concatenates
their outputs along channels (``nn.Concat``):

    1x1 conv | 1x1 conv -> 3x3 conv | 1x1 conv -> 5x5 conv | 3x3 max-pool -> 1x1 conv

``googlenet(input_size=224)`` is the network of the paper's Table 1 (the 5x5
branches, no batch norm, without the two auxiliary classifiers and without
local response normalisation; 6,998,552 parameters at 1000 classes).  Max-pools
use padding 1 instead of Caffe's ceil rounding: same output sizes
(112 -> 56 -> 28 -> 14 -> 7).  Initialisation as the BVLC Caffe release: fan-in
scaled uniform ("xavier" filler), conv biases 0.2, classifier bias 0.

``googlenet(input_size=32)`` is the common CIFAR form (kuangliu/pytorch-cifar):
a single 3x3, 192 stem instead of the 7x7/2 stem and its pools, the same nine
Inception blocks with two stride-2 pools (32 -> 16 -> 8), batch norm after every
convolution and no conv biases (5,871,914 parameters at 10 classes; kuangliu's
version factors the 5x5 into two 3x3s); He normal (fan_out)
initialisation.  ``batch_norm`` overrides the default of either form.
"""
from .. import init, nn
from ._registry import check_input_size, init_batchnorm_, named, register_model, zero_bias_


def conv_unit(in_channels, out_channels, kernel_size, stride=1, padding=0, batch_norm=False):
    """conv -> (BN) -> ReLU as one named Sequential."""
    return named(
        ("conv", nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                           bias=not batch_norm)),
        ("bn", nn.BatchNorm2d(out_channels) if batch_norm else None),
        ("relu", nn.ReLU()))


class Inception(nn.Concat):
    """The Inception block: four branches concatenated along channels.

    Output channels: ``ch1x1 + ch3x3 + ch5x5 + pool_proj``.
    """

    def __init__(self, in_channels, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj,
                 batch_norm=False):
        bn = batch_norm
        super().__init__(
            conv_unit(in_channels, ch1x1, 1, batch_norm=bn),
            named(("reduce", conv_unit(in_channels, ch3x3red, 1, batch_norm=bn)),
                  ("conv", conv_unit(ch3x3red, ch3x3, 3, padding=1, batch_norm=bn))),
            named(("reduce", conv_unit(in_channels, ch5x5red, 1, batch_norm=bn)),
                  ("conv", conv_unit(ch5x5red, ch5x5, 5, padding=2, batch_norm=bn))),
            named(("pool", nn.MaxPool2d(3, 1, padding=1)),
                  ("proj", conv_unit(in_channels, pool_proj, 1, batch_norm=bn))),
        )
        self.out_channels = ch1x1 + ch3x3 + ch5x5 + pool_proj


# (name, in, #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj): the paper's Table 1.
# "pool" marks a stride-2 3x3 max-pool.
BLOCKS = [
    ("inception3a", 192, 64, 96, 128, 16, 32, 32),
    ("inception3b", 256, 128, 128, 192, 32, 96, 64),
    "pool3",
    ("inception4a", 480, 192, 96, 208, 16, 48, 64),
    ("inception4b", 512, 160, 112, 224, 24, 64, 64),
    ("inception4c", 512, 128, 128, 256, 24, 64, 64),
    ("inception4d", 512, 112, 144, 288, 32, 64, 64),
    ("inception4e", 528, 256, 160, 320, 32, 128, 128),
    "pool4",
    ("inception5a", 832, 256, 160, 320, 32, 128, 128),
    ("inception5b", 832, 384, 192, 384, 48, 128, 128),
]


@register_model
def googlenet(num_classes=None, in_channels=3, input_size=224, batch_norm=None, dropout=0.4):
    """GoogLeNet: the paper's ImageNet network (224) or the CIFAR form (32).

    ``num_classes`` defaults to 1000 at 224 and 10 at 32; ``batch_norm`` to
    False at 224 (the paper) and True at 32.
    """
    check_input_size("googlenet", input_size, (32, 224))
    if num_classes is None:
        num_classes = 1000 if input_size == 224 else 10
    bn = (input_size == 32) if batch_norm is None else bool(batch_norm)
    if input_size == 224:
        stem = [("conv1", conv_unit(in_channels, 64, 7, 2, 3, batch_norm=bn)),   # 112
                ("pool1", nn.MaxPool2d(3, 2, padding=1)),                       # 56
                ("conv2_reduce", conv_unit(64, 64, 1, batch_norm=bn)),
                ("conv2", conv_unit(64, 192, 3, padding=1, batch_norm=bn)),
                ("pool2", nn.MaxPool2d(3, 2, padding=1))]                       # 28
    else:
        stem = [("conv1", conv_unit(in_channels, 192, 3, padding=1, batch_norm=bn))]  # 32
    body = [(b, nn.MaxPool2d(3, 2, padding=1)) if isinstance(b, str)
            else (b[0], Inception(*b[1:], batch_norm=bn)) for b in BLOCKS]
    head = [("pool5", nn.GlobalAvgPool2d()), ("flatten", nn.Flatten()),
            ("dropout", nn.Dropout(dropout)), ("fc", nn.Linear(1024, num_classes))]
    model = named(*stem, *body, *head)

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            if bn:
                init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                zero_bias_(m)
            else:
                init.lecun_uniform_(m.weight)
                if m.bias is not None:
                    init.constant_(m.bias, 0.2)
        elif isinstance(m, nn.Linear) and not bn:
            init.lecun_uniform_(m.weight)
            zero_bias_(m)
    init_batchnorm_(model)
    return model
