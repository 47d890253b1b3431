"""A training step's optimizer update, fed the gradients of the trained arrays as a flat list.

The block-by-block step (engine/blockwise_step.py) gathers its gradients stage by stage and hands them
to one compiled update at the step's end, in `trained_names`' order (built once: rebuilding the tree each
step with tree_map_with_path over trainable_parameters() cost ~4 ms of host time at full depth while the
GPU ran out of queued work, bench/NOTES.md item 44).
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from engine.lora import get_module
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
    holders = []  # (module, attribute) of each trained array, in trained_names' order
    for name in trained_names:
        path, _, key = name.rpartition(".")
        module = get_module(transformer, path)
        if module is None:
            raise ValueError(f"trained array {name!r} does not sit on a module")
        holders.append((module, key))

    @partial(mx.compile, inputs=[optimizer.state], outputs=[optimizer.state])
    def updated(flat_grads, flat_params):
        new = optimizer.apply_gradients(as_tree(flat_grads), as_tree(flat_params))
        return [value for _, value in tree_flatten(new)]

    def update(flat_grads: list) -> None:
        for (module, key), value in zip(holders, updated(flat_grads, [module[key] for module, key in holders])):
            module[key] = value

    return update, trained_names
