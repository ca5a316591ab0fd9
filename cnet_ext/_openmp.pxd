# OpenMP shim shared by every kernel module.
#
# Kernels must build and run without OpenMP: then the omp_* calls below are
# inline stand-ins and Cython's prange runs serially.  Thread counts are never
# read from a global here; the Python layer (cnet/_threads.py) passes n_threads
# into every kernel, so a kernel called from a data-loader thread behaves the
# same as one called from the main thread.

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define CNET_HAVE_OPENMP 1
    #else
    #define CNET_HAVE_OPENMP 0
    static inline int omp_get_max_threads(void) { return 1; }
    static inline int omp_get_thread_num(void) { return 0; }
    static inline int omp_get_num_threads(void) { return 1; }
    static inline void omp_set_num_threads(int n) { (void)n; }
    #endif
    """
    int CNET_HAVE_OPENMP
    int omp_get_max_threads() noexcept nogil
    int omp_get_thread_num() noexcept nogil
    int omp_get_num_threads() noexcept nogil
    void omp_set_num_threads(int n) noexcept nogil


# Below this many scalar operations a parallel region costs more to start
# (waking and joining the other threads) than it saves on a 2-core machine.
cdef enum:
    _MIN_WORK_PER_THREAD = 32768
    # Cheap per-element passes (batch norm, add, ReLU) stay on one thread below
    # this many elements per thread: waking the sleeping core of a passive wait
    # costs ~80 us on the 2-core VM, a pass over 0.5M elements.  ms at 1 / 2
    # threads: BN forward 0.5M elements 0.14 / 0.28, 1M 0.29-0.39 / 0.28-0.35,
    # 2M 0.6-0.96 / 0.5-0.6; add 0.5M 0.07 / 0.10, 1M 0.17 / 0.15, 2M 0.55 / 0.38;
    # relu 0.5M 0.05 / 0.10, 1M 0.11 / 0.13, 2M 0.26 / 0.20.
    _MIN_ELEMENTS_PER_THREAD = 1 << 19

cdef inline int effective_threads(Py_ssize_t work, int n_threads,
                                  Py_ssize_t min_per_thread=_MIN_WORK_PER_THREAD) noexcept nogil:
    """Threads worth using for ``work`` scalar operations, at most n_threads; a kernel
    whose operations are cheap passes its own (larger) minimum per thread."""
    cdef Py_ssize_t useful
    if n_threads <= 1 or CNET_HAVE_OPENMP == 0:
        return 1
    useful = work // min_per_thread
    if useful < 1:
        return 1
    if useful < n_threads:
        return <int>useful
    return n_threads
