"""VGG-11/13/16/19 (Simonyan & Zisserman 2015, configurations A, B, D, E), with
and without batch normalisation.

``input_size=224`` is the ImageNet network: five conv stages (3x3 convolutions,
2x2 max-pool after each) to 7x7x512, then the 4096-4096 classifier with dropout
(VGG-16: 138,357,544 parameters, torchvision's count).  ``input_size=32`` is the
usual CIFAR form: the same conv stages bring 32x32 down to 1x1x512, and a single
512 -> num_classes linear layer classifies.

Names follow the Caffe release (conv1_1 ... pool5, fc6 ... fc8).  Initialisation
as torchvision: He normal (fan_out) convolutions with zero bias, N(0, 0.01)
linear layers with zero bias, BN scale 1 and shift 0.
"""
from .. import init, nn
from ._registry import check_input_size, init_batchnorm_, named, register_model, zero_bias_

# Conv widths per stage (a stage ends with a 2x2 max-pool).
CONFIGS = {
    "A": [[64], [128], [256, 256], [512, 512], [512, 512]],                                # VGG-11
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],                       # VGG-13
    "D": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],        # VGG-16
    "E": [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],                          # VGG-19
}


def make_features(config, in_channels=3, batch_norm=False):
    """The convolutional part: 3x3/pad-1 convs (+BN) + ReLU, 2x2 max-pool per stage."""
    layers = []
    for s, widths in enumerate(config, start=1):
        for i, width in enumerate(widths, start=1):
            layers.append((f"conv{s}_{i}", nn.Conv2d(in_channels, width, 3, padding=1)))
            if batch_norm:
                layers.append((f"bn{s}_{i}", nn.BatchNorm2d(width)))
            layers.append((f"relu{s}_{i}", nn.ReLU()))
            in_channels = width
        layers.append((f"pool{s}", nn.MaxPool2d(2, 2)))
    return named(*layers)


def vgg(config, batch_norm=False, num_classes=None, in_channels=3, input_size=224, dropout=0.5):
    """A VGG network from a configuration letter ("A", "B", "D", "E") or a list of stages."""
    check_input_size("vgg", input_size, (32, 224))
    if num_classes is None:
        num_classes = 1000 if input_size == 224 else 10
    stages = CONFIGS[config] if isinstance(config, str) else config
    width = stages[-1][-1]
    features = make_features(stages, in_channels, batch_norm)
    if input_size == 224:
        side = input_size // 2 ** len(stages)
        classifier = named(
            ("flatten", nn.Flatten()),
            ("fc6", nn.Linear(width * side * side, 4096)), ("relu6", nn.ReLU()),
            ("drop6", nn.Dropout(dropout)),
            ("fc7", nn.Linear(4096, 4096)), ("relu7", nn.ReLU()), ("drop7", nn.Dropout(dropout)),
            ("fc8", nn.Linear(4096, num_classes)),
        )
    else:
        classifier = named(("flatten", nn.Flatten()), ("fc", nn.Linear(width, num_classes)))
    model = named(("features", features), ("classifier", classifier))
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            zero_bias_(m)
        elif isinstance(m, nn.Linear):
            init.normal_(m.weight, 0.0, 0.01)
            zero_bias_(m)
    init_batchnorm_(model)
    return model


def _builder(name, config, batch_norm):
    def build(num_classes=None, in_channels=3, input_size=224, dropout=0.5):
        return vgg(config, batch_norm, num_classes, in_channels, input_size, dropout)
    depth = sum(map(len, CONFIGS[config])) + 3
    build.__name__ = build.__qualname__ = name
    build.__doc__ = (f"VGG-{depth} (configuration {config}){' with batch norm' if batch_norm else ''}.\n\n"
                     "``input_size`` 224 (ImageNet, 4096-4096 classifier) or 32 (CIFAR, 512 -> "
                     "classes head); ``num_classes`` defaults to 1000 at 224 and 10 at 32.")
    return register_model(build)


vgg11 = _builder("vgg11", "A", False)
vgg11_bn = _builder("vgg11_bn", "A", True)
vgg13 = _builder("vgg13", "B", False)
vgg13_bn = _builder("vgg13_bn", "B", True)
vgg16 = _builder("vgg16", "D", False)
vgg16_bn = _builder("vgg16_bn", "D", True)
vgg19 = _builder("vgg19", "E", False)
vgg19_bn = _builder("vgg19_bn", "E", True)
