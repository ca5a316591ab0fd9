"""The one place that knows cnet's thread counts.

cnet runs two thread pools: the OpenMP team of its own kernels and the BLAS
pool that numpy's matmul uses for the convolution and dense GEMMs.  Both are
set together here.  Kernels never read a global thread count: every call site
passes ``num_threads()`` explicitly, so a kernel called from a data-loader
thread uses the same count as one called from the main thread.

Why cnet's OpenMP workers spin briefly (GOMP_SPINCOUNT=10000, ~0.5 ms here)
before they sleep: a training step is hundreds of parallel regions (every
convolution's chunks run on the OpenMP team too, see nn/conv._run_tasks), and
waking a sleeping worker costs ~50-80 us on the 2-core VM, so with a passive
wait the small batch-norm and add passes were not worth a second thread at
all.  Spinning is safe because nothing else competes for the cores in a step:
the convolutions call BLAS on one thread inside the team, and the BLAS pool
(multithreaded only for large Linear layers and a batch of one image) sleeps
after ~16 cycles (OPENBLAS_THREAD_TIMEOUT=4).  Both must be set before the
libraries load, so cnet/__init__ sets them before it imports any kernel; a
user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.

After os.fork() the child runs cnet's kernels on one thread: GNU OpenMP
cannot start a team in the child of a process that already ran one (it
waits for the parent's workers forever).
"""
import contextlib
import os
import threading

_lock = threading.Lock()
_num_threads = None
_controller = None


def available_cores():
    """The cores this process may run on (affinity mask aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _blas_controller():
    """One cached ThreadpoolController: building one inspects every loaded library."""
    global _controller
    if _controller is None:
        import numpy  # noqa: F401  (make sure numpy's BLAS is loaded and visible)
        from threadpoolctl import ThreadpoolController
        _controller = ThreadpoolController()
    return _controller


_CBLAS_NAMES = [("scipy_cblas_sgemm64_", "scipy_cblas_dgemm64_", True),   # numpy >= 2 wheels
                ("cblas_sgemm64_", "cblas_dgemm64_", True),
                ("cblas_sgemm", "cblas_dgemm", None)]     # int width from the build config
_cblas = None


def cblas_gemm():
    """(sgemm address, dgemm address, 64-bit integers, get-threads address,
    set-threads address) of the cblas GEMMs and the thread-count functions
    (openblas_get/set_num_threads with the same affixes; 0 where missing) in the
    BLAS numpy uses, or None: OpenBLAS only, where its symbols can be found and
    their integer width is known.  Cached; the library stays loaded with numpy."""
    global _cblas
    if _cblas is not None:
        return _cblas or None
    import ctypes
    found = ()
    for lib in _blas_controller().lib_controllers:
        if lib.user_api != "blas" or lib.internal_api != "openblas" or found:
            continue
        try:
            dll = ctypes.CDLL(lib.filepath)
        except OSError:
            continue
        for sname, dname, int64 in _CBLAS_NAMES:
            if not (hasattr(dll, sname) and hasattr(dll, dname)):
                continue
            if int64 is None:         # plain names: ILP64 builds say so in their config
                get_config = getattr(dll, "openblas_get_config", None)
                if get_config is None:
                    break
                get_config.restype = ctypes.c_char_p
                int64 = b"USE64BITINT" in (get_config() or b"")
            prefix = "scipy_" if sname.startswith("scipy_") else ""
            suffix = "64_" if sname.endswith("64_") else ""
            found = (_address(dll, sname), _address(dll, dname), int64,
                     _address(dll, f"{prefix}openblas_get_num_threads{suffix}"),
                     _address(dll, f"{prefix}openblas_set_num_threads{suffix}"))
            break
    _cblas = found
    return found or None


def _address(dll, name):
    import ctypes
    return ctypes.cast(getattr(dll, name), ctypes.c_void_p).value if hasattr(dll, name) else 0


def num_threads():
    """Thread count for kernels and BLAS (hot path: a global read)."""
    n = _num_threads
    return n if n is not None else _init_default()


def _init_default():
    env = os.environ.get("CNET_NUM_THREADS")
    n = int(env) if env else available_cores()
    set_num_threads(n)
    return n


def set_num_threads(n):
    """Use ``n`` threads for cnet's OpenMP kernels and for the BLAS pool."""
    global _num_threads
    n = int(n)
    if n < 1:
        raise ValueError(f"set_num_threads: n must be >= 1, got {n}")
    from cnet_ext import _openmp_helpers
    with _lock:
        _num_threads = n
        _openmp_helpers.set_max_threads(n)
        _blas_controller().limit(limits=n, user_api="blas")


def _one_thread_after_fork():
    global _num_threads
    _num_threads = 1
    from cnet_ext import _openmp_helpers
    _openmp_helpers.set_max_threads(1)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_one_thread_after_fork)


def get_num_threads():
    """The thread count set by set_num_threads (default: available cores)."""
    return num_threads()


@contextlib.contextmanager
def threads(n):
    """Temporarily run cnet's kernels and BLAS with ``n`` threads."""
    previous = num_threads()
    set_num_threads(n)
    try:
        yield n
    finally:
        set_num_threads(previous)


def blas_info():
    """What threadpoolctl sees: one dict per loaded BLAS / OpenMP library."""
    return [dict(api=i.get("user_api"), internal_api=i.get("internal_api"),
                 version=i.get("version"), num_threads=i.get("num_threads"),
                 architecture=i.get("architecture"), filepath=i.get("filepath"))
            for i in _blas_controller().info()]
