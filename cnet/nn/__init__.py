"""Layers, containers and losses (PyTorch names, NHWC activations, HWIO kernels).

Layer modules load on first use (``nn.Conv2d`` imports ``cnet.nn.conv``), which
keeps ``import cnet`` fast.
"""
import importlib

from .module import Module, Parameter, flatten_parameters
from .containers import Sequential, Add, Concat
from .layers import Identity, Flatten

_LAZY = {
    "Conv2d": "conv", "Linear": "conv",
    "BatchNorm2d": "normalization", "BatchNorm1d": "normalization",
    "ReLU": "activation", "Dropout": "activation",
    "MaxPool2d": "pooling", "AvgPool2d": "pooling", "GlobalAvgPool2d": "pooling",
    "CrossEntropyLoss": "loss",
}

__all__ = ["Module", "Parameter", "flatten_parameters", "Sequential", "Add", "Concat",
           "Identity", "Flatten", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cnet.nn' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
