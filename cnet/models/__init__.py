"""The model zoo: every architecture of the design notes, built from ``cnet.nn``.

>>> from cnet import models
>>> model = models.resnet20(num_classes=10)          # or models.get_model("resnet20")
>>> models.list_models()[:3]
['googlenet', 'lenet5', 'nin']
>>> cnet.summary(model, (32, 32, 3))                 # table + the numbers as data

Builders take ``num_classes``, ``in_channels`` and, where a network has both an
ImageNet and a 32x32 form, ``input_size`` (224 or 32).  Activations are NHWC.
"""
from ._registry import get_model, list_models, register_model
from .lenet import lenet5
from .vgg import (vgg, vgg11, vgg11_bn, vgg13, vgg13_bn, vgg16, vgg16_bn, vgg19,  # noqa: F401
                  vgg19_bn)
from .nin import MLPConv, nin
from .inception import Inception, googlenet
from .resnet import (BasicBlock, Bottleneck, ShortcutA, resnet, resnet_cifar,  # noqa: F401
                     resnet18, resnet20, resnet32, resnet34, resnet44, resnet50, resnet56,
                     resnet101, resnet110)
from .resnext import ResNeXtBlock, resnext29_8x64d, resnext29_16x64d, resnext50_32x4d, resnext_cifar
from .summary import summary

__all__ = ["get_model", "list_models", "register_model", "summary",
           "MLPConv", "Inception", "BasicBlock", "Bottleneck", "ResNeXtBlock", "ShortcutA",
           "vgg", "resnet", "resnet_cifar", "resnext_cifar", *list_models()]
