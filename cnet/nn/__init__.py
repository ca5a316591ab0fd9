"""Layers, containers and losses (PyTorch names, NHWC activations, HWIO kernels)."""
from .module import Module, Parameter, flatten_parameters
from .containers import Sequential, Add, Concat
from .layers import Identity, Flatten

__all__ = ["Module", "Parameter", "flatten_parameters", "Sequential", "Add", "Concat",
           "Identity", "Flatten"]
