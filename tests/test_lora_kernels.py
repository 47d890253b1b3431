"""The training step's hand-written pieces: LoRA's update with its own backward
(engine/lora_kernels.py), GELU's and the quantized matmul's backward, RoPE's
CUDA route. Everywhere, each must equal plain MLX autodiff; on CUDA the kernels
must also equal the matmuls they replace (those tests skip elsewhere)."""
from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from engine.flux import speed
from engine.lora_kernels import add_low_rank, lora_update, reduce_outer, skinny_matmul

ON_CUDA = hasattr(mx, "cuda") and mx.cuda.is_available()


def _arrays(shape_x, shape_y, rank, dtype=mx.float32, seed=0):
    keys = mx.random.split(mx.random.key(seed), 5)
    x = mx.random.normal(shape_x, key=keys[0]).astype(dtype)
    y = mx.random.normal(shape_y, key=keys[1]).astype(dtype)
    lora_A = mx.random.normal((rank, shape_x[-1]), key=keys[2]) * 0.1
    lora_B = mx.random.normal((shape_y[-1], rank), key=keys[3]) * 0.1
    cotangent = mx.random.normal(shape_y, key=keys[4]).astype(dtype)
    return y, x, lora_A, lora_B, cotangent


@pytest.mark.parametrize("rank", [1, 4, 16])
def test_lora_update_and_its_backward_equal_autodiff(rank):
    y, x, lora_A, lora_B, cotangent = _arrays((2, 24, 48), (2, 24, 40), rank)

    def reference(y, x, a, b):
        return y + ((x @ a.T) * 0.5) @ b.T

    def ours(y, x, a, b):
        return lora_update(y, x, a, b * 0.5)

    assert np.allclose(reference(y, x, lora_A, lora_B), ours(y, x, lora_A, lora_B), atol=1e-5)
    grads = [mx.grad(lambda *args, f=f: (f(*args) * cotangent).sum(), argnums=(0, 1, 2, 3))(y, x, lora_A, lora_B)
             for f in (reference, ours)]
    for expected, got in zip(*grads):
        assert got.dtype == expected.dtype and got.shape == expected.shape
        np.testing.assert_allclose(np.array(got), np.array(expected), rtol=1e-4, atol=1e-5)


def test_the_products_and_their_layouts():
    _, x, lora_A, lora_B, cotangent = _arrays((3, 8, 32), (3, 8, 24), 4)
    z = skinny_matmul(x, lora_A)
    np.testing.assert_allclose(z, x @ lora_A.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(skinny_matmul(cotangent, lora_B, transposed=True), cotangent @ lora_B, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(add_low_rank(cotangent, z, lora_B), cotangent + z @ lora_B.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(add_low_rank(None, z, lora_A, transposed=True), z @ lora_A, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(reduce_outer(z, x), z.reshape(-1, 4).T @ x.reshape(-1, 32), rtol=1e-4, atol=1e-4)


def test_gelu_backward_from_its_input_equals_autodiff():
    from engine.flux.layers import gelu_tanh

    x = mx.random.normal((64, 96), key=mx.random.key(1)) * 3
    cotangent = mx.random.normal((64, 96), key=mx.random.key(2))
    grads = []
    for saves_input in (True, False):
        speed.GELU_SAVES_INPUT = saves_input
        try:
            grads.append(mx.grad(lambda v: (gelu_tanh(v) * cotangent).sum())(x))
        finally:
            speed.GELU_SAVES_INPUT = speed.DEFAULTS["GELU_SAVES_INPUT"]
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-5, atol=1e-5)  # grads reach ~1.1


@pytest.mark.skipif(not ON_CUDA, reason="the CUDA kernels run only on an NVIDIA GPU")
@pytest.mark.parametrize("in_dim,out_dim,rank", [(3072, 3072, 4), (3072, 12288, 8), (15360, 3072, 16), (64, 72, 3)])
def test_cuda_kernels_equal_the_matmuls(in_dim, out_dim, rank):
    y, x, lora_A, lora_B, cotangent = _arrays((1, 300, in_dim), (1, 300, out_dim), rank, mx.bfloat16)

    def everything():
        z = skinny_matmul(x, lora_A)
        grad = mx.grad(lambda *a: (lora_update(*a) * cotangent).astype(mx.float32).sum(), argnums=(0, 1, 2, 3))
        return [z, skinny_matmul(cotangent, lora_B, transposed=True), add_low_rank(y, z, lora_B),
                add_low_rank(None, z, lora_A, transposed=True), reduce_outer(z, x), *grad(y, x, lora_A, lora_B)]

    ours = everything()
    speed.LORA_KERNELS = False
    try:
        reference = everything()
    finally:
        speed.LORA_KERNELS = True
    for got, expected in zip(ours, reference):
        got, expected = np.array(got.astype(mx.float32)), np.array(expected.astype(mx.float32))
        # bf16 outputs: the kernels and cuBLAS round the same float32 sums at different points
        assert np.abs(got - expected).max() <= 0.02 * np.abs(expected).max()


@pytest.mark.skipif(not ON_CUDA, reason="the CUDA kernels run only on an NVIDIA GPU")
def test_cuda_rope_and_dequantize_equal_the_mlx_routes():
    from engine.flux.quantized import dequantize
    from engine.flux.rope import apply_rope, rope_inverse_frequencies, rope_rotation

    frequencies, axis_of_pair = rope_inverse_frequencies([16, 56, 56])
    ids = mx.array(np.random.default_rng(0).integers(0, 64, (96, 3)).astype(np.float32))
    rotation = rope_rotation(ids, frequencies, axis_of_pair)
    x = mx.random.normal((2, 96, 3, 128)).astype(mx.bfloat16)
    cotangent = mx.random.normal(x.shape).astype(mx.bfloat16)
    results = []
    for kernel in (True, False):
        speed.ROPE_KERNEL = kernel
        try:
            results.append([apply_rope(x, rotation),
                            mx.grad(lambda v: (apply_rope(v, rotation) * cotangent).astype(mx.float32).sum())(x)])
        finally:
            speed.ROPE_KERNEL = True
    for got, expected in zip(*results):
        np.testing.assert_allclose(np.array(got.astype(mx.float32)), np.array(expected.astype(mx.float32)), atol=0.02)

    weight = (mx.random.normal((256, 512)) * 0.05).astype(mx.bfloat16)
    for bits in (4, 8):
        wq, scales, biases = mx.quantize(weight, 64, bits)
        assert mx.array_equal(dequantize(wq, scales, biases, 64, bits, "affine"), mx.dequantize(wq, scales, biases, 64, bits))


def test_checkpointed_joint_block_training_takes_the_mlx_routes():
    try:
        assert speed.configure_for_training(True, ["transformer_blocks.5.attn.to_q"]) == list(
            speed.UNPROVEN_WITH_CHECKPOINTED_JOINT_BLOCKS)
        assert not speed.LORA_KERNELS and not speed.ROPE_KERNEL and not speed.GELU_SAVES_INPUT
        assert speed.configure_for_training(True, ["single_transformer_blocks.3.proj_out"]) == []
        assert speed.LORA_KERNELS and speed.ROPE_KERNEL and speed.GELU_SAVES_INPUT
        assert speed.configure_for_training(False, ["transformer.transformer_blocks.5.attn.to_q"]) == []
    finally:
        speed.configure_for_training(False, [])
