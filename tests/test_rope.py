"""RoPE's MLX route (every backend; CUDA's kernel has its own test in test_lora_kernels.py)."""
import mlx.core as mx
import numpy as np
import pytest

from engine.flux.rope import apply_rope, rope_inverse_frequencies, rope_rotation
from tests.helpers import launches


def _reference(x, rotation):
    # even/odd pairs rotated in float32 with plain ops, which autodiff differentiates itself
    x32 = x.astype(mx.float32)
    even, odd = x32[..., 0::2], x32[..., 1::2]
    cos, sin = rotation.cos, rotation.sin
    out = mx.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1).reshape(x.shape)
    return out.astype(x.dtype)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_rope_and_its_gradient_match_plain_autodiff(dtype):
    frequencies, axis_of_pair = rope_inverse_frequencies([4, 6, 6])
    ids = mx.array(np.random.default_rng(0).integers(0, 16, (20, 3)).astype(np.float32))
    rotation = rope_rotation(ids, frequencies, axis_of_pair)
    x = mx.random.normal((2, 20, 3, 16), key=mx.random.key(0)).astype(dtype)
    cotangent = mx.random.normal(x.shape, key=mx.random.key(1)).astype(dtype)
    got, expected = (
        (f(x, rotation), mx.grad(lambda v, f=f: (f(v, rotation) * cotangent).astype(mx.float32).sum())(x))
        for f in (apply_rope, _reference))
    tolerance = 1e-5 if dtype == mx.float32 else 1e-2
    for g, e in zip(got, expected):
        assert g.dtype == dtype
        np.testing.assert_allclose(np.array(g.astype(mx.float32)), np.array(e.astype(mx.float32)), atol=tolerance)


def test_rope_is_one_fused_kernel_each_way_inside_a_compiled_step(monkeypatch):
    # the step's queue of kernels is what a checkpointed 4-bit step waits on (bench/NOTES.md item 49):
    # the rotation must stay one elementwise kernel forward and one backward, with its float32
    # arithmetic inside it, never a float32 copy of q or k beside it
    from engine.flux import speed

    monkeypatch.setattr(speed, "ROPE_KERNEL", False)  # on CUDA our kernel would take bf16 (test_lora_kernels.py)
    frequencies, axis_of_pair = rope_inverse_frequencies([4, 6, 6])
    ids = mx.array(np.random.default_rng(0).integers(0, 16, (20, 3)).astype(np.float32))
    rotation = rope_rotation(ids, frequencies, axis_of_pair)
    mx.eval(rotation)
    x = mx.random.normal((2, 20, 3, 16)).astype(mx.bfloat16)
    cotangent = mx.random.normal((2, 3, 20, 16)).astype(mx.bfloat16).transpose(0, 2, 1, 3)  # as attention hands it back
    mx.eval(x, cotangent)
    forward = mx.compile(lambda v: apply_rope(v, rotation))
    assert [name.startswith("Compiled") for name in launches([forward(x)])] == [True]
    both = mx.compile(lambda v, c: mx.vjp(lambda u: apply_rope(u, rotation), [v], [c]))
    outputs, grads = both(x, cotangent)
    kernels = launches(outputs + grads)
    assert len(kernels) == 2 and all(name.startswith("Compiled") for name in kernels), kernels
