# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Row parts of a GEMM on the OpenMP team, calling numpy's BLAS from C.

A Python task on an OpenMP worker has to take the GIL, and a worker waiting for
it sleeps (~50-100 us to wake on the 2-core VM): as much as a part of a small
GEMM (Linear's 256 x 400 x 120 is ~120 us on one core).  Here each worker calls
the BLAS's cblas_?gemm itself, with no Python in between.  The function
pointers are those of the BLAS numpy links (found by cnet.nn.conv through
threadpoolctl: OpenBLAS's cblas symbols, with 64-bit or 32-bit integers); with
none set, gemm_rows declines and the caller takes its Python tasks.
"""
from cython.parallel cimport prange
from libc.stdint cimport int32_t, int64_t, uintptr_t

import numpy as np

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

cdef void* _sgemm = NULL
cdef void* _dgemm = NULL
cdef bint _int64 = True


def set_gemm(uintptr_t sgemm, uintptr_t dgemm, bint int64):
    """Use these cblas_sgemm / cblas_dgemm addresses (0, 0: none), whose integer
    arguments are 64-bit (int64) or 32-bit."""
    global _sgemm, _dgemm, _int64
    _sgemm = <void*>sgemm
    _dgemm = <void*>dgemm
    _int64 = int64



cdef tuple _operand(x, Py_ssize_t itemsize):
    """(transpose flag, leading dimension, elements from one row to the next) of a 2-D
    operand that is a row-major matrix or the transpose of one, else None."""
    cdef Py_ssize_t s0 = x.strides[0], s1 = x.strides[1], r = x.shape[0], c = x.shape[1]
    if s0 % itemsize or s1 % itemsize:
        return None
    s0 //= itemsize
    s1 //= itemsize
    if s1 == 1 and s0 >= max(c, 1):
        return _NO_TRANS, s0, s0
    if s0 == 1 and s1 >= max(r, 1):
        return _TRANS, s1, 1
    return None


def gemm_rows(a, b, out, Py_ssize_t parts, int n_threads):
    """out = a @ b (2-D, float32 or float64), rows split into ``parts`` ranges
    [m * i // parts, m * (i + 1) // parts) run on an n_threads OpenMP team, each
    one cblas call (the caller pins BLAS to one thread).  ``a`` and ``b`` may be
    row-major or transposed views; ``out`` must be C-contiguous.  Returns False,
    having done nothing, where it cannot (no BLAS pointers, other dtypes or
    strides): the caller then runs the parts itself."""
    cdef Py_ssize_t m, k, n, i, r0, r1, step_a
    cdef int ta, tb
    cdef int64_t lda, ldb
    cdef uintptr_t pa, pb, pc
    cdef bint single
    if (_sgemm == NULL or _dgemm == NULL or a.ndim != 2 or b.ndim != 2 or out.ndim != 2
            or a.dtype != out.dtype or b.dtype != out.dtype
            or out.dtype not in (np.float32, np.float64) or not out.flags.c_contiguous):
        return False
    m, k = a.shape
    n = b.shape[1]
    if b.shape[0] != k or out.shape[0] != m or out.shape[1] != n or min(m, n, k) < 1:
        return False
    if parts < 1 or parts > m:
        raise ValueError(f"gemm_rows: {parts} row parts of {m} rows")
    oa = _operand(a, a.itemsize)
    ob = _operand(b, b.itemsize)
    if oa is None or ob is None or (not _int64 and max(m, n, k, oa[1], ob[1]) >= 2 ** 31):
        return False
    ta, lda, step_a = oa
    tb, ldb = ob[0], ob[1]
    pa = a.__array_interface__["data"][0]
    pb = b.__array_interface__["data"][0]
    pc = out.__array_interface__["data"][0]
    single = out.dtype == np.float32
    with nogil:
        for i in prange(parts, num_threads=max(1, min(n_threads, parts)), schedule="static",
                        chunksize=1):
            r0 = m * i // parts
            r1 = m * (i + 1) // parts
            _call(single, ta, tb, r1 - r0, n, k, pa, lda, pb, ldb, pc, r0 * step_a, r0 * n)
    return True


cdef inline void _call(bint single, int ta, int tb, Py_ssize_t m, Py_ssize_t n, Py_ssize_t k,
                       uintptr_t pa, int64_t lda, uintptr_t pb, int64_t ldb, uintptr_t pc,
                       Py_ssize_t a_off, Py_ssize_t c_off) noexcept nogil:
    if single:
        if _int64:
            (<sgemm64_t>_sgemm)(_ROW_MAJOR, ta, tb, m, n, k, 1, (<const float*>pa) + a_off,
                                lda, <const float*>pb, ldb, 0, (<float*>pc) + c_off, n)
        else:
            (<sgemm32_t>_sgemm)(_ROW_MAJOR, ta, tb, <int32_t>m, <int32_t>n, <int32_t>k, 1,
                                (<const float*>pa) + a_off, <int32_t>lda, <const float*>pb,
                                <int32_t>ldb, 0, (<float*>pc) + c_off, <int32_t>n)
    elif _int64:
        (<dgemm64_t>_dgemm)(_ROW_MAJOR, ta, tb, m, n, k, 1, (<const double*>pa) + a_off, lda,
                            <const double*>pb, ldb, 0, (<double*>pc) + c_off, n)
    else:
        (<dgemm32_t>_dgemm)(_ROW_MAJOR, ta, tb, <int32_t>m, <int32_t>n, <int32_t>k, 1,
                            (<const double*>pa) + a_off, <int32_t>lda, <const double*>pb,
                            <int32_t>ldb, 0, (<double*>pc) + c_off, <int32_t>n)
