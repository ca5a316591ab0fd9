"""Weight initialisation (torch.nn.init's names and formulas, cnet's layouts).

Every function fills a numpy array or a ``Parameter`` in place and returns
it.  Fans come from cnet's layouts:

- conv kernels are HWIO ``(KH, KW, C_in // groups, C_out)``:
  fan_in = KH*KW*C_in/groups, fan_out = KH*KW*C_out/groups
  (the same numbers PyTorch derives from its OIHW weight);
- dense kernels are ``(in_features, out_features)``;
- 1-D arrays (biases) have no fans: pass ``fan_in`` explicitly where needed.

All randomness comes from cnet's global generator (``cnet.manual_seed``).
Samples are drawn in float64 and cast, so a seed gives the same values for a
float32 and a float64 model.
"""
import math

import numpy as np

from . import _random

__all__ = ["calculate_gain", "fans", "uniform_", "normal_", "constant_", "zeros_", "ones_",
           "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_",
           "lecun_uniform_", "lecun_normal_", "fan_in_uniform_", "trunc_normal_"]


def _array(t):
    """The numpy array behind ``t`` (a Parameter's .data or the array itself)."""
    arr = getattr(t, "data", t) if not isinstance(t, np.ndarray) else t
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"init: expected a numpy array or Parameter, got {type(t).__name__}")
    return arr


def _fill(t, values):
    _array(t)[...] = values
    return t


def calculate_gain(nonlinearity, param=None):
    """torch.nn.init.calculate_gain: the recommended gain for a nonlinearity."""
    linear = ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d",
              "conv_transpose2d", "conv_transpose3d", "sigmoid")
    if nonlinearity in linear:
        return 1.0
    if nonlinearity == "tanh":
        return 5.0 / 3
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        slope = 0.01 if param is None else float(param)
        return math.sqrt(2.0 / (1 + slope ** 2))
    if nonlinearity == "selu":
        return 3.0 / 4
    raise ValueError(f"calculate_gain: unsupported nonlinearity {nonlinearity!r}")


def fans(shape, groups=1):
    """(fan_in, fan_out) of a dense (in, out) or HWIO conv kernel shape.

    ``shape[-2]`` is already ``C_in // groups`` for a grouped conv, so fan_in is
    right as it stands.  With the default ``groups=1``, fan_out is
    ``KH*KW*C_out``, PyTorch's number for the same weight; pass the layer's
    ``groups`` to get the true fan-out ``KH*KW*C_out/groups`` (each input
    channel feeds only its own group's outputs).
    """
    shape = tuple(shape)
    if len(shape) < 2:
        raise ValueError(f"fans: need at least a 2-D shape (dense (in, out) or HWIO), got {shape}")
    receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    fan_in = shape[-2] * receptive
    fan_out = shape[-1] * receptive // groups if len(shape) > 2 else shape[-1]
    return fan_in, fan_out


def _fan(shape, mode, groups):
    if 0 in shape:
        return 1    # a zero-element array: nothing to fill (torch warns and returns)
    fan_in, fan_out = fans(shape, groups)
    if mode == "fan_in":
        return fan_in
    if mode == "fan_out":
        return fan_out
    raise ValueError(f"mode must be 'fan_in' or 'fan_out', got {mode!r}")


def uniform_(t, a=0.0, b=1.0):
    arr = _array(t)
    return _fill(t, _random.generator().uniform(a, b, size=arr.shape))


def normal_(t, mean=0.0, std=1.0):
    arr = _array(t)
    return _fill(t, _random.generator().normal(mean, std, size=arr.shape))


def trunc_normal_(t, mean=0.0, std=1.0, a=-2.0, b=2.0):
    """Normal(mean, std) redrawn until inside [a, b] (absolute bounds, as torch)."""
    arr = _array(t)
    gen = _random.generator()
    out = gen.normal(mean, std, size=arr.size)
    bad = (out < a) | (out > b)
    while bad.any():
        out[bad] = gen.normal(mean, std, size=int(bad.sum()))
        bad = (out < a) | (out > b)
    return _fill(t, out.reshape(arr.shape))


def constant_(t, value):
    return _fill(t, value)


def zeros_(t):
    return _fill(t, 0)


def ones_(t):
    return _fill(t, 1)


def xavier_uniform_(t, gain=1.0, groups=1):
    """Glorot uniform: U(-a, a), a = gain * sqrt(6 / (fan_in + fan_out))."""
    fan_in, fan_out = fans(_array(t).shape, groups)
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return uniform_(t, -bound, bound)


def xavier_normal_(t, gain=1.0, groups=1):
    """Glorot normal: N(0, std^2), std = gain * sqrt(2 / (fan_in + fan_out))."""
    fan_in, fan_out = fans(_array(t).shape, groups)
    return normal_(t, 0.0, gain * math.sqrt(2.0 / (fan_in + fan_out)))


def kaiming_uniform_(t, a=0.0, mode="fan_in", nonlinearity="leaky_relu", groups=1):
    """He uniform: U(-b, b), b = gain * sqrt(3 / fan)."""
    fan = _fan(_array(t).shape, mode, groups)
    bound = calculate_gain(nonlinearity, a) * math.sqrt(3.0 / fan)
    return uniform_(t, -bound, bound)


def kaiming_normal_(t, a=0.0, mode="fan_in", nonlinearity="leaky_relu", groups=1):
    """He normal: N(0, std^2), std = gain / sqrt(fan)."""
    fan = _fan(_array(t).shape, mode, groups)
    return normal_(t, 0.0, calculate_gain(nonlinearity, a) / math.sqrt(fan))


def lecun_uniform_(t, groups=1):
    """LeCun uniform: U(-b, b), b = sqrt(3 / fan_in) (unit variance for linear units)."""
    fan_in = _fan(_array(t).shape, "fan_in", groups)
    bound = math.sqrt(3.0 / fan_in)
    return uniform_(t, -bound, bound)


def lecun_normal_(t, groups=1):
    """LeCun normal: N(0, 1 / fan_in)."""
    fan_in = _fan(_array(t).shape, "fan_in", groups)
    return normal_(t, 0.0, math.sqrt(1.0 / fan_in))


def fan_in_uniform_(t, fan_in):
    """The classic U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's default for biases,
    and, via kaiming_uniform_(a=sqrt(5)), for conv and dense weights)."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return uniform_(t, -bound, bound)
