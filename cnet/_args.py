"""Argument parsing shared by layers and transforms (no numerics here)."""
import numpy as np


def int_pair(owner, name, value):
    """``(a, b)`` from an int or a pair of ints (torch's ``_pair``): kernel sizes,
    strides, paddings, crop sizes.  ``owner`` names the layer or transform in the
    error (a class name: the object is not built yet).  Bools and non-integers
    are refused, as torch's int[2] arguments are."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{owner}: {name} must be an int or a pair, got {value!r}")
        a, b = value
    else:
        a = b = value
    if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in (a, b)):
        raise TypeError(f"{owner}: {name} must be an int or a pair of ints, got {value!r}")
    return int(a), int(b)
