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
# min_elements_per_thread() elements per thread: what a parallel region costs to
# start depends on whether the idle OpenMP workers spin (cnet's default, a short
# GOMP_SPINCOUNT: ~5 us) or sleep (OMP_WAIT_POLICY=PASSIVE: ~80 us to wake the
# other core on the 2-core VM).  Read from the same environment libgomp reads
# when it loads (cnet sets it before that), so every module agrees with it.
# add+ReLU, us at 1 / 2 threads, spinning: 64K elements 8.1 / 5.7, 128K 15 / 8.5,
# 512K 52 / 28; sleeping: 64K 8.7 / 57, 512K 53 / 95 (BN forward 1M elements
# 0.29-0.39 / 0.28-0.35 ms).
cdef extern from *:
    """
    #include <stdlib.h>
    #include <string.h>
    #include <strings.h>
    /* libgomp's rule: GOMP_SPINCOUNT if set, else OMP_WAIT_POLICY (PASSIVE: no spin). */
    static int cnet_workers_spin(void) {
        const char *count = getenv("GOMP_SPINCOUNT");
        const char *policy = getenv("OMP_WAIT_POLICY");
        if (count && *count)
            return strtoll(count, NULL, 10) != 0 || strncasecmp(count, "inf", 3) == 0;
        return !(policy && strcasecmp(policy, "passive") == 0);
    }
    static Py_ssize_t cnet_min_elements_per_thread(void) {
        static Py_ssize_t cached = 0;   /* a benign race: every thread computes the same */
        if (!cached)
            cached = cnet_workers_spin() ? (Py_ssize_t)1 << 15 : (Py_ssize_t)1 << 19;
        return cached;
    }
    """
    int cnet_workers_spin() noexcept nogil
    Py_ssize_t cnet_min_elements_per_thread() noexcept nogil

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
