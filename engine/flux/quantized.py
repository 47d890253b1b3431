"""Quantized linears that dequantize just in time for a plain matmul.

On CUDA (and CPU) MLX's quantized matmul is several times slower than a
bf16 matmul at FLUX's training shapes (bench/NOTES.md: one 3072x21504 linear,
forward+backward, 2.17 ms quantized vs 0.55 ms dequantize-then-matmul), while
the dequantization itself is cheap. The backward dequantizes again rather than
keeping the dense weight, so memory stays at the quantized size. Apple's Metal
kernels for quantized matmul are fast, so there the stock layer stays.
"""
from __future__ import annotations

from contextlib import contextmanager
from functools import cache

import mlx.core as mx
import mlx.nn as nn

from engine.flux import speed


# One thread per packed 32-bit word: it reads the word and its group's scale and bias once
# and writes all 32/BITS values with one vector store. MLX 0.32's own CUDA dequantize moved
# ~1 TB/s at FLUX's shapes (bench/NOTES.md), a quarter of an H200's bandwidth. A group never
# spans two words (GROUP is a multiple of 32/BITS) nor two rows (the row's width is a multiple
# of GROUP), so word w's group is w * (32/BITS) / GROUP whatever the shape: the kernel takes the
# shape at run time, and a process compiles it once per dtype, bits and group size. MLX keeps no
# custom kernel on disk, so each shape compiled as its own kernel cost every process about a
# second: 6.6 s in a people run's first block (bench/NOTES.md item 37).
_DEQUANTIZE_SOURCE = """
    const uint64_t word = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    constexpr int PER_WORD = 32 / BITS;
    if (word >= (uint64_t)wq_shape[0] * (uint64_t)wq_shape[1]) {
        return;
    }
    const uint64_t group = word * PER_WORD / GROUP;
    const float scale = static_cast<float>(scales[group]);
    const float bias = static_cast<float>(biases[group]);
    const uint32_t packed = wq[word];
    struct alignas(2 * PER_WORD) Values { T v[PER_WORD]; } values;
    #pragma unroll
    for (int j = 0; j < PER_WORD; ++j) {
        values.v[j] = static_cast<T>(scale * static_cast<float>((packed >> (BITS * j)) & ((1u << BITS) - 1)) + bias);
    }
    reinterpret_cast<Values*>(out)[word] = values;
"""


@cache
def _dequantize_kernel():
    return mx.fast.cuda_kernel(name="affine_dequantize_words", input_names=["wq", "scales", "biases"],
                               output_names=["out"], source=_DEQUANTIZE_SOURCE)


def cuda_dequantize_supported(wq: mx.array, scales: mx.array, group_size: int, bits: int, mode: str) -> bool:
    return (mode == "affine" and bits in (4, 8) and wq.ndim == 2 and wq.dtype == mx.uint32
            and scales.dtype in (mx.bfloat16, mx.float16) and group_size % (32 // bits) == 0
            and speed.on_cuda())


def dequantize(wq: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int, mode: str) -> mx.array:
    """mx.dequantize, through the word-per-thread kernel above where it applies (CUDA, affine, 4/8 bits)."""
    if not (speed.CUDA_DEQUANTIZE and cuda_dequantize_supported(wq, scales, group_size, bits, mode)):
        return mx.dequantize(wq, scales, biases, group_size, bits, mode=mode)
    rows, columns = wq.shape[0], wq.shape[1] * 32 // bits
    words = wq.size
    return _dequantize_kernel()(
        inputs=[wq, scales, biases],
        template=[("T", scales.dtype), ("BITS", bits), ("GROUP", group_size)],
        grid=((words + 255) // 256 * 256, 1, 1), threadgroup=(256, 1, 1),
        output_shapes=[(rows, columns)], output_dtypes=[scales.dtype])[0]


def plus_bias(x: mx.array, dense: mx.array, bias: mx.array | None) -> mx.array:
    """x @ dense.T (+ bias): the bias added by the matmul's own epilogue, so the layer's output is one
    buffer, not a product and a sum. Inside a queued stage MLX holds every buffer until the GPU has
    run it (engine/blockwise_step.py), and a people single block has 8 (tokens x hidden) tensors of
    such sums."""
    if bias is None:
        return x @ dense.T
    return mx.addmm(bias.astype(x.dtype), x, dense.T)


def dense_after(trigger: mx.array, packed, group_size: int, bits: int, mode: str) -> mx.array:
    """The dense weight of `packed` (wq, scales, biases) in `trigger`'s dtype, dequantized only once
    `trigger` is: without this ordering MLX may schedule every layer's dequantize up front (they depend
    only on weights), holding all dense weights at once."""
    wq, scales, biases = mx.depends(list(packed), [trigger])
    return dequantize(wq, scales, biases, group_size, bits, mode).astype(trigger.dtype)


@cache
def dequantized_matmul(group_size: int, bits: int, mode: str, with_bias: bool = False):
    """x @ dequantize(w).T (+ bias, the last input when `with_bias`) with a backward that recomputes
    the dense weight."""

    @mx.custom_function
    def matmul(x, wq, scales, biases, *bias):
        return plus_bias(x, dense_after(x, (wq, scales, biases), group_size, bits, mode), bias[0] if with_bias else None)

    @matmul.vjp
    def matmul_vjp(primals, cotangent, output):
        x, wq, scales, biases, *bias = primals
        grad_x = cotangent @ dense_after(cotangent, (wq, scales, biases), group_size, bits, mode)
        # the frozen base gets no gradient; zeros are never evaluated
        return (grad_x, *(mx.zeros_like(a) for a in (wq, scales, biases, *bias)))

    return matmul


_keep_dense = False  # set by `keeping_dense_weights` while a stage's backward is traced


@contextmanager
def keeping_dense_weights():
    """Inside it, DequantizingLinear dequantizes once and lets autodiff keep the dense weight for the
    backward: for engine/blockwise_step.py, whose backward recomputes one block at a time, so only
    that block's dense weights are kept, and the second dequantize of each layer is saved."""
    global _keep_dense
    before, _keep_dense = _keep_dense, True
    try:
        yield
    finally:
        _keep_dense = before


class DequantizingLinear(nn.QuantizedLinear):
    """An nn.QuantizedLinear (same parameters, same files) computed by dequantize + matmul."""

    @classmethod
    def from_quantized(cls, layer: nn.QuantizedLinear) -> "DequantizingLinear":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.__dict__.update({k: v for k, v in layer.__dict__.items()})
        dict.update(new, layer)
        return new

    # below this many input rows (the modulation linears see one row per sample) MLX's quantized
    # matrix-vector kernel is fast and needs no dense copy of the weight. From 8 rows MLX runs its
    # quantized matrix-matrix kernel: slower than dequantize + matmul at FLUX's shapes (module
    # docstring), and on CUDA a kernel NVRTC compiles for about 40 s the first time (CLIP's 77
    # tokens took it: bench/NOTES.md item 36)
    MIN_ROWS = 8

    def takes_dense_route(self, x: mx.array) -> bool:
        """Whether a call on `x` dequantizes for a plain matmul (otherwise MLX's quantized matmul runs)."""
        return (self.get("biases") is not None and getattr(self, "mode", "affine") == "affine"
                and x.size // x.shape[-1] >= self.MIN_ROWS)

    def _dense(self, dtype: mx.Dtype) -> mx.array:
        return dequantize(self["weight"], self["scales"], self["biases"], self.group_size, self.bits,
                          self.mode).astype(dtype)

    def lora_operands(self, x: mx.array) -> tuple[tuple | None, list[mx.array]]:
        """For engine.lora_fused.lora_linear on `x` (where `takes_dense_route`): its `quantized` and
        its weight arrays: the dense weight while a stage's backward keeps them (keeping_dense_weights),
        otherwise the packed ones."""
        if _keep_dense:
            return None, [self._dense(x.dtype)]
        return (self.group_size, self.bits, self.mode), [self["weight"], self["scales"], self["biases"]]

    def __call__(self, x: mx.array) -> mx.array:
        if not self.takes_dense_route(x):
            return super().__call__(x)
        bias = self.get("bias")
        if _keep_dense:
            return plus_bias(x, self._dense(x.dtype), bias)
        matmul = dequantized_matmul(self.group_size, self.bits, self.mode, bias is not None)
        return matmul(x, self["weight"], self["scales"], self["biases"], *([] if bias is None else [bias]))


def prefer_dequantizing() -> bool:
    """Everywhere but Metal, where MLX's quantized matmul kernels are the fast path."""
    try:
        return not mx.metal.is_available()
    except AttributeError:
        return True


def use_dequantizing_linears(model: nn.Module) -> int:
    """Swap every nn.QuantizedLinear in `model` for a DequantizingLinear; returns how many."""
    from engine.lora import set_module

    swaps = [(path, layer) for path, layer in model.named_modules()
             if isinstance(layer, nn.QuantizedLinear) and not isinstance(layer, DequantizingLinear)]
    for path, layer in swaps:
        set_module(model, path, DequantizingLinear.from_quantized(layer))
    return len(swaps)
