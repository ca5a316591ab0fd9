"""The single source of randomness: initialisation, dropout, shuffling, augmentation.

``cnet.manual_seed(s)`` resets it; ``get_rng_state`` / ``set_rng_state`` let a
checkpoint resume the exact stream.  Kernels that need random numbers (dropout,
augmentation) take a 64-bit seed drawn from here per call and use a
counter-based generator, so their output does not depend on the thread count.
"""
import numpy as np

_generator = np.random.Generator(np.random.PCG64())


def manual_seed(seed):
    """Seed every random draw cnet makes; returns the generator."""
    global _generator
    _generator = np.random.Generator(np.random.PCG64(int(seed)))
    return _generator


def generator():
    """The global numpy Generator (look it up each time: manual_seed replaces it)."""
    return _generator


def next_seed():
    """A fresh 63-bit seed for a kernel's counter-based generator."""
    return int(_generator.integers(0, 2**63 - 1))


def get_rng_state():
    """A JSON-able snapshot of the global generator."""
    return _generator.bit_generator.state


def set_rng_state(state):
    bg = np.random.PCG64()
    bg.state = state
    global _generator
    _generator = np.random.Generator(bg)
