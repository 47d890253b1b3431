"""Gradient checkpointing as a block-by-block backward with a bounded queue.

With `nn.utils.checkpoint` the whole step is one graph, and on CUDA the host
queues it far ahead of the GPU: MLX keeps every queued op's temporaries (the
dense copies of dequantized weights among them) until the GPU has run it, so a
checkpointed 4-bit people step held 17.8 GiB for 6.25 GiB of weights. Capping
MLX's memory held it to 10.5 GiB at a cost in speed (bench/NOTES.md items 3, 6).

Here the step is run as stages (the embedders, each block, the join of the two
streams, the output layer and loss), each one compiled and queued on its own,
and the host waits whenever more than `depth` stages are queued. So what is
alive is: the weights, the input of every stage from the first trained one on
(the checkpoints), and every buffer of at most depth + 1 stages (MLX frees a
queued op's buffers only once the GPU has run it: ~0.8 GiB a full-size stage in
bf16, ~1.05 GiB over a 4-bit base). The backward walks the stages from the last
to the first trained one, recomputing each from its saved input inside one
compiled vector-Jacobian product, which also runs the optimizer's update of
the stage's own trained arrays (engine/optimizer_update.py: StageUpdates).
Numbers are the same as `nn.value_and_grad` and one optimizer update over the
whole model (tests/test_blockwise_step.py). People over a 4-bit base,
checkpointed, on an H200: 8.67 GiB at 0.157 s a step, where the one graph held
10.5 GiB capped at 0.215 s (bench/NOTES.md items 23-27).

A stage is traced once per layout (its parameters' names, shapes and dtypes,
which are trained, and its modules' settings), not once per block: blocks
sharing a layout share one compiled function, which takes the block's
parameters as inputs.
"""
from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from engine.flux import speed
from engine.flux.bounded_queue import UNBOUNDED, BoundedQueue
from engine.flux.quantized import keeping_dense_weights
from engine.flux.transformer import join_streams
from engine.flux.uncompiled import compile_is_off
from engine.lora import ComputeCopies, using_compute_copies
from engine.optimizer_update import StageUpdates, compile_stage_updates, holders_of, make_update, updates_by_stage
from engine.training_step import flow_loss, noisy_latents

log = logging.getLogger(__name__)

# bench/bench_train.py sets a list here to get (phase, peak bytes) per step: the forward, then the
# backward and update (the peak is reset between them, and each step waits for its own end)
PHASE_PEAKS: list | None = None


@dataclass
class _Stage:
    """One piece of the model's call: `run(holder, carry, temb, rope) -> carry`, with the parameters
    of `holder` under `prefix` in the transformer's parameter tree."""

    prefix: str
    holder: nn.Module
    run: Callable

    def parameters(self) -> list[tuple[str, mx.array]]:
        return tree_flatten(self.holder.parameters())

    def trainable(self) -> list[str]:
        return [name for name, _ in tree_flatten(self.holder.trainable_parameters())]

    def layout(self) -> tuple:
        """What a compiled function of this stage depends on besides its arrays' values."""
        settings = tuple((path, type(module).__name__, tuple(sorted(
            (k, v) for k, v in vars(module).items()
            if not k.startswith("_") and isinstance(v, (int, float, str, bool, type(None))))))
            for path, module in self.holder.named_modules())
        arrays = tuple((name, tuple(a.shape), str(a.dtype)) for name, a in self.parameters())
        return self.run, settings, arrays, tuple(self.trainable())


def parameter_tree(module: nn.Module) -> dict:
    """`module.parameters()`, the same tree of the same arrays, without its filter machinery: a step
    gathers every stage's parameters again each call (an update replaces the arrays), 2.1 ms a full-depth
    step through `parameters()` against 1.3 ms this way (bench/probe_host_overhead.py's model, a 2-core
    host), time in which the GPU, held to a few kernels ahead of the host at depth -1, may run dry
    (bench/NOTES.md item 44)."""
    return {key: _parameter_value(value) for key, value in module.items()
            if isinstance(value, (dict, list, mx.array)) and not key.startswith("_")}


def _parameter_value(value):
    if isinstance(value, mx.array):
        return value
    if isinstance(value, nn.Module):
        return parameter_tree(value)
    items = value.items() if isinstance(value, dict) else enumerate(value)
    kept = {key: _parameter_value(item) if isinstance(item, (dict, list, mx.array)) else {} for key, item in items}
    return kept if isinstance(value, dict) else list(kept.values())


def _container(**modules: nn.Module) -> nn.Module:
    holder = nn.Module()
    for name, module in modules.items():
        setattr(holder, name, module)
    return holder


def _stages(transformer) -> tuple[_Stage, list[_Stage], _Stage]:
    """(embedders, the blocks in order with the join of the two streams as a stage, output layer and loss).

    Each stage runs the transformer's own pieces (engine/flux/transformer.py); a holder only
    gathers the modules whose parameters a compiled function takes as inputs."""
    dtype = transformer.dtype

    def run_embed(holder, inputs, temb, rope):
        latents, noise, sigma, encoder_hidden, pooled, *guidance = inputs  # schnell has no guidance
        guidance = guidance[0] if guidance else None
        noisy = noisy_latents(latents, noise, sigma, dtype)
        hidden, context, temb = transformer.embed(noisy, encoder_hidden, pooled, sigma.astype(dtype),
                                                  None if guidance is None else guidance.astype(dtype))
        return hidden, context, temb

    def run_head(holder, carry, temb, rope):
        joined, latents, noise, text_length = carry
        return flow_loss(transformer.head(joined, temb, text_length), latents, noise)

    embed = _Stage("", _container(x_embedder=transformer.x_embedder, context_embedder=transformer.context_embedder,
                                  time_text_embed=transformer.time_text_embed), run_embed)
    blocks = [_Stage(f"transformer_blocks.{i}", block, _run_joint)
              for i, block in enumerate(transformer.transformer_blocks)]
    blocks.append(_Stage("", nn.Module(), _run_join))
    blocks += [_Stage(f"single_transformer_blocks.{i}", block, _run_single)
               for i, block in enumerate(transformer.single_transformer_blocks)]
    head = _Stage("", _container(norm_out=transformer.norm_out, proj_out=transformer.proj_out), run_head)
    return embed, blocks, head


def _run_joint(block, carry, temb, rope):
    return block(*carry, temb, rope)


def _run_join(holder, carry, temb, rope):
    return (join_streams(*carry),)


def _run_single(block, carry, temb, rope):
    return (block(carry[0], temb, rope),)


def _with_parameters(template: nn.Module, parameters: dict, compute: Callable):
    """compute() with `template`'s parameters swapped for `parameters` (tracers while compiling)."""
    saved = template.parameters()
    template.update(parameters)
    try:
        return compute()
    finally:
        template.update(saved)


def _forward(template, run, copies: bool, parameters, carry, temb, rope):
    with using_compute_copies() if copies else nullcontext():
        return _with_parameters(template, parameters, lambda: run(template, carry, temb, rope))


def _backward(template, run, trainable: tuple, carry_grads: int, temb_grad: bool, copies: bool,
              parameters, carry, temb, rope, cotangents):
    """The stage's outputs and the gradients of (its trainable parameters, its first `carry_grads`
    carry arrays, temb if `temb_grad`), recomputing the stage from its inputs."""
    flat = dict(tree_flatten(parameters))
    primals = [flat[name] for name in trainable] + list(carry[:carry_grads]) + ([temb] if temb_grad else [])

    def stage(*arrays):
        values = dict(flat)
        values.update(zip(trainable, arrays))
        given = list(arrays[len(trainable):len(trainable) + carry_grads]) + list(carry[carry_grads:])
        with (keeping_dense_weights() if speed.BLOCKWISE_KEEPS_DENSE else nullcontext(),
              using_compute_copies() if copies else nullcontext()):
            out = _with_parameters(template, tree_unflatten(list(values.items())),
                                   lambda: run(template, tuple(given), arrays[-1] if temb_grad else temb, rope))
        return list(out) if isinstance(out, tuple) else [out]

    return mx.vjp(stage, primals, cotangents)


def _backward_updating(updates: StageUpdates, template, run, trainable: tuple, carry_grads: int, temb_grad: bool,
                       copies: bool, parameters, carry, temb, rope, cotangents, scalars, states):
    """_backward's, with the stage's trained arrays updated by the optimizer in the same function: (outputs,
    the gradients of the carry and temb, the new trained arrays, the optimizer's new state for each)."""
    outputs, vjps = _backward(template, run, trainable, carry_grads, temb_grad, copies, parameters, carry, temb, rope,
                              cotangents)
    flat = dict(tree_flatten(parameters))
    new_parameters, new_states = updates.apply(scalars, vjps[:len(trainable)], [flat[name] for name in trainable],
                                               states)
    return outputs, vjps[len(trainable):], new_parameters, new_states


class _Functions:
    """One compiled forward and backward per stage layout, traced on the first stage that has it."""

    def __init__(self, copies: bool = False, updates: StageUpdates | None = None):
        self._compiled: dict = {}
        self.copies = copies  # whether LoRA layers read their compute copies (engine/lora.py: ComputeCopies)
        self.updates = updates  # where backward stages update their own trained arrays

    @property
    def count(self) -> int:
        return len(self._compiled)

    def position(self, function) -> int:
        """The order in which `function` was first made (the same in every process for one model)."""
        return next(i for i, f in enumerate(self._compiled.values()) if f is function)

    def _get(self, key, make):
        if key not in self._compiled:
            self._compiled[key] = mx.compile(make())
        return self._compiled[key]

    def forward(self, stage: _Stage, layout: tuple):
        return self._get(("forward", layout), lambda: partial(_forward, stage.holder, stage.run, self.copies))

    def backward(self, stage: _Stage, layout: tuple, carry_grads: int, temb_grad: bool):
        """The stage's backward; `_backward_updating`'s where it updates the stage's trained arrays."""
        # the trained names from the layout (its last part), not from the module tree on every call
        updating = self.updates is not None and bool(layout[-1])
        function = partial(_backward_updating, self.updates) if updating else _backward
        return self._get(("backward+update" if updating else "backward", layout, carry_grads, temb_grad),
                         lambda: partial(function, stage.holder, stage.run, layout[-1], carry_grads, temb_grad,
                                         self.copies))


def _stand_in(array: mx.array) -> mx.array:
    """An array of the same shape and dtype, made without evaluating `array`'s graph."""
    return mx.random.normal(array.shape).astype(array.dtype)


def make_blockwise_step(transformer, optimizer, compute_dtype: mx.Dtype, has_guidance: bool,
                        depth: int | None = None, compile_only: Callable[[int], bool] | None = None):
    """A training step with the signature and numbers of engine.training_step.make_train_step's,
    run stage by stage (module docstring). The trained layers must stay as they are while the step
    is in use (which parameters train decides how each stage is compiled). `depth`: stages queued
    ahead of the GPU (None: speed.blockwise_depth(); 0: one stage at a time, the least memory; 1: the
    GPU runs one stage while the host queues the next; on an H200 a second bought 2% speed for
    0.96 GiB, bench/NOTES.md item 24).

    `compile_only` (engine/kernel_warmup.py): every stage function is traced, in the same order as a
    real step's, but only those whose position (`_Functions.position`; a whole update at the step's
    end, where the backward stages do not update their own arrays, is the number of stage functions)
    it accepts run, each on random stand-ins of its inputs. So several processes, each running its
    share, compile a step's GPU kernels side by side. The step then returns a zero loss; the model
    changes only if a whole update ran, the optimizer's step count and state meaninglessly."""
    depth = speed.blockwise_depth() if depth is None else depth
    del compute_dtype  # the stages run in the transformer's own dtype, as the whole-model step does
    # before the layouts: the copies are parameters each stage function takes
    copies = ComputeCopies(transformer, transformer.dtype) if speed.LORA_COMPUTE_COPIES else None
    embed, blocks, head = _stages(transformer)
    stages = [embed, *blocks, head]
    layouts = [stage.layout() for stage in stages]
    trainable = [stage.trainable() for stage in stages]
    trained = [i for i, names in enumerate(trainable) if names]
    first = trained[0] if trained else len(stages) - 1  # nothing trained: the loss alone
    temb_grad = bool(trainable[0])  # only the embedders lie behind temb
    # each backward stage updates its own trained arrays (engine/optimizer_update.py: StageUpdates), where
    # the copies, refreshed by the whole update, are off
    updates = StageUpdates(transformer, optimizer) if (
        speed.BLOCKWISE_UPDATE_IN_BACKWARD and copies is None and updates_by_stage(optimizer)) else None
    functions = _Functions(copies is not None, updates)
    state = [transformer.state, optimizer.state]
    # the whole update at the step's end, only where the stages do not update their own arrays
    update, trained_names = make_update(transformer, optimizer, copies) if updates is None else (None, [])
    holders = [holders_of(stage.holder, names) for stage, names in zip(stages, trainable)]
    full_names = [[f"{stage.prefix}.{name}" if stage.prefix else name for name in names]
                  for stage, names in zip(stages, trainable)]

    first_call = [True]
    warming = compile_only is not None
    runs = lambda function: compile_only(functions.position(function))  # noqa: E731

    def step(latents, noise, hidden, pooled, sigma, guidance, img_ids, txt_ids):
        started = time.perf_counter()
        if copies is not None:
            copies.ensure_fresh()
        scalars = updates.begin() if updates is not None and trained else None
        stage_times = [(started, 0)]  # (when each forward stage was queued, its index), on the first call
        queue = BoundedQueue(depth)
        rope = transformer.rope(img_ids, txt_ids)
        inputs = (latents, noise, sigma, hidden, pooled) + ((guidance,) if has_guidance else ())
        # each stage's parameters, gathered when the stage is first queued rather than all at the step's
        # start: there the GPU has only the last step's update in flight (run 22's profile: ~4.5 ms idle a
        # step before a kernel that runs once a step, likely the first), while between forward stages it has work
        params: list = [None] * len(stages)

        def params_of(i: int) -> dict:
            if params[i] is None:
                params[i] = parameter_tree(stages[i].holder)
            return params[i]

        saved = {}  # the input of every stage the backward recomputes (the checkpoints)

        # forward: the embedders, then each block; the head's forward runs inside its backward
        if first == 0:
            saved[0] = inputs
        function = functions.forward(embed, layouts[0])
        *carry, temb = function(params_of(0), inputs, None, rope)
        carry = tuple(carry)
        if not warming or runs(function):
            queue.push([*carry, temb])
        if warming:
            temb = _stand_in(temb)
        for i in range(1, len(stages) - 1):
            given = tuple(map(_stand_in, carry)) if warming else carry
            if i >= first:
                saved[i] = given
            function = functions.forward(stages[i], layouts[i])
            carry = tuple(function(params_of(i), given, temb, rope))
            if not warming or runs(function):
                if warming and stages[i].run is _run_join and scalars is not None:
                    # the stages' update kernels, in the process whose share holds the join, the cheapest stage
                    # function, first, rather than at the end of each trained backward (a machine's first run)
                    compile_stage_updates(updates, scalars, [(holders[j], full_names[j]) for j in trained],
                                          transformer.dtype)
                queue.push(list(carry))
            if first_call[0]:
                stage_times.append((time.perf_counter(), i))
        if warming:
            carry = tuple(map(_stand_in, carry))

        forward_done = time.perf_counter()
        if PHASE_PEAKS is not None:  # a bench probe: the forward's peak, then the backward's
            queue.drain()
            PHASE_PEAKS.append(("forward", mx.get_peak_memory()))
            mx.reset_peak_memory()
        # backward, last stage first; each recomputes its stage from the saved input
        grads: dict[str, mx.array] = {}
        last = len(stages) - 1
        head_carry = (carry[0], latents, noise, hidden.shape[1])
        cotangents, d_temb, loss = [mx.array(1.0, dtype=mx.float32)], None, None
        for i in range(last, first - 1, -1):
            stage = stages[i]
            carry_grads = 0 if i == first else (1 if i == last else len(saved[i]))
            takes_temb = temb_grad and i > 0  # the embedders make temb; their cotangent for it is the sum
            if i == 0:
                cotangents = cotangents + [d_temb]
            if warming:
                cotangents = [_stand_in(c) for c in cotangents]
            function = functions.backward(stage, layouts[i], carry_grads, takes_temb)
            arguments = (params_of(i), head_carry if i == last else saved.pop(i), None if i == 0 else temb, rope,
                         cotangents)
            names = trainable[i]
            if updates is not None and names:  # the gradients go straight into the stage's own update
                states = updates.states(full_names[i])
                outputs, vjps, new_arrays, new_states = function(*arguments, scalars, states)
                if not warming:
                    StageUpdates.store(holders[i], states, new_arrays, new_states)
                trained_out = new_arrays + [value for new in new_states for value in new.values()]
            else:
                outputs, vjps = function(*arguments)
                grads.update(zip(full_names[i], vjps))
                trained_out, vjps = list(vjps[:len(names)]), vjps[len(names):]
            loss = outputs[0] if i == last else loss
            if speed.BLOCKWISE_SPLIT_BACKWARD and i != last and not warming:
                queue.push(list(outputs))  # the recomputed forward first: its values stay for the backward
            cotangents = list(vjps[:carry_grads])
            if takes_temb:
                d_temb = vjps[-1] if d_temb is None else d_temb + vjps[-1]
            if not warming:
                if speed.BLOCKWISE_GRADS_FIRST and trained_out and queue.depth == UNBOUNDED:
                    # the adapter's gradients or updated arrays (and what they need) queued first, so the stage's
                    # last kernels are the input gradient's matmuls, which the GPU runs while the host makes the
                    # next stage
                    mx.async_eval(trained_out)
                queue.push(trained_out + list(vjps) + [loss])
            elif runs(function):
                queue.push(trained_out + list(vjps))
        if warming:  # the update last, on stand-ins, where this process runs it
            if grads and compile_only(functions.count):
                update([_stand_in(grads[name]) for name in trained_names])
                if copies is not None:
                    copies.mark_fresh()
                queue.push([state])
            queue.drain()
            loss = mx.zeros((), mx.float32)
        else:
            if grads:
                update([grads[name] for name in trained_names])
                if copies is not None:
                    copies.mark_fresh()
            queue.push([loss, state])  # the update is the last stage
        if first_call[0] and not compile_is_off():  # where a first compiled step's time goes: tracing, compiling
            first_call[0] = False
            log.info("first block-by-block step: forward traced and queued in %.1f s, backward and update in "
                     "%.1f s (%d stage functions compiled); the slowest forward stages: %s", forward_done - started,
                     time.perf_counter() - forward_done, functions.count, ", ".join(
                         f"{index} {seconds:.2f} s" for seconds, index in sorted(
                             ((b[0] - a[0], b[1]) for a, b in zip(stage_times, stage_times[1:])), reverse=True)[:4]))
        if PHASE_PEAKS is not None:
            mx.eval(loss, state)
            PHASE_PEAKS.append(("backward", mx.get_peak_memory()))
        return loss

    step.stage_functions = functions  # for tests: which compiled functions the step made
    # for tests: the whole update (fed the gradients as a flat list in trained_names order), or the stages'
    step.update, step.trained_names, step.stage_updates = update, trained_names, updates
    return step
