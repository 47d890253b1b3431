"""A single block's q, k, v and MLP input as one quantized product (engine/flux/fused_inputs.py,
speed.FUSED_SINGLE_INPUTS): the same training as the four layers, and no second copy of their weights."""
from __future__ import annotations

import gc

import mlx.core as mx
import numpy as np
import pytest

from engine.flux import fused_inputs, speed
from engine.flux import transformer as transformer_module
from engine.flux.latents import latent_image_ids, text_ids
from engine.flux.loading import load_model, quantize_module
from engine.lora import LoRALinear, apply_lora
from tests.test_blockwise_step import LAYOUTS, train

ALL_FOUR = [(f"single_transformer_blocks.{b}.{layer}", 4) for b in range(10, 38)
            for layer in ("proj_out", "proj_mlp", "attn.to_q", "attn.to_k", "attn.to_v")]


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("targets", [ALL_FOUR, LAYOUTS["people"]], ids=["all four trained", "q and mlp trained"])
def test_the_fused_product_trains_as_the_four_layers(monkeypatch, checkpointing, targets):
    reference = train(targets, checkpointing=checkpointing, bits=4)
    calls = []
    real = transformer_module.project
    monkeypatch.setattr(transformer_module, "project", lambda block, x: calls.append(1) or real(block, x))
    monkeypatch.setattr(speed, "FUSED_SINGLE_INPUTS", True)
    fused = train(targets, checkpointing=checkpointing, bits=4)
    assert calls  # the single blocks took the one product
    (losses, params), (fused_losses, fused_params) = reference, fused
    assert losses[-1] < losses[0]  # it trained
    np.testing.assert_allclose(fused_losses, losses, rtol=1e-5)
    assert set(fused_params) == set(params)
    for name, value in params.items():  # three AdamW steps of 1e-2: rounding moves a near-zero gradient's step
        np.testing.assert_allclose(np.array(fused_params[name]), np.array(value), rtol=1e-4, atol=1e-4, err_msg=name)


def _quantized_model():
    transformer = load_model("tiny", text_encoders=False).transformer
    quantize_module(transformer, 4)
    apply_lora(transformer, ALL_FOUR[:5], key=mx.random.key(0))
    return transformer


def _output(transformer):
    keys = mx.random.split(mx.random.key(5), 3)
    out = transformer(mx.random.normal((1, 16, 64), key=keys[0]), mx.random.normal((1, 32, 32), key=keys[1]),
                      mx.random.normal((1, 32), key=keys[2]), mx.array([0.5]), latent_image_ids(8, 8), text_ids(32),
                      mx.array([3.0]))
    mx.eval(out)
    return out


def test_fusing_keeps_one_copy_of_the_weights_and_the_layers_outputs(monkeypatch):
    transformer = _quantized_model()
    before_output = _output(transformer)
    gc.collect()
    before = mx.get_active_memory()
    blocks = transformer.single_transformer_blocks
    packed = sum(layer[key].nbytes for block in blocks for layer in fused_inputs._layers(block)
                 for key in fused_inputs.PACKED for layer in [fused_inputs._base(layer)])
    assert fused_inputs.fuse_single_block_inputs(transformer) == len(blocks)
    assert fused_inputs.fuse_single_block_inputs(transformer) == 0  # made once
    gc.collect()
    # the layers' arrays are views of the joined ones: a second copy would be `packed` more (the tiny model's
    # small arrays round up in the allocator by ~12%)
    assert mx.get_active_memory() - before < 0.25 * packed
    # the four layers alone (switch off) and the one product (on) give the model's output as before
    assert mx.allclose(_output(transformer), before_output, atol=1e-5)
    monkeypatch.setattr(speed, "FUSED_SINGLE_INPUTS", True)
    assert mx.allclose(_output(transformer), before_output, atol=1e-5)


def test_only_four_dequantizing_layers_of_one_quantization_are_fused():
    dense = load_model("tiny", text_encoders=False).transformer
    assert fused_inputs.fuse_single_block_inputs(dense) == 0  # not quantized
    transformer = _quantized_model()
    block = transformer.single_transformer_blocks[10]
    block.attn.to_q = LoRALinear(block.attn.to_q, 2, key=mx.random.key(1))  # a second adapter on the first
    assert not fused_inputs.fusable(block)
    assert fused_inputs.fusable(transformer.single_transformer_blocks[11])


@pytest.mark.parametrize("adapted", [4, 2, 1])
def test_the_adapters_first_products_are_one_product(adapted):
    # add_adapters: x @ [A_1; A_2; ...].T once for a block's adapters, then each adapter's B into its part
    from tests.helpers import launches

    mx.random.seed(3)
    transformer = load_model("tiny", text_encoders=False).transformer
    quantize_module(transformer, 4)
    layers = ("attn.to_q", "proj_mlp", "attn.to_k", "attn.to_v")[:adapted]
    apply_lora(transformer, [(f"single_transformer_blocks.0.{layer}", 4) for layer in layers], key=mx.random.key(0))
    block = transformer.single_transformer_blocks[0]
    for layer in fused_inputs._layers(block):
        if isinstance(layer, LoRALinear):  # B starts at zero: something to add
            layer.lora_B = mx.random.normal(layer.lora_B.shape) * 0.1
    assert fused_inputs.fuse_single_block_inputs(transformer)
    x = mx.random.normal((1, 8, block.attn.to_q.base["weight"].shape[1] * 8))
    mx.eval(x, transformer.parameters())
    fused = fused_inputs.project(block, x)
    products = [name for name in launches(fused) if name in ("Matmul", "AddMM")]  # before evaluating them
    # the base's one product, the A's (one, or the lone adapter's own) and each adapter's B
    assert len(products) == 1 + 1 + adapted, products
    separate = [layer(x) for layer in fused_inputs._layers(block)]
    for got, want in zip(fused, separate):
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-5)
