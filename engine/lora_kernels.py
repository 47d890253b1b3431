"""LoRA's low-rank products as three small CUDA kernels, and the LoRA update built on them.

A rank-4 LoRA multiplies (tokens x 3072) activations by (3072 x 4) matrices. cuBLAS
runs such skinny products at a few percent of the card's bandwidth: on an H200 the
six small GEMMs of one LoRA layer's forward and backward took ~230 us where reading
and writing the activations once takes ~15 us, about 40% of a pets step (bench/NOTES.md).
Each product here is bandwidth-bound by construction:

  skinny_matmul(x, a)       x @ a.T      (M, K) x (R, K)  -> (M, R)   one warp per rows
  add_low_rank(c, z, bt)    c + z @ bt   (M, R) x (R, N)  -> (M, N)   8 outputs per thread
  reduce_outer(z, x)        z.T @ x      (M, R) x (M, K)  -> (R, K)   float32, per-chunk partials

Partials are summed by MLX, not by atomics, so a step's result does not depend on
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
template <typename T, int COUNT>
__device__ __forceinline__ void load(const T* source, float* values) {
    #pragma unroll
    for (int e = 0; e < COUNT; ++e) {
        values[e] = static_cast<float>(source[e]);
    }
}
"""

# one warp per ROWS rows of x: lanes stride over K eight values at a time, then a warp reduction
_SKINNY_SOURCE = """
    const int lane = threadIdx.x & 31;
    const long long first_row = (((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5) * ROWS;
    if (first_row >= M) {
        return;
    }
    float acc[ROWS][R];
    #pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        #pragma unroll
        for (int j = 0; j < R; ++j) acc[r][j] = 0.0f;
    }
    for (int k = lane * 8; k < K; k += 256) {
        float av[R][8];
        #pragma unroll
        for (int j = 0; j < R; ++j) load<T, 8>(a + (long long)j * K + k, av[j]);
        #pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            if (first_row + r < M) {
                float xv[8];
                load<T, 8>(x + (first_row + r) * K + k, xv);
                #pragma unroll
                for (int j = 0; j < R; ++j) {
                    #pragma unroll
                    for (int e = 0; e < 8; ++e) acc[r][j] += xv[e] * av[j][e];
                }
            }
        }
    }
    #pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        #pragma unroll
        for (int j = 0; j < R; ++j) {
            float v = acc[r][j];
            #pragma unroll
            for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffff, v, offset);
            if (lane == 0 && first_row + r < M) out[(first_row + r) * R + j] = static_cast<T>(v);
        }
    }
"""

# eight consecutive outputs of one row per thread: out = c + z @ bt
_ADD_LOW_RANK_SOURCE = """
    const long long index = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (index >= (long long)M * (N / 8)) {
        return;
    }
    const long long row = index / (N / 8);
    const int column = (int)(index % (N / 8)) * 8;
    float acc[8];
    INIT_ACC
    #pragma unroll
    for (int j = 0; j < R; ++j) {
        const float zj = static_cast<float>(z[row * R + j]);
        float bv[8];
        load<T, 8>(bt + (long long)j * N + column, bv);
        #pragma unroll
        for (int e = 0; e < 8; ++e) acc[e] += zj * bv[e];
    }
    #pragma unroll
    for (int e = 0; e < 8; ++e) out[row * N + column + e] = static_cast<T>(acc[e]);
"""

# COLS consecutive columns of one chunk of CHUNK rows per thread: partial[chunk] = z[chunk].T @ x[chunk]
_REDUCE_OUTER_SOURCE = """
    const long long index = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long chunk = index / (K / COLS);
    if (chunk * CHUNK >= M) {
        return;
    }
    const int column = (int)(index % (K / COLS)) * COLS;
    float acc[R][COLS];
    #pragma unroll
    for (int j = 0; j < R; ++j) {
        #pragma unroll
        for (int e = 0; e < COLS; ++e) acc[j][e] = 0.0f;
    }
    const long long end = min((long long)M, (chunk + 1) * CHUNK);
    for (long long m = chunk * CHUNK; m < end; ++m) {
        float xv[COLS];
        load<T, COLS>(x + m * K + column, xv);
        #pragma unroll
        for (int j = 0; j < R; ++j) {
            const float zj = static_cast<float>(z[m * R + j]);
            #pragma unroll
            for (int e = 0; e < COLS; ++e) acc[j][e] += zj * xv[e];
        }
    }
    #pragma unroll
    for (int j = 0; j < R; ++j) {
        #pragma unroll
        for (int e = 0; e < COLS; ++e) out[(chunk * R + j) * K + column + e] = acc[j][e];
    }
"""

MAX_RANK = 64


@cache
def _kernel(name: str, inputs: tuple[str, ...], source: str):
    return mx.fast.cuda_kernel(name=name, input_names=list(inputs), output_names=["out"], source=source,
                               header=_HEADER)


@cache
def _cuda_default() -> bool:
    try:
        return mx.cuda.is_available() and mx.default_device() == mx.gpu
    except AttributeError:
        return False


def kernels_apply(dtype: mx.Dtype, width: int) -> bool:
    """Whether the kernels take activations of this dtype and (8-aligned) width: bf16/fp16 on CUDA."""
    return speed.LORA_KERNELS and _cuda_default() and dtype in (mx.bfloat16, mx.float16) and width % 8 == 0


def _grid(threads: int) -> tuple[int, int, int]:
    return ((threads + 255) // 256 * 256, 1, 1)


def skinny_matmul(x: mx.array, a: mx.array) -> mx.array:
    """x @ a.T for a with few rows (the rank): (..., K) x (R, K) -> (..., R), in x's dtype."""
    rank, width = a.shape
    if rank > MAX_RANK or not kernels_apply(x.dtype, width):
        return x @ a.astype(x.dtype).T
    rows = x.size // width
    rows_per_warp = max(1, min(4, 32 // rank))
    warps = (rows + rows_per_warp - 1) // rows_per_warp
    out = _kernel("lora_skinny_matmul", ("x", "a"), _SKINNY_SOURCE)(
        inputs=[x, a.astype(x.dtype)],
        template=[("T", x.dtype), ("R", rank), ("K", width), ("M", rows), ("ROWS", rows_per_warp)],
        grid=_grid(warps * 32), threadgroup=(256, 1, 1), output_shapes=[(rows, rank)], output_dtypes=[x.dtype])[0]
    return out.reshape(*x.shape[:-1], rank)


def add_low_rank(c: mx.array | None, z: mx.array, bt: mx.array) -> mx.array:
    """c + z @ bt for few columns of z (the rank): (..., R) x (R, N) -> (..., N), in z's dtype."""
    rank, width = bt.shape
    # the kernel's 8-wide vectors run along N (z's width is the rank)
    if rank > MAX_RANK or not kernels_apply(z.dtype, width) or (c is not None and c.dtype != z.dtype):
        product = z @ bt.astype(z.dtype)
        return product if c is None else c + product.astype(c.dtype)
    rows = z.size // rank
    inputs, names = [z, bt.astype(z.dtype)], ("z", "bt")
    if c is not None:
        inputs, names = [c, *inputs], ("c", *names)
    init = ("load<T, 8>(c + row * N + column, acc);" if c is not None
            else "for (int e = 0; e < 8; ++e) acc[e] = 0.0f;")
    out = _kernel(f"lora_add_low_rank_{len(names)}", names, _ADD_LOW_RANK_SOURCE.replace("INIT_ACC", init))(
        inputs=inputs,
        template=[("T", z.dtype), ("R", rank), ("N", width), ("M", rows)],
        grid=_grid(rows * width // 8), threadgroup=(256, 1, 1), output_shapes=[(rows, width)],
        output_dtypes=[z.dtype])[0]
    return out.reshape(*z.shape[:-1], width)


def reduce_outer(z: mx.array, x: mx.array) -> mx.array:
    """z.T @ x over all leading axes, in float32: (..., R) x (..., K) -> (R, K)."""
    rank, width = z.shape[-1], x.shape[-1]
    z2, x2 = z.reshape(-1, rank), x.reshape(-1, width)
    if rank > MAX_RANK or not kernels_apply(x.dtype, width):
        return z2.T.astype(mx.float32) @ x2.astype(mx.float32)
    rows = x2.shape[0]
    columns_per_thread = 8 if rank <= 8 else 4 if rank <= 16 else 2
    threads_per_chunk = width // columns_per_thread
    chunks = max(1, min(rows, 65536 // threads_per_chunk))
    chunk = (rows + chunks - 1) // chunks
    chunks = (rows + chunk - 1) // chunk
    partials = _kernel("lora_reduce_outer", ("z", "x"), _REDUCE_OUTER_SOURCE)(
        inputs=[z2.astype(x.dtype), x2],
        template=[("T", x.dtype), ("R", rank), ("K", width), ("M", rows), ("CHUNK", chunk),
                  ("COLS", columns_per_thread)],
        grid=_grid(chunks * threads_per_chunk), threadgroup=(256, 1, 1), output_shapes=[(chunks, rank, width)],
        output_dtypes=[mx.float32])[0]
    return partials.sum(axis=0)


@mx.custom_function
def lora_update(y: mx.array, x: mx.array, lora_A: mx.array, lora_B_scaled: mx.array) -> mx.array:
    """y + (x @ A.T) @ B_scaled.T, with A (rank, in) and B_scaled (out, rank) the float32
    masters (B already times the LoRA scale), computed in x's dtype.

    The backward recomputes x @ A.T (rank columns: cheaper than keeping it) and gives
    float32 gradients for A and B directly."""
    z = skinny_matmul(x, lora_A)
    return add_low_rank(y, z, lora_B_scaled.T.astype(x.dtype))


@lora_update.vjp
def _lora_update_vjp(primals, cotangent, output):
    y, x, lora_A, lora_B_scaled = primals
    cotangent = cotangent.astype(x.dtype)
    z = skinny_matmul(x, lora_A)  # (..., rank)
    dz = skinny_matmul(cotangent, lora_B_scaled.T)  # d/dz of z @ B.T: (..., rank)
    grad_x = add_low_rank(None, dz, lora_A.astype(x.dtype))  # dz @ A
    grad_A = reduce_outer(dz, x)  # dz.T @ x: (rank, in)
    grad_B = reduce_outer(z, cotangent).T  # (cotangent.T @ z): (out, rank)
    return cotangent.astype(y.dtype), grad_x, grad_A, grad_B
