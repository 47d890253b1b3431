"""FluxTransformer against diffusers' FluxTransformer2DModel, plus the training
paths: gradient checkpointing, mx.compile, bf16 and 8-bit quantization."""
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel
from mlx.utils import tree_flatten, tree_map

from engine.flux.transformer import FluxTransformer, convert_hf_weights, export_hf_weights

TINY = dict(
    patch_size=1,
    in_channels=16,
    out_channels=None,
    num_layers=2,
    num_single_layers=3,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=16,
    guidance_embeds=True,
    axes_dims_rope=[4, 6, 6],
)


def relative_error(ours, reference) -> float:
    ours, reference = np.asarray(ours, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    return float(np.linalg.norm(ours - reference) / np.linalg.norm(reference))


def make_reference(config: dict, seed: int = 0) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            # RMSNorm weights (the only 1-D weights) near 1 like trained ones, everything else small and nonzero
            is_norm_weight = name.endswith(".weight") and parameter.ndim == 1
            parameter.copy_(torch.randn_like(parameter) * 0.1 + (1.0 if is_norm_weight else 0.0))
    return model


def make_ours(reference: FluxTransformer2DModel, config: dict) -> FluxTransformer:
    hf_weights = {k: mx.array(v.detach().numpy()) for k, v in reference.state_dict().items()}
    model = FluxTransformer({**config, "_class_name": "FluxTransformer2DModel", "some_future_key": 1})
    model.load_weights(list(convert_hf_weights(hf_weights).items()), strict=True)
    mx.eval(model.parameters())
    return model


def image_ids(height: int, width: int) -> np.ndarray:
    ids = np.zeros((height, width, 3), dtype=np.float32)
    ids[..., 1] = np.arange(height)[:, None]
    ids[..., 2] = np.arange(width)[None, :]
    return ids.reshape(height * width, 3)


def make_inputs(config: dict, batch: int = 2, grid=(4, 6), text_length: int = 5, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    tokens = grid[0] * grid[1]
    inputs = dict(
        hidden_states=rng.standard_normal((batch, tokens, config["in_channels"]), dtype=np.float32),
        encoder_hidden_states=rng.standard_normal((batch, text_length, config["joint_attention_dim"]), dtype=np.float32),
        pooled_projections=rng.standard_normal((batch, config["pooled_projection_dim"]), dtype=np.float32),
        timestep=rng.uniform(0.05, 1.0, size=(batch,)).astype(np.float32),
        img_ids=image_ids(*grid),
        txt_ids=np.zeros((text_length, 3), dtype=np.float32),
    )
    if config["guidance_embeds"]:
        inputs["guidance"] = np.full((batch,), 3.5, dtype=np.float32)
    return inputs


def run_reference(model, inputs) -> np.ndarray:
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in inputs.items()}, return_dict=False)[0]
    return out.numpy()


def run_ours(model, inputs) -> mx.array:
    return model(**{k: mx.array(v) for k, v in inputs.items()})


@pytest.mark.parametrize(
    "overrides, grid",
    [
        ({}, (4, 6)),  # dev-like: guidance embedder, non-square latent grid
        ({"guidance_embeds": False}, (6, 4)),  # schnell-like
        ({"in_channels": 64, "out_channels": 32, "num_layers": 1, "num_single_layers": 2}, (2, 3)),
        ({"num_attention_heads": 3, "attention_head_dim": 8, "axes_dims_rope": [2, 2, 4]}, (3, 5)),
    ],
)
def test_matches_diffusers_in_float32(overrides, grid):
    config = {**TINY, **overrides}
    reference = make_reference(config)
    ours = make_ours(reference, config)
    inputs = make_inputs(config, grid=grid)
    expected = run_reference(reference, inputs)
    got = run_ours(ours, inputs)
    assert got.shape == expected.shape
    assert relative_error(got, expected) < 1e-4


def test_gradients_match_torch_autograd():
    """Backward parity, through the custom rotary vjp (to_q, to_k) and both block kinds."""
    config = dict(TINY)
    reference = make_reference(config)
    ours = make_ours(reference, config)
    inputs = make_inputs(config)
    projection = np.random.default_rng(3).standard_normal((2, 24, config["in_channels"]), dtype=np.float32)
    names = ["transformer_blocks.0.attn.to_q.weight", "transformer_blocks.1.attn.add_k_proj.weight",
             "single_transformer_blocks.1.attn.to_k.weight", "x_embedder.weight"]

    out = reference(**{k: torch.from_numpy(v) for k, v in inputs.items()}, return_dict=False)[0]
    (out * torch.from_numpy(projection)).sum().backward()
    expected = {name: parameter.grad.numpy() for name, parameter in reference.named_parameters() if name in names}

    def loss_fn(model):
        return (run_ours(model, inputs) * mx.array(projection)).sum()

    grads = dict(tree_flatten(nn.value_and_grad(ours, loss_fn)(ours)[1]))
    for name in names:
        assert relative_error(grads[name], expected[name]) < 1e-4, name


def test_batched_ids_match_shared_ids():
    config = dict(TINY)
    ours = make_ours(make_reference(config), config)
    inputs = make_inputs(config)
    shared = run_ours(ours, inputs)
    batched = dict(inputs, img_ids=np.stack([inputs["img_ids"]] * 2), txt_ids=inputs["txt_ids"][None])
    assert relative_error(run_ours(ours, batched), shared) < 1e-6


def test_parameter_names_are_diffusers_keys_and_export_round_trips():
    config = dict(TINY)
    reference = make_reference(config)
    ours = make_ours(reference, config)
    ours_weights = dict(tree_flatten(ours.parameters()))
    assert set(ours_weights) == set(reference.state_dict())
    exported = export_hf_weights(ours_weights)
    for key, value in reference.state_dict().items():
        np.testing.assert_array_equal(np.asarray(exported[key]), value.numpy())
    # LoRA code relies on these being plain linears reachable by attribute
    assert isinstance(ours.single_transformer_blocks[1].attn.to_q, nn.Linear)
    assert isinstance(ours.transformer_blocks[0].attn.to_out[0], nn.Linear)
    assert isinstance(ours.transformer_blocks[0].ff.net[0].proj, nn.Linear)
    assert isinstance(ours.transformer_blocks[0].ff_context.net[2], nn.Linear)


def training_setup(config: dict):
    """Our model frozen but for a few layers of both block kinds, and a loss."""
    ours = make_ours(make_reference(config), config)
    ours.freeze()
    ours.transformer_blocks[0].attn.to_q.unfreeze()
    ours.transformer_blocks[1].ff.net[2].unfreeze()
    ours.single_transformer_blocks[2].proj_out.unfreeze()
    inputs = {k: mx.array(v) for k, v in make_inputs(config).items()}
    target = mx.array(np.random.default_rng(7).standard_normal((2, 24, config["in_channels"]), dtype=np.float32))

    def loss_fn(model):
        return nn.losses.mse_loss(model(**inputs), target)

    return ours, loss_fn


def test_gradient_checkpointing_gives_same_loss_and_gradients(monkeypatch):
    ours, loss_fn = training_setup(dict(TINY))
    loss_and_grad = nn.value_and_grad(ours, loss_fn)
    loss_plain, grads_plain = loss_and_grad(ours)

    checkpointed_calls = []
    real_checkpoint = mx.checkpoint
    monkeypatch.setattr(mx, "checkpoint", lambda fn: checkpointed_calls.append(fn) or real_checkpoint(fn))
    ours.gradient_checkpointing = True
    loss_checkpointed, grads_checkpointed = loss_and_grad(ours)
    assert len(checkpointed_calls) == TINY["num_layers"] + TINY["num_single_layers"]  # one per block
    mx.eval(loss_plain, grads_plain, loss_checkpointed, grads_checkpointed)

    flat_plain, flat_checkpointed = dict(tree_flatten(grads_plain)), dict(tree_flatten(grads_checkpointed))
    assert set(flat_plain) == set(flat_checkpointed) == {
        "transformer_blocks.0.attn.to_q.weight", "transformer_blocks.0.attn.to_q.bias",
        "transformer_blocks.1.ff.net.2.weight", "transformer_blocks.1.ff.net.2.bias",
        "single_transformer_blocks.2.proj_out.weight", "single_transformer_blocks.2.proj_out.bias",
    }
    assert abs(loss_plain.item() - loss_checkpointed.item()) <= 1e-6 * abs(loss_plain.item())
    for key, grad in flat_plain.items():
        assert float(mx.abs(grad).max()) > 0, key
        assert relative_error(flat_checkpointed[key], grad) < 1e-5, key


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_training_step_matches_eager(checkpointing):
    ours, loss_fn = training_setup(dict(TINY))
    ours.gradient_checkpointing = checkpointing
    optimizer_learning_rate = 0.1
    loss_and_grad = nn.value_and_grad(ours, loss_fn)

    def step():
        loss, grads = loss_and_grad(ours)
        ours.update(tree_map(lambda p, g: p - optimizer_learning_rate * g, ours.trainable_parameters(), grads))
        return loss

    start = tree_map(lambda p: p, ours.trainable_parameters())
    eager_losses = [step().item() for _ in range(2)]
    ours.update(start)
    mx.eval(ours.parameters())

    compiled_step = mx.compile(step, inputs=ours.state, outputs=ours.state)
    compiled_losses = []
    for _ in range(2):
        loss = compiled_step()
        mx.eval(loss, ours.state)
        compiled_losses.append(loss.item())

    assert eager_losses[1] < eager_losses[0]  # the step trained something
    np.testing.assert_allclose(compiled_losses, eager_losses, rtol=1e-5)


def test_runs_with_bfloat16_parameters():
    config = dict(TINY)
    reference = make_reference(config)
    inputs = make_inputs(config)
    expected = run_ours(make_ours(reference, config), inputs)
    ours = make_ours(reference, config)
    ours.set_dtype(mx.bfloat16)
    got = run_ours(ours, inputs)
    assert got.dtype == mx.bfloat16
    # bf16 keeps ~3 significant digits; errors compound over 5 blocks
    assert relative_error(got.astype(mx.float32), expected) < 3e-2


def test_runs_after_8_bit_quantization():
    config = dict(TINY)
    reference = make_reference(config)
    inputs = make_inputs(config)
    expected = run_ours(make_ours(reference, config), inputs)
    ours = make_ours(reference, config)
    nn.quantize(
        ours, group_size=32, bits=8,
        class_predicate=lambda _, module: isinstance(module, nn.Linear) and module.weight.shape[-1] % 32 == 0,
    )
    quantized = [k for k, m in ours.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert "single_transformer_blocks.0.attn.to_q" in quantized and len(quantized) > 40
    got = run_ours(ours, inputs)
    assert relative_error(got, expected) < 1e-2
