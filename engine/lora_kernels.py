"""LoRA's low-rank products as three small CUDA kernels, and the LoRA update built on them.

A rank-4 LoRA multiplies (tokens x 3072) activations by (3072 x 4) matrices. cuBLAS
runs such skinny products at a few percent of the card's bandwidth: on an H200 the
six small GEMMs of one LoRA layer's forward and backward took ~230 us where reading
and writing the activations once takes ~15 us, about 40% of a pets step (bench/NOTES.md).
Each product here is bandwidth-bound by construction (the first two also take their
small matrix transposed, so no call copies one):

  skinny_matmul(x, a)       x @ a.T      (M, K) x (R, K)  -> (M, R)   a block per row
  add_low_rank(c, z, b)     c + z @ b.T  (M, R) x (N, R)  -> (M, N)   8 outputs per thread
  reduce_outer(z, x)        z.T @ x      (M, R) x (M, K)  -> (R, K)   float32, per-chunk partials

Shapes (rows, widths) are read at run time, not compiled in: MLX keeps no custom kernel on
disk, so each process compiles these afresh, and now once per dtype and rank rather than once
per layer shape and token count (~25 s at a people run's first step before; bench/NOTES.md
items 21, 37). Partials are summed by MLX, not by atomics, so a step's result does not depend on
thread timing (resume stays bit-exact). Elsewhere (CPU, Metal, shapes the kernels do
not take) the same functions are plain MLX matmuls, so `lora_update` and its hand-written
backward are tested everywhere; the kernels themselves are checked on the GPU
(tests/test_lora_kernels.py, bench/profile_step.py).
"""
from __future__ import annotations

from functools import cache

import mlx.core as mx

from engine.flux import speed

_HEADER = """
// COUNT consecutive values as floats; one 16-byte load when the address allows it
template <typename T, int COUNT>
__device__ __forceinline__ void load(const T* source, float* values) {
    if (COUNT * sizeof(T) == 16 && (reinterpret_cast<unsigned long long>(source) & 15) == 0) {
        const uint4 raw = *reinterpret_cast<const uint4*>(source);
        const T* packed = reinterpret_cast<const T*>(&raw);
        #pragma unroll
        for (int e = 0; e < COUNT; ++e) values[e] = static_cast<float>(packed[e]);
        return;
    }
    #pragma unroll
    for (int e = 0; e < COUNT; ++e) values[e] = static_cast<float>(source[e]);
}

// eight floats stored as T, one 16-byte store when the address allows it
template <typename T>
__device__ __forceinline__ void store8(T* target, const float* values) {
    if (sizeof(T) == 2 && (reinterpret_cast<unsigned long long>(target) & 15) == 0) {
        uint4 raw;
        T* packed = reinterpret_cast<T*>(&raw);
        #pragma unroll
        for (int e = 0; e < 8; ++e) packed[e] = static_cast<T>(values[e]);
        *reinterpret_cast<uint4*>(target) = raw;
        return;
    }
    #pragma unroll
    for (int e = 0; e < 8; ++e) target[e] = static_cast<T>(values[e]);
}
"""

# A block of 128 threads takes ROWS rows of x: each thread holds an 8-wide slice of the small
# matrix for all R and applies it to every row, then warps and the block reduce the sums.
# LOAD_A fills av[j][e] = a(j, k + e) from a (R, K) or a (K, R).
_SKINNY_SOURCE = """
    const long long M = x_shape[0];
    const int K = x_shape[1];
    const int tid = threadIdx.x;
    const long long row0 = (long long)blockIdx.x * ROWS;
    float acc[ROWS][R];
    #pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        #pragma unroll
        for (int j = 0; j < R; ++j) acc[r][j] = 0.0f;
    }
    for (int k = tid * 8; k < K; k += 1024) {
        float av[R][8];
        LOAD_A
        #pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            if (row0 + r < M) {
                float xv[8];
                load<T, 8>(x + (row0 + r) * K + k, xv);
                #pragma unroll
                for (int j = 0; j < R; ++j) {
                    #pragma unroll
                    for (int e = 0; e < 8; ++e) acc[r][j] += xv[e] * av[j][e];
                }
            }
        }
    }
    __shared__ float partial[4][ROWS * R];
    #pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        #pragma unroll
        for (int j = 0; j < R; ++j) {
            float v = acc[r][j];
            #pragma unroll
            for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffff, v, offset);
            if ((tid & 31) == 0) partial[tid >> 5][r * R + j] = v;
        }
    }
    __syncthreads();
    for (int i = tid; i < ROWS * R; i += 128) {
        if (row0 + i / R < M) {
            float sum = 0.0f;
            #pragma unroll
            for (int w = 0; w < 4; ++w) sum += partial[w][i];
            out[row0 * R + i] = static_cast<T>(sum);
        }
    }
"""

# A thread takes 8 consecutive columns of RPT rows: it holds b's slice for them in registers
# and writes out = c + z @ b.T one row at a time. LOAD_B fills bv[j][e] = b(column + e, j)
# from b (N, R) or b (R, N).
_ADD_LOW_RANK_SOURCE = """
    const long long M = z_shape[0];
    const int N = b_shape[B_TRANSPOSED ? 1 : 0];
    const long long index = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long chunk = index / (N / 8);
    if (chunk * RPT >= M) {
        return;
    }
    const int column = (int)(index % (N / 8)) * 8;
    float bv[R][8];
    LOAD_B
    const long long end = min((long long)M, (chunk + 1) * RPT);
    for (long long row = chunk * RPT; row < end; ++row) {
        float acc[8];
        INIT_ACC
        float zr[R];
        load<T, R>(z + row * R, zr);
        #pragma unroll
        for (int j = 0; j < R; ++j) {
            #pragma unroll
            for (int e = 0; e < 8; ++e) acc[e] += zr[j] * bv[j][e];
        }
        store8<T>(out + row * N + column, acc);
    }
"""

# A block of 256 threads takes 32 groups of COLS columns (R * COLS = 32) and one chunk of CHUNK
# rows: its 8 warps take every 8th row of the chunk, then sum through shared memory, so
# partial[chunk] = z[chunk].T @ x[chunk].
_REDUCE_OUTER_SOURCE = """
    const long long M = x_shape[0];
    const int K = x_shape[1];
    const long long CHUNK = (M + SPLITS - 1) / SPLITS;
    const int GROUP_BLOCKS = (K / COLS + 31) / 32;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int group = blockIdx.x % GROUP_BLOCKS * 32 + lane;
    const long long chunk = blockIdx.x / GROUP_BLOCKS;
    const bool active = group < K / COLS;
    const int column = group * COLS;
    float acc[R][COLS];
    #pragma unroll
    for (int j = 0; j < R; ++j) {
        #pragma unroll
        for (int e = 0; e < COLS; ++e) acc[j][e] = 0.0f;
    }
    const long long end = min((long long)M, (chunk + 1) * CHUNK);
    if (active) {
        for (long long m = chunk * CHUNK + warp; m < end; m += 8) {
            float xv[COLS];
            load<T, COLS>(x + m * K + column, xv);
            float zr[R];
            load<T, R>(z + m * R, zr);
            #pragma unroll
            for (int j = 0; j < R; ++j) {
                #pragma unroll
                for (int e = 0; e < COLS; ++e) acc[j][e] += zr[j] * xv[e];
            }
        }
    }
    __shared__ float shared[8][R * COLS][32];
    #pragma unroll
    for (int j = 0; j < R; ++j) {
        #pragma unroll
        for (int e = 0; e < COLS; ++e) shared[warp][j * COLS + e][lane] = acc[j][e];
    }
    __syncthreads();
    if (warp == 0 && active) {
        #pragma unroll
        for (int j = 0; j < R; ++j) {
            #pragma unroll
            for (int e = 0; e < COLS; ++e) {
                float sum = 0.0f;
                #pragma unroll
                for (int w = 0; w < 8; ++w) sum += shared[w][j * COLS + e][lane];
                out[(chunk * R + j) * K + column + e] = sum;
            }
        }
    }
"""

# the partials of reduce_outer summed over chunks, one output per thread, always in the same order
_SUM_CHUNKS_SOURCE = """
    const long long SIZE = (long long)partials_shape[1] * partials_shape[2];
    const int CHUNKS = partials_shape[0];
    const long long index = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (index >= SIZE) {
        return;
    }
    float sum = 0.0f;
    for (int c = 0; c < CHUNKS; ++c) sum += partials[c * SIZE + index];
    out[index] = sum;
"""

# reduce_outer splits the rows into this many chunks, summed afterwards in a fixed order
REDUCE_CHUNKS = 16
# Ranks above this go through matmuls. The kernels keep R x 8 values per thread in registers;
# ranks 4 and 8 ran in full-size steps (pets, people, with and without checkpointing). The one
# run with rank 16 (style's joint blocks) and gradient checkpointing hit an illegal memory
# access on the H200 that could not be traced in the time left (bench/NOTES.md), so rank 16
# stays on cuBLAS until it is.
MAX_RANK = 8


@cache
def _kernel(name: str, inputs: tuple[str, ...], source: str):
    return mx.fast.cuda_kernel(name=name, input_names=list(inputs), output_names=["out"], source=source,
                               header=_HEADER)


def kernels_apply(dtype: mx.Dtype, width: int, rank: int = 1) -> bool:
    """Whether the kernels take activations of this dtype and (8-aligned) width, for this rank: bf16/fp16 on CUDA."""
    return (speed.LORA_KERNELS and speed.on_cuda() and dtype in (mx.bfloat16, mx.float16) and width % 8 == 0
            and rank <= MAX_RANK)


def _grid(threads: int) -> tuple[int, int, int]:
    return ((threads + 255) // 256 * 256, 1, 1)


# How each kernel reads its small matrix, by its layout. The slice a thread needs is contiguous
# in the (K, R) / (N, R) layout too (8 rows of R values): loaded as R vectors, then regrouped.
_SLICE_OF_ROWS = """
        float slice[8 * R];
        #pragma unroll
        for (int i = 0; i < R; ++i) load<T, 8>(SOURCE + (long long)(START) * R + 8 * i, slice + 8 * i);
        #pragma unroll
        for (int j = 0; j < R; ++j) {
            #pragma unroll
            for (int e = 0; e < 8; ++e) TARGET[j][e] = slice[e * R + j];
        }
"""
_LOAD_A = {False: "for (int j = 0; j < R; ++j) load<T, 8>(a + (long long)j * K + k, av[j]);",  # a is (R, K)
           True: _SLICE_OF_ROWS.replace("SOURCE", "a").replace("START", "k").replace("TARGET", "av")}
_LOAD_B = {False: _SLICE_OF_ROWS.replace("SOURCE", "b").replace("START", "column").replace("TARGET", "bv"),
           True: "for (int j = 0; j < R; ++j) load<T, 8>(b + (long long)j * N + column, bv[j]);"}  # b is (R, N)
ROWS_PER_THREAD = 8


def skinny_matmul(x: mx.array, a: mx.array, transposed: bool = False) -> mx.array:
    """x @ a.T for a (R, K) with few rows (the rank), or x @ a for a (K, R) when `transposed`:
    (..., K) -> (..., R), in x's dtype."""
    width, rank = a.shape if transposed else a.shape[::-1]
    a = a.astype(x.dtype)
    if not kernels_apply(x.dtype, width, rank):
        return x @ (a if transposed else a.T)
    rows = x.size // width
    rows_per_block = 2 if rank <= 8 else 1  # many small blocks: the card needs ~1000 to stay busy
    out = _kernel(f"lora_skinny_matmul_{int(transposed)}", ("x", "a"),
                  _SKINNY_SOURCE.replace("LOAD_A", _LOAD_A[transposed]))(
        inputs=[x.reshape(rows, width), a], template=[("T", x.dtype), ("R", rank), ("ROWS", rows_per_block)],
        grid=((rows + rows_per_block - 1) // rows_per_block * 128, 1, 1), threadgroup=(128, 1, 1),
        output_shapes=[(rows, rank)], output_dtypes=[x.dtype])[0]
    return out.reshape(*x.shape[:-1], rank)


def add_low_rank(c: mx.array | None, z: mx.array, b: mx.array, transposed: bool = False) -> mx.array:
    """c + z @ b.T for b (N, R), or c + z @ b for b (R, N) when `transposed`, z having few
    columns (the rank): (..., R) -> (..., N), in z's dtype. c may be None (no addition)."""
    width, rank = b.shape[::-1] if transposed else b.shape
    b = b.astype(z.dtype)
    # the kernel's 8-wide vectors run along N (z's width is the rank)
    if not kernels_apply(z.dtype, width, rank) or (c is not None and c.dtype != z.dtype):
        b = b if transposed else b.T
        if c is not None and c.dtype == z.dtype and speed.LORA_ADDMM:
            return mx.addmm(c, z, b)  # one buffer, not a product and a sum (runs short of the kernels take this)
        product = z @ b
        return product if c is None else c + product.astype(c.dtype)
    rows = z.size // rank
    inputs, names = [z.reshape(rows, rank), b], ("z", "b")
    if c is not None:
        inputs, names = [c.reshape(rows, width), *inputs], ("c", *names)
    init = ("load<T, 8>(c + row * N + column, acc);" if c is not None
            else "for (int e = 0; e < 8; ++e) acc[e] = 0.0f;")
    source = _ADD_LOW_RANK_SOURCE.replace("INIT_ACC", init).replace("LOAD_B", _LOAD_B[transposed])
    out = _kernel(f"lora_add_low_rank_{len(names)}_{int(transposed)}", names, source)(
        inputs=inputs,
        template=[("T", z.dtype), ("R", rank), ("B_TRANSPOSED", transposed), ("RPT", ROWS_PER_THREAD)],
        grid=_grid((rows + ROWS_PER_THREAD - 1) // ROWS_PER_THREAD * (width // 8)), threadgroup=(256, 1, 1),
        output_shapes=[(rows, width)],
        output_dtypes=[z.dtype])[0]
    return out.reshape(*z.shape[:-1], width)


def reduce_outer(z: mx.array, x: mx.array, float32: bool = True) -> mx.array:
    """z.T @ x over all leading axes, in float32: (..., R) x (..., K) -> (R, K). With `float32` False,
    the matmul route leaves its product in x's dtype (it is rounded to that dtype either way), for a
    caller whose consumer casts it (the optimizer update, with its own kernel)."""
    rank, width = z.shape[-1], x.shape[-1]
    z2, x2 = z.reshape(-1, rank), x.reshape(-1, width)

    def by_matmul():
        # in x's dtype, as autodiff of a LoRA layer would: a float32 copy of x (and of the incoming
        # gradient) per layer was 0.3 GiB more in a 4-bit people backward stage, where runs too short
        # for the kernels (speed.kernels_not_worth_compiling) come here
        product = z2.astype(x2.dtype).T @ x2
        return product.astype(mx.float32) if float32 else product

    if not kernels_apply(x.dtype, width, rank):
        return by_matmul()
    rows = x2.shape[0]
    columns_per_thread = max(1, 32 // rank)  # rank x columns = 32 sums per thread
    if (width // columns_per_thread) * columns_per_thread != width:
        return by_matmul()
    group_blocks = (width // columns_per_thread + 31) // 32
    chunk = (rows + REDUCE_CHUNKS - 1) // REDUCE_CHUNKS
    chunks = (rows + chunk - 1) // chunk
    partials = _kernel("lora_reduce_outer", ("z", "x"), _REDUCE_OUTER_SOURCE)(
        inputs=[z2.astype(x.dtype), x2],
        template=[("T", x.dtype), ("R", rank), ("SPLITS", REDUCE_CHUNKS), ("COLS", columns_per_thread)],
        grid=(group_blocks * chunks * 256, 1, 1), threadgroup=(256, 1, 1), output_shapes=[(chunks, rank, width)],
        output_dtypes=[mx.float32])[0]
    size = rank * width
    return _kernel("lora_sum_chunks", ("partials",), _SUM_CHUNKS_SOURCE)(
        inputs=[partials], grid=_grid(size),
        threadgroup=(256, 1, 1), output_shapes=[(rank, width)], output_dtypes=[mx.float32])[0]


@mx.custom_function
def lora_update(y: mx.array, x: mx.array, lora_A: mx.array, lora_B_scaled: mx.array) -> mx.array:
    """y + (x @ A.T) @ B_scaled.T, with A (rank, in) and B_scaled (out, rank) the float32
    masters (B already times the LoRA scale), computed in x's dtype.

    The backward recomputes x @ A.T (rank columns: cheaper than keeping it) and gives
    float32 gradients for A and B directly."""
    return add_low_rank(y, skinny_matmul(x, lora_A), lora_B_scaled)


@lora_update.vjp
def _lora_update_vjp(primals, cotangent, output):
    y, x, lora_A, lora_B_scaled = primals
    cotangent = cotangent.astype(x.dtype)
    z = skinny_matmul(x, lora_A)  # x @ A.T: (..., rank)
    dz = skinny_matmul(cotangent, lora_B_scaled, transposed=True)  # cotangent @ B: (..., rank)
    grad_x = add_low_rank(None, dz, lora_A, transposed=True)  # dz @ A: (..., in)
    grad_A = reduce_outer(dz, x)  # dz.T @ x: (rank, in)
    grad_B = reduce_outer(z, cotangent).T  # (z.T @ cotangent).T: (out, rank)
    return cotangent.astype(y.dtype), grad_x, grad_A, grad_B
