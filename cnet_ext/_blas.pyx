# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Row parts of a GEMM on the OpenMP team, calling numpy's BLAS from C.

A Python task on an OpenMP worker has to take the GIL, and a worker waiting for
it sleeps (~50-100 us to wake on the 2-core VM): as much as a part of a small
GEMM (Linear's 256 x 400 x 120 is ~120 us on one core).  Here each worker calls
the BLAS's cblas_?gemm itself, with no Python in between.  The function
pointers are those of the BLAS numpy links (found by cnet.nn.conv through
threadpoolctl: OpenBLAS's cblas symbols, with 64-bit or 32-bit integers, and its
thread-count functions); with none set, gemms declines and the caller takes its
Python tasks.
"""
from cython.parallel cimport prange
from libc.stdint cimport int32_t, int64_t, uintptr_t

import numpy as np
cimport numpy as cnp

cnp.import_array()

cdef enum:
    _ROW_MAJOR = 101      # CBLAS_ORDER / CBLAS_TRANSPOSE values
    _NO_TRANS = 111
    _TRANS = 112

ctypedef void (*sgemm64_t)(int, int, int, int64_t, int64_t, int64_t, float, const float*,
                           int64_t, const float*, int64_t, float, float*, int64_t) noexcept nogil
ctypedef void (*dgemm64_t)(int, int, int, int64_t, int64_t, int64_t, double, const double*,
                           int64_t, const double*, int64_t, double, double*,
                           int64_t) noexcept nogil
ctypedef void (*sgemm32_t)(int, int, int, int32_t, int32_t, int32_t, float, const float*,
                           int32_t, const float*, int32_t, float, float*, int32_t) noexcept nogil
ctypedef void (*dgemm32_t)(int, int, int, int32_t, int32_t, int32_t, double, const double*,
                           int32_t, const double*, int32_t, double, double*,
                           int32_t) noexcept nogil

ctypedef int (*get_threads_t)() noexcept nogil
ctypedef void (*set_threads_t)(int) noexcept nogil

cdef void* _sgemm = NULL
cdef void* _dgemm = NULL
cdef bint _int64 = True
cdef get_threads_t _get_threads = NULL
cdef set_threads_t _set_threads = NULL


def set_gemm(uintptr_t sgemm, uintptr_t dgemm, bint int64, uintptr_t get_threads=0,
             uintptr_t set_threads=0):
    """Use these cblas_sgemm / cblas_dgemm addresses (0, 0: none), whose integer
    arguments are 64-bit (int64) or 32-bit, and the BLAS's get/set thread-count
    functions (int(void), void(int); 0: none, and gemms leaves pinning BLAS to
    its caller)."""
    global _sgemm, _dgemm, _int64, _get_threads, _set_threads
    _sgemm = <void*>sgemm
    _dgemm = <void*>dgemm
    _int64 = int64
    _get_threads = <get_threads_t>get_threads
    _set_threads = <set_threads_t>set_threads


def pins_blas():
    """Whether gemms pins BLAS to one thread itself around a parallel region."""
    return _get_threads != NULL and _set_threads != NULL



cdef bint _operand(cnp.ndarray x, int* trans, int64_t* ld, Py_ssize_t* step) noexcept:
    """Transpose flag, leading dimension and elements from one row to the next of a
    2-D operand that is a row-major matrix or the transpose of one; False if it is
    neither."""
    cdef Py_ssize_t itemsize = cnp.PyArray_ITEMSIZE(x)
    cdef Py_ssize_t s0 = cnp.PyArray_STRIDE(x, 0), s1 = cnp.PyArray_STRIDE(x, 1)
    cdef Py_ssize_t r = cnp.PyArray_DIM(x, 0), c = cnp.PyArray_DIM(x, 1)
    if s0 % itemsize or s1 % itemsize:
        return False
    s0 //= itemsize
    s1 //= itemsize
    if s1 == 1 and s0 >= max(c, 1):
        trans[0], ld[0], step[0] = _NO_TRANS, s0, s0
        return True
    if s0 == 1 and s1 >= max(r, 1):
        trans[0], ld[0], step[0] = _TRANS, s1, 1
        return True
    return False


cdef extern from *:
    """
    #include "_simd.h"
    /* Linear's epilogue on rows of its output while they are in cache: out += bias,
     * then max(out, 0) (NaN passes through, as torch.relu) where relu is set. */
    #define CNET_BIAS_ACT(T, SFX) \
    CNET_CLONES static void cnet_bias_act_##SFX(T *out, const T *bias, Py_ssize_t rows, \
                                                 Py_ssize_t n, int relu) \
    { \
        for (Py_ssize_t r = 0; r < rows; r++) { \
            T *o = out + r * n; \
            if (bias) { \
                CNET_SIMD for (Py_ssize_t c = 0; c < n; c++) o[c] += bias[c]; \
            } \
            if (relu) { \
                CNET_SIMD for (Py_ssize_t c = 0; c < n; c++) { \
                    T v = o[c]; \
                    o[c] = v < (T)0 ? (T)0 : v; \
                } \
            } \
        } \
    }
    CNET_BIAS_ACT(float, f32)
    CNET_BIAS_ACT(double, f64)
    """
    void cnet_bias_act_f32(float*, const float*, Py_ssize_t, Py_ssize_t, int) noexcept nogil
    void cnet_bias_act_f64(double*, const double*, Py_ssize_t, Py_ssize_t, int) noexcept nogil


# Row parts start at multiples of this many rows.  A BLAS kernel runs whole blocks of
# rows (its register tile: 12 for OpenBLAS's Haswell sgemm, 2 for its dgemm) with one
# instruction sequence and a last partial block with another, whose sums can round
# differently (Zen 5 with OPENBLAS_CORETYPE=Haswell: a 513-row product split at any
# row but a multiple of 12 changed 2-9% of the elements).  Splits at a multiple of
# every such block leave each row in the kind of block the whole product puts it in.
cdef enum:
    _ROW_ALIGN = 48
ROW_ALIGN = _ROW_ALIGN


cdef inline Py_ssize_t _row_bound(Py_ssize_t m, Py_ssize_t part, Py_ssize_t parts) noexcept nogil:
    """First row of row part ``part`` of ``parts`` (m at part == parts): the even
    split rounded to the nearest multiple of ROW_ALIGN; a part may be empty."""
    cdef Py_ssize_t r = (m * part // parts + _ROW_ALIGN // 2) // _ROW_ALIGN * _ROW_ALIGN
    return m if part >= parts or r > m else r


def row_bound(Py_ssize_t m, Py_ssize_t part, Py_ssize_t parts):
    """First row of part ``part`` of an m-row product split in ``parts`` (_row_bound):
    where gemms and cnet's Python row parts split a product."""
    return _row_bound(m, part, parts)


cdef struct GemmJob:
    int ta, tb
    Py_ssize_t m, n, k, step_a, parts, first_task
    int64_t lda, ldb
    uintptr_t pa, pb, pc, pbias
    bint relu, accumulate


cdef enum:
    _MAX_JOBS = 4


def gemms(jobs, int n_threads, bint blas_pool=False):
    """Several independent GEMMs in one parallel region: for each job
    ``(a, b, out, parts, accumulate, bias, relu)``, out = a @ b (out += a @ b with
    ``accumulate``), then out += bias (a 1-D array of out's columns, or None) and
    ReLU where ``relu`` is set, each row part [row_bound(m, i, parts), row_bound(m,
    i + 1, parts)) one task: its cblas call and its epilogue while the rows are in cache.  Tasks
    are dealt round-robin over an n_threads OpenMP team, BLAS pinned to one
    thread meanwhile (here where set_gemm gave its thread-count functions, see
    pins_blas, else by the caller), unless ``blas_pool`` (one thread running
    large products with BLAS's own threads).  A job's row split never changes an
    element's sum.  Linear runs its backward's weight gradient and input gradient
    as two jobs: one hand-off instead of two, and on two threads one whole GEMM
    each.  Returns False, having done nothing, where a job cannot run here (no
    BLAS pointers, other dtypes, strides or shapes).

    Operands are read through the numpy C API and BLAS is pinned from C: Python
    attribute access (__array_interface__, dtype tests) and threadpoolctl took
    ~9 us a call, 7-70% of LeNet's Linear GEMMs; now 0.25 us."""
    cdef GemmJob js[_MAX_JOBS]
    cdef Py_ssize_t n_jobs = len(jobs), total = 0, i, j, m, k, n
    cdef cnp.ndarray a, b, out, bias
    cdef int type_num = -1, blas_threads = 1
    cdef bint pin, single
    if _sgemm == NULL or _dgemm == NULL or n_jobs < 1 or n_jobs > _MAX_JOBS:
        return False
    for j in range(n_jobs):
        job = jobs[j]
        a, b, out, parts = job[0], job[1], job[2], job[3]
        bias = job[5]
        if a is None or b is None or out is None:
            return False
        if (cnp.PyArray_NDIM(a) != 2 or cnp.PyArray_NDIM(b) != 2 or cnp.PyArray_NDIM(out) != 2
                or not cnp.PyArray_IS_C_CONTIGUOUS(out)):
            return False
        if j == 0:
            type_num = cnp.PyArray_TYPE(out)
            if type_num != cnp.NPY_FLOAT32 and type_num != cnp.NPY_FLOAT64:
                return False
        if (cnp.PyArray_TYPE(out) != type_num or cnp.PyArray_TYPE(a) != type_num
                or cnp.PyArray_TYPE(b) != type_num):
            return False
        m, k, n = cnp.PyArray_DIM(a, 0), cnp.PyArray_DIM(a, 1), cnp.PyArray_DIM(b, 1)
        if (cnp.PyArray_DIM(b, 0) != k or cnp.PyArray_DIM(out, 0) != m
                or cnp.PyArray_DIM(out, 1) != n or min(m, n, k) < 1):
            return False
        if bias is not None and (cnp.PyArray_TYPE(bias) != type_num or cnp.PyArray_NDIM(bias) != 1
                                 or cnp.PyArray_DIM(bias, 0) != n
                                 or not cnp.PyArray_IS_C_CONTIGUOUS(bias)):
            return False
        if parts < 1 or parts > m:
            raise ValueError(f"gemms: {parts} row parts of {m} rows")
        if (not _operand(a, &js[j].ta, &js[j].lda, &js[j].step_a)
                or not _operand(b, &js[j].tb, &js[j].ldb, &i)
                or (not _int64 and max(m, n, k, js[j].lda, js[j].ldb) >= 2 ** 31)):
            return False
        js[j].m, js[j].n, js[j].k = m, n, k
        js[j].parts, js[j].first_task = parts, total
        js[j].pa = <uintptr_t>cnp.PyArray_DATA(a)
        js[j].pb = <uintptr_t>cnp.PyArray_DATA(b)
        js[j].pc = <uintptr_t>cnp.PyArray_DATA(out)
        js[j].pbias = 0 if bias is None else <uintptr_t>cnp.PyArray_DATA(bias)
        js[j].relu, js[j].accumulate = job[6], job[4]
        total += parts
    single = type_num == cnp.NPY_FLOAT32
    with nogil:
        # Each task is one BLAS call on one thread: BLAS's own pool stays out
        # unless the caller asks for it (large products on one thread).
        pin = not blas_pool and _get_threads != NULL and _set_threads != NULL
        if pin:
            blas_threads = _get_threads()
            pin = blas_threads != 1
            if pin:
                _set_threads(1)
        if n_threads <= 1 or total == 1:
            for i in range(total):
                _run_task(js, n_jobs, i, single)
        else:
            for i in prange(total, num_threads=min(n_threads, total), schedule="static",
                            chunksize=1):
                _run_task(js, n_jobs, i, single)
        if pin:
            _set_threads(blas_threads)
    return True


cdef inline void _run_task(GemmJob* js, Py_ssize_t n_jobs, Py_ssize_t task,
                           bint single) noexcept nogil:
    cdef Py_ssize_t j = 0, part, r0, r1
    while j + 1 < n_jobs and task >= js[j + 1].first_task:
        j += 1
    part = task - js[j].first_task
    r0 = _row_bound(js[j].m, part, js[j].parts)
    r1 = _row_bound(js[j].m, part + 1, js[j].parts)
    if r1 == r0:
        return
    _call(single, js[j].ta, js[j].tb, r1 - r0, js[j].n, js[j].k, js[j].pa, js[j].lda,
          js[j].pb, js[j].ldb, js[j].pc, r0 * js[j].step_a, r0 * js[j].n, js[j].accumulate)
    if js[j].pbias or js[j].relu:
        if single:
            cnet_bias_act_f32((<float*>js[j].pc) + r0 * js[j].n, <const float*>js[j].pbias,
                              r1 - r0, js[j].n, js[j].relu)
        else:
            cnet_bias_act_f64((<double*>js[j].pc) + r0 * js[j].n, <const double*>js[j].pbias,
                              r1 - r0, js[j].n, js[j].relu)


cdef inline void _call(bint single, int ta, int tb, Py_ssize_t m, Py_ssize_t n, Py_ssize_t k,
                       uintptr_t pa, int64_t lda, uintptr_t pb, int64_t ldb, uintptr_t pc,
                       Py_ssize_t a_off, Py_ssize_t c_off, bint accumulate) noexcept nogil:
    cdef int beta = 1 if accumulate else 0
    if single:
        if _int64:
            (<sgemm64_t>_sgemm)(_ROW_MAJOR, ta, tb, m, n, k, 1, (<const float*>pa) + a_off,
                                lda, <const float*>pb, ldb, beta, (<float*>pc) + c_off, n)
        else:
            (<sgemm32_t>_sgemm)(_ROW_MAJOR, ta, tb, <int32_t>m, <int32_t>n, <int32_t>k, 1,
                                (<const float*>pa) + a_off, <int32_t>lda, <const float*>pb,
                                <int32_t>ldb, beta, (<float*>pc) + c_off, <int32_t>n)
    elif _int64:
        (<dgemm64_t>_dgemm)(_ROW_MAJOR, ta, tb, m, n, k, 1, (<const double*>pa) + a_off, lda,
                            <const double*>pb, ldb, beta, (<double*>pc) + c_off, n)
    else:
        (<dgemm32_t>_dgemm)(_ROW_MAJOR, ta, tb, <int32_t>m, <int32_t>n, <int32_t>k, 1,
                            (<const double*>pa) + a_off, <int32_t>lda, <const double*>pb,
                            <int32_t>ldb, beta, (<double*>pc) + c_off, <int32_t>n)
