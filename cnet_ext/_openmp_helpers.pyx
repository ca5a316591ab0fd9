"""OpenMP queries for cnet._threads, and the task runner of cnet.nn.conv."""
from cython.parallel cimport parallel
from cnet_ext._openmp cimport (CNET_HAVE_OPENMP, cnet_min_elements_per_thread,
                               cnet_workers_spin, omp_get_max_threads, omp_get_thread_num,
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



def workers_spin():
    """Whether idle OpenMP workers spin before they sleep (the environment libgomp
    read), and the per-thread element minimum of the cheap passes that follows."""
    return bool(cnet_workers_spin()), cnet_min_elements_per_thread()


cdef extern from *:
    """
    static inline Py_ssize_t cnet_next_task(Py_ssize_t *counter) {
        return __atomic_fetch_add(counter, 1, __ATOMIC_RELAXED);
    }
    """
    Py_ssize_t cnet_next_task(Py_ssize_t *counter) noexcept nogil


def run_tasks(fn, Py_ssize_t n_tasks, int n_threads):
    """Call fn(task, worker) for every task in range(n_tasks) on an OpenMP team of
    n_threads; the caller is worker 0.

    The team is the one the kernels use, so a worker that finishes a layer's
    chunks spins on into the next kernel's parallel region (GOMP_SPINCOUNT)
    instead of sleeping on a Python thread pool's lock: ~5 us per hand-off
    instead of ~50-80 on the 2-core VM, and no second pool whose spinning
    steals the core.  Each task runs under the GIL (fn calls kernels and BLAS,
    which release it).  Tasks are taken in order as workers free up, so a
    slower core takes fewer.  After an exception no further task starts, and the
    first exception is raised here once the team has joined.
    """
    cdef Py_ssize_t counter = 0
    cdef Py_ssize_t t
    cdef int wid
    errors = []
    if n_threads < 1:
        raise ValueError(f"run_tasks: n_threads must be >= 1, got {n_threads}")
    with nogil, parallel(num_threads=n_threads):
        wid = omp_get_thread_num()
        while True:
            t = cnet_next_task(&counter)
            if t >= n_tasks:
                break
            with gil:
                if errors:
                    t = n_tasks
                else:
                    try:
                        fn(t, wid)
                    except BaseException as exc:
                        errors.append(exc)
            if t >= n_tasks:
                break
    if errors:
        raise errors[0]
