"""A training step's optimizer update: whole at the step's end, or stage by stage inside the backward.

`make_update`: the block-by-block step (engine/blockwise_step.py) gathers its gradients stage by stage
and hands them to one compiled update at the step's end, in `trained_names`' order (built once:
rebuilding the tree each step with tree_map_with_path over trainable_parameters() cost ~4 ms of host
time at full depth while the GPU ran out of queued work, bench/NOTES.md item 44).

`StageUpdates`: each backward stage's own trained arrays updated inside that stage's compiled function,
as soon as their gradients exist (a block's adapters are used by nothing later in the step). The same
arithmetic as the optimizer's `apply_gradients`, to the bit: the step count and schedules advance once
a step (`begin`), then each array goes through the optimizer's own `apply_single`.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from engine.lora import get_module, node_at
from engine.lora_fused import float32_gradients


def make_update(transformer: nn.Module, optimizer, copies=None) -> tuple[Callable[[list], None], list[str]]:
    """(update(flat_grads), trained_names): update applies `optimizer` to the transformer's trained arrays,
    their gradients given in trained_names' order, as `optimizer.update` would, to the bit. `copies`
    (engine/lora.py: ComputeCopies, or None) are remade inside the update."""
    trained_tree = transformer.trainable_parameters()
    trained_names = [name for name, _ in tree_flatten(trained_tree)]
    trained_skeleton = tree_map(lambda _: None, trained_tree)  # the tree's shape, no arrays kept
    del trained_tree

    def as_tree(flat: list) -> dict:
        leaves = iter(flat)  # in tree_flatten's order, which tree_map walks too
        return tree_map(lambda _: next(leaves), trained_skeleton)

    if copies is not None:
        state = [transformer.state, optimizer.state]

        @partial(mx.compile, inputs=state, outputs=state)
        def update_with_copies(flat_grads: list) -> None:
            grads = float32_gradients(as_tree(flat_grads), transformer.trainable_parameters())
            optimizer.update(transformer, grads)
            copies.refresh()  # the next step's copies, made with the update's own kernels

        return update_with_copies, trained_names

    # Without copies the update takes the trained arrays and gives back the new ones, and only the
    # optimizer's state is the compiled function's captured state: with the whole model's (3012 arrays of
    # a 4-bit people model, 280 of them trained) each call read and wrote back every frozen array too,
    # 3.1-3.9 ms of the host's time a call on a 2-core CPU against 1.8 (bench/NOTES.md item 51), at the
    # step's end, where the GPU waits for the next step's first kernels
    holders = holders_of(transformer, trained_names)

    @partial(mx.compile, inputs=[optimizer.state], outputs=[optimizer.state])
    def updated(flat_grads, flat_params):
        new = optimizer.apply_gradients(as_tree(flat_grads), as_tree(flat_params))
        return [value for _, value in tree_flatten(new)]

    def update(flat_grads: list) -> None:
        for (module, key), value in zip(holders, updated(flat_grads, [module[key] for module, key in holders])):
            module[key] = value

    return update, trained_names


def updates_by_stage(optimizer) -> bool:
    """Whether `optimizer` updates as MLX's Optimizer.apply_gradients does (schedules, step count, then
    apply_single per array), which StageUpdates splits; one that changes that keeps the whole update."""
    import mlx.optimizers as optim

    return (isinstance(optimizer, optim.Optimizer)
            and type(optimizer).apply_gradients is optim.Optimizer.apply_gradients)


class StageUpdates:
    """The optimizer's update split by stage (module docstring). Per step: `scalars = begin()`; then in
    each stage function, traced, `apply(scalars, gradients, parameters, states)`; after each call,
    `store(...)` puts the new arrays in the model and the optimizer's state."""

    def __init__(self, transformer: nn.Module, optimizer):
        self.transformer, self.optimizer = transformer, optimizer
        self._states_root, self._states = None, {}

    def begin(self) -> dict[str, mx.array]:
        """Advance the step count and schedules as `apply_gradients` does before its per-array updates;
        the optimizer's scalar state (step, learning rate, scheduled values), which each stage function
        takes as inputs: captured, the compiled functions would keep the first step's values."""
        optimizer = self.optimizer
        if not getattr(optimizer, "_initialized", True):  # a fresh optimizer, or a state just restored
            optimizer.init(self.transformer.trainable_parameters())
        optimizer.apply_gradients({}, {})  # nothing to update: the schedules and the step count alone
        return {key: value for key, value in optimizer.state.items() if isinstance(value, mx.array)}

    def apply(self, scalars: dict, gradients: list, parameters: list, states: list[dict]) -> tuple[list, list]:
        """(new parameters, new states) for one stage's trained arrays; run while a stage is traced, with
        the optimizer's scalars swapped for the traced ones."""
        top = self.optimizer.state
        saved = {key: top[key] for key in scalars}
        top.update(scalars)
        try:
            new_parameters, new_states = [], []
            for gradient, parameter, state in zip(gradients, parameters, states):
                state = dict(state)  # apply_single writes into it: the traced values, not the optimizer's
                new_parameters.append(self.optimizer.apply_single(gradient.astype(parameter.dtype), parameter, state))
                new_states.append(state)
            return new_parameters, new_states
        finally:
            top.update(saved)

    def states(self, names: list[str]) -> list[dict]:
        """The optimizer's per-array state dicts (e.g. AdamW's {"m", "v"}) of the arrays at full `names`,
        looked up again once the optimizer's state is replaced (a resumed run's)."""
        root = self.optimizer.state
        if root is not self._states_root:
            self._states_root, self._states = root, {}
        found = []
        for name in names:
            if name not in self._states:
                state = node_at(root, name)
                if not isinstance(state, dict):
                    raise ValueError(f"the optimizer keeps no state for trained array {name!r}")
                self._states[name] = state
            found.append(self._states[name])
        return found

    @staticmethod
    def store(holders: list[tuple[nn.Module, str]], states: list[dict], new_parameters: list,
              new_states: list[dict]) -> None:
        for (module, key), value in zip(holders, new_parameters):
            module[key] = value
        for state, new in zip(states, new_states):
            state.update(new)


def compile_stage_updates(updates: StageUpdates, scalars: dict, stages: list[tuple[list, list[str]]],
                          compute_dtype: mx.Dtype) -> None:
    """Run, on stand-in gradients, each trained stage's optimizer update as its backward stage function runs
    it (StageUpdates.apply on the stage's arrays and state, in one compiled call), so that this process
    compiles the update's GPU kernels (engine/kernel_warmup.py: the part holding the join runs this first,
    engine/blockwise_step.py). A gradient reaches the update either in the stage's compute dtype, its cast
    to the array's dtype joining the update's kernel (an adapter's A, or an unfused LoRA layer's), or
    already cast (B, behind its transpose): both kinds are compiled. Nothing is stored: the model and the
    optimizer's state stay as they were."""
    done = set()
    for holders, names in stages:
        arrays = [module[key] for module, key in holders]
        for dtype in dict.fromkeys([compute_dtype, *(array.dtype for array in arrays)]):
            key = (dtype, tuple((tuple(array.shape), str(array.dtype)) for array in arrays))
            if key in done:
                continue
            done.add(key)
            gradients = [mx.random.normal(array.shape).astype(dtype) for array in arrays]
            new_arrays, new_states = mx.compile(updates.apply)(scalars, gradients, arrays, updates.states(names))
            mx.eval(new_arrays, new_states)


def holders_of(module: nn.Module, names: list[str]) -> list[tuple[nn.Module, str]]:
    """(module, attribute) of each trained array at `names` under `module`."""
    holders = []
    for name in names:
        path, _, key = name.rpartition(".")
        holder = get_module(module, path)
        if holder is None:
            raise ValueError(f"trained array {name!r} does not sit on a module")
        holders.append((holder, key))
    return holders
