"""OpenMP queries for cnet._threads (the only caller)."""
from cnet_ext._openmp cimport (CNET_HAVE_OPENMP, omp_get_max_threads,
                               omp_set_num_threads)


def openmp_enabled():
    """True when the kernels were compiled with OpenMP."""
    return bool(CNET_HAVE_OPENMP)


def get_max_threads():
    """OpenMP's default team size for the calling thread (1 without OpenMP)."""
    return omp_get_max_threads()


def set_max_threads(int n):
    """Set the calling thread's default OpenMP team size."""
    if n < 1:
        raise ValueError(f"thread count must be >= 1, got {n}")
    omp_set_num_threads(n)
