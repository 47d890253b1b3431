"""The block-by-block checkpointed step (engine/blockwise_step.py) against the whole-model step."""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from engine import blockwise_step
from engine.flux import speed
from engine.flux.latents import latent_image_ids, text_ids
from engine.flux.loading import load_model, quantize_module
from engine.flux.quantized import DequantizingLinear
from engine.flux.tiny import TRANSFORMER_CONFIG
from engine.flux.transformer import FluxTransformer
from engine.lora import apply_lora
from engine.training_step import make_train_step

LAYOUTS = {
    # the templates' shapes: single blocks only from block 10 (people); joint q/k/v then single blocks (style)
    "people": [(f"single_transformer_blocks.{b}.{layer}", 4) for b in range(10, 38)
               for layer in ("proj_out", "proj_mlp", "attn.to_q")],
    "style": [(f"transformer_blocks.{b}.attn.{layer}", 8) for b in range(5, 16) for layer in ("to_q", "to_k", "to_v")]
             + [(f"single_transformer_blocks.{b}.proj_out", 4) for b in range(20, 38)],
    # the embedders (so temb's gradient sums over every block), modulations, the output layer, and two
    # blocks whose layouts differ only in which same-shaped layer is trained
    "everywhere": [("x_embedder", 2), ("time_text_embed.timestep_embedder.linear_1", 2),
                   ("transformer_blocks.3.norm1.linear", 2), ("single_transformer_blocks.5.norm.linear", 2),
                   ("single_transformer_blocks.6.attn.to_q", 2), ("single_transformer_blocks.7.attn.to_k", 2),
                   ("proj_out", 2)],
}


def train(targets, checkpointing: bool, steps: int = 3, bits: int | None = None, scales: dict | None = None):
    """Losses and trained parameters after `steps` AdamW steps of the tiny model (float32, CPU);
    `scales`: {LoRA layer path: its scale}."""
    transformer = load_model("tiny", text_encoders=False).transformer
    if bits:
        quantize_module(transformer, bits)
    apply_lora(transformer, targets, key=mx.random.key(0))
    for path, scale in (scales or {}).items():
        dict(transformer.named_modules())[path].scale = scale
    transformer.gradient_checkpointing = checkpointing
    optimizer = optim.AdamW(learning_rate=1e-2)
    optimizer.init(transformer.trainable_parameters())
    step = make_train_step(transformer, optimizer, mx.float32, has_guidance=True)
    keys = mx.random.split(mx.random.key(3), 4)
    latents, noise = mx.random.normal((1, 16, 64), key=keys[0]), mx.random.normal((1, 16, 64), key=keys[1])
    arguments = (latents, noise, mx.random.normal((1, 32, 32), key=keys[2]), mx.random.normal((1, 32), key=keys[3]),
                 mx.array([0.5]), mx.array([3.0]), latent_image_ids(8, 8), text_ids(32))
    losses = [float(step(*arguments)) for _ in range(steps)]
    return losses, dict(tree_flatten(transformer.trainable_parameters()))


def assert_same_training(reference, blockwise, rtol=1e-5):
    (losses, params), (block_losses, block_params) = reference, blockwise
    assert losses[-1] < losses[0]  # it trained
    np.testing.assert_allclose(block_losses, losses, rtol=rtol)
    assert set(block_params) == set(params)
    for name, value in params.items():
        np.testing.assert_allclose(np.array(block_params[name]), np.array(value), rtol=rtol, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_blockwise_step_trains_as_the_whole_model_step(layout):
    assert speed.BLOCKWISE_CHECKPOINTING
    assert_same_training(train(LAYOUTS[layout], checkpointing=False), train(LAYOUTS[layout], checkpointing=True))


def test_blocks_whose_adapters_differ_only_in_scale_are_compiled_apart():
    # same names, shapes and trained arrays; the scale is a Python float a compiled function bakes in
    scales = {"single_transformer_blocks.12.proj_out": 0.25, "single_transformer_blocks.30.proj_out": 3.0}
    targets = LAYOUTS["people"]
    assert_same_training(train(targets, checkpointing=False, scales=scales),
                         train(targets, checkpointing=True, scales=scales))


@pytest.mark.parametrize("guidance", [True, False])
def test_blockwise_step_for_dev_and_schnell_at_batch_two(guidance):
    # schnell has no guidance embedder (the step then gets no guidance input); two samples a step
    def run(checkpointing):
        mx.random.seed(0)
        transformer = FluxTransformer(dict(TRANSFORMER_CONFIG, guidance_embeds=guidance, num_layers=3,
                                           num_single_layers=4))
        transformer.freeze()
        apply_lora(transformer, [("transformer_blocks.2.attn.to_q", 4), ("single_transformer_blocks.1.proj_out", 4)],
                   key=mx.random.key(0))
        transformer.gradient_checkpointing = checkpointing
        optimizer = optim.AdamW(learning_rate=1e-2)
        optimizer.init(transformer.trainable_parameters())
        step = make_train_step(transformer, optimizer, mx.float32, has_guidance=guidance)
        keys = mx.random.split(mx.random.key(3), 4)
        arguments = (mx.random.normal((2, 16, 64), key=keys[0]), mx.random.normal((2, 16, 64), key=keys[1]),
                     mx.random.normal((2, 32, 32), key=keys[2]), mx.random.normal((2, 32), key=keys[3]),
                     mx.array([0.5, 0.2]), mx.array([3.0, 3.0]), latent_image_ids(8, 8), text_ids(32))
        return [float(step(*arguments)) for _ in range(3)], dict(tree_flatten(transformer.trainable_parameters()))

    assert_same_training(run(False), run(True))


@pytest.mark.parametrize("keeps_dense", [True, False])
def test_blockwise_step_over_a_quantized_base_dequantizing_once_or_twice(monkeypatch, keeps_dense):
    # every quantized linear through dequantize + matmul (the CUDA route), not only the long ones
    monkeypatch.setattr(DequantizingLinear, "MIN_ROWS", 1)
    monkeypatch.setattr(speed, "BLOCKWISE_KEEPS_DENSE", keeps_dense)
    kept = []
    real = blockwise_step.keeping_dense_weights
    monkeypatch.setattr(blockwise_step, "keeping_dense_weights", lambda: kept.append(1) or real())
    targets = LAYOUTS["style"]
    assert_same_training(train(targets, checkpointing=False, bits=4), train(targets, checkpointing=True, bits=4))
    assert bool(kept) == keeps_dense


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_blockwise_step_keeps_at_most_its_depth_queued(monkeypatch, depth):
    monkeypatch.setattr(speed, "BLOCKWISE_DEPTH", depth)
    queued, most = [], [0]  # ids of what was queued and not yet waited for; the most at once
    real_async_eval, real_eval = mx.async_eval, mx.eval

    def async_eval(*arrays):
        queued.append(id(arrays[0]))
        most[0] = max(most[0], len(queued))
        return real_async_eval(*arrays)

    def evaluate(*arrays):
        if arrays and id(arrays[0]) in queued:  # waiting for a queued stage retires it
            queued.remove(id(arrays[0]))
        return real_eval(*arrays)

    monkeypatch.setattr(mx, "async_eval", async_eval)
    monkeypatch.setattr(mx, "eval", evaluate)
    train(LAYOUTS["people"], checkpointing=True, steps=1)
    # right after a push, before the host waits: `depth` queued stages plus the new one
    assert most[0] == depth + 1


def test_an_unbounded_step_never_waits_between_stages_and_keeps_only_the_last_queued(monkeypatch):
    # depth -1 (bounded_queue.UNBOUNDED): on CUDA MLX's own bound on graphs in flight holds the host;
    # the queue keeps no stage's outputs but the last one's (their buffers would stay alive)
    from engine.flux import bounded_queue

    monkeypatch.setattr(speed, "BLOCKWISE_DEPTH", bounded_queue.UNBOUNDED)
    waits, kept = [], []
    real_eval, real_push = mx.eval, bounded_queue.BoundedQueue.push
    monkeypatch.setattr(mx, "eval", lambda *arrays: waits.append(1) or real_eval(*arrays))
    monkeypatch.setattr(bounded_queue.BoundedQueue, "push",
                        lambda self, arrays: real_push(self, arrays) or kept.append(len(self.pending)))
    targets = LAYOUTS["people"]
    unbounded = train(targets, checkpointing=True, steps=2)
    assert kept and max(kept) == 1
    assert len(waits) <= 3 * 2  # the training loop's own reads, not one a stage
    monkeypatch.setattr(speed, "BLOCKWISE_DEPTH", 1)
    assert_same_training(unbounded, train(targets, checkpointing=True, steps=2))


def test_blockwise_step_logs_where_its_first_call_went(caplog):
    # for a time to first step: the trainer's --verbose log says how long the trace took, once
    with caplog.at_level("INFO", logger="engine.blockwise_step"):
        train(LAYOUTS["people"], checkpointing=True, steps=2)
    lines = [r.getMessage() for r in caplog.records if r.name == "engine.blockwise_step"]
    assert len(lines) == 1 and "8 stage functions compiled" in lines[0], lines


def test_blocks_sharing_a_layout_share_one_compiled_function(monkeypatch):
    traced = set()
    real_forward, real_backward = blockwise_step._forward, blockwise_step._backward

    def forward(template, *args):
        traced.add(("forward", id(template)))
        return real_forward(template, *args)

    def backward(template, *args):
        traced.add(("backward", id(template)))
        return real_backward(template, *args)

    monkeypatch.setattr(blockwise_step, "_forward", forward)
    monkeypatch.setattr(blockwise_step, "_backward", backward)
    train(LAYOUTS["people"], checkpointing=True, steps=1)
    # embedders, joint blocks, the join, single blocks 0-9, 10-37: five forwards; the head, trained
    # single blocks and the first trained one (no input gradient): three backwards, not 57 + 29
    assert len({t for t in traced if t[0] == "forward"}) == 5
    assert len({t for t in traced if t[0] == "backward"}) == 3


@pytest.mark.parametrize("layout", ["people", "style"])
def test_a_backward_split_at_its_recomputed_forward_trains_the_same_and_queues_it_first(monkeypatch, layout):
    # speed.BLOCKWISE_SPLIT_BACKWARD: each backward stage's recomputed forward is a piece of its own,
    # waited for halfway through the stage; the numbers stay the whole-model step's
    monkeypatch.setattr(speed, "BLOCKWISE_SPLIT_BACKWARD", True)
    monkeypatch.setattr(speed, "BLOCKWISE_DEPTH", 1)
    pushes = []
    real_push = blockwise_step.BoundedQueue.push
    monkeypatch.setattr(blockwise_step.BoundedQueue, "push",
                        lambda self, arrays: pushes.append(len(arrays)) or real_push(self, arrays))
    targets = LAYOUTS[layout]
    assert_same_training(train(targets, checkpointing=False), train(targets, checkpointing=True))
    split = len(pushes)
    pushes.clear()
    monkeypatch.setattr(speed, "BLOCKWISE_SPLIT_BACKWARD", False)
    train(targets, checkpointing=True)
    # three steps, each with one more piece per backward stage but the head's: stages are the embedders
    # (0), 19 joint blocks, the join (20), 38 single blocks (21-58) and the head (59)
    first_trained = {"people": 21 + 10, "style": 1 + 5}[layout]
    assert split - len(pushes) == 3 * (59 - first_trained)


def _identities(tree):
    return [(name, id(value)) for name, value in tree_flatten(tree)]


def test_parameter_tree_is_the_modules_own_parameters():
    # the step gathers every stage's parameters with it each call: same names, same arrays, same nesting
    transformer = load_model("tiny", text_encoders=False).transformer
    quantize_module(transformer, 4)
    apply_lora(transformer, LAYOUTS["style"], key=mx.random.key(0))
    for module in (transformer, transformer.transformer_blocks[5], transformer.single_transformer_blocks[20]):
        assert _identities(blockwise_step.parameter_tree(module)) == _identities(module.parameters())
    # the odd cases parameters() handles: private keys, plain dicts and lists, values that are not arrays
    odd = nn.Module()
    odd.kept = mx.zeros(2)
    odd._private = mx.zeros(3)
    odd.table = {"a": mx.ones(1), "b": [mx.ones(2), 7], "c": "text"}
    odd.layers = [nn.Linear(2, 2), {"x": mx.ones(3)}]
    odd.number = 3
    assert blockwise_step.parameter_tree(odd).keys() == odd.parameters().keys()
    assert _identities(blockwise_step.parameter_tree(odd)) == _identities(odd.parameters())
    assert blockwise_step.parameter_tree(odd)["table"]["b"][1] == {} == odd.parameters()["table"]["b"][1]


@pytest.mark.parametrize("layout", ["people", "style"])
def test_adapter_gradients_queued_first_train_the_same_one_queueing_more_a_stage(monkeypatch, layout):
    # speed.BLOCKWISE_GRADS_FIRST at depth -1: each backward stage's adapter gradients are queued (mx.async_eval)
    # before the stage's other outputs, so the stage ends with its input gradient's matmuls; the numbers stay
    from engine.flux import bounded_queue

    monkeypatch.setattr(speed, "BLOCKWISE_DEPTH", bounded_queue.UNBOUNDED)
    queued = []
    real_async_eval = mx.async_eval
    monkeypatch.setattr(mx, "async_eval", lambda *arrays: queued.append(1) or real_async_eval(*arrays))
    targets = LAYOUTS[layout]
    runs = {}
    for first in (False, True):
        monkeypatch.setattr(speed, "BLOCKWISE_GRADS_FIRST", first)
        queued.clear()
        runs[first] = train(targets, checkpointing=True), len(queued)
    (together, queued_together), (grads_first, queued_first) = runs[False], runs[True]
    np.testing.assert_array_equal(grads_first[0], together[0])
    for name, value in together[1].items():
        assert mx.array_equal(grads_first[1][name], value), name
    # three steps, one queueing more for each backward stage that trains something: people trains single
    # blocks 10-37 (28 stages), style joint blocks 5-15 and single blocks 20-37 (29)
    assert queued_first - queued_together == 3 * {"people": 28, "style": 29}[layout]


def test_the_steps_update_equals_the_optimizers_own_exactly(monkeypatch):
    # the whole update at the step's end (where the backward stages do not update their own arrays) takes
    # and gives back the trained arrays (only the optimizer's state is captured): it must be AdamW's own
    # update, to the bit, step counter and state included, over consecutive steps
    monkeypatch.setattr(speed, "BLOCKWISE_UPDATE_IN_BACKWARD", False)
    models, optimizers = [], []
    for _ in range(2):
        transformer = load_model("tiny", text_encoders=False).transformer
        apply_lora(transformer, LAYOUTS["style"], key=mx.random.key(0))
        transformer.gradient_checkpointing = True
        optimizer = optim.AdamW(learning_rate=optim.linear_schedule(1e-2, 1e-3, 10))
        optimizer.init(transformer.trainable_parameters())
        models.append(transformer)
        optimizers.append(optimizer)
    step = make_train_step(models[0], optimizers[0], mx.float32, has_guidance=True)
    names = step.trained_names
    assert names == [name for name, _ in tree_flatten(models[1].trainable_parameters())]
    for seed in range(3):
        grads = [mx.random.normal(value.shape, key=mx.random.key(seed * 1000 + i))
                 for i, (_, value) in enumerate(tree_flatten(models[1].trainable_parameters()))]
        step.update(grads)
        optimizers[1].update(models[1], tree_unflatten(list(zip(names, grads))))
        mx.eval(models[0].parameters(), optimizers[0].state, models[1].parameters(), optimizers[1].state)
    for (name, got), (_, expected) in zip(tree_flatten(models[0].parameters()), tree_flatten(models[1].parameters())):
        assert mx.array_equal(got, expected), name
    for (name, got), (_, expected) in zip(tree_flatten(optimizers[0].state), tree_flatten(optimizers[1].state)):
        assert mx.array_equal(got, expected), name
    assert optimizers[0].state["step"].item() == 3


def _train_with(optimizer_factory, targets, steps=3):
    """The checkpointed tiny model trained `steps` steps: losses, trained arrays, optimizer state."""
    transformer = load_model("tiny", text_encoders=False).transformer
    apply_lora(transformer, targets, key=mx.random.key(0))
    transformer.gradient_checkpointing = True
    optimizer = optimizer_factory()
    step = make_train_step(transformer, optimizer, mx.float32, has_guidance=True)
    keys = mx.random.split(mx.random.key(3), 4)
    latents = mx.random.normal((1, 16, 64), key=keys[0])
    arguments = (latents, mx.random.normal((1, 32, 32), key=keys[2]), mx.random.normal((1, 32), key=keys[3]),
                 mx.array([3.0]), latent_image_ids(8, 8), text_ids(32))
    losses = []
    for index in range(steps):
        noise = mx.random.normal(latents.shape, key=mx.random.key(10 + index))
        hidden, pooled, guidance, img_ids, txt_ids = arguments[1:]
        losses.append(float(step(latents, noise, hidden, pooled, mx.array([0.2 + 0.25 * index]), guidance,
                                 img_ids, txt_ids)))
    return losses, tree_flatten(transformer.trainable_parameters()), tree_flatten(optimizer.state), step


@pytest.mark.parametrize("layout", ["people", "everywhere"])
@pytest.mark.parametrize("optimizer_factory", [
    lambda: optim.AdamW(learning_rate=optim.linear_schedule(1e-2, 1e-3, 10)),  # a schedule, not initialised
    lambda: optim.SGD(learning_rate=3e-2, momentum=0.9),
    lambda: optim.Adafactor(learning_rate=1e-2, relative_step=False, scale_parameter=False),
], ids=["adamw-scheduled", "sgd-momentum", "adafactor"])
def test_updates_inside_the_backward_stages_equal_the_whole_update_to_the_bit(monkeypatch, layout, optimizer_factory):
    # speed.BLOCKWISE_UPDATE_IN_BACKWARD: each backward stage updates its own trained arrays; the step count
    # and schedules advance once a step. Losses, arrays and the optimizer's whole state stay the same as with
    # the one update at the step's end
    runs = {}
    for in_backward in (False, True):
        monkeypatch.setattr(speed, "BLOCKWISE_UPDATE_IN_BACKWARD", in_backward)
        runs[in_backward] = _train_with(optimizer_factory, LAYOUTS[layout])
    (losses, arrays, state, _), (losses_in, arrays_in, state_in, step) = runs[False], runs[True]
    assert losses[-1] < losses[0]
    assert losses_in == losses
    assert [name for name, _ in arrays_in] == [name for name, _ in arrays]
    for (name, got), (_, expected) in zip(arrays_in, arrays):
        assert mx.array_equal(got, expected), name
    assert [name for name, _ in state_in] == [name for name, _ in state]
    for (name, got), (_, expected) in zip(state_in, state):
        assert got.dtype == expected.dtype and mx.array_equal(got, expected), name
    assert dict(state_in)["step"].item() == 3
    # the stages did update: the compiled backward functions of trained stages are the updating ones
    assert any(key[0] == "backward+update" for key in step.stage_functions._compiled)


def test_a_resumed_optimizer_state_is_the_one_the_backward_stages_update(monkeypatch):
    # the trainer restores a checkpoint by replacing the optimizer's state (MLX then marks it uninitialised):
    # the stages must update the restored arrays, not the ones they looked up before
    monkeypatch.setattr(speed, "BLOCKWISE_UPDATE_IN_BACKWARD", True)
    losses, arrays, state, step = _train_with(lambda: optim.AdamW(learning_rate=1e-2), LAYOUTS["people"], steps=1)
    optimizer = step.stage_updates.optimizer
    restored = tree_unflatten([(name, mx.array(value) + 0) for name, value in state])
    optimizer.state = restored
    transformer = step.stage_updates.transformer
    keys = mx.random.split(mx.random.key(3), 4)
    step(mx.random.normal((1, 16, 64), key=keys[0]), mx.random.normal((1, 16, 64), key=keys[1]),
         mx.random.normal((1, 32, 32), key=keys[2]), mx.random.normal((1, 32), key=keys[3]), mx.array([0.5]),
         mx.array([3.0]), latent_image_ids(8, 8), text_ids(32))
    mx.eval(transformer.parameters(), optimizer.state)
    assert optimizer.state is restored and optimizer.state["step"].item() == 2
    before, after = dict(state), dict(tree_flatten(optimizer.state))
    for name in before:
        if name.endswith(".m"):
            assert not mx.array_equal(after[name], before[name]), name  # each restored moment moved
