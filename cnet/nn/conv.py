"""Conv2d and Linear over NHWC activations and HWIO kernels.

How a convolution runs (kernels in cnet_ext/_conv.pyx):

- Few output channels per group (<= 128 with AVX-512, else 32; whole SIMD
  vectors): a register-blocked direct kernel computes the output, the weight
  gradient and, at stride 1, the input gradient (a convolution of dy with the
  flipped kernel), with no im2col at all.  Skinny GEMMs are where BLAS is
  weakest, and a grouped layer is G of them (ResNeXt).  Fewer
  outputs than one vector (LeNet's 6) run the direct forward with a zero-padded
  weight, and, when a kernel row has KW * C_in <= 8 values, a weight gradient
  that keeps one accumulator per value of the row.
- Ungrouped spatial layers on maps up to 32 wide, any channel count: the same
  direct kernels with blocks of 8 images at one output pixel instead of 8
  pixels of a row (Conv2d._shape_paths): every image of a block has the same
  in-bounds taps, so the padding products that im2col multiplies (3x3: 31% at
  4x4) are skipped; wide weights are repacked per channel block.  Not for
  batches that fill a block worse than the other path fills its own (one
  image would be computed 8 times: Conv2d._image_blocks_fill).
- One input channel and few outputs (LeNet's conv1, 1 -> 6; AVX-512): the
  narrow kernels put pixels, not channels, in the vector lanes (forward and
  weight gradient; the channel-vector kernels would fill 6 of 16 lanes).
- Few inputs (a kernel row's KW * C_in values fill more than one vector, at most
  two; LeNet's conv2): dx without col2im, each output pixel's dy scattered onto
  its input window (_conv.conv_scatter_dx).
- A first layer (1-4 inputs, stride 1, up to 32 outputs; LeNet's and ResNet-20's
  conv1) whose input gradient is asked for: dx with pixels in the vector lanes,
  from dy's channels as zero-bordered planes (_conv.conv_planar_dx).
- 1x1, stride 1, padding 0: the NHWC input already *is* the column matrix
  (N*H*W, C), so the convolution is one GEMM with no im2col.
- Otherwise im2col of a chunk of images into a column buffer small enough to
  stay in cache (1 MB; 8 MB for layers with >= 256 outputs per group, whose
  GEMMs need rows more than cache), then one GEMM straight into the NHWC
  output; backward recomputes the chunk's columns from the saved input (a
  ResNet-20 stage-1 column matrix would be 75 MB per layer) and scatters the
  column gradient back with a race-free gather (col2im).
- Groups are one batched GEMM over a (G, M, K) x (G, K, C_out/G) stack: numpy's
  matmul hands every group to BLAS with strided views of the column buffer,
  the HWIO weight and the NHWC output, so nothing is copied or transposed.

Threads: chunks of whole images are the unit of work.  Each worker thread runs
a whole chunk (im2col, GEMMs with a one-thread BLAS, col2im) so a layer has one
hand-off instead of several per chunk; the workers are the kernels' OpenMP
team (see _run_tasks).  A batch of two or more
images is split into at least as many chunks as the machine has cores, in whole
rounds for the cores and the backward's stripes (_balanced_chunks).
Chunking depends only on shapes (and that core count, not the thread count),
and weight gradients are summed per fixed stripe of chunks and then in stripe
order, so results are bitwise the same for any thread count.  Linear's small
GEMMs run in row parts on the same team, one BLAS thread each (_gemm).

The chunking plan is made once per input shape and dtype; scratch buffers
(column buffers, gradient slots) are shared by all layers of the calling
thread (_scratch); outputs and input gradients are fresh arrays.  Training
mode keeps a reference to the input for backward; eval mode keeps nothing.
"""
import contextlib
import math
import threading

import numpy as np

from cnet_ext import _batchnorm, _blas, _conv, _elementwise, _openmp_helpers

from .. import init
from .. import _threads
from .._args import int_pair
from .._threads import num_threads
from .module import (Module, Parameter, add_into, check_input, runs_own, require_cache,
                     residual_fits)

__all__ = ["Conv2d", "Linear"]

# Column-buffer bytes per chunk of images: small enough to stay in one core's
# L2 while it is written by im2col and read by the GEMM (bench/conv_layers.py).
_COL_CHUNK_BYTES = 1 << 20
# Wide layers (>= _WIDE_CHANNELS outputs per group) take bigger chunks: their GEMM
# does N flops per column value, so the columns' trip through L3 costs little,
# while a chunk of few rows makes skinny GEMMs and a K x N weight-gradient
# product written and summed per chunk.  One thread, fwd+bwd, 1 MB -> 8 MB:
# VGG 512 ch at 4x4 (batch 64) 228 -> 155 ms, at 2x2 59 -> 41 ms; 256 ch at
# 8x8 190 -> 155 ms; ResNet-18 512 ch at 2x2 (batch 32) 30 -> 22 ms.  Not for 1x1
# layers, whose GEMM reads the input in place: OpenBLAS runs their forward faster
# with fewer rows (ResNeXt 32x32x128->256, batch 64, 2 threads, 8 MB -> 1 MB:
# forward 27.4 -> 24.8 ms, fwd+bwd 75.1 -> 72.3; 16x16 and 8x8 layers a tie).
_WIDE_CHANNELS = 256
_WIDE_CHUNK_BYTES = 8 << 20
# Layers whose forward and weight gradient need no column buffer (direct and
# depthwise kernels) take bigger chunks (counted in column-equivalent bytes):
# fewer calls, same balance (ResNet-20 stage 1: 19 chunks, ~10% faster than 128).
_KERNEL_CHUNK_BYTES = 4 << 20
# Backward sums weight gradients over at most this many stripes of chunks (the
# parallelism of the weight-gradient GEMMs), with all slots under _STRIPE_BYTES.
_STRIPES = 8
_STRIPE_BYTES = 32 << 20
# The direct kernels (no im2col) beat im2col + BLAS up to this many channels.
# One thread on the AVX-512 dev box (8-pixel x 2-vector blocks), GFLOP/s direct
# vs im2col+BLAS: 16 ch 105/30 forward, 115/31 weight gradient; 64 ch 117/69,
# 112/66; 128 ch 78/57, 73/55; 256 ch a tie; 512 ch (7x7) BLAS wins.  With
# AVX2's 16 registers (6 x 1 blocks) they tie with BLAS from 64 channels.
_DIRECT_MAX_CHANNELS = 128 if _conv._wide_vectors() else 32
_DIRECT_MAX_POINTWISE = min(64, _DIRECT_MAX_CHANNELS)
# im2col layers (groups 1, dilation 1) whose columns would be at least this
# fraction padding zeros run by regions instead (see _tap_runs): VGG's 3x3 at
# 4x4 (31% zeros) and 2x2 (56%), ResNet-18's layer3/layer4.
# They run one chunk of images per core, and only where the smallest region (a
# corner: one pixel per image) still gives its GEMM this many rows: batch 64 /
# 2 chunks, 2 threads, region / plain time: 8x8x256 0.91, 4x4x512 0.99, 2x2x512
# 0.86; batch 32 (16 rows): 8x8x128 s2 1.07, 4x4x256 1.24, 2x2x512 1.11.
_REGION_MIN_ZEROS = 0.05
_REGION_MIN_ROWS = 32
# Output widths up to this run the direct kernels over blocks of images
# (Conv2d._shape_paths), for any channel count.  2 threads, fwd+bwd / forward ms,
# row blocks -> image blocks: 32x32x16 (batch 128) 11.9 -> 11.0 / 3.75 -> 3.41,
# 16x16x32 10.7 -> 10.3 / 3.44 -> 3.19, LeNet's 10x10x16 5.1 -> 4.7 / 1.43 -> 0.88.
# Not for grouped layers: their channel blocks are outermost, so each group
# streams the chunk's input again, and chunks of whole 8-image blocks make the
# column buffers of a strided layer's dx too big for cache (ResNeXt fwd+bwd, 2
# threads, rows -> images: 32x32x128 g8 64 -> 81 ms, 16x16x512 s2 g8 45 -> 64,
# 8x8x512 g8 38 -> 40).
_IMAGE_BLOCK_MAX_WIDTH = 32
# Weights of at least this size are repacked for the image-blocked kernel, one
# contiguous piece per block of output channels: as HWIO rows a block is 64 B
# every C_out values, which at 512 outputs maps onto 1/16 of L2's sets and is
# evicted between images (VGG 4x4x512, batch 64, one thread: 40 -> 31 ms).
_PACK_WEIGHT_BYTES = 1 << 20
# Forward GEMMs of at most this many output pixels (all images) read the weight in
# place instead of packing it per call (Conv2d._forward_gemm_operand).
_GEMM_INPLACE_ROWS = 256
# Eval mode: Sequential lets a direct layer apply the next batch norm per chunk
# (Python tasks, Conv2d.forward_with_batchnorm) only when its output is at least
# this big (Conv2d.folds_batchnorm); below,
# the kernel runs all chunks without Python and the batch norm's pass stays in
# L3.  2 threads, inference, two calls -> per chunk: ResNet-20 (8 MB maps)
# 52 -> 55 ms; ResNeXt-29 (32-67 MB maps) 733-765 -> 691-708 ms.
_FOLD_DIRECT_BYTES = 16 << 20
# Before both, Sequential puts an eval batch norm into a direct or 1x1 layer's weights
# (forward_with_folded_batchnorm: no batch-norm pass at all) where the weight is at
# most this fraction of the output: scaling a weight costs a pass over it per
# forward, which for the wide layers of small maps is more than the batch norm's
# pass (2 threads, inference, folding every small direct layer: VGG-11-BN 38.4 ->
# 49.6 ms, ResNet-18 21.7 -> 27.2; ResNet-20's 9-147 KB weights against 2-8 MB maps:
# 28.3 -> 27.8 at a ratio of 16; 8, which adds its 8x8x64 layers (147 KB against
# 2 MB), 25.05 -> 24.75 and 26.19 -> 25.73).  Direct layers over _FOLD_DIRECT_BYTES
# too, instead of per chunk: VGG-11-BN 35.26 -> 34.74, ResNeXt-29 318.5 -> 313.4; and its
# 1x1 layers on cnet's GEMM (17 of 19, 128 KB-1 MB weights against 8-67 MB maps; the bias
# and ReLU in the GEMM's store), 4 alternating processes: 319-326 -> 305-313 ms.
_FOLD_WEIGHT_RATIO = 8
# Chunks per layer at least (and a multiple of it where the batch allows).
_MIN_TASKS = _threads.available_cores()
# Stripes per backward at most: _STRIPES in whole rounds of the cores.
_STRIPE_UNIT = max(_MIN_TASKS, _STRIPES - _STRIPES % _MIN_TASKS)

# GEMMs under this many multiply-adds (~0.7 ms on one core) do not use BLAS's own
# threads (Linear): ResNet-18's classifier (32 x 512 x 200) took 0.07 ms on one
# thread, 24-50 ms on two while another process kept the second core busy.
# Instead they are split by rows over the OpenMP team, each part on one BLAS
# thread.  Where the BLAS's cblas symbols are known (_threads.cblas_gemm) every
# worker calls it from C (_blas.gemms), parts of _MIN_PART_MACS_C (~20 us);
# else a part is a Python task, and a worker that waits for the GIL sleeps (~50-100
# us to wake), so parts are _MIN_PART_MACS (~80 us).  Linear fwd+bwd, 2 threads,
# ms (min of 200), one thread -> Python tasks -> C: LeNet's fc1 (256 x 400 x 120)
# 0.76 -> 0.60-0.63 -> 0.47; fc2 (256 x 120 x 84) 0.20 -> (1M-MAC tasks 0.29) ->
# 0.15; 32 x 512 x 200 0.28-0.31 -> (0.37) -> 0.23; 128 x 400 x 120 0.44 -> 0.27-0.32.
_SMALL_GEMM_MACS = 1 << 25
_MIN_PART_MACS = 1 << 22
_MIN_PART_MACS_C = 1 << 20

_scratch_store = threading.local()


def _scratch(name, shape, dtype):
    """A scratch array for one layer call, shared by every layer run from this thread.

    Column buffers, gradient slots and the like are dead once the layer call
    returns, and layers run one at a time, so one buffer per name (grown to the
    largest request) serves them all: peak memory is the biggest layer's
    scratch, not the sum over layers (VGG-11 at batch 64: ~120 MB of per-layer
    column buffers).  Per calling thread, so models driven from different
    threads do not share.  Names must differ within a call.
    """
    store = getattr(_scratch_store, "bufs", None)
    if store is None:
        store = _scratch_store.bufs = {}
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    buf = store.get(name)
    if buf is None or buf.nbytes < nbytes:
        buf = store[name] = np.empty(max(nbytes, 1), np.uint8)
    return buf[:nbytes].view(dtype).reshape(shape)


def _packed_gemm_operand(b, n_threads):
    """b (K x N) packed for _conv.gemm_packed into the calling thread's scratch (one
    layer call packs one operand at a time: no allocation per call)."""
    size = _conv.gemm_packed_size(b.shape[0], b.shape[1], b.dtype)
    return _conv.gemm_pack(b, _scratch("gemm_b", (size,), b.dtype), n_threads)


def _balanced_chunks(n, wanted):
    """How many chunks to split a batch of n images into, given the wanted count.

    At least _MIN_TASKS (a machine constant, not the thread count, so results do
    not depend on it): fewer tasks than threads would hand one chunk to parallel
    kernels and BLAS, a hand-off per call that costs several ms when the cores
    are shared.  A multiple of the cores, and beyond _STRIPES a multiple of the
    stripe count, so that the threads and the backward's stripes all get the
    same number of images (chunk t is images [t*n // n_chunks, (t+1)*n // n_chunks):
    sizes differ by at most one, and are equal where up to 1.5x the chunks do it).
    ResNet-20 stage 1 (batch 128) had 19 chunks of 7 images (one 2) in 8 stripes
    of 2 or 3 chunks: a thread idled ~10% of the layer's backward.
    """
    n_chunks = min(n, max(wanted, _MIN_TASKS))
    unit = _STRIPE_UNIT if n_chunks > _STRIPE_UNIT else _MIN_TASKS
    n_chunks = min(n, -(-n_chunks // unit) * unit)
    # Up to half again as many chunks where that makes them all the same size.
    exact = [k for k in range(n_chunks, min(n, n_chunks * 3 // 2) + 1, unit)
             if n % k == 0 and k % (_STRIPE_UNIT if k > _STRIPE_UNIT else _MIN_TASKS) == 0]
    return exact[0] if exact else n_chunks


def _stripes(n_chunks, weight_bytes):
    """Stripes for the backward's weight-gradient sums: a divisor of n_chunks (equal
    stripes), a multiple of the cores where it can be, all slots under _STRIPE_BYTES."""
    cap = max(1, min(n_chunks, _STRIPE_UNIT, _STRIPE_BYTES // max(1, weight_bytes)))
    divisors = [s for s in range(1, cap + 1) if n_chunks % s == 0]
    even = [s for s in divisors if s % _MIN_TASKS == 0]
    return max(even or divisors)


def _run_tasks(fn, n_tasks, n_threads):
    """Call fn(task, worker, kernel_threads) for every task in range(n_tasks) on
    n_threads threads.

    Why threads over chunks instead of parallel kernels and a multithreaded
    BLAS: each worker runs im2col, its GEMMs and col2im on its own chunk with a
    single-threaded BLAS, so a layer has one hand-off instead of four per chunk
    (every hand-off costs a wake-up, and several milliseconds when the cores are
    shared).  The workers are the kernels' own OpenMP team
    (_openmp_helpers.run_tasks), which spins briefly between parallel regions,
    so the next layer's chunks or the batch norm after them start without
    waking a sleeping thread.  Tasks are taken dynamically (a slow core takes
    fewer), which cannot change results: a task writes only its own outputs.
    The caller's thread is worker 0.

    kernel_threads is the thread count for fn's own kernels and BLAS: 1 on the
    team; n_threads when there are fewer tasks than threads (a batch of one
    large image), where the tasks run in turn on this thread with parallel
    kernels and BLAS instead.  Task results do not depend on it.
    """
    if n_threads <= 1 or n_tasks < n_threads:
        for t in range(n_tasks):
            fn(t, 0, n_threads)
        return
    with _one_thread_blas():
        _openmp_helpers.run_tasks(lambda t, worker: fn(t, worker, 1), n_tasks, n_threads)


@contextlib.contextmanager
def _one_thread_blas(enabled=True):
    """Pin the BLAS pool to one thread inside the block (restored afterwards)."""
    if not enabled:
        yield
        return
    blas = [lib for lib in _threads._blas_controller().lib_controllers
            if lib.user_api == "blas"]
    saved = [lib.num_threads for lib in blas]
    for lib in blas:
        lib.set_num_threads(1)
    try:
        yield
    finally:
        for lib, n in zip(blas, saved):
            lib.set_num_threads(n)


def _gemm(a, b, out):
    """out = a @ b (2-D), where _blas.gemms cannot run it (_gemms' fallback: no cblas
    symbols, or operands it declines).  Large GEMMs use BLAS's threads; small ones
    (waking BLAS's sleeping pool costs more than they take) run in row parts as
    Python tasks on the OpenMP team (or on this thread), each part on one BLAS
    thread.  Each element's sum is over k in the same order however the rows are
    split."""
    m, k = a.shape
    n = b.shape[1]
    nt = num_threads()
    macs = m * k * n
    if nt == 1 or macs >= _SMALL_GEMM_MACS:
        np.matmul(a, b, out=out)
        return
    with _one_thread_blas():
        parts = min(nt, m, max(1, macs // _MIN_PART_MACS))
        if parts < nt:
            np.matmul(a, b, out=out)
            return
    bounds = [(_blas.row_bound(m, i, parts), _blas.row_bound(m, i + 1, parts))
              for i in range(parts)]

    def part(t, worker, kernel_threads):
        r0, r1 = bounds[t]
        if r1 > r0:
            np.matmul(a[r0:r1], b, out=out[r0:r1])

    _run_tasks(part, parts, nt)


def _gemms(jobs):
    """Independent products ``[(a, b, out, accumulate, bias, relu)]``: out = a @ b
    (out += a @ b with accumulate), then out += bias (or None) and ReLU where
    relu is set.  Small jobs run in one parallel region of row parts
    (_blas.gemms), each part's bias and ReLU while its rows are in cache; where
    there are as many equal jobs as threads (Linear's backward on two threads)
    each thread runs one whole GEMM, so no operand is packed twice.  Large jobs
    use BLAS's threads, one after the other."""
    nt = num_threads()
    if _cblas_ready():
        sizes = [a.shape[0] * a.shape[1] * b.shape[1] for a, b, *_ in jobs]
        large = [s >= _SMALL_GEMM_MACS for s in sizes]
        if all(large) or (nt == 1 and _blas.pins_blas()):
            if _blas.gemms([(a, b, out, 1, acc, bias, relu)
                            for a, b, out, acc, bias, relu in jobs], 1, all(large)):
                return
        elif any(large):
            for job in jobs:
                _gemms([job])
            return
        else:
            # Whole GEMMs per thread where the jobs share the threads out evenly.
            per_job = nt // len(jobs) if nt % len(jobs) == 0 else nt
            tasks = [(a, b, out, min(per_job, a.shape[0], max(1, s // _MIN_PART_MACS_C)),
                      acc, bias, relu)
                     for (a, b, out, acc, bias, relu), s in zip(jobs, sizes)]
            if _blas.pins_blas():
                if _blas.gemms(tasks, nt):
                    return
            else:
                with _one_thread_blas():
                    if _blas.gemms(tasks, nt):
                        return
    for a, b, out, accumulate, bias, relu in jobs:
        if accumulate:
            product = np.empty_like(out)
            _gemm(a, b, product)
            np.add(out, product, out=out)
        else:
            _gemm(a, b, out)
        if bias is not None:
            np.add(out, bias, out=out)
        if relu:
            _elementwise.relu_forward(out, out, nt)


_cblas_state = []


def _cblas_ready():
    """Whether _blas.gemms can call numpy's BLAS from the OpenMP team (once: the
    symbols of the BLAS numpy loaded, see _threads.cblas_gemm)."""
    if not _cblas_state:
        found = _threads.cblas_gemm()
        if found:
            _blas.set_gemm(*found)
        _cblas_state.append(bool(found))
    return _cblas_state[0]


def _bias_grad(dy2d, bias_grad):
    """bias.grad += dy2d.sum(axis=0), deterministic in the thread count."""
    _conv.bias_grad(dy2d, bias_grad.reshape(-1), num_threads())


def _relu_backward(dy2, y2, bias):
    """A fused ReLU's backward, dy2 masked where its output y2 <= 0 (as
    relu_backward), into a workspace: a fresh array per step (5 MB for LeNet's
    conv1) costs more in page faults than the masking itself.  With a bias, its
    gradient's sums come from the same pass (LeNet conv1, 200K x 6, 2 threads:
    0.43 -> 0.21 ms for the two).  Rows (M, C) in, the masked rows out."""
    masked = _scratch("masked", dy2.shape, dy2.dtype)
    if bias is not None:
        _conv.bias_grad(dy2, bias.grad.reshape(-1), num_threads(), y2, masked)
    else:
        _elementwise.relu_backward(dy2, y2, masked, num_threads())
    return masked


def _check_param_dtype(layer, dtype):
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"{layer._describe()}: parameters are {dtype}; the kernels run in "
                         "float32 or float64 (use .float() or .double())")


def _check_grad(layer, grad, shape, dtype):
    if not isinstance(grad, np.ndarray) or grad.shape != shape:
        got = grad.shape if isinstance(grad, np.ndarray) else type(grad).__name__
        raise ValueError(f"{layer._describe()}: backward expected a gradient of shape {shape}, "
                         f"got {got}")
    if grad.dtype != dtype:
        raise ValueError(f"{layer._describe()}: backward expected a {np.dtype(dtype)} gradient, "
                         f"got {grad.dtype}")
    # A non-contiguous gradient (a transposed view from a user's loss) is copied
    # once rather than refused: backward never writes to it.
    return np.ascontiguousarray(grad)


def _tap_runs(size, out, k, stride, pad):
    """Runs of output positions along one axis whose in-bounds taps are the same
    range: [(o0, o1, k0, k1)] (k0 >= k1: the outputs see only padding)."""
    runs = []
    for o in range(out):
        k0, k1 = max(0, pad - o * stride), min(k, size + pad - o * stride)
        if runs and runs[-1][1] == o and runs[-1][2:] == (k0, k1):
            runs[-1] = (runs[-1][0], o + 1, k0, k1)
        else:
            runs.append((o, o + 1, k0, k1))
    return runs


def _regions(h, w, oh, ow, kernel_size, stride, padding):
    """Output regions (oh0, oh1, ow0, ow1, kh0, kh1, kw0, kw1) whose pixels all see the
    same rectangle of in-bounds kernel taps (corners, edges, interior), and the
    fraction of an im2col GEMM's products they skip (multiplications by padding)."""
    rows = _tap_runs(h, oh, kernel_size[0], stride[0], padding[0])
    cols = _tap_runs(w, ow, kernel_size[1], stride[1], padding[1])
    regions = [r[:2] + c[:2] + r[2:] + c[2:] for r in rows for c in cols]
    valid = sum((o1 - o0) * (q1 - q0) * max(0, a1 - a0) * max(0, b1 - b0)
                for o0, o1, q0, q1, a0, a1, b0, b1 in regions)
    return regions, 1.0 - valid / (oh * ow * kernel_size[0] * kernel_size[1])


class Conv2d(Module):
    """2-D convolution over NHWC input with an HWIO kernel (torch.nn.Conv2d semantics).

    ``weight``: (KH, KW, in_channels // groups, out_channels); ``bias``:
    (out_channels,).  Initialised as PyTorch does: kaiming_uniform_(a=sqrt(5))
    on the weight, i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and the same bound
    for the bias.
    """
    _activations = ("_x", "_y")

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 dilation=1, groups=1, bias=True, dtype=np.float32):
        super().__init__()
        in_channels, out_channels, groups = int(in_channels), int(out_channels), int(groups)
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = int_pair("Conv2d", "kernel_size", kernel_size)
        self.stride = int_pair("Conv2d", "stride", stride)
        self.dilation = int_pair("Conv2d", "dilation", dilation)
        self._padding_str = None
        if isinstance(padding, str):
            padding = self._padding_from_string(padding)
        self.padding = int_pair("Conv2d", "padding", padding)
        if in_channels < 1 or out_channels < 1 or groups < 1:
            raise ValueError(f"Conv2d: in_channels={in_channels}, out_channels={out_channels} and "
                             f"groups={groups} must be positive")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"Conv2d: in_channels={in_channels} and out_channels={out_channels} "
                             f"must both be divisible by groups={groups}")
        if min(self.kernel_size + self.stride + self.dilation) < 1 or min(self.padding) < 0:
            raise ValueError(f"Conv2d: kernel_size={self.kernel_size}, stride={self.stride} and "
                             f"dilation={self.dilation} must be positive and "
                             f"padding={self.padding} non-negative")
        kh, kw = self.kernel_size
        self.weight = Parameter(np.empty((kh, kw, in_channels // groups, out_channels), dtype))
        self.bias = Parameter(np.empty((out_channels,), dtype)) if bias else None
        self.reset_parameters()
        self._x = None
        self._y = None
        self._relu = False
        self._ws = None
        self._ws_key = None

    def fuse_relu(self):
        """Apply the following ReLU to each chunk of the output while it is still in
        cache (called by Sequential's plan): one pass over the activations fewer
        (LeNet's first layer: ~1 ms of a 9 ms inference).  Backward masks the
        gradient with the cached output."""
        self._relu = True
        return True

    def _padding_from_string(self, padding):
        """torch's 'valid' (none) and 'same' (stride 1; symmetric padding only)."""
        if padding not in ("same", "valid"):
            raise ValueError(f"Conv2d: invalid padding string {padding!r}, should be one of "
                             "{'same', 'valid'}")
        self._padding_str = padding
        if padding == "valid":
            return 0
        if self.stride != (1, 1):
            raise ValueError("Conv2d: padding='same' is not supported for strided convolutions")
        totals = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
        if any(t % 2 for t in totals):
            raise ValueError(f"Conv2d: padding='same' needs symmetric padding, but kernel_size="
                             f"{self.kernel_size} with dilation={self.dilation} pads {totals} "
                             "in total (use an explicit padding)")
        return totals[0] // 2, totals[1] // 2

    def reset_parameters(self):
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            init.fan_in_uniform_(self.bias, init.fans(self.weight.shape)[0])

    def extra_repr(self):
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}")
        if self._padding_str is not None:
            s += f", padding={self._padding_str}"
        elif self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self._relu:
            s += ", fused_relu=True"
        return s

    def _drop_cache(self):
        self._x = None
        self._y = None
        self._ws = None
        self._ws_key = None

    # -- geometry ----------------------------------------------------------
    def output_shape(self, input_shape):
        """(N, OH, OW, C_out) for an NHWC input shape; ValueError if the input is too small."""
        n, h, w = input_shape[0], input_shape[1], input_shape[2]
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (self.kernel_size, self.stride,
                                                  self.padding, self.dilation)
        eh, ew = dh * (kh - 1) + 1, dw * (kw - 1) + 1
        if h + 2 * ph < eh or w + 2 * pw < ew:
            raise ValueError(f"{self._describe()}: input of shape {tuple(input_shape)} is smaller "
                             f"than the kernel: padded size ({h + 2 * ph}, {w + 2 * pw}) < "
                             f"(dilated) kernel size ({eh}, {ew})")
        return n, (h + 2 * ph - eh) // sh + 1, (w + 2 * pw - ew) // sw + 1, self.out_channels

    def _paths(self, dtype):
        """(forward, weight gradient, input gradient) algorithms for this layer and dtype.

        depthwise: groups == C_in == C_out, loops along the channel axis.
        direct:    few output channels per group in whole SIMD vectors (the
                   skinny GEMMs BLAS is weakest at; 1x1 included: 16->32 channels
                   at 32x32 runs 2x faster than the GEMM; ResNeXt's grouped 3x3
                   with 16-64 channels per group); the input gradient too when
                   the stride is 1 and C_in per group qualifies (it is then an
                   ordinary grouped convolution of dy with the flipped kernel,
                   padding d*(k-1)-p).
                   C_out below one vector (LeNet's 6) takes the direct forward too,
                   with zero-padded weights; its weight gradient is "small" (blocked
                   over a kernel row's (kw, c) pairs) when KW * C_in <= 8.
        pointwise: 1x1 stride 1 padding 0, the input is its own column matrix.
        scatter:   dx of layers with few inputs (_conv.scatter_dx_fits) in place of
                   col2im.
        planar:    dx of stride-1 layers with 1-4 inputs and few outputs
                   (_conv.planar_dx_fits), vectorized along the width.
        phase:     dx of strided direct layers (C_in per group in whole vectors):
                   per phase of dx pixels a stride-1 direct convolution of dy
                   (_conv.conv_phase_dx) in place of col2im.
        otherwise im2col / batched GEMM / col2im, with the weight gradient
                   "direct" for spatial kernels whose C_out per group fills the
                   6 x 4 weight-gradient block; on small padded maps the im2col
                   and col2im run by regions (decided per input shape: _workspace).
        Per input shape, _shape_paths moves small maps to image-blocked kernels.
        On AVX-512 machines the GEMMs of pointwise and im2col layers (groups 1) run
        on cnet's own kernels (_own_gemm: _conv.gemm_packed / gemm_tn, 6 x 4-vector
        register tiles, the maps or columns read in place, bias and ReLU in the
        store), at or above OpenBLAS's sgemm on these shapes (bench/RESULTS.md).
        """
        cin, cout, g = self.in_channels, self.out_channels, self.groups
        kw = self.kernel_size[1]
        lanes = _conv.direct_lanes(np.dtype(dtype))
        pointwise = self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)
        if g > 1 and g == cin == cout:
            return "depthwise", "depthwise", "depthwise"
        cin_g, cout_g = cin // g, cout // g
        # (C_in < lanes would fit the dx kernel too, but LeNet's 6 measured slower
        # than col2im: 6.6 vs 4.6 ms.)
        direct_dx = cin_g <= _DIRECT_MAX_CHANNELS and self._flipped_dx_fits(lanes)
        # Few inputs (a kernel row's KW * C_in values fill one to two vectors): each
        # output pixel scatters its dy onto dx without col2im's K = C_out GEMM
        # (LeNet's conv2, 6 -> 16, batch 256 in 8 chunks, one thread: 2.8 -> 2.0 ms).
        col2im = ("scatter" if _conv.scatter_dx_fits(cin, kw, self.dilation[1], g, dtype)
                  else "col2im")
        # Strided: dx by phases (_conv.conv_phase_dx), each a stride-1 convolution of
        # dy with some of the taps, on the direct row kernel: no column matrix and
        # no col2im pass (dx ms, one / two threads, col2im -> phases: ResNet-20's
        # 32x32x16 -> 16x16x32 6.7 / 4.7 -> 4.8 / 1.9, 16x16x32 -> 8x8x64 4.5 / 2.9 ->
        # 3.4 / 2.8; ResNeXt's 32x32x256 s2 g8 48 / 37 -> 43 / 29).
        if (self.stride != (1, 1) and self.dilation == (1, 1) and cin_g % lanes == 0
                and cin_g <= _DIRECT_MAX_CHANNELS):
            col2im = "phase"
        # A first layer (1-4 inputs, stride 1, at most 32 outputs): dx along the width
        # from planes of dy (dx ms, one / two threads, col2im -> planar: LeNet's conv1
        # 5.9 / 3.1 -> 1.1 / 0.6, ResNet-20's 3 -> 16 3.0 / 1.6 -> 1.7 / 0.9).
        if _conv.planar_dx_fits(cin, cout, *self.kernel_size, self.stride, self.padding,
                                self.dilation, g):
            col2im = "planar"
        if pointwise and g == 1 and self._own_gemm():
            # cnet's GEMM beats the direct kernel on a 1x1 of any width (2 threads,
            # fwd+bwd ms, direct -> own GEMM: 32x32x16->32 (batch 128) 4.52 -> 3.85,
            # 32x32x64->64 17.0 -> 11.7, 16x16x64->64 3.08 -> 2.60, 32x32x128->64
            # 27.8 -> 23.7; forward 7-30% faster)
            return "pointwise", "gemm", "pointwise"
        # A 1x1 is a plain GEMM with K = C_in: BLAS catches up sooner (ResNeXt's
        # 64 -> 128 at 32x32, 2 threads: direct 31.7 ms, GEMM 22.8; 64 -> 64 a tie).
        max_direct = (_DIRECT_MAX_POINTWISE if pointwise and g == 1
                      else _DIRECT_MAX_CHANNELS)
        if cout_g <= max_direct and cout_g % lanes == 0:
            # (a 1x1 with too many inputs for the direct dx kernel: one GEMM into dx)
            return "direct", "direct", ("direct" if direct_dx else
                                        "pointwise" if pointwise else col2im)
        # Wide layers keep their GEMM forward and input gradient, but the direct
        # kernel's 6 x 4 block beats im2col + sgemm for the weight gradient of a
        # spatial kernel (and skips the padding): see _conv._wgrad_variant.  Not
        # for 1x1: each block streams the chunk's dy once per 6 inputs, and with
        # K = C_in the GEMM is at its best (ResNeXt 8x8x512->1024: 126 vs 67 ms).
        block = _conv.wgrad_block_channels(np.dtype(dtype))
        wide_dw = ("direct" if block and cout_g % block == 0 and self.kernel_size != (1, 1)
                   else "gemm")
        if pointwise:
            return "pointwise", "gemm", "pointwise"
        if g == 1 and cout < lanes:
            # One partial vector (LeNet's 6 channels): the direct forward still beats
            # im2col + a GEMM with N = C_out (LeNet conv1: 4.5 vs 6.3 ms, 1 thread),
            # and with KW * C_in <= 8 so does a weight gradient that blocks over
            # the kernel row's (kw, c) pairs (conv1: 1.9 vs 6.7 ms).
            small = _conv.small_wgrad_fits(cin, cout, kw, np.dtype(dtype))
            return "direct", "small" if small else "gemm", "direct" if direct_dx else col2im
        return "im2col", wide_dw, col2im

    def _own_gemm(self):
        """Whether this layer's GEMMs (1x1 or im2col paths) run on cnet's own kernels
        (_conv.gemm_packed, gemm_tn) instead of BLAS: ungrouped, on machines with
        the AVX-512 registers their 6 x 4-vector tiles need (_conv.gemm_kernel)."""
        return self.groups == 1 and _conv.gemm_kernel()

    def _flipped_dx_fits(self, lanes):
        """Whether dx can run as a convolution of dy with the flipped kernel (stride 1,
        padding within the dilated kernel, C_in per group in whole vectors)."""
        (kh, kw), (ph, pw), (dh, dw) = self.kernel_size, self.padding, self.dilation
        return (self.stride == (1, 1) and (self.in_channels // self.groups) % lanes == 0
                and ph <= dh * (kh - 1) and pw <= dw * (kw - 1))

    def _shape_paths(self, n, h, w, oh, ow, dtype):
        """(forward, weight gradient, input gradient, by_images) for a batch of n
        images of h x w (output oh x ow).

        On maps at most _IMAGE_BLOCK_MAX_WIDTH wide, ungrouped layers run the
        direct kernels over blocks of images instead of a row's pixels
        (conv_direct's by_images), for any number of channels: every image of a
        block has the same in-bounds taps, so the padding is skipped (3x3: 16% of
        the products at 8x8, 31% at 4x4, 56% at 2x2) where im2col and the row
        blocks multiply it, and small maps do not leave row blocks half empty (a
        4x4 map fills half of 8 pixels).  One thread, forward, ms (im2col or row
        kernel / by images): ResNet-18 4x4x256 7.4 / 4.6, 2x2x512 8.2 / 3.0-4.5;
        VGG 4x4x512 (batch 64) 50 / 31, 8x8x256 44 / 37; 8x8x128 5.1 / 4.6.  Not
        for 1x1 (no padding: the GEMM) nor depthwise, nor for batches that fill
        the image blocks worse than the other path fills its own
        (_image_blocks_fill).
        """
        paths = self._paths(dtype)
        lanes = _conv.direct_lanes(np.dtype(dtype))
        by_images = (ow <= _IMAGE_BLOCK_MAX_WIDTH and self.groups == 1
                     and paths[0] in ("direct", "im2col")
                     and self.kernel_size != (1, 1)
                     and (self.out_channels // self.groups) % lanes == 0
                     and self._image_blocks_fill(paths[0], n, h, w, oh, ow, dtype))
        if not by_images:
            return paths + (False,)
        dx = "direct" if self._flipped_dx_fits(lanes) else paths[2]
        return "direct", paths[1], dx, True

    def _image_blocks_fill(self, path, n, h, w, oh, ow, dtype):
        """Whether n images use the image-blocked kernels at least as well as the
        other path (``path``, the forward's "direct" or "im2col") uses its kernels.  A block of fewer images repeats one and
        computes a whole block (one image: 8 times the work), but skips the
        padded taps.  Useful share of the products: image blocks n / (blocks *
        B); row kernels (direct path) ow / (row blocks * B) times the in-bounds
        share of a kernel row's taps (out-of-bounds kernel rows are skipped);
        im2col the in-bounds share of all taps, times M / (M + 64) for its GEMM
        of M = n * oh * ow rows (a product of few rows runs below the GEMM's rate;
        the factor was fitted when such forwards still packed the weight per call,
        before _forward_gemm_operand).
        Batches that are a multiple of B always qualify.  Per layer, 2 threads,
        fwd+bwd ms, image blocks / other: ResNet-20 batch 4 32x32x16 0.26 /
        0.17 (rows); VGG-11 batch 4 8x8x256 2.85 / 2.34 (im2col), 4x4x512
        3.66 / 5.43 (im2col); ResNet-18 batch 2 4x4x256 0.83 / 1.17 (im2col)."""
        block = _conv.direct_image_block(np.dtype(dtype))
        image_fill = n / (-(-n // block) * block)

        def in_bounds(size, out, k, s, p, d):
            return sum(0 <= o * s - p + t * d < size for o in range(out)
                       for t in range(k)) / (out * k)

        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (self.kernel_size, self.stride,
                                                  self.padding, self.dilation)
        across = in_bounds(w, ow, kw, sw, pw, dw)
        if path == "direct":
            other = ow / (-(-ow // block) * block) * across
        else:
            rows = n * oh * ow
            other = in_bounds(h, oh, kh, sh, ph, dh) * across * rows / (rows + 64)
        return image_fill >= other

    def _workspace(self, x, out_shape):
        """Buffers for this input shape, allocated once and reused.

        The batch is split into chunks of whole images (shape-only, so the
        chunking, and hence every summation order, is the same for any thread
        count).  Each worker thread owns one column buffer (which the column
        gradient reuses when the weight gradient is a GEMM) and one
        weight-gradient scratch.  Backward sums the weight
        gradient of a fixed number of stripes (consecutive chunks) in separate
        slots and adds the slots in stripe order: deterministic, no locks.
        """
        key = (x.shape, x.dtype)
        if self._ws_key != key:
            n, oh, ow, _ = out_shape
            kh, kw = self.kernel_size
            k_total = kh * kw * self.in_channels
            per_image = oh * ow * k_total
            paths = self._shape_paths(n, x.shape[1], x.shape[2], oh, ow, x.dtype)
            if paths[0] != "im2col" and paths[1] != "gemm":     # no column buffers
                budget = _KERNEL_CHUNK_BYTES
            elif (self.out_channels // self.groups >= _WIDE_CHANNELS
                  and paths[0] != "pointwise"):
                budget = _WIDE_CHUNK_BYTES
            else:
                budget = _COL_CHUNK_BYTES
            chunk = max(1, min(n, budget // max(1, per_image * x.itemsize)))
            # Chunks of whole image blocks for the image-blocked kernels; one per
            # core for wide weights, which each chunk streams once per channel
            # block, unless column buffers (a strided layer's dx) grow with it.
            unit = _conv.direct_image_block(x.dtype) if paths[3] else 1
            if (paths[3] and self.weight.data.nbytes >= _PACK_WEIGHT_BYTES
                    and "col2im" not in paths and "gemm" not in paths):
                chunk = n
            units = -(-n // unit)
            n_chunks = _balanced_chunks(units, -(-units // max(1, chunk // unit)))
            regions = None
            if (paths[0] == "im2col" and paths[2] == "col2im" and self.groups == 1
                    and self.dilation == (1, 1)):
                regions, zeros = _regions(x.shape[1], x.shape[2], oh, ow, self.kernel_size,
                                          self.stride, self.padding)
                # One chunk per core: every region's GEMM repacks its kernel rows, so
                # it needs rows to amortise that (see _REGION_MIN_ROWS).
                big = -(-n // min(n, _MIN_TASKS))
                smallest = min(((o1 - o0) * (q1 - q0) for o0, o1, q0, q1, a0, a1, b0, b1
                                in regions if a0 < a1 and b0 < b1), default=0)
                if zeros < _REGION_MIN_ZEROS or big * smallest < _REGION_MIN_ROWS:
                    regions = None
                else:
                    n_chunks = min(n, _MIN_TASKS)
            stripes = _stripes(n_chunks, self.weight.data.nbytes)
            # the largest chunk: buffers are sized for it
            chunk = min(n, -(-units // n_chunks) * unit)
            self._ws = {"paths": paths, "chunk": chunk, "n_chunks": n_chunks, "stripes": stripes,
                        "bounds": [(min(n, t * units // n_chunks * unit),
                                    min(n, (t + 1) * units // n_chunks * unit))
                                   for t in range(n_chunks)],
                        "col_shape": (chunk * oh * ow, k_total), "regions": regions}
            self._ws_key = key
        return self._ws

    @staticmethod
    def _packed_weight_fits(w, by_images):
        """Whether the image-blocked kernel gets its weight repacked per channel block:
        where the HWIO rows are too far apart to stay in cache (_PACK_WEIGHT_BYTES)."""
        return by_images and w.nbytes >= _PACK_WEIGHT_BYTES

    def _packed(self, w, by_images, n_threads):
        """The forward's packed weight operand (or None: the HWIO weight itself)."""
        if not self._packed_weight_fits(w, by_images):
            return None
        return _conv.direct_weight_blocks(w, self.groups, n_threads)

    @staticmethod
    def _forward_gemm_operand(wstack, out_shape, n_threads):
        """The forward GEMM's weight operand: packed (_packed_gemm_operand), or the
        weight itself where the batch has at most _GEMM_INPLACE_ROWS output pixels
        (a small batch's map), for which packing costs as much as the product."""
        rows = out_shape[0] * out_shape[1] * out_shape[2]
        if rows <= _GEMM_INPLACE_ROWS and _conv.gemm_inplace_fits(wstack.shape[1],
                                                                    wstack.dtype):
            return wstack
        return _packed_gemm_operand(wstack, n_threads)

    @staticmethod
    def _worker_buffers(name, n_workers, shape, dtype):
        """One scratch array per worker thread (see _scratch)."""
        return [_scratch((name, wid), shape, dtype) for wid in range(n_workers)]

    def _weight_stack(self, w):
        """HWIO weight as (G, K, C_out/G) views (no copy): group g's GEMM operand."""
        g = self.groups
        k = w.shape[0] * w.shape[1] * w.shape[2]
        if g == 1:
            return w.reshape(k, w.shape[3])
        return w.reshape(k, g, w.shape[3] // g).transpose(1, 0, 2)

    def _group_view(self, a):
        """(M, G*K) matrix as the (G, M, K) stack BLAS reads in place."""
        g = self.groups
        if g == 1:
            return a
        return a.reshape(a.shape[0], g, a.shape[1] // g).transpose(1, 0, 2)

    def _geometry(self):
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (self.kernel_size, self.stride,
                                                  self.padding, self.dilation)
        return kh, kw, sh, sw, ph, pw, dh, dw, self.groups

    # -- regions (im2col without the padding) -----------------------------------
    def _region_weights(self, ws, w):
        """Per region, its taps' rows of the HWIO kernel as a (K_region, C_out) matrix
        (a view when the taps span whole kernel rows, else a copy into a scratch
        buffer), or None for outputs that see only padding."""
        cout = w.shape[3]
        subs = []
        for i, (*_, a0, a1, b0, b1) in enumerate(ws["regions"]):
            if a0 >= a1 or b0 >= b1:
                subs.append(None)
                continue
            block = w[a0:a1, b0:b1]
            if block.flags.c_contiguous:
                subs.append(block.reshape(-1, cout))
                continue
            sub = _scratch(("wsub", i), block.shape, w.dtype)
            np.copyto(sub, block)
            subs.append(sub.reshape(-1, cout))
        return subs

    def _region_forward(self, x, y, n0, n1, wsubs, col, out, kt):
        """y[n0:n1] (without bias) region by region."""
        regions, cout = self._ws["regions"], y.shape[3]
        sh, sw = self.stride
        ph, pw = self.padding
        for (o0, o1, q0, q1, a0, a1, b0, b1), wsub in zip(regions, wsubs):
            yreg = y[n0:n1, o0:o1, q0:q1]
            if wsub is None:
                yreg.fill(0)
                continue
            m, k = yreg.size // cout, wsub.shape[0]
            c = col[:m * k].reshape(m, k)
            _conv.im2col_region(x, c, n0, n1, o0, o1, q0, q1, a0, a1, b0, b1, sh, sw, ph, pw,
                                kt)
            if yreg.flags.c_contiguous:
                np.matmul(c, wsub, out=yreg.reshape(m, cout))
            else:
                yb = out[:m * cout].reshape(m, cout)
                np.matmul(c, wsub, out=yb)
                np.copyto(yreg, yb.reshape(yreg.shape))

    def _region_backward(self, x, dy, dx, n0, n1, wsubs, acc, first, col, out, dwbuf, kt):
        """Weight gradient of images [n0, n1) into ``acc`` (HWIO; overwritten when
        ``first``; None: computed elsewhere) and, if dx is not None, dx[n0:n1],
        region by region."""
        regions, cout = self._ws["regions"], dy.shape[3]
        sh, sw = self.stride
        ph, pw = self.padding
        if acc is None and dx is None:
            return
        if first and acc is not None:
            acc.fill(0)
        if dx is not None:
            dx[n0:n1].fill(0)
        for (o0, o1, q0, q1, a0, a1, b0, b1), wsub in zip(regions, wsubs):
            if wsub is None:
                continue
            dyreg = dy[n0:n1, o0:o1, q0:q1]
            m, k = dyreg.size // cout, wsub.shape[0]
            if dyreg.flags.c_contiguous:
                dyc = dyreg.reshape(m, cout)
            else:
                dyc = out[:m * cout].reshape(m, cout)
                np.copyto(dyc.reshape(dyreg.shape), dyreg)
            c = col[:m * k].reshape(m, k)
            geom = (n0, n1, o0, o1, q0, q1, a0, a1, b0, b1, sh, sw, ph, pw, kt)
            if acc is not None:
                _conv.im2col_region(x, c, *geom)
                dwc = dwbuf[:k * cout].reshape(k, cout)
                np.matmul(c.T, dyc, out=dwc)
                blk = acc[a0:a1, b0:b1]
                np.add(blk, dwc.reshape(blk.shape), out=blk)
            if dx is not None:
                np.matmul(dyc, wsub.T, out=c)   # the columns are read: reuse the buffer
                _conv.col2im_region_add(c, dx, *geom)

    # -- computation -------------------------------------------------------
    def forward(self, x):
        return self._forward(x, None)

    def folds_batchnorm(self, bn, x=None):
        """Whether forward_with_batchnorm(x, bn) may stand for bn(self(x)): both in
        eval mode, bn a BatchNorm2d over this layer's outputs with running
        statistics, both running their class's own forward (runs_own: not a
        profiler's wrapper nor a subclass's).  Given the input x, also whether it
        pays: not for a direct layer with an output under _FOLD_DIRECT_BYTES."""
        from .normalization import BatchNorm2d
        w = self.weight.data
        if not (not self.training and isinstance(bn, BatchNorm2d) and not bn.training
                and bn.track_running_stats and bn.num_features == self.out_channels
                and bn._dtype() == w.dtype
                and runs_own(self, Conv2d) and runs_own(bn, BatchNorm2d)):
            return False
        if x is None:
            return True
        out_shape = self._output_shape_of(x)
        if out_shape is None:
            return False
        direct = self._workspace(x, out_shape)["paths"][0] == "direct"
        return not direct or math.prod(out_shape) * x.itemsize >= _FOLD_DIRECT_BYTES

    def forward_with_batchnorm(self, x, bn, residual=None):
        """bn(self(x)) for an eval-mode BatchNorm2d (see folds_batchnorm), the batch
        norm (and its fused ReLU) applied to each chunk of the output while it is
        still in cache: the raw output never goes to memory, and one pass over
        the activations is saved (ResNeXt-29 inference at 2 threads: 58 ms of
        batch norm per 742 ms step, the 64x32x32x256 maps being larger than L3;
        733-765 -> 691-708 ms); Sequential does it where folds_batchnorm(bn, x)
        says it pays.  The same values as the two calls (eval mode has no batch statistics).

        With ``residual`` (an array of the output's shape and dtype; bn without a
        fused ReLU): relu(bn(self(x)) + residual), the residual join of an eval-mode
        Add(body, shortcut) + ReLU done per chunk too (Sequential._forward_residual),
        which saves the add's pass over three maps."""
        if not self.folds_batchnorm(bn):
            raise ValueError(f"{self._describe()}: cannot apply {bn._describe()} to its chunks "
                             "(both must be in eval mode, a BatchNorm2d with running "
                             "statistics over this layer's outputs, same dtype)")
        if residual is not None:
            self._check_join(x, bn, residual)
        return self._forward(x, bn, residual)

    def _check_join(self, x, bn, residual):
        """A residual join's operands (forward_with_batchnorm, ..._folded_batchnorm)."""
        want = self.output_shape(np.shape(x))
        if not residual_fits(residual, want, self.weight.data.dtype):
            raise ValueError(f"{self._describe()}: the residual must be a C-contiguous "
                             f"{self.weight.data.dtype} array of the output's shape {want}, "
                             f"got {getattr(residual, 'shape', type(residual).__name__)} "
                             f"{getattr(residual, 'dtype', '')}")
        if bn._relu or self._relu:
            raise ValueError(f"{self._describe()}: a residual join adds before the ReLU; "
                             f"{bn._describe()} must not apply one itself")

    def folds_batchnorm_weights(self, bn, x):
        """Whether forward_with_folded_batchnorm(x, bn) may stand for bn(self(x)) and
        pays: as folds_batchnorm(bn), for a direct or 1x1 (pointwise) layer without a
        fused ReLU of its own (the batch norm must see the raw sums) whose weight is at
        most 1/_FOLD_WEIGHT_RATIO of its output (scaling it is a pass per forward).
        Sequential asks this first, then folds_batchnorm(bn, x)."""
        if self._relu or not self.folds_batchnorm(bn):
            return False
        out_shape = self._output_shape_of(x)
        return (out_shape is not None
                and self._workspace(x, out_shape)["paths"][0] in ("direct", "pointwise")
                and self.weight.data.nbytes * _FOLD_WEIGHT_RATIO
                <= math.prod(out_shape) * x.itemsize)

    def forward_with_folded_batchnorm(self, x, bn, residual=None):
        """bn(self(x)) for an eval-mode BatchNorm2d (see folds_batchnorm_weights) as one
        convolution: the batch norm's per-channel scale alpha = weight / sqrt(var + eps)
        folded into this layer's weight, its shift beta - mean * alpha (plus alpha
        times this layer's bias) as the bias, its fused ReLU in the kernel's store.
        No pass over the activations for the batch norm at all (ResNet-20 inference at
        2 threads, with the residual join below: 28.2-28.5 -> 27.4 ms, see
        bench/RESULTS.md).
        The products round differently (x * (w * alpha) against (x * w) * alpha):
        equal to the two calls within float32 round-off, not bitwise; as PyTorch's
        conv-bn fusion for frozen inference models.

        With ``residual`` (an array of the output's shape and dtype; bn without a
        fused ReLU): relu(bn(self(x)) + residual), the residual join of an eval-mode
        Add(body, shortcut) + ReLU in the kernel's epilogue, while each chunk is in
        cache (Sequential._forward_residual)."""
        if self._relu or not self.folds_batchnorm(bn):
            raise ValueError(f"{self._describe()}: cannot fold {bn._describe()} into its "
                             "weights (both must be in eval mode, a BatchNorm2d with running "
                             "statistics over this layer's outputs, same dtype, and no ReLU "
                             "fused into this layer)")
        if residual is not None:
            self._check_join(x, bn, residual)
        w = self.weight.data
        alpha, shift = bn.eval_scale_shift()          # float64, per output channel
        # on a line already: the kernel would copy a misaligned one (_conv.aligned_empty)
        weight = np.multiply(w, alpha.astype(w.dtype), out=_conv.aligned_empty(w.shape, w.dtype))
        if self.bias is not None:
            shift = shift + alpha * self.bias.data
        return self._forward(x, None, residual, (weight, shift.astype(w.dtype), bn._relu))

    def collects_batch_moments(self, bn, x):
        """Whether forward_with_batch_moments(x) may hand ``bn`` its batch statistics:
        both in training mode, bn a BatchNorm2d over this layer's outputs of its dtype,
        no ReLU fused into this layer (bn sees the raw sums), both running their
        class's own forward (runs_own), x a valid input (else forward's own checks
        say why)."""
        from .normalization import BatchNorm2d
        w = self.weight.data
        return (self.training and not self._relu and isinstance(bn, BatchNorm2d)
                and bn.training and bn.num_features == self.out_channels
                and bn._dtype() in (None, w.dtype)
                and runs_own(self, Conv2d) and runs_own(bn, BatchNorm2d)
                and self._output_shape_of(x) is not None)

    def _output_shape_of(self, x):
        """The output shape for input x, or None where x is not one this layer takes
        (the joined paths then step aside and forward's own checks say why)."""
        if not (isinstance(x, np.ndarray) and x.ndim == 4 and x.shape[3] == self.in_channels
                and x.dtype == self.weight.data.dtype):
            return None
        try:
            return self.output_shape(x.shape)
        except ValueError:
            return None

    def forward_with_batch_moments(self, x):
        """(self(x), moments): the output and its per-channel moments, taken from each
        chunk (or row block of a 1x1 layer's GEMM) right after it is computed, while
        in cache, for the training batch norm after this layer (BatchNorm2d._forward's
        ``moments``), which then does not read the output back from memory for its
        statistics (Sequential does this; see collects_batch_moments).  The output is
        bitwise this layer's forward; the statistics equal the batch norm's own
        within float32 round-off (other pieces, merged the same way)."""
        if self._relu:
            raise ValueError(f"{self._describe()}: a batch norm's moments are of the raw "
                             "output; this layer applies a ReLU")
        return self._forward(x, None, collect=True)

    def _forward(self, x, bn, residual=None, folded=None, collect=False):
        """``folded``: (weight, bias, relu) standing for this layer's own (an eval batch
        norm folded into them, forward_with_folded_batchnorm).  ``collect``: returns
        (y, moments) (forward_with_batch_moments)."""
        w = self.weight.data if folded is None else folded[0]
        relu = self._relu if folded is None else folded[2]
        _check_param_dtype(self, w.dtype)
        check_input(self, x, 4, channels=self.in_channels, dtype=w.dtype)
        out_shape = self.output_shape(x.shape)
        n, oh, ow, cout = out_shape
        nt = num_threads()
        ws = self._workspace(x, out_shape)
        chunk, n_chunks, bounds, rows = ws["chunk"], ws["n_chunks"], ws["bounds"], oh * ow
        path, _, _, by_images = ws["paths"]
        packed = self._packed(w, by_images, nt)
        n_workers = min(nt, n_chunks)
        if path == "im2col":
            cols = self._worker_buffers("col", n_workers, ws["col_shape"], x.dtype)
            if ws["regions"] is not None:
                path = "region"
                wsubs = self._region_weights(ws, w)
                outs = self._worker_buffers("out", n_workers, (chunk * rows * cout,),
                                            x.dtype)
        wstack = self._weight_stack(w)
        bias = None if self.bias is None else self.bias.data
        if folded is not None:
            bias = folded[1]
        geom = self._geometry()
        # The GEMM of a 1x1 or im2col layer on cnet's own kernel (bias and ReLU in
        # its store) where it has one (_own_gemm); else BLAS.
        packed_gemm = (self._forward_gemm_operand(wstack, out_shape, nt)
                       if path in ("pointwise", "im2col") and self._own_gemm() else None)
        y = np.empty(out_shape, x.dtype)
        y2 = y.reshape(-1, cout)
        residual2 = None if residual is None else residual.reshape(-1, cout)
        if bn is not None:
            # each chunk's raw output goes to a worker's buffer, the batch norm into y
            raws = self._worker_buffers("raw", n_workers, (chunk, oh, ow, cout), x.dtype)
            bn_vectors = [bn._workspace(x.dtype)[2:] if wid == 0 else
                          (np.empty(cout, x.dtype), np.empty(cout, x.dtype))
                          for wid in range(n_workers)]

        def compute(xs, ys, n0, n1, wid, kt):
            """ys[n0:n1] = this layer on xs[n0:n1] (ReLU included)."""
            yc = ys.reshape(-1, cout)[n0 * rows:n1 * rows]
            if path == "direct":
                _conv.conv_direct(xs, w, bias, ys, n0, n1, *geom[2:8], kt, self.groups,
                                  by_images, packed, None, relu)
                return
            if path == "depthwise":
                _conv.depthwise_forward(xs, w, bias, ys, n0, n1, *geom[2:8], kt)
            elif path == "region":
                self._region_forward(xs, ys, n0, n1, wsubs, cols[wid].reshape(-1),
                                     outs[wid], kt)
                if bias is not None:
                    np.add(yc, bias, out=yc)
            else:
                if path == "pointwise":
                    c = xs.reshape(-1, self.in_channels)[n0 * rows:n1 * rows]
                else:
                    c = cols[wid][:(n1 - n0) * rows]
                    _conv.im2col(xs, c, n0, n1, oh, ow, *geom, kt)
                if packed_gemm is not None:
                    _conv.gemm_packed(c, packed_gemm, yc, bias, relu, 0, len(c), kt)
                    return
                np.matmul(self._group_view(c), wstack, out=self._group_view(yc))
                if bias is not None:
                    np.add(yc, bias, out=yc)   # while the chunk is still in cache
            if relu:
                _elementwise.relu_forward(yc, yc, kt)

        def task(t, wid, kt):
            n0, n1 = bounds[t]
            if bn is None:
                compute(x, y, n0, n1, wid, kt)
                if residual is not None:     # a folded batch norm's join, in cache
                    yc = y2[n0 * rows:n1 * rows]
                    _elementwise.add(yc, residual2[n0 * rows:n1 * rows], yc, True, kt)
                if moments is not None:      # the next batch norm's statistics, in cache
                    _batchnorm.rows_moments(y2[n0 * rows:n1 * rows], *moments, t)
                return
            raw = raws[wid][:n1 - n0]
            compute(x[n0:n1], raw, 0, n1 - n0, wid, kt)
            bn._forward_eval_rows(raw.reshape(-1, cout), y2[n0 * rows:n1 * rows],
                                  *bn_vectors[wid], kt,
                                  None if residual is None else residual2[n0 * rows:n1 * rows])

        one_gemm = (packed_gemm is not None and path == "pointwise" and bn is None
                    and residual is None)
        moments = None
        if collect:
            # one piece per chunk (per row block of the 1x1 GEMM): the statistics'
            # rounding does not depend on the thread count
            moments = _batchnorm.moment_slots(
                _conv.gemm_row_blocks(0, n * rows) if one_gemm else n_chunks, cout)
        if path == "direct" and bn is None:
            # All chunks in one parallel region of the kernel: no Python, and no GIL
            # hand-off, per chunk (2 threads, ms, Python tasks -> one region:
            # ResNet-18 16x16x64 2.74 -> 2.63, 2x2x512 2.74 -> 2.60; ResNet-20
            # 32x32x16 3.20 -> 3.04).
            _conv.conv_direct(x, w, bias, y, 0, n, *geom[2:8], nt, self.groups, by_images,
                              packed, bounds if collect or (nt > 1 and n_chunks >= nt)
                              else None, relu, residual, moments)
        elif one_gemm:
            # the whole batch in one parallel region: no Python per chunk
            _conv.gemm_packed(x.reshape(-1, self.in_channels), packed_gemm, y2, bias,
                              relu, 0, n * rows, nt, moments=moments)
        else:
            _run_tasks(task, n_chunks, nt)
        if self.training:
            self._x = x
            self._y = y if relu else None
        return (y, moments) if collect else y

    def backward(self, grad_out):
        return self._backward(grad_out)

    def _backward_into(self, grad_out, into):
        """A 1x1 layer on cnet's GEMM adds its input gradient to ``into`` in the
        GEMM's store (C += dY W^T), a direct layer each chunk's while in cache
        (conv_direct_backward's accumulate_dx); elsewhere backward, then the add
        (_backward decides).  ResNeXt-29 training, 2 threads: the add pass of its six
        identity blocks saved (see bench/RESULTS.md)."""
        x = self._x
        if (not runs_own(self, Conv2d, "backward") or x is None or not self.input_grad
                or not residual_fits(into, x.shape, x.dtype)
                or not isinstance(grad_out, np.ndarray) or np.may_share_memory(into, grad_out)
                or np.may_share_memory(into, x)):
            return super()._backward_into(grad_out, into)
        return self._backward(grad_out, into=into)

    def backward_through_pool(self, pool, grad):
        """The backward of this layer and the MaxPool2d right after it (Sequential's
        plan), given the pool's output gradient: ``self.backward(pool.backward(grad))``.
        Where this layer's weight gradient is the narrow kernel's and no input
        gradient is wanted (LeNet's conv1 -> ReLU -> pool), the kernel gathers each
        row of its gradient from the pool's gradient and argmax, applies the fused
        ReLU's mask and sums the bias gradient while making it planar: the pool's
        dx and the masked gradient are never written (LeNet conv1 + pool1 backward,
        batch 256, see bench/RESULTS.md).  Same values; the bias sums in another
        fixed order."""
        from .pooling import MaxPool2d
        idx = getattr(pool, "_idx", None)
        if (not isinstance(pool, MaxPool2d) or idx is None or self.input_grad
                or not runs_own(self, Conv2d, "backward")
                or not runs_own(pool, MaxPool2d, "backward")
                or self._x is None or not isinstance(grad, np.ndarray)
                or grad.shape != idx.shape or grad.dtype != self.weight.data.dtype
                or not self._narrow_backward(self._x)):
            return self.backward(pool.backward(grad))
        return self._backward(None, (pool, np.ascontiguousarray(grad)))

    def takes_batchnorm_grad(self, bn, grad, into=None):
        """Whether backward_through_batchnorm(bn, grad) may stand for
        ``self.backward(bn.backward(grad))``: both in training mode with their
        forward caches, bn a BatchNorm2d over this layer's output, both running
        their class's own backward (runs_own), no bias or ReLU of this layer's
        own (they would need dy whole), and a backward that takes dy by chunks
        (_chunked_grad_path).  ``into``: as _backward_into, an array of the input's
        shape that aliases neither the forward input, the batch norm's nor the
        gradient (bn.backward_rows checks grad's shape)."""
        from .normalization import BatchNorm2d
        x = self._x
        if not (self.training and isinstance(bn, BatchNorm2d) and bn.training
                and x is not None and bn._cache is not None and self.bias is None
                and not self._relu and runs_own(self, Conv2d, "backward")
                and runs_own(bn, BatchNorm2d, "backward")
                and bn.num_features == self.out_channels and bn._cache.dtype == x.dtype
                and bn._cache.shape == self.output_shape(x.shape)):
            return False
        if into is not None and (not self.input_grad or not residual_fits(into, x.shape, x.dtype)
                                 or any(np.may_share_memory(into, a)
                                        for a in (x, bn._cache, grad))):
            return False
        return self._chunked_grad_path(x) is not None

    def _chunked_grad_path(self, x):
        """The backward paths that take dy one chunk at a time from a batch norm after
        the layer (backward_through_batchnorm): "gemm", a 1x1 on cnet's GEMM (the
        chunks are blocks of rows, run as Python tasks); "direct", the direct weight
        gradient with the direct or scatter dx, or none (conv_direct_backward's one
        parallel region, with bn_grad); else None."""
        ws = self._workspace(x, self.output_shape(x.shape))
        _, dw_path, dx_path, _ = ws["paths"]
        if ws["regions"] is not None:
            return None
        if (dw_path, dx_path) == ("gemm", "pointwise"):
            lanes = _conv.direct_lanes(x.dtype)
            return "gemm" if self._own_gemm() and self.out_channels % lanes == 0 else None
        if dw_path == "direct" and (dx_path in ("direct", "scatter") or not self.input_grad):
            return "direct"
        return None

    def backward_through_batchnorm(self, bn, grad, into=None):
        """``self.backward(bn.backward(grad))`` (with ``into``: into + that, as
        _backward_into) for the training BatchNorm2d after this layer (see
        takes_batchnorm_grad): the batch norm takes its sums over the batch, then
        each chunk of this layer's output gradient is written into a worker's
        buffer right before the chunk's kernels read it (BatchNorm2d.backward_rows),
        so the batch norm's dL/dx is never written to memory and read back.  The
        same values as the two calls."""
        if not self.takes_batchnorm_grad(bn, grad, into):
            raise ValueError(f"{self._describe()}: cannot take {bn._describe()}'s gradient by "
                             "chunks (both in training mode after a forward, a BatchNorm2d "
                             "over this layer's output, a 1x1 on cnet's GEMM or a direct "
                             "layer, no bias or fused ReLU here; into of the input's shape, "
                             "aliasing no operand)")
        return self._backward(None, into=into, bn_grad=bn.backward_rows(grad))

    def _narrow_weight_grad(self, ws, dtype):
        """Whether backward's weight gradient is the narrow kernel's (in
        conv_direct_backward's parallel region)."""
        return ws["paths"][1] == "small" and _conv._narrow_fits(
            self.in_channels, self.out_channels, self.kernel_size[1], self.stride[1],
            self.dilation[1], self.groups, _conv.direct_lanes(dtype), False)

    def _narrow_backward(self, x):
        """Whether backward is the narrow weight-gradient kernel alone, with no input
        gradient: its planar pass can mask, sum and gather the gradient."""
        ws = self._workspace(x, self.output_shape(x.shape))
        return (not self.input_grad and ws["regions"] is None
                and self._narrow_weight_grad(ws, x.dtype))

    def _backward(self, grad_out, pooled=None, into=None, bn_grad=None):
        """dL/dx, or ``into`` + dL/dx (see _backward_into): in the GEMM's store on
        the own-GEMM 1x1 path, else by an add after the backward.  ``bn_grad``: a
        BatchNormInputGrad standing for grad_out, written by chunks
        (backward_through_batchnorm)."""
        x = require_cache(self, self._x)
        w = self.weight.data
        out_shape = self.output_shape(x.shape)
        dy = (None if pooled or bn_grad is not None
              else _check_grad(self, grad_out, out_shape, w.dtype))
        if bn_grad is not None and (self._chunked_grad_path(x) is None or self._relu
                                    or self.bias is not None):
            raise ValueError(f"{self._describe()}: this layer's backward does not take its "
                             "output gradient by chunks")
        n, oh, ow, cout = out_shape
        nt = num_threads()
        ws = self._workspace(x, out_shape)
        bias_done = False
        # The narrow kernel masks, sums the bias gradient (and gathers from the pool)
        # in its planar pass: no separate pass over the gradient.
        in_kernel = self._narrow_backward(x)
        bias_sums = None
        if in_kernel and self.bias is not None:
            bias_sums = _scratch("bias_sums", (ws["stripes"], cout), np.float64)
            bias_done = True
        if self._relu and not in_kernel:
            dy = _relu_backward(dy.reshape(-1, cout), self._y.reshape(-1, cout),
                                self.bias).reshape(dy.shape)
            bias_done = self.bias is not None
        chunk, n_chunks, stripes, rows = ws["chunk"], ws["n_chunks"], ws["stripes"], oh * ow
        bounds = ws["bounds"]
        _, dw_path, dx_path, by_images = ws["paths"]
        if ws["regions"] is not None:
            dx_path = "region"
            if dw_path == "gemm":
                dw_path = "region"
        pointwise = dx_path == "pointwise"   # the input is its own column matrix
        if not self.input_grad:
            dx_path = None                  # requires_input_grad_(False): dL/dx not wanted
        n_workers = min(nt, stripes)
        geom = self._geometry()
        kh, kw, _, _, ph, pw, dh, dw, _ = geom
        wstack = self._weight_stack(w)
        wstack_t = np.swapaxes(wstack, -1, -2)            # (G, Cout/G, K) view
        # The kernels write HWIO gradients; the GEMMs write (G, K, Cout/G) stacks.
        target = self._weight_stack(self.weight.grad) if dw_path == "gemm" else self.weight.grad
        slots = _scratch("slots", (stripes,) + target.shape, w.dtype)
        # cnet's GEMM sums the weight gradient into the stripe's slot in place
        own_gemm = self._own_gemm()
        own_dw = (dw_path == "gemm" and own_gemm
                  and cout % _conv.direct_lanes(w.dtype) == 0)
        if bn_grad is not None and own_dw:
            dybufs = self._worker_buffers("dy", n_workers, (chunk * rows, cout), w.dtype)
        if dw_path == "gemm":
            if not own_dw:
                dws = self._worker_buffers("dw", n_workers, target.shape, w.dtype)
            if not pointwise:
                cols = self._worker_buffers("col", n_workers, ws["col_shape"], x.dtype)
        if "region" in (dw_path, dx_path):
            wsubs = self._region_weights(ws, w)
            cols = self._worker_buffers("col", n_workers, ws["col_shape"], x.dtype)
            outs = self._worker_buffers("out", n_workers, (chunk * rows * cout,), x.dtype)
            dws = self._worker_buffers("dw", n_workers, (w.size,), w.dtype)
        if dx_path == "col2im":
            # The column gradient overwrites the columns once the weight-gradient
            # GEMM has read them: one buffer per worker instead of two.
            dcols = cols if dw_path == "gemm" else self._worker_buffers(
                "dcol", n_workers, ws["col_shape"], x.dtype)
        wflip = packed_flip = None
        if dx_path == "scatter":
            wscatter = _conv.scatter_weight(w)
        if dx_path == "planar":
            wplanar = _conv.planar_weight(w)
        if dx_path == "phase":
            phases = _conv.phase_weights(w, *self.stride, ph, pw, self.groups)
        if dx_path == "direct":
            dx_pad = (dh * (kh - 1) - ph, dw * (kw - 1) - pw)
            # dx = grouped conv of dy with the flipped kernel, inputs and outputs of
            # each group swapped (_conv.flip_weight), packed for the image-blocked
            # kernel where the weight is wide.
            if self._packed_weight_fits(w, by_images):
                wflip, packed_flip = None, _conv.flip_weight(w, self.groups, nt, True)
            else:
                wflip, packed_flip = _conv.flip_weight(w, self.groups, nt), None
        packed_t = (_packed_gemm_operand(wstack_t, nt) if dx_path in ("pointwise", "col2im")
                    and own_gemm else None)
        x2 = x.reshape(-1, self.in_channels)
        dy2 = None if dy is None else dy.reshape(-1, cout)
        narrow_dw = dw_path == "small" and self._narrow_weight_grad(ws, w.dtype)
        # All stripes in one parallel region of the direct kernels (no Python per chunk)
        region = (not in_kernel and (dw_path == "direct" or narrow_dw)
                  and dx_path in ("direct", "scatter", None))
        # into + dL/dx straight from the GEMM's store where the 1x1 runs on it, or
        # added chunk by chunk in the direct kernels' region
        into_gemm = into is not None and dx_path == "pointwise" and packed_t is not None
        into_region = into is not None and region and dx_path is not None
        dx = (None if dx_path is None else into if into_gemm or into_region
              else np.empty_like(x))
        dx2 = None if dx_path is None else dx.reshape(-1, self.in_channels)

        def stripe(s, wid, kt):
            acc = slots[s]
            first = s * n_chunks // stripes
            for t in range(first, (s + 1) * n_chunks // stripes):
                n0, n1 = bounds[t]
                r0, r1 = n0 * rows, n1 * rows
                if "region" in (dw_path, dx_path):
                    if dw_path == "direct":
                        _conv.conv_direct_wgrad(x, dy, acc, t != first, n0, n1, *geom[2:8],
                                                kt, self.groups)
                    self._region_backward(x, dy, dx, n0, n1, wsubs,
                                          acc if dw_path == "region" else None, t == first,
                                          cols[wid].reshape(-1), outs[wid], dws[wid], kt)
                    continue
                if bn_grad is not None:
                    # this chunk of dy made now, while the GEMMs below find it in cache
                    dyc = dybufs[wid][:r1 - r0]
                    bn_grad.write(r0, r1, dyc, kt)
                else:
                    dyc = dy2[r0:r1]
                dys = self._group_view(dyc)
                # weight gradient of this chunk into the stripe's slot
                if dw_path == "direct":
                    _conv.conv_direct_wgrad(x, dy, acc, t != first, n0, n1, *geom[2:8], kt,
                                            self.groups)
                elif dw_path == "depthwise":
                    _conv.depthwise_weight_grad(x, dy, acc, t != first, n0, n1, *geom[2:8], kt)
                elif dw_path == "small":
                    _conv.conv_small_wgrad(x, dy, acc, t != first, n0, n1, *geom[2:8], kt)
                else:
                    if pointwise:
                        c = x2[r0:r1]
                    else:
                        # Recompute the columns from the saved input: cheaper than keeping them.
                        c = cols[wid][:r1 - r0]
                        _conv.im2col(x, c, n0, n1, oh, ow, *geom, kt)
                    if own_dw:
                        _conv.gemm_tn(c, dyc, acc, t != first, 0, r1 - r0, kt)
                    else:
                        ct = np.swapaxes(self._group_view(c), -1, -2)
                        if t == first:
                            np.matmul(ct, dys, out=acc)
                        else:
                            np.matmul(ct, dys, out=dws[wid])
                            np.add(acc, dws[wid], out=acc)
                # input gradient of this chunk
                if dx_path == "direct":
                    _conv.conv_direct(dy, wflip, None, dx, n0, n1, 1, 1, *dx_pad, dh, dw, kt,
                                      self.groups, by_images, packed_flip)
                elif dx_path == "depthwise":
                    _conv.depthwise_input_grad(dy, w, dx, n0, n1, *geom[2:8], kt)
                elif dx_path == "pointwise" and packed_t is not None:
                    _conv.gemm_packed(dyc, packed_t, dx2[r0:r1], None, False, 0, r1 - r0, kt,
                                      accumulate=into_gemm)
                elif dx_path == "pointwise":
                    np.matmul(dys, wstack_t, out=self._group_view(dx2[r0:r1]))
                elif dx_path == "scatter":
                    _conv.conv_scatter_dx(dy, wscatter, dx, n0, n1, kh, kw, *geom[2:8], kt)
                elif dx_path == "planar":
                    _conv.conv_planar_dx(dy, wplanar, dx, n0, n1, ph, pw, kt)
                elif dx_path == "phase":
                    _conv.conv_phase_dx(dy, phases, dx, n0, n1, *self.stride, kt, self.groups)
                elif dx_path == "col2im":
                    dc = dcols[wid][:r1 - r0]
                    if packed_t is not None:
                        _conv.gemm_packed(dy2[r0:r1], packed_t, dc, None, False, 0, r1 - r0,
                                          kt)
                    else:
                        np.matmul(dys, wstack_t, out=self._group_view(dc))
                    _conv.col2im(dc, dx, n0, n1, oh, ow, *geom, kt)

        if in_kernel:
            pool = None
            if pooled:
                pool_layer, grad_pool = pooled
                pool = (grad_pool, pool_layer._idx, *pool_layer.kernel_size, *pool_layer.stride,
                        *pool_layer.padding, *pool_layer.dilation)
            _conv.conv_direct_backward(x, dy, slots, bounds, stripes, *geom[2:8], nt,
                                       self.groups, relu_y=self._y if self._relu else None,
                                       pool=pool, bias_sums=bias_sums)
            if bias_sums is not None:
                np.add(self.bias.grad, bias_sums[:stripes].sum(axis=0).astype(w.dtype),
                       out=self.bias.grad)
        elif region:
            _conv.conv_direct_backward(x, dy, slots, bounds, stripes, *geom[2:8], nt,
                                       self.groups, dx, wflip, packed_flip, by_images,
                                       wscatter if dx_path == "scatter" else None,
                                       bn_grad=None if bn_grad is None else bn_grad.operands,
                                       accumulate_dx=into_region)
        else:
            _run_tasks(stripe, stripes, nt)
        # fixed order: same bits for any thread count
        if target.flags.c_contiguous:
            _elementwise.add_slots(target, slots[:stripes], nt)
        else:
            for s in range(stripes):
                np.add(target, slots[s], out=target)
        if self.bias is not None and not bias_done:
            _bias_grad(dy2, self.bias.grad)
        if into is not None and not (into_gemm or into_region):
            return add_into(into, dx)
        return dx


class Linear(Module):
    """y = x @ weight + bias with weight (in_features, out_features) (torch.nn.Linear
    semantics, transposed weight layout).  Accepts (N, in) or (..., in) input."""
    _activations = ("_x", "_y")

    def __init__(self, in_features, out_features, bias=True, dtype=np.float32):
        super().__init__()
        in_features, out_features = int(in_features), int(out_features)
        if in_features < 1 or out_features < 1:
            raise ValueError(f"Linear: in_features={in_features} and out_features={out_features} "
                             "must be positive")
        self.in_features, self.out_features = in_features, out_features
        self.weight = Parameter(np.empty((in_features, out_features), dtype))
        self.bias = Parameter(np.empty((out_features,), dtype)) if bias else None
        self.reset_parameters()
        self._relu = False
        self._x = None
        self._y = None

    def reset_parameters(self):
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            init.fan_in_uniform_(self.bias, self.in_features)

    def fuse_relu(self):
        """Apply the following ReLU to each row part of the output right after its
        GEMM, while it is in cache (called by Sequential's plan); backward masks
        the gradient with the cached output in the bias-gradient pass."""
        self._relu = True
        return True

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}" + (", fused_relu=True" if self._relu else ""))

    def _drop_cache(self):
        self._x = None
        self._y = None

    def forward(self, x):
        w = self.weight.data
        _check_param_dtype(self, w.dtype)
        check_input(self, x, (2, 3, 4), channels=self.in_features, dtype=w.dtype)
        x2 = x.reshape(-1, self.in_features)
        y = np.empty(x.shape[:-1] + (self.out_features,), x.dtype)
        bias = None if self.bias is None else self.bias.data
        _gemms([(x2, w, y.reshape(-1, self.out_features), False, bias, self._relu)])
        if self.training:
            self._x = x
            self._y = y if self._relu else None
        return y

    def backward(self, grad_out):
        x = require_cache(self, self._x)
        w = self.weight.data
        dy = _check_grad(self, grad_out, x.shape[:-1] + (self.out_features,), w.dtype)
        x2 = x.reshape(-1, self.in_features)
        dy2 = dy.reshape(-1, self.out_features)
        if self._relu:
            g = _relu_backward(dy2, require_cache(self, self._y).reshape(dy2.shape), self.bias)
        else:
            g = dy2
            if self.bias is not None:
                _bias_grad(dy2, self.bias.grad)
        jobs = [(x2.T, g, self.weight.grad, True, None, False)]
        dx = None
        if self.input_grad:
            dx = np.empty_like(x)
            jobs.append((g, w.T, dx.reshape(-1, self.in_features), False, None, False))
        _gemms(jobs)
        return dx
