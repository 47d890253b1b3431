"""MLX's compile off where compiling costs more than it saves (engine/flux/uncompiled.py): the encoders, and
training steps queued while the kernel warm-up compiles (engine/flux/speed.py: TRAIN_WHILE_COMPILING;
engine/training_step.py: make_uncompiled_step) until its processes end, then the compiled step. The trainer's
side is in tests/test_trainer.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import mlx.core as mx
import numpy as np
import pytest


_STEP_SCRIPT = textwrap.dedent("""
    import glob, json, os, sys
    import mlx.core as mx
    from engine.config import load_template, lora_targets
    from engine.flux.tiny import TRANSFORMER_CONFIG
    from engine.flux.latents import latent_image_ids, text_ids
    from engine.flux.transformer import FluxTransformer
    from engine.lora import apply_lora
    from engine.optimizers import build_optimizer
    from engine.training_step import make_train_step, make_uncompiled_step

    def kernels():  # MLX's CPU backend writes each fused kernel it compiles under TMPDIR
        return len(glob.glob(os.path.join(os.environ["TMPDIR"], "mlx", "**", "*.cpp"), recursive=True))

    checkpointing, uncompiled_steps = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    mx.random.seed(0)
    transformer = FluxTransformer(TRANSFORMER_CONFIG)
    transformer.gradient_checkpointing = checkpointing
    apply_lora(transformer, lora_targets(load_template("people")), key=mx.random.key(1))
    optimizer = build_optimizer("AdamW", 1e-3)
    optimizer.init(transformer.trainable_parameters())
    step = make_train_step(transformer, optimizer, mx.float32, True)
    uncompiled = make_uncompiled_step(transformer, optimizer, mx.float32, True)
    depths = []  # the depth each call of a block-by-block step queues at
    from engine.flux import bounded_queue
    real_init = bounded_queue.BoundedQueue.__init__
    bounded_queue.BoundedQueue.__init__ = lambda self, depth: depths.append(depth) or real_init(self, depth)
    tokens, channels = 4, TRANSFORMER_CONFIG["in_channels"]
    losses, compiled_after = [], []
    for index in range(4):
        key = mx.random.key(10 + index)
        arrays = (mx.random.normal((1, tokens, channels), key=key), mx.random.normal((1, tokens, channels), key=key + 1),
                  mx.random.normal((1, 8, TRANSFORMER_CONFIG["joint_attention_dim"]), key=key + 2),
                  mx.random.normal((1, TRANSFORMER_CONFIG["pooled_projection_dim"]), key=key + 3), mx.array([0.3 + 0.1 * index]),
                  mx.array([3.5]), latent_image_ids(4, 4), text_ids(8))
        loss = (uncompiled if index < uncompiled_steps else step)(*arrays)
        losses.append(float(loss))
        compiled_after.append(kernels())
    adapters = {name: value.tolist() for name, value in
                __import__("mlx.utils").utils.tree_flatten(transformer.trainable_parameters())}
    print(json.dumps({"losses": losses, "kernels": compiled_after, "depths": depths, "adapters": adapters}))
""")


def _start(tmp_path, name, checkpointing, uncompiled_steps):
    folder = tmp_path / name
    folder.mkdir()
    return subprocess.Popen([sys.executable, "-c", _STEP_SCRIPT, json.dumps(checkpointing), json.dumps(uncompiled_steps)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, TMPDIR=str(folder)),
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _result(process):
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    return json.loads(out.splitlines()[-1])


@pytest.mark.parametrize("checkpointing", [True, False])
def test_uncompiled_steps_compile_no_kernel_and_train_as_compiled_ones(tmp_path, checkpointing):
    processes = [_start(tmp_path, "compiled", checkpointing, 0), _start(tmp_path, "mixed", checkpointing, 2)]
    compiled, mixed = map(_result, processes)  # side by side: each compiles its kernels on one core
    # fresh kernel caches: a compiled step compiles its fused kernels, an uncompiled one none
    assert compiled["kernels"][0] > 5
    assert mixed["kernels"][:2] == [0, 0] and mixed["kernels"][2] > 5
    # the same numbers: MLX's unfused kernels compute what the fused ones do, and the block-by-block step what
    # the one-graph step does (to the rounding: its gradients add up in another order)
    tolerance = 1e-6 if checkpointing else 1e-5
    np.testing.assert_allclose(mixed["losses"], compiled["losses"], rtol=tolerance, atol=0)
    assert compiled["adapters"].keys() == mixed["adapters"].keys()
    for name, value in compiled["adapters"].items():
        np.testing.assert_allclose(mixed["adapters"][name], value, rtol=1e-4, atol=1e-6, err_msg=name)
    # uncompiled, the block-by-block step one stage at a time, checkpointed or not; compiled, the run's step
    assert mixed["depths"][:2] == [0, 0] and mixed["depths"][2:] == compiled["depths"][2:]
    assert compiled["depths"][0] != 0 if checkpointing else compiled["depths"] == []


_ENCODE_SCRIPT = textwrap.dedent("""
    import glob, json, os
    import mlx.core as mx
    import mlx.nn as nn
    from engine.flux.loading import load_model

    def kernels():
        return len(glob.glob(os.path.join(os.environ["TMPDIR"], "mlx", "**", "*.cpp"), recursive=True))

    model = load_model("tiny")
    hidden, pooled = model.encode_prompts(["photo of sks toy"])
    mean = model.vae.encode(mx.random.uniform(-1, 1, (1, 64, 64, 3)))
    mx.eval(hidden, pooled, mean)
    encoded = kernels()
    x = mx.random.normal((8, 8))
    mx.eval(nn.gelu_fast_approx(x), nn.silu(x))  # MLX's compiled activations, as the encoders use them
    print(json.dumps({"encoding": encoded, "activations": kernels() - encoded}))
""")


def test_the_encoders_compile_no_kernel(tmp_path):
    # CLIP's quick GELU, T5's tanh GELU and the VAE's SiLU are compiled functions in MLX; called inside the
    # encoders they run unfused: nothing to compile (~17 s of NVRTC on a machine's first CUDA run)
    result = subprocess.run([sys.executable, "-c", _ENCODE_SCRIPT], capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, TMPDIR=str(tmp_path)),
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stderr[-3000:]
    counts = json.loads(result.stdout.splitlines()[-1])
    assert counts["activations"] >= 2  # outside the encoders the same activations compile
    assert counts["encoding"] == 0


def test_compile_comes_back_on_when_the_last_user_ends():
    from engine.flux.uncompiled import compile_is_off, compile_switched_off, uncompiled

    calls = []

    @mx.compile
    def double(x):
        calls.append("traced")
        return x * 2

    @uncompiled
    def eager(x):
        assert compile_is_off()
        return double(x)

    x = mx.array([1.0])
    with compile_switched_off():
        eager(x)
        assert compile_is_off()  # the inner use ended, the outer holds it off
        double(x)
    assert calls == ["traced", "traced"]  # every call ran the function itself
    assert not compile_is_off()
    double(x)
    double(x)
    assert calls == ["traced"] * 3  # compiled again: traced once, then replayed
