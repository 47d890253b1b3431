"""bench/probe_fused_inputs.py times a single block's four input projections as one quantized product
against four (bench/NOTES.md item 55): its variants must compute the same outputs and gradients, or the
GPU timing compares different work."""
from __future__ import annotations

import mlx.core as mx
import pytest

from bench import probe_fused_inputs as probe


@pytest.mark.parametrize("group", [32, 64])
def test_the_fused_variants_compute_the_separate_layers_outputs_and_gradients(group):
    mx.random.seed(1)
    layers, fused = probe.build(width=128, mlp=256, rank=4, bits=4, group=group, dtype=mx.float32)
    for layer, scale in zip(layers, (0.5, 1.0, 2.0, 4.0)):  # an alpha other than the rank
        layer.scale = scale
    x = mx.random.normal((1, 16, 128))
    flat = [array for layer in layers for array in (layer.lora_A, layer.lora_B)]
    cotangents = [mx.random.normal((1, 16, n)) for n in (128, 128, 128, 256)]
    results = {name: probe.stage(function)(x, flat, cotangents)
               for name, function in probe.variants(layers, fused).items()}
    reference = results.pop("separate")
    assert len(reference) == 4 + 1 + 8  # the outputs, then the input's and each adapter's gradient
    assert all(float(mx.abs(r).max()) > 0 for r in reference)
    for name, got in results.items():
        for a, b in zip(got, reference):
            assert a.shape == b.shape
            assert mx.allclose(a, b, rtol=1e-4, atol=1e-4), name
