"""The training step's hand-written pieces: LoRA's update with its own backward
(engine/lora_kernels.py), GELU's and the quantized matmul's backward, RoPE's
CUDA route. Everywhere, each must equal plain MLX autodiff; on CUDA the kernels
must also equal the matmuls they replace (those tests skip elsewhere)."""
from __future__ import annotations

import re
from contextlib import nullcontext

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from engine.flux import speed
from engine.lora_fused import lora_linear
from engine.lora_kernels import add_low_rank, kernels_apply, lora_update, reduce_outer, skinny_matmul
from tests.helpers import launches

ON_CUDA = hasattr(mx, "cuda") and mx.cuda.is_available()


@pytest.fixture
def float32_on_the_cpu():
    """Tests that hold two float32 routes to ~1e-4 of each other run on MLX's CPU device: on CUDA they
    did not hold (run 17), where float32 matmuls may round differently; the CUDA routes themselves are
    held to MLX's own in bf16 (the CUDA-only tests below). speed.on_cuda is read first: it is cached."""
    speed.on_cuda()
    device = mx.default_device()
    mx.set_default_device(mx.cpu)
    try:
        yield
    finally:
        mx.set_default_device(device)


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


@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("keep_dense", [False, True])
def test_a_fused_lora_layer_equals_its_base_and_lora_apart(bits, bias, keep_dense, monkeypatch, float32_on_the_cpu):
    from engine.flux.quantized import DequantizingLinear, keeping_dense_weights
    from engine.lora import LoRALinear

    mx.random.seed(3)
    base = nn.Linear(64, 96, bias=bias)
    if bits:
        base = DequantizingLinear.from_quantized(nn.QuantizedLinear.from_linear(base, 64, bits))
    layer = LoRALinear(base, rank=4, key=mx.random.key(1), scale=0.5)
    layer.lora_B = mx.random.normal(layer.lora_B.shape, key=mx.random.key(2)) * 0.1
    x = mx.random.normal((2, 24, 64), key=mx.random.key(4))
    cotangent = mx.random.normal((2, 24, 96), key=mx.random.key(5))

    def run():
        def loss(params, x):
            layer.update(params)
            with keeping_dense_weights() if keep_dense else nullcontext():
                return (layer(x) * cotangent).sum()
        value, (grads, grad_x) = mx.value_and_grad(loss, argnums=(0, 1))(layer.trainable_parameters(), x)
        return [value, grad_x, grads["lora_A"], grads["lora_B"]]

    routed = []
    monkeypatch.setattr(LoRALinear, "_fused_operands",
                        lambda self, x, real=LoRALinear._fused_operands: routed.append(1) or real(self, x))
    fused = run()
    assert routed and layer._fused_operands(x) is not None  # the fused route ran
    monkeypatch.setattr(speed, "LORA_FUSED_LINEAR", False)
    apart = run()
    for got, expected in zip(fused, apart):
        np.testing.assert_allclose(np.array(got), np.array(expected), rtol=1e-4, atol=1e-4)


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


def _plain_attention(q, k, v, scale):
    scores = (q.astype(mx.float32) * scale) @ k.astype(mx.float32).swapaxes(-1, -2)
    return (mx.softmax(scores, axis=-1) @ v.astype(mx.float32)).astype(q.dtype)


@pytest.mark.parametrize("heads", [3, 10, 24])  # one piece, 8 + 2, three full pieces of 8
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_attention_backward_recomputed_with_matmuls_equals_autodiff(heads, dtype):
    from engine.flux.layers import attention

    keys = mx.random.split(mx.random.key(3), 4)
    # (B, L, heads, D) transposed to (B, heads, L, D) as FluxAttention hands them over; logits up to ~20
    q, k, v, cotangent = (mx.random.normal((2, 40, heads, 16), key=key).transpose(0, 2, 1, 3) for key in keys)
    q, k, v = q * 2, k * 2, v.astype(dtype)
    q, k = q.astype(dtype), k.astype(dtype)
    scale = 16**-0.5
    argnums = (0, 1, 2)
    expected = mx.grad(lambda *a: (_plain_attention(*a, scale).astype(mx.float32) * cotangent).sum(), argnums)(q, k, v)
    out = attention(q, k, v, scale, backward="recomputed")
    got = mx.grad(lambda *a: (attention(*a, scale, backward="recomputed").astype(mx.float32) * cotangent).sum(),
                  argnums)(q, k, v)
    tolerance = 1e-4 if dtype == mx.float32 else 3e-2
    if dtype == mx.float32:  # the forward is the fused kernel's (in bf16 its rounding differs from this reference's)
        np.testing.assert_allclose(np.array(out), np.array(_plain_attention(q, k, v, scale)), atol=1e-4)
    for g, e in zip(got, expected):
        assert g.dtype == dtype and g.shape == e.shape
        g, e = np.array(g.astype(mx.float32)), np.array(e.astype(mx.float32))
        # relative to the gradient's own scale: bf16 rounds every product
        assert np.abs(g - e).max() <= tolerance * np.abs(e).max(), np.abs(g - e).max() / np.abs(e).max()


def test_joint_attention_trains_the_same_with_every_attention_backward(monkeypatch, float32_on_the_cpu):
    """The LoRA gradients of a joint block (what failed on CUDA) agree between the three backwards."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from engine.flux import layers
    from engine.flux.rope import rope_inverse_frequencies, rope_rotation
    from engine.flux.transformer import FluxTransformerBlock
    from engine.lora import apply_lora

    mx.random.seed(0)
    block = FluxTransformerBlock(64, 4, 16)
    apply_lora(block, [(f"attn.{name}", 4) for name in ("to_q", "to_k", "to_v", "add_q_proj")], key=mx.random.key(1))
    for name in ("to_q", "to_k", "to_v", "add_q_proj"):
        getattr(block.attn, name).lora_B = mx.random.normal(getattr(block.attn, name).lora_B.shape) * 0.1
    keys = mx.random.split(mx.random.key(2), 3)
    hidden, context = mx.random.normal((1, 12, 64), key=keys[0]), mx.random.normal((1, 5, 64), key=keys[1])
    temb = nn.silu(mx.random.normal((1, 64), key=keys[2]))
    ids = mx.concatenate([mx.zeros((5, 3)), mx.stack([mx.zeros(12), mx.arange(12) // 4, mx.arange(12) % 4], axis=1)])
    rope = rope_rotation(ids, *rope_inverse_frequencies([4, 6, 6]))

    def loss(model):
        out, ctx = model(hidden, context, temb, rope)
        return (out * out).sum() + (ctx * ctx).sum()

    grads = []
    for backward in ("fused", "contiguous", "recomputed"):
        monkeypatch.setattr(layers, "_joint_backward", lambda b=backward: b)
        grads.append(dict(tree_flatten(nn.value_and_grad(block, loss)(block)[1])))
    assert len(grads[0]) == 8
    for other in grads[1:]:
        assert other.keys() == grads[0].keys()
        for name, expected in grads[0].items():
            np.testing.assert_allclose(np.array(other[name]), np.array(expected), rtol=1e-3, atol=1e-5, err_msg=name)


def test_only_joint_blocks_take_the_recomputed_attention_backward(monkeypatch):
    """The switch reroutes joint blocks' attention; single blocks keep the fused backward
    (on CUDA it matched the recomputed one for them, and it is cheaper)."""
    from engine.flux import layers
    from engine.flux.rope import rope_inverse_frequencies, rope_rotation
    from engine.flux.transformer import FluxSingleTransformerBlock, FluxTransformerBlock

    routed = []
    original = layers._attention_recomputing_backward
    monkeypatch.setattr(layers, "_attention_recomputing_backward", lambda scale: routed.append(scale) or original(scale))
    ids = mx.concatenate([mx.zeros((5, 3)), mx.stack([mx.zeros(12), mx.arange(12) // 4, mx.arange(12) % 4], axis=1)])
    rope = rope_rotation(ids, *rope_inverse_frequencies([4, 6, 6]))
    temb = mx.random.normal((1, 64))
    joint, single = FluxTransformerBlock(64, 4, 16), FluxSingleTransformerBlock(64, 4, 16)
    for fused in (True, False):
        monkeypatch.setattr(speed, "FUSED_ATTENTION_BACKWARD", fused)
        single(mx.random.normal((1, 17, 64)), temb, rope)
        assert routed == []
        joint(mx.random.normal((1, 12, 64)), mx.random.normal((1, 5, 64)), temb, rope)
        assert routed == ([] if fused else [16**-0.5])


@pytest.mark.skipif(not ON_CUDA, reason="the CUDA kernels run only on an NVIDIA GPU")
@pytest.mark.parametrize("in_dim,out_dim,rank,rows", [(3072, 3072, 4, 300), (3072, 12288, 8, 1536), (15360, 3072, 16, 300),
                                                     (64, 72, 3, 300), (3072, 15360, 8, 77), (15360, 3072, 8, 4097)])
def test_cuda_kernels_equal_the_matmuls(monkeypatch, in_dim, out_dim, rank, rows):
    # one process compiles each kernel once per dtype and rank and reads the shapes at run time (the
    # kernels are off by default: speed.LORA_KERNELS)
    y, x, lora_A, lora_B, cotangent = _arrays((1, rows, in_dim), (1, rows, out_dim), rank, mx.bfloat16)

    weight = (mx.random.normal((out_dim, in_dim), key=mx.random.key(7)) * 0.02).astype(mx.bfloat16)
    bias = (mx.random.normal((out_dim,), key=mx.random.key(8)) * 0.02).astype(mx.bfloat16)
    fused = lora_linear(None, True)

    def everything():
        z = skinny_matmul(x, lora_A)
        grad = mx.grad(lambda *a: (lora_update(*a) * cotangent).astype(mx.float32).sum(), argnums=(0, 1, 2, 3))
        grad_fused = mx.grad(lambda *a: (fused(*a, weight, bias) * cotangent).astype(mx.float32).sum(), argnums=(0, 1, 2))
        return [z, skinny_matmul(cotangent, lora_B, transposed=True), add_low_rank(y, z, lora_B),
                add_low_rank(None, z, lora_A, transposed=True), reduce_outer(z, x), *grad(y, x, lora_A, lora_B),
                fused(x, lora_A, lora_B, weight, bias), *grad_fused(x, lora_A, lora_B)]

    monkeypatch.setattr(speed, "LORA_KERNELS", True)
    assert kernels_apply(mx.bfloat16, in_dim, rank) == (rank <= 8)
    ours = everything()
    monkeypatch.setattr(speed, "LORA_KERNELS", False)
    reference = everything()
    for got, expected in zip(ours, reference):
        got, expected = np.array(got.astype(mx.float32)), np.array(expected.astype(mx.float32))
        # bf16 outputs: the kernels and cuBLAS round the same float32 sums at different points
        assert np.abs(got - expected).max() <= 0.02 * np.abs(expected).max()


@pytest.mark.skipif(not ON_CUDA, reason="the CUDA kernels run only on an NVIDIA GPU")
def test_cuda_rope_and_dequantize_equal_the_mlx_routes():
    from engine.flux.quantized import dequantize
    from engine.flux.rope import apply_rope, rope_inverse_frequencies, rope_rotation

    frequencies, axis_of_pair = rope_inverse_frequencies([16, 56, 56])
    # the kernel reads shapes at run time: one compiled kernel serves both, with the angles shared
    # over the batch (first) or one set per sample (second)
    for shape, id_shape, seed in (((2, 96, 3, 128), (96, 3), 0), ((2, 40, 5, 128), (2, 40, 3), 1)):
        ids = mx.array(np.random.default_rng(seed).integers(0, 64, id_shape).astype(np.float32))
        rotation = rope_rotation(ids, frequencies, axis_of_pair)
        x = mx.random.normal(shape).astype(mx.bfloat16)
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


def test_short_runs_on_cuda_skip_kernels_that_would_not_win_back_their_compile_time(monkeypatch):
    # RoPE's kernel: ~6 s to compile, ~3 ms a step saved; LoRA's kernels are off at any length (they
    # lose to cuBLAS on H100s: speed.LORA_KERNELS)
    assert not speed.DEFAULTS["LORA_KERNELS"]
    assert speed.kernels_not_worth_compiling(100) == ["ROPE_KERNEL"]
    assert speed.kernels_not_worth_compiling(2200) == []
    try:
        monkeypatch.setattr(speed, "on_cuda", lambda: True)
        speed.LORA_KERNELS = True  # a benchmark's setting: every run resets it to the default
        assert speed.configure_for_training(steps=300) == ["ROPE_KERNEL"]
        assert not speed.LORA_KERNELS and not speed.ROPE_KERNEL and speed.GELU_SAVES_INPUT
        assert speed.configure_for_training(steps=2200) == []
        assert not speed.LORA_KERNELS and speed.ROPE_KERNEL  # reset to the default first, then chosen
        assert speed.configure_for_training() == [] and speed.ROPE_KERNEL  # a long run
        monkeypatch.setattr(speed, "on_cuda", lambda: False)  # they never run elsewhere: nothing to report
        assert speed.configure_for_training(steps=300) == [] and speed.ROPE_KERNEL
    finally:
        speed.configure_for_training()


def test_joint_blocks_on_cuda_take_the_contiguous_attention_backward(monkeypatch):
    from engine.flux import layers

    monkeypatch.setattr(speed, "on_cuda", lambda: True)
    assert speed.DEFAULTS["CONTIGUOUS_JOINT_ATTENTION"]
    assert layers._joint_backward() == "contiguous"
    monkeypatch.setattr(speed, "CONTIGUOUS_JOINT_ATTENTION", False)
    assert layers._joint_backward() == "recomputed"
    monkeypatch.setattr(speed, "FUSED_ATTENTION_BACKWARD", False)
    assert layers._joint_backward() == "recomputed"
    monkeypatch.setattr(speed, "on_cuda", lambda: False)
    assert layers._joint_backward() == "recomputed"
    monkeypatch.setattr(speed, "FUSED_ATTENTION_BACKWARD", True)
    assert layers._joint_backward() == "fused"


def test_attention_backward_on_contiguous_copies_equals_the_fused_one():
    from engine.flux.layers import attention

    keys = mx.random.split(mx.random.key(5), 4)
    # transposed views, as FluxAttention hands them over, and a transposed incoming gradient
    q, k, v = (mx.random.normal((1, 30, 6, 16), key=key).transpose(0, 2, 1, 3) for key in keys[:3])
    cotangent = mx.random.normal((1, 16, 30, 6), key=keys[3]).transpose(0, 3, 2, 1)
    scale = 16**-0.5
    results = []
    for backward in ("fused", "contiguous"):
        loss = lambda *a, b=backward: (attention(*a, scale, backward=b) * cotangent).sum()  # noqa: E731
        results.append([attention(q, k, v, scale, backward=backward), *mx.grad(loss, (0, 1, 2))(q, k, v)])
    for got, expected in zip(*results):
        assert got.shape == expected.shape
        np.testing.assert_allclose(np.array(got), np.array(expected), rtol=1e-5, atol=1e-6)


def test_a_lora_scale_costs_no_kernel_of_its_own_in_a_compiled_step():
    # the scale is a constant of the fused layer: it joins the casts of B and of B's gradient, where it
    # had been a multiply of its own in every forward and backward (bench/NOTES.md item 49)
    from engine.lora import LoRALinear

    counts = {}
    for scale in (1.0, 0.5):
        base = nn.Linear(64, 96)
        base.update({"weight": base.weight.astype(mx.bfloat16), "bias": base.bias.astype(mx.bfloat16)})
        layer = LoRALinear(base, rank=4, key=mx.random.key(1), scale=scale)
        x = mx.random.normal((2, 24, 64)).astype(mx.bfloat16)
        cotangent = mx.random.normal((2, 24, 96)).astype(mx.bfloat16)
        mx.eval(layer.parameters(), x, cotangent)

        def run(lora_A, lora_B, layer=layer, x=x):
            layer.lora_A, layer.lora_B = lora_A, lora_B
            return layer(x)

        step = mx.compile(lambda a, b, run=run, cotangent=cotangent: mx.vjp(run, [a, b], [cotangent]))
        outputs, grads = step(layer.lora_A, layer.lora_B)
        counts[scale] = launches(outputs + grads)
        # a multiply alone (compiled or not): inside a compiled step MLX wraps a lone op as Compiled<op>
        assert not [name for name in counts[scale] if re.fullmatch(r"(Compiled)?(Broadcast)*Multiply", name)], counts
    assert len(counts[0.5]) == len(counts[1.0]), counts
