# The batch-norm kernels that the convolutions run too (_bn_shared_impl.h): the
# per-channel moments of a chunk of rows and the backward's dx of a chunk.

cdef extern from "_bn_shared_impl.h":
    Py_ssize_t BN_PAD(Py_ssize_t C) nogil
    Py_ssize_t BN_SLOT(Py_ssize_t C) nogil
    void bn_slot_moments_f(const float* x, Py_ssize_t n, Py_ssize_t C, double* slot) nogil
    void bn_slot_moments_d(const double* x, Py_ssize_t n, Py_ssize_t C, double* slot) nogil
    void bn_dx_f(const float* x, const float* dy, float* dx, Py_ssize_t n, Py_ssize_t C,
                 const float* mean, const float* a, const float* k, const float* b,
                 const float* alpha, const float* shift, int relu) nogil
    void bn_dx_d(const double* x, const double* dy, double* dx, Py_ssize_t n, Py_ssize_t C,
                 const double* mean, const double* a, const double* k, const double* b,
                 const double* alpha, const double* shift, int relu) nogil
