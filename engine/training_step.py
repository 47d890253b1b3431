"""One compiled DreamBooth LoRA optimizer step, shared by the trainer and bench/.

Gradients flow only to the LoRA parameters (the base is frozen), the loss is
computed in float32 whatever the compute dtype, and the whole step (forward,
backward, optimizer update) is one `mx.compile`d function over the model's
and optimizer's state.
"""
from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.nn as nn

from engine.flux.uncompiled import compile_switched_off


def noisy_latents(latents: mx.array, noise: mx.array, sigma: mx.array, dtype: mx.Dtype) -> mx.array:
    """The transformer's input at noise level sigma (B,): (1 - sigma) x0 + sigma noise."""
    s = sigma[:, None, None]
    return ((1 - s) * latents + s * noise).astype(dtype)


def flow_loss(prediction: mx.array, latents: mx.array, noise: mx.array) -> mx.array:
    """Rectified flow's loss in float32: the transformer predicts the velocity noise - x0."""
    return mx.mean(mx.square(prediction.astype(mx.float32) - (noise - latents)))


def make_train_step(transformer: nn.Module, optimizer, compute_dtype: mx.Dtype, has_guidance: bool,
                    blockwise_depth: int | None = None, compile_only=None):
    """Returns step(latents, noise, hidden, pooled, sigma, guidance, img_ids, txt_ids) -> loss.

    The step is queued for evaluation (model and optimizer state included) and
    its loss returned unevaluated; reading it waits for the step. With the transformer's
    gradient checkpointing on, the step runs block by block (engine/blockwise_step.py), at
    `blockwise_depth` (None: speed.blockwise_depth()); `compile_only`: see make_blockwise_step."""
    from engine.flux import speed
    from engine.flux.fused_inputs import fuse_single_block_inputs

    if speed.FUSED_SINGLE_INPUTS and fuse_single_block_inputs(transformer):
        # the optimizer's state tree takes the new (frozen) layers' places; its values stay (MLX's init
        # fills in only what is missing, as after a restored state)
        optimizer.init(transformer.trainable_parameters())
    if transformer.gradient_checkpointing and speed.BLOCKWISE_CHECKPOINTING:
        from engine.blockwise_step import make_blockwise_step

        return make_blockwise_step(transformer, optimizer, compute_dtype, has_guidance, depth=blockwise_depth,
                                   compile_only=compile_only)
    if compile_only is not None:
        raise ValueError("compile_only needs the block-by-block step (gradient checkpointing)")

    def loss_fn(latents, noise, hidden, pooled, sigma, guidance, img_ids, txt_ids):
        prediction = transformer(noisy_latents(latents, noise, sigma, compute_dtype), hidden, pooled,
                                 sigma.astype(compute_dtype), img_ids, txt_ids,
                                 guidance.astype(compute_dtype) if has_guidance else None)
        return flow_loss(prediction, latents, noise)

    from engine.lora import ComputeCopies, using_compute_copies
    from engine.lora_fused import float32_gradients

    loss_and_grad = nn.value_and_grad(transformer, loss_fn)
    copies = ComputeCopies(transformer, compute_dtype) if speed.LORA_COMPUTE_COPIES else None
    state = [transformer.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def compiled_step(*arrays):
        if copies is None:
            loss, grads = loss_and_grad(*arrays)
        else:
            with using_compute_copies():
                loss, grads = loss_and_grad(*arrays)
            grads = float32_gradients(grads, transformer.trainable_parameters())
        optimizer.update(transformer, grads)
        if copies is not None:
            copies.refresh()  # the next step's copies, made with the update's own kernels
        return loss

    def step(*arrays):
        if copies is not None:
            copies.ensure_fresh()
        # Queued, not waited for: a caller that reads the loss (float(loss)) only after
        # queueing the next step lets the host build step n+1's graph while the GPU still
        # runs step n (bench/NOTES.md: the host needs ~20 ms per full-size step).
        loss = compiled_step(*arrays)
        if copies is not None:
            copies.mark_fresh()
        mx.async_eval(loss, state)
        return loss

    return step


def make_uncompiled_step(transformer: nn.Module, optimizer, compute_dtype: mx.Dtype, has_guidance: bool):
    """step(latents, noise, hidden, pooled, sigma, guidance, img_ids, txt_ids) -> loss, as make_train_step's
    (the same numbers, the same model and optimizer state), with MLX's compile off (engine/flux/uncompiled.py):
    on MLX's own unfused kernels, nothing to compile, for the steps a run queues while other processes compile
    the compiled step's kernels (engine/kernel_warmup.py). It is the block-by-block step one stage at a time,
    checkpointed or not: unfused, a stage keeps more temporaries alive than compiled (and on CUDA MLX keeps a
    queued kernel's buffers until its CUDA graph has run), so the least memory there is, within the run's
    estimate whatever its own step."""
    from engine.flux import speed

    if speed.BLOCKWISE_CHECKPOINTING:
        from engine.blockwise_step import make_blockwise_step

        inner = make_blockwise_step(transformer, optimizer, compute_dtype, has_guidance, depth=0)
    else:  # that step switched off (a benchmark): the run's own
        inner = make_train_step(transformer, optimizer, compute_dtype, has_guidance, blockwise_depth=0)

    def step(*arrays):
        with compile_switched_off():
            return inner(*arrays)

    return step
