"""cnet: a CPU deep-learning engine with Cython/OpenMP kernels.

>>> import cnet
>>> from cnet import nn, optim, init
"""
import os as _os
import sys as _sys

# These are read once, when the library loads, so they must precede the first
# kernel import (libgomp) and numpy's import (OpenBLAS); see _threads.py.
# OpenBLAS's idle threads otherwise spin for ~0.1 s (2**28 cycles) after each
# multithreaded GEMM, stealing a core from the OpenMP kernels that run next:
# measured on 2 cores, LeNet-5 training at 2 threads 119 -> 34 ms, ResNet-18
# (64x64) 361 -> 239 ms (bench/RESULTS.md).  A user's own setting wins.
_BLAS_TIMEOUT_APPLIED = "OPENBLAS_THREAD_TIMEOUT" in _os.environ or "numpy" not in _sys.modules
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
# cnet's OpenMP workers spin ~0.5 ms (10000 rounds) before they sleep, so that
# consecutive kernels and layers find them awake; see _threads.py.  Not when
# the user chose a wait policy or spin count.
if "OMP_WAIT_POLICY" not in _os.environ and "GOMP_SPINCOUNT" not in _os.environ:
    _os.environ["GOMP_SPINCOUNT"] = "10000"
# OpenBLAS's faster sgemm kernels on AMD Zen 4 (see _cpu.openblas_coretype).
from . import _cpu  # noqa: E402
if "numpy" not in _sys.modules and _cpu.openblas_coretype():
    _os.environ.setdefault("OPENBLAS_CORETYPE", _cpu.openblas_coretype())

__version__ = "0.1.0"

from . import _malloc  # noqa: E402
_malloc.tune()

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
        "omp_spin_count": _os.environ.get("GOMP_SPINCOUNT"),
        "openblas_thread_timeout": (_os.environ.get("OPENBLAS_THREAD_TIMEOUT")
                                    if _BLAS_TIMEOUT_APPLIED else None),
        "allocator": _malloc.tune(),
        "num_threads": _threads.get_num_threads(),
        "available_cores": _threads.available_cores(),
        "blas": _threads.blas_info(),
        "openblas_coretype": _os.environ.get("OPENBLAS_CORETYPE"),
        "cblas_from_kernels": _threads.cblas_gemm() is not None,
    }
    lines = [f"cnet {info['cnet']}  (python {info['python']}, numpy {info['numpy']})",
             f"platform:        {info['platform']}",
             f"OpenMP kernels:  {'on' if info['openmp'] else 'OFF (built without OpenMP: single-threaded)'}"
             f"  idle workers {_omp_wait(info)}",
             f"threads:         {info['num_threads']} (cores available: {info['available_cores']})",
             f"allocator:       {info['allocator']}"]
    if info["openblas_thread_timeout"] is None:
        lines.append("note:            numpy was imported before cnet, so OpenBLAS keeps its idle "
                     "threads spinning ~0.1 s after each GEMM; import cnet first or set "
                     "OPENBLAS_THREAD_TIMEOUT=4 for better multi-thread speed")
    lines.append("small GEMMs:     " + ("row parts call the BLAS from the OpenMP team"
                                         if info["cblas_from_kernels"] else
                                         "row parts run as Python tasks (no cblas symbols "
                                         "found in numpy's BLAS)"))
    for lib in info["blas"]:
        lines.append(f"{lib['api']:<16} {lib['internal_api']} {lib['version']}, "
                     f"{lib['num_threads']} threads"
                     + (f", {lib['architecture']} kernels" if lib["architecture"] else "")
                     + f" ({lib['filepath']})")
    print("\n".join(lines), file=file)
    return info


def _omp_wait(info):
    if info["omp_spin_count"] is not None:
        return f"spin GOMP_SPINCOUNT={info['omp_spin_count']} rounds, then sleep"
    if info["omp_wait_policy"] is not None:
        return f"OMP_WAIT_POLICY={info['omp_wait_policy']}"
    return "libgomp's default wait"


def __getattr__(name):
    # Heavier submodules load on first use, so `import cnet` stays quick.
    import importlib
    if name in ("optim", "init", "models", "data", "train", "cli"):
        return importlib.import_module(f".{name}", __name__)
    if name == "summary":
        from .models import summary
        return summary
    raise AttributeError(f"module 'cnet' has no attribute {name!r}")
