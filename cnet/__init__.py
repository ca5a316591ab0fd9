"""cnet: a CPU deep-learning engine with Cython/OpenMP kernels.

>>> import cnet
>>> from cnet import nn, optim, init
"""
import os as _os

# Must precede the first kernel import (libgomp reads it once): see _threads.py.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

from ._random import manual_seed, get_rng_state, set_rng_state  # noqa: E402
from ._threads import set_num_threads, get_num_threads, threads  # noqa: E402
from .serialize import save, load  # noqa: E402
from . import nn  # noqa: E402


def show_config(file=None):
    """Print how cnet was built and how it will run; return the same as a dict."""
    import platform
    import sys

    import numpy as np

    from cnet_ext import _openmp_helpers
    from . import _threads

    info = {
        "cnet": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "numpy": np.__version__,
        "openmp": _openmp_helpers.openmp_enabled(),
        "omp_wait_policy": _os.environ.get("OMP_WAIT_POLICY"),
        "num_threads": _threads.get_num_threads(),
        "available_cores": _threads.available_cores(),
        "blas": _threads.blas_info(),
    }
    lines = [f"cnet {info['cnet']}  (python {info['python']}, numpy {info['numpy']})",
             f"platform:        {info['platform']}",
             f"OpenMP kernels:  {'on' if info['openmp'] else 'OFF (built without OpenMP: single-threaded)'}"
             f"  wait policy {info['omp_wait_policy']}",
             f"threads:         {info['num_threads']} (cores available: {info['available_cores']})"]
    for lib in info["blas"]:
        lines.append(f"{lib['api']:<16} {lib['internal_api']} {lib['version']}, "
                     f"{lib['num_threads']} threads ({lib['filepath']})")
    print("\n".join(lines), file=file)
    return info


def __getattr__(name):
    # Heavier submodules load on first use, so `import cnet` stays quick.
    import importlib
    if name in ("optim", "init", "models", "data", "train", "cli"):
        return importlib.import_module(f".{name}", __name__)
    if name == "summary":
        from .models import summary
        return summary
    raise AttributeError(f"module 'cnet' has no attribute {name!r}")
