"""Residual networks (He et al. 2016).

A residual block is ``Sequential(residual=Add(body, shortcut), relu=ReLU())``,
so the join and its ReLU fuse into one pass where the layers allow it.

- ``resnet20/32/44/56/110``: the paper's CIFAR networks (Sec. 4.2): a 3x3, 16
  stem, three stages of n basic blocks at 16, 32, 64 channels (depth 6n+2),
  global average pooling, a linear classifier.  The default shortcut is the
  paper's option A (identity; at a stage change subsample by 2 and pad the new
  channels with zeros: ``ShortcutA``, no parameters), which gives the published
  0.27M / 0.46M / 0.66M / 0.85M / 1.7M parameters.  ``shortcut="B"`` uses a
  1x1 projection + BN where the shape changes, ``"C"`` in every block.
- ``resnet18/34`` (basic blocks) and ``resnet50/101`` (bottleneck 1x1 -> 3x3 ->
  1x1, stride on the 3x3 as torchvision "v1.5"): torchvision's ImageNet networks,
  exactly (11,689,512 / 21,797,672 / 25,557,032 / 44,549,160 parameters at 1000
  classes).  ``input_size=32`` swaps the 7x7/2 stem and its max-pool for a
  3x3/1 stem (the usual CIFAR adaptation).

Initialisation as torchvision: He normal (fan_out, ReLU gain) convolutions, BN
scale 1 and shift 0, PyTorch's default for the classifier; with
``zero_init_residual`` the last BN of every block starts at scale 0, so each
block starts as the identity (Goyal et al. 2017).
"""
import numpy as np

from cnet_ext import _elementwise

from .. import init, nn
from .._threads import num_threads
from ..nn.module import check_input, require_cache
from ._registry import check_input_size, init_batchnorm_, named, register_model


def conv3x3(in_channels, out_channels, stride=1, groups=1):
    return nn.Conv2d(in_channels, out_channels, 3, stride, 1, groups=groups, bias=False)


def conv1x1(in_channels, out_channels, stride=1):
    return nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)


class ShortcutA(nn.Module):
    """Option-A shortcut: ``x[:, ::stride, ::stride, :]`` with the channels
    zero-padded from ``in_channels`` to ``out_channels`` (half of the new
    channels before, half after, as the reference CIFAR implementations do).
    No parameters."""

    def __init__(self, in_channels, out_channels, stride=2):
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"ShortcutA: out_channels ({out_channels}) < in_channels ({in_channels})")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.pad_before = (out_channels - in_channels) // 2
        self._in_shape = None

    def extra_repr(self):
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"

    def _drop_cache(self):
        self._in_shape = None

    def forward(self, x):
        check_input(self, x, 4, channels=self.in_channels)
        s = self.stride
        n, h, w, _ = x.shape
        out = np.empty((n, -(-h // s), -(-w // s), self.out_channels), dtype=x.dtype)
        # one parallel pass (numpy's three strided assignments ran on one thread)
        _elementwise.subsample_pad_channels(x, out, s, self.pad_before, num_threads())
        if self.training:
            self._in_shape = x.shape
        return out

    def backward(self, grad):
        in_shape = require_cache(self, self._in_shape)
        s = self.stride
        want = (in_shape[0], -(-in_shape[1] // s), -(-in_shape[2] // s), self.out_channels)
        if not isinstance(grad, np.ndarray) or grad.shape != want \
                or grad.dtype not in (np.float32, np.float64):
            raise ValueError(f"{self._describe()}: expected a float32 or float64 gradient of "
                             f"shape {want}, got {getattr(grad, 'shape', type(grad).__name__)} "
                             f"{getattr(grad, 'dtype', '')}")
        grad_in = np.empty(in_shape, dtype=grad.dtype)
        _elementwise.subsample_pad_channels_backward(np.ascontiguousarray(grad), grad_in, s,
                                                     self.pad_before, num_threads())
        return grad_in

    def flops(self, in_shape, out_shape):
        return 0  # a strided copy


def make_shortcut(in_channels, out_channels, stride, kind="B"):
    """The shortcut branch: identity where shapes agree (except option C), else
    option A (``ShortcutA``) or a 1x1 projection + BN (options B and C)."""
    if kind not in ("A", "B", "C"):
        raise ValueError(f"shortcut must be 'A', 'B' or 'C', got {kind!r}")
    if kind != "C" and stride == 1 and in_channels == out_channels:
        return nn.Identity()
    if kind == "A":
        return ShortcutA(in_channels, out_channels, stride)
    return named(("conv", conv1x1(in_channels, out_channels, stride)),
                 ("bn", nn.BatchNorm2d(out_channels)))


class _ResidualBlock(nn.Sequential):
    """``residual = Add(body, shortcut)`` followed by ``relu``."""

    def __init__(self, body, shortcut):
        super().__init__({"residual": nn.Add(body, shortcut), "relu": nn.ReLU()})

    @property
    def body(self):
        return self.residual.branches[0]

    @property
    def shortcut(self):
        return self.residual.branches[1]

    @property
    def last_bn(self):
        return self.body[-1]


class BasicBlock(_ResidualBlock):
    """3x3 conv -> BN -> ReLU -> 3x3 conv -> BN, plus the shortcut, then ReLU."""

    expansion = 1

    def __init__(self, in_channels, planes, stride=1, shortcut="B"):
        body = named(("conv1", conv3x3(in_channels, planes, stride)),
                     ("bn1", nn.BatchNorm2d(planes)), ("relu1", nn.ReLU()),
                     ("conv2", conv3x3(planes, planes)), ("bn2", nn.BatchNorm2d(planes)))
        super().__init__(body, make_shortcut(in_channels, planes, stride, shortcut))


class Bottleneck(_ResidualBlock):
    """1x1 conv (reduce to ``width``) -> 3x3 conv (stride, ``groups``) -> 1x1 conv
    (expand to ``planes * 4``), BN + ReLU between, plus the shortcut, then ReLU.

    ``width = int(planes * base_width / 64) * groups`` (torchvision), so
    ``groups > 1`` is a ResNeXt block: split-transform-merge as a grouped conv.
    """

    expansion = 4

    def __init__(self, in_channels, planes, stride=1, groups=1, base_width=64, shortcut="B"):
        width = int(planes * (base_width / 64.0)) * groups
        out_channels = planes * self.expansion
        body = named(("conv1", conv1x1(in_channels, width)),
                     ("bn1", nn.BatchNorm2d(width)), ("relu1", nn.ReLU()),
                     ("conv2", conv3x3(width, width, stride, groups)),
                     ("bn2", nn.BatchNorm2d(width)), ("relu2", nn.ReLU()),
                     ("conv3", conv1x1(width, out_channels)),
                     ("bn3", nn.BatchNorm2d(out_channels)))
        super().__init__(body, make_shortcut(in_channels, out_channels, stride, shortcut))


def make_stage(block, in_channels, planes, blocks, stride, **block_kwargs):
    """``blocks`` blocks; the first one changes stride/width.  Returns (stage, out_channels)."""
    layers = []
    for i in range(blocks):
        layers.append((str(i), block(in_channels, planes, stride if i == 0 else 1, **block_kwargs)))
        in_channels = planes * block.expansion
    return named(*layers), in_channels


def init_resnet_(model, zero_init_residual=False):
    """He normal (fan_out) convs, BN 1/0; optionally zero the last BN of each block."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    init_batchnorm_(model)
    if zero_init_residual:
        for m in model.modules():
            if isinstance(m, _ResidualBlock):
                init.zeros_(m.last_bn.weight)
    return model


# -- CIFAR ResNets -------------------------------------------------------------

def resnet_cifar(depth, num_classes=10, in_channels=3, shortcut="A", zero_init_residual=False):
    """The CIFAR ResNet of depth 6n+2 (three stages of n basic blocks: 16, 32, 64)."""
    if (depth - 2) % 6 or depth < 8:
        raise ValueError(f"resnet_cifar: depth must be 6n+2 (20, 32, 44, 56, 110, ...), got {depth}")
    n = (depth - 2) // 6
    layer1, c = make_stage(BasicBlock, 16, 16, n, 1, shortcut=shortcut)
    layer2, c = make_stage(BasicBlock, c, 32, n, 2, shortcut=shortcut)
    layer3, c = make_stage(BasicBlock, c, 64, n, 2, shortcut=shortcut)
    model = named(
        ("conv1", conv3x3(in_channels, 16)), ("bn1", nn.BatchNorm2d(16)), ("relu", nn.ReLU()),
        ("layer1", layer1), ("layer2", layer2), ("layer3", layer3),          # 32, 16, 8
        ("avgpool", nn.GlobalAvgPool2d()), ("flatten", nn.Flatten()),
        ("fc", nn.Linear(c, num_classes)))
    return init_resnet_(model, zero_init_residual)


def _cifar_builder(depth, params):
    def build(num_classes=10, in_channels=3, shortcut="A", zero_init_residual=False):
        return resnet_cifar(depth, num_classes, in_channels, shortcut, zero_init_residual)
    build.__name__ = build.__qualname__ = f"resnet{depth}"
    build.__doc__ = (f"ResNet-{depth} for 32x32 inputs (He et al. 2016, Sec. 4.2; {params} "
                     "parameters with the default option-A shortcuts).")
    return register_model(build)


resnet20 = _cifar_builder(20, "0.27M")
resnet32 = _cifar_builder(32, "0.46M")
resnet44 = _cifar_builder(44, "0.66M")
resnet56 = _cifar_builder(56, "0.85M")
resnet110 = _cifar_builder(110, "1.7M")


# -- ImageNet ResNets (torchvision) ----------------------------------------------

def resnet(block, layers, num_classes=None, in_channels=3, input_size=224,
           zero_init_residual=False, groups=1, width_per_group=64):
    """torchvision's ResNet/ResNeXt: ``block`` BasicBlock or Bottleneck, ``layers``
    the block count per stage (e.g. [3, 4, 6, 3]); option-B shortcuts."""
    check_input_size("resnet", input_size, (32, 224))
    if num_classes is None:
        num_classes = 1000 if input_size == 224 else 10
    if input_size == 224:
        stem = [("conv1", nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)),   # 112
                ("bn1", nn.BatchNorm2d(64)), ("relu", nn.ReLU()),
                ("maxpool", nn.MaxPool2d(3, 2, padding=1))]                     # 56
    else:
        stem = [("conv1", conv3x3(in_channels, 64)), ("bn1", nn.BatchNorm2d(64)),
                ("relu", nn.ReLU())]
    kw = {"groups": groups, "base_width": width_per_group} if block is Bottleneck else {}
    c, stages = 64, []
    for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
        stage, c = make_stage(block, c, planes, n, 1 if i == 0 else 2, **kw)
        stages.append((f"layer{i + 1}", stage))
    model = named(*stem, *stages,
                  ("avgpool", nn.GlobalAvgPool2d()), ("flatten", nn.Flatten()),
                  ("fc", nn.Linear(c, num_classes)))
    return init_resnet_(model, zero_init_residual)


def _imagenet_builder(name, block, layers, params, **fixed):
    def build(num_classes=None, in_channels=3, input_size=224, zero_init_residual=False):
        return resnet(block, layers, num_classes, in_channels, input_size, zero_init_residual,
                      **fixed)
    build.__name__ = build.__qualname__ = name
    build.__doc__ = (f"{name} as torchvision ({params} parameters at 1000 classes); "
                     "``input_size=32`` uses a 3x3/1 stem without max-pool; ``num_classes`` "
                     "defaults to 1000 at 224 and 10 at 32.")
    return register_model(build)


resnet18 = _imagenet_builder("resnet18", BasicBlock, [2, 2, 2, 2], "11,689,512")
resnet34 = _imagenet_builder("resnet34", BasicBlock, [3, 4, 6, 3], "21,797,672")
resnet50 = _imagenet_builder("resnet50", Bottleneck, [3, 4, 6, 3], "25,557,032")
resnet101 = _imagenet_builder("resnet101", Bottleneck, [3, 4, 23, 3], "44,549,160")
