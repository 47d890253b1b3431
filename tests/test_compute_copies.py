"""LoRA's compute copies (engine/lora.py: ComputeCopies, speed.LORA_COMPUTE_COPIES): a training step
whose LoRA layers read copies made once a step trains exactly as one that casts the masters in
every call, remakes copies whose masters changed outside it, and leaves nothing else reading them."""
from __future__ import annotations

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from engine.flux import speed
from engine.flux.latents import latent_image_ids, text_ids
from engine.flux.loading import load_model, quantize_module
from engine.lora import ComputeCopies, apply_lora, load_lora_parameters, lora_layers, lora_parameters
from engine.training_step import make_train_step

TARGETS = [(f"single_transformer_blocks.{b}.{layer}", 4) for b in range(30, 38)
           for layer in ("proj_out", "proj_mlp", "attn.to_q")] + \
          [(f"transformer_blocks.{b}.attn.to_k", 2) for b in range(17, 19)]


def _arguments(batch: int = 1):
    keys = mx.random.split(mx.random.key(3), 4)
    return (mx.random.normal((batch, 16, 64), key=keys[0]), mx.random.normal((batch, 16, 64), key=keys[1]),
            mx.random.normal((batch, 32, 32), key=keys[2]), mx.random.normal((batch, 32), key=keys[3]),
            mx.array([0.5] * batch), mx.array([3.0] * batch), latent_image_ids(8, 8), text_ids(32))


def _setup(copies: bool, checkpointing: bool, dtype=mx.float32, bits=None, scales=None, monkeypatch=None):
    monkeypatch.setattr(speed, "LORA_COMPUTE_COPIES", copies)
    transformer = load_model("tiny", text_encoders=False).transformer
    if dtype != mx.float32:
        transformer.update(tree_map(lambda a: a.astype(dtype), transformer.parameters()))
    if bits:
        quantize_module(transformer, bits)
    apply_lora(transformer, TARGETS, key=mx.random.key(0))
    for path, scale in (scales or {}).items():
        lora_layers(transformer)[path].scale = scale
    transformer.gradient_checkpointing = checkpointing
    optimizer = optim.AdamW(learning_rate=1e-2)
    optimizer.init(transformer.trainable_parameters())
    return transformer, make_train_step(transformer, optimizer, dtype, has_guidance=True)


def _trained(transformer):
    return {name: np.array(value) for name, value in tree_flatten(transformer.trainable_parameters())}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["whole-model", "blockwise"])
@pytest.mark.parametrize("variant", ["float32", "4-bit", "scaled"])
def test_a_step_reading_compute_copies_trains_as_one_casting_the_masters(monkeypatch, checkpointing, variant):
    options = {"float32": {}, "4-bit": {"bits": 4},
               "scaled": {"scales": {"single_transformer_blocks.31.proj_mlp": 0.5,
                                     "transformer_blocks.18.attn.to_k": 3.0}}}[variant]
    results = []
    for copies in (False, True):
        transformer, step = _setup(copies, checkpointing, monkeypatch=monkeypatch, **options)
        losses = [float(step(*_arguments())) for _ in range(3)]
        results.append((losses, _trained(transformer), transformer))
    (losses, params, _), (copy_losses, copy_params, transformer) = results
    assert losses[-1] < losses[0]
    np.testing.assert_allclose(copy_losses, losses, rtol=1e-6)
    assert set(copy_params) == set(params)
    for name, value in params.items():
        np.testing.assert_allclose(copy_params[name], value, rtol=1e-5, atol=1e-7, err_msg=name)
    # the copies are frozen extras: neither trained nor saved
    assert all(name.endswith((".lora_A", ".lora_B")) for name in copy_params)
    assert set(lora_parameters(transformer)) == set(params)
    assert any(name.endswith(".compute_A") for name, _ in tree_flatten(transformer.parameters()))


@pytest.mark.parametrize("checkpointing", [False, True], ids=["whole-model", "blockwise"])
def test_compute_copies_in_bf16_train_as_the_masters(monkeypatch, checkpointing):
    # bf16 is where the copies differ from the masters: the gradients leave the layers in bf16 and the
    # update casts them; every product is rounded to bf16 on both routes, so the results agree closely
    results = []
    for copies in (False, True):
        transformer, step = _setup(copies, checkpointing, dtype=mx.bfloat16, monkeypatch=monkeypatch)
        losses = [float(step(*_arguments())) for _ in range(2)]
        trained = _trained(transformer)
        assert all(value.dtype == np.float32 for value in trained.values())  # the masters stay float32
        results.append((losses, trained))
    (losses, params), (copy_losses, copy_params) = results
    np.testing.assert_allclose(copy_losses, losses, rtol=1e-3)
    for name, value in params.items():
        np.testing.assert_allclose(copy_params[name], value, rtol=1e-3, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["whole-model", "blockwise"])
def test_masters_replaced_outside_the_step_get_new_copies_before_the_next_step(monkeypatch, checkpointing):
    # what a resume or a loaded LoRA does: the next step must not read copies of the old values
    results = []
    for copies in (False, True):
        transformer, step = _setup(copies, checkpointing, monkeypatch=monkeypatch)
        step(*_arguments())
        replacement = {name: mx.random.normal(value.shape, key=mx.random.key(i)) * 0.1
                       for i, (name, value) in enumerate(sorted(lora_parameters(transformer).items()))}
        load_lora_parameters(transformer, replacement)
        results.append([float(step(*_arguments())) for _ in range(2)] + [_trained(transformer)])
    reference, with_copies = results
    np.testing.assert_allclose(with_copies[:2], reference[:2], rtol=1e-6)
    for name, value in reference[2].items():
        np.testing.assert_allclose(with_copies[2][name], value, rtol=1e-5, atol=1e-7, err_msg=name)


def test_nothing_outside_a_step_reads_the_copies(monkeypatch):
    # previews and generation call the model between steps: they must see the masters, so a copy that
    # does not match them (here: garbage) changes nothing
    transformer, step = _setup(True, True, monkeypatch=monkeypatch)
    step(*_arguments())
    layer = lora_layers(transformer)["single_transformer_blocks.33.proj_mlp"]
    layer.lora_B = mx.random.normal(layer.lora_B.shape, key=mx.random.key(5))
    x = mx.random.normal((1, 8, layer.input_dims), key=mx.random.key(6))
    before = layer(x)
    layer.compute_A = mx.full(layer["compute_A"].shape, 7.0)
    layer.compute_B = mx.full(layer["compute_B"].shape, -3.0)
    expected = layer.base(x) + (x @ layer.lora_A.T) @ layer.lora_B.T
    np.testing.assert_allclose(np.array(layer(x)), np.array(before), rtol=1e-6)
    np.testing.assert_allclose(np.array(layer(x)), np.array(expected), rtol=1e-4, atol=1e-5)


def test_compute_copies_are_made_in_the_compute_dtype_and_report_what_went_stale(monkeypatch):
    transformer, _ = _setup(False, True, monkeypatch=monkeypatch)
    copies = ComputeCopies(transformer, mx.bfloat16)
    layer = lora_layers(transformer)["single_transformer_blocks.30.attn.to_q"]
    assert layer["compute_A"].dtype == mx.bfloat16 and layer["compute_B"].dtype == mx.bfloat16
    assert not layer.trainable_parameters().get("compute_A")  # frozen
    assert copies.stale() == []
    layer.lora_B = layer.lora_B + 1.0
    layer.scale = 2.0
    assert copies.stale() == [layer]
    assert copies.ensure_fresh() == 1 and copies.stale() == []
    np.testing.assert_allclose(np.array(layer["compute_B"].astype(mx.float32)),
                               np.array((layer.lora_B * 2.0).astype(mx.bfloat16).astype(mx.float32)))
