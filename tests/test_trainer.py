"""The training loop on the tiny model: it learns, resumes bit-exactly, obeys its controls."""
from __future__ import annotations

import json
import logging
import os
import stat
import threading

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from engine.checkpoint import read_checkpoint
from engine.config import load_config
from engine.events import TrainingControls
from engine.flux.loading import FluxModel
from engine.lora import lora_parameters
from engine.trainer import Trainer
from tests.helpers import make_training_folder


def run(config_path, **kwargs):
    events = []
    trainer = Trainer(load_config(config_path), events.append, **kwargs)
    return trainer, trainer.run(), events


def test_loss_falls_and_the_lora_pulls_samples_toward_the_training_image(tmp_path):
    from engine.dataset import build_training_set
    from engine.generate import denoise_latents

    config = make_training_folder(tmp_path, count=1, training_loop={"num_epochs": 80, "batch_size": 1},
                                  optimizer={"name": "AdamW", "learning_rate": 3e-3})
    trainer, result, events = run(config)
    losses = [e["loss"] for e in events if e["type"] == "step"]
    assert len(losses) == 80
    assert np.mean(losses[-10:]) < 0.85 * np.mean(losses[:10])

    model = trainer.model
    dataset, extra = build_training_set(model, [(trainer.config.image_paths[0], "photo of sks toy", None)], 64, 64)
    target = dataset.examples[0].latents
    prompt = dataset.prompts["photo of sks toy"]
    hidden, pooled = prompt.hidden[None], prompt.pooled[None]

    def distance():
        latents = denoise_latents(model, hidden, pooled, 64, 64, steps=4, guidance=3.0, seed=7)
        return float(mx.sqrt(mx.mean(mx.square(latents[0] - target))))

    trained = distance()
    # the same model with every B zeroed is exactly the base model
    flat = lora_parameters(model.transformer)
    from engine.lora import load_lora_parameters

    load_lora_parameters(model.transformer, {k: (mx.zeros_like(v) if k.endswith("lora_B") else v) for k, v in flat.items()})
    base = distance()
    assert trained < 0.9 * base, (trained, base)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_three_steps_then_resumed_equals_one_straight_run(tmp_path, checkpointing):
    # checkpointed: the block-by-block step, whose backward stages update their own adapters and look the
    # optimizer's state up again once a resumed run replaces it (engine/optimizer_update.py: StageUpdates)
    straight = make_training_folder(tmp_path / "a", count=3, training_loop={"num_epochs": 2, "batch_size": 1},
                                    save={"checkpoint_frequency": 1}, gradient_checkpointing=checkpointing)
    _, five, _ = run(straight)
    assert five.step == 6  # 3 images x 2 epochs, batch 1
    # stop the second run after 3 steps, then resume it for the rest
    split = make_training_folder(tmp_path / "b", count=3, training_loop={"num_epochs": 2, "batch_size": 1},
                                 save={"checkpoint_frequency": 1}, gradient_checkpointing=checkpointing)
    controls = TrainingControls()

    def stop_after_three(event):
        if event["type"] == "step" and event["step"] == 3:
            controls.stop()

    first = Trainer(load_config(split), stop_after_three, controls).run()
    assert first.stopped and first.step == 3
    resumed = Trainer.from_checkpoint(first.checkpoint_path).run()
    assert resumed.step == five.step and not resumed.stopped

    a = read_checkpoint(five.checkpoint_path)
    b = read_checkpoint(resumed.checkpoint_path)
    from safetensors.numpy import load as load_safetensors

    adapter_a, adapter_b = load_safetensors(a.adapter), load_safetensors(b.adapter)
    assert adapter_a.keys() == adapter_b.keys() and adapter_a
    for key in adapter_a:
        assert np.array_equal(adapter_a[key], adapter_b[key]), key  # bit for bit
    assert a.optimizer.keys() == b.optimizer.keys()
    for key in a.optimizer:
        assert np.array_equal(np.array(a.optimizer[key]), np.array(b.optimizer[key])), key
    assert [(e["step"], e["loss"]) for e in a.loss] == [(e["step"], e["loss"]) for e in b.loss]
    assert a.iterator["rng_state"] == b.iterator["rng_state"]


def test_step_zero_equals_the_base_model(tmp_path):
    from engine.flux.loading import load_model
    from engine.lora import apply_lora

    model = load_model("tiny")
    x = mx.random.normal((1, 16, 64), key=mx.random.key(1))
    hidden = mx.random.normal((1, 512, 32), key=mx.random.key(2))
    pooled = mx.random.normal((1, 32), key=mx.random.key(3))
    from engine.flux.latents import latent_image_ids, text_ids

    args = (x, hidden, pooled, mx.array([0.5]), latent_image_ids(8, 8), text_ids(512), mx.array([3.0]))
    before = model.transformer(*args)
    apply_lora(model.transformer, [("single_transformer_blocks.0.attn.to_q", 4), ("transformer_blocks.3.ff.net.2", 8)],
               key=mx.random.key(0))
    after = model.transformer(*args)
    assert mx.array_equal(before, after)
    trainable = dict(tree_flatten(model.transformer.trainable_parameters()))
    assert set(trainable) == {"single_transformer_blocks.0.attn.to_q.lora_A", "single_transformer_blocks.0.attn.to_q.lora_B",
                              "transformer_blocks.3.ff.net.2.lora_A", "transformer_blocks.3.ff.net.2.lora_B"}


def test_controls_pause_checkpoint_and_preview_from_another_thread(tmp_path):
    config = make_training_folder(tmp_path, count=2, training_loop={"num_epochs": 4, "batch_size": 1})
    controls = TrainingControls()
    events = []
    paused_seen = threading.Event()

    def listener(event):
        events.append(event)
        if event["type"] == "step" and event["step"] == 2:
            controls.request_checkpoint()
            controls.request_preview()
            controls.pause()
        if event["type"] == "paused":
            paused_seen.set()

    trainer = Trainer(load_config(config), listener, controls)
    thread = threading.Thread(target=lambda: events.append({"type": "result", "value": trainer.run()}))
    thread.start()
    assert paused_seen.wait(120)
    steps_at_pause = sum(e["type"] == "step" for e in events)
    thread.join(0.5)
    assert sum(e["type"] == "step" for e in events) == steps_at_pause  # really paused
    controls.resume()
    thread.join(120)
    kinds = [e["type"] for e in events]
    assert "resumed" in kinds and kinds.count("step") == 8
    checkpoints = [e for e in events if e["type"] == "checkpoint"]
    previews = [e for e in events if e["type"] == "preview"]
    # step 3 was already queued when step 2 was reported (one step in flight), so the
    # requests are served by step 3, the first whose weights are current, and the pause follows it
    assert checkpoints[0]["step"] == 3 and previews[0]["step"] == 3
    assert [e["step"] for e in events if e["type"] == "paused"] == [3] and steps_at_pause == 3
    assert (tmp_path / "out" / "_validation" / "images" / "0000003_validation_image.png").is_file()
    result = events[-1]["value"]
    assert result.adapter_path.is_file() and not result.stopped


def test_outputs_and_instrumentation_files(tmp_path):
    config = make_training_folder(tmp_path, count=2, training_loop={"num_epochs": 2, "batch_size": 2},
                                  save={"checkpoint_frequency": 1},
                                  instrumentation={"plot_frequency": 1, "generate_image_frequency": 2,
                                                   "validation_prompt": "photo of sks toy"})
    _, result, events = run(config)
    out = tmp_path / "out"
    assert result.step == 2
    assert sorted(p.name for p in (out / "_checkpoints").iterdir()) == ["0000001_checkpoint.zip", "0000002_checkpoint.zip"]
    assert (out / "_validation" / "images" / "0000002_validation_image.png").is_file()
    history = json.loads((out / "_validation" / "plots" / "0000002_loss.json").read_text())
    assert [h["step"] for h in history] == [1, 2]
    assert (out / "_validation" / "plots" / "0000002_loss.png").is_file()
    assert (out / "adapter.safetensors").is_file()
    import zipfile

    names = set(zipfile.ZipFile(out / "_checkpoints" / "0000002_checkpoint.zip").namelist())
    assert names == {"0000002_adapter.safetensors", "0000002_optimizer.safetensors", "0000002_iterator.json",
                     "0000002_loss.json", "0000002_config.json", "checkpoint.json"}
    # every file is written through a temporary one (mkstemp's 0600) yet readable as any other new file: a ComfyUI
    # service account must read the LoRA
    umask = os.umask(0o022)
    os.umask(umask)
    kept = [path for path in out.rglob("*") if path.is_file()]
    assert {path.suffix for path in kept} == {".safetensors", ".zip", ".png", ".json"}
    assert {str(path.relative_to(out)): stat.S_IMODE(path.stat().st_mode) for path in kept} == {
        str(path.relative_to(out)): 0o666 & ~umask for path in kept}
    assert not [path for path in out.rglob(".*")]  # no temporary file left


def test_a_second_fresh_run_never_overwrites_the_first(tmp_path, caplog):
    config = make_training_folder(tmp_path, count=1, training_loop={"num_epochs": 1, "batch_size": 1})
    with caplog.at_level(logging.INFO, logger="engine.trainer"):
        _, first, _ = run(config)
    # where a slow first step's time went: tracing it or running it (bench/time_to_first_step.py reads these)
    first_step_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("first step")]
    assert [line.split(" in ")[0] for line in first_step_lines] == ["first step traced and queued",
                                                                    "first step ran"], first_step_lines
    _, second, _ = run(config)
    assert first.output_dir != second.output_dir
    assert first.adapter_path.is_file() and second.adapter_path.is_file()

def test_the_first_step_log_splits_queuing_from_running(tmp_path, caplog, monkeypatch):
    # a queue call that takes 2 s (as tracing and compiling do on CUDA) counts as queuing, not running
    import time

    from engine import trainer as trainer_module

    make_train_step = trainer_module.make_train_step

    def slow_to_queue(*args, **kwargs):
        step = make_train_step(*args, **kwargs)

        def queue(*step_args):
            time.sleep(2.0)
            return step(*step_args)

        return queue

    monkeypatch.setattr(trainer_module, "make_train_step", slow_to_queue)
    config = make_training_folder(tmp_path, count=1, training_loop={"num_epochs": 1, "batch_size": 1})
    with caplog.at_level(logging.INFO, logger="engine.trainer"):
        run(config)
    seconds = {r.getMessage().split(" in ")[0]: float(r.getMessage().split(" in ")[1].split(" s")[0])
               for r in caplog.records if r.getMessage().startswith("first step")}
    assert seconds["first step traced and queued"] >= 2.0
    assert seconds["first step ran"] < 2.0, seconds


@pytest.mark.parametrize("template", ["pets", "people", "style", "object"])
def test_every_template_trains_two_steps_on_tiny(tmp_path, template):
    from engine.config import config_to_dict, load_template

    base = json.loads(make_training_folder(tmp_path, count=2).read_text())
    data = config_to_dict(load_template(template))
    data.update(model="tiny", quantize=None, width=64, height=64, examples=base["examples"], save=base["save"],
                training_loop={"num_epochs": 1, "batch_size": 1}, instrumentation=None)
    data = {k: v for k, v in data.items() if v is not None}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    _, result, _ = run(path)
    assert result.step == 2 and result.adapter_path.is_file()


def test_a_crop_in_the_config_is_what_gets_trained(tmp_path):
    from engine.dataset import build_training_set
    from engine.flux.loading import load_model

    config = make_training_folder(tmp_path, count=1, size=96)
    data = json.loads(config.read_text())
    data["examples"]["images"][0]["crop"] = [0, 0, 48, 48]
    config.write_text(json.dumps(data))
    cfg = load_config(config)
    assert cfg.examples.images[0].crop == (0, 0, 48, 48)
    model = load_model("tiny")
    path = cfg.image_paths[0]
    cropped, _ = build_training_set(model, [(path, "p", cfg.examples.images[0].crop)], 64, 64)
    centred, _ = build_training_set(model, [(path, "p", None)], 64, 64)
    assert not mx.array_equal(cropped.examples[0].latents, centred.examples[0].latents)
    data["examples"]["images"][0]["crop"] = [60, 60, 48, 48]  # outside the 96x96 photo
    config.write_text(json.dumps(data))
    from engine.errors import ConfigError

    with pytest.raises(ConfigError, match="crop"):  # refused as the config is read, before any loading
        load_config(config)


def test_compiled_step_with_lora_on_both_modulations_of_several_joint_blocks():
    # regression: with silu(temb) computed inside every modulation, MLX 0.32's compile
    # of value_and_grad failed (IndexError) for this layout; the transformer now shares it
    import mlx.optimizers as optim

    from engine.flux.latents import latent_image_ids, text_ids
    from engine.flux.loading import load_model
    from engine.lora import apply_lora
    from engine.training_step import make_train_step

    transformer = load_model("tiny", text_encoders=False).transformer
    apply_lora(transformer, [(f"transformer_blocks.{b}.{layer}", 4) for b in (0, 1)
                             for layer in ("norm1.linear", "norm1_context.linear")], key=mx.random.key(0))
    optimizer = optim.AdamW(learning_rate=1e-3)
    optimizer.init(transformer.trainable_parameters())
    step = make_train_step(transformer, optimizer, mx.float32, has_guidance=True)
    keys = mx.random.split(mx.random.key(3), 4)
    latents, noise = mx.random.normal((1, 16, 64), key=keys[0]), mx.random.normal((1, 16, 64), key=keys[1])
    losses = [float(step(latents, noise, mx.random.normal((1, 32, 32), key=keys[2]), mx.random.normal((1, 32), key=keys[3]),
                         mx.array([0.5]), mx.array([3.0]), latent_image_ids(8, 8), text_ids(32))) for _ in range(3)]
    assert all(np.isfinite(losses)) and losses[-1] != losses[0]


def test_trainer_weighs_our_cuda_kernels_compile_time_against_the_steps_it_runs(tmp_path, monkeypatch):
    # the style layout with gradient checkpointing (it once crashed on CUDA with every kernel on,
    # bench/NOTES.md item 12; it trains since the contiguous attention backward, run 12): a run
    # this short would not win back our kernels' compile time on CUDA, so they are off for it,
    # and for this run only
    from engine.flux import speed

    monkeypatch.setattr(speed, "on_cuda", lambda: True)  # the choice is the trainer's; no kernel runs here
    config = make_training_folder(
        tmp_path, count=1, gradient_checkpointing=True, training_loop={"num_epochs": 2, "batch_size": 1},
        lora_layers={"transformer_blocks": {"block_range": {"start": 5, "end": 7},
                                            "layer_types": ["attn.to_q", "attn.to_k", "attn.to_v"], "lora_rank": 16}})
    seen, configured = [], []

    def listener(event):
        if event["type"] == "step":
            seen.append((speed.LORA_KERNELS, speed.ROPE_KERNEL, speed.GELU_SAVES_INPUT, event["loss"]))

    def configure(*args, **kwargs):
        configured.append(kwargs.get("steps"))
        return configure_for_training(*args, **kwargs)

    configure_for_training = speed.configure_for_training
    try:
        speed.configure_for_training = configure
        result = Trainer(load_config(config), listener).run()
        assert result.step == 2 and not result.stopped
        assert configured == [2]  # the steps this process runs: what our kernels' compile time is weighed against
        assert [switches[:3] for switches in seen] == [(False, False, True)] * 2
        assert all(np.isfinite(loss) for *_, loss in seen)
    finally:
        speed.configure_for_training = configure_for_training
        speed.configure_for_training()
    assert not speed.LORA_KERNELS and speed.ROPE_KERNEL and speed.GELU_SAVES_INPUT


def test_trainer_caps_cuda_memory_from_what_was_free_before_it_loaded(tmp_path, monkeypatch):
    # measured before loading (our own weights would count against the run otherwise), then handed
    # to the cap decision (engine/memory_limit.py) once the transformer's config is known
    from engine import memory_limit
    from engine.trainer import Trainer as TrainerClass

    events, calls = [], []
    monkeypatch.setattr(TrainerClass, "_available_on_cuda", staticmethod(lambda: events.append("measured") or 7 * 2**30))
    import engine.flux.loading as loading

    load_model = loading.load_model

    def recording_load_model(*args, **kwargs):
        events.append("load")
        return load_model(*args, **kwargs)

    monkeypatch.setattr(loading, "load_model", recording_load_model)

    def apply(cfg, model_config, backend, available_bytes=None):
        calls.append((backend, available_bytes, model_config.transformer["num_layers"]))
        return None

    monkeypatch.setattr(memory_limit, "apply_graph_memory_limit", apply)
    config = make_training_folder(tmp_path, count=1, training_loop={"num_epochs": 1, "batch_size": 1})
    Trainer(load_config(config), lambda event: None).run()
    assert events[:2] == ["measured", "load"]
    assert calls == [("cuda", 7 * 2**30, calls[0][2])] and calls[0][2] > 0


@pytest.mark.parametrize("set_depth, available, depth", [(1, 2**40, 1), (1, 2**20, 0), (None, 2**40, -1),
                                                        (None, 2**20, 0)])
def test_trainer_runs_the_checkpointed_step_one_stage_at_a_time_only_where_it_must(tmp_path, monkeypatch, caplog,
                                                                                   set_depth, available, depth):
    # on CUDA a checkpointed run whose default depth would not fit what was free goes one stage at a
    # time (engine/memory_cuda.py: blockwise_depth_to_fit): 7.63 instead of 8.67 GiB, 1.1-1.35x the time (run 15).
    # CUDA's default (BLOCKWISE_DEPTH unset) is -1: never waiting between stages, with small CUDA graphs
    import engine.flux.loading as loading
    from engine import blockwise_step
    from engine.flux import speed
    from engine.trainer import Trainer as TrainerClass

    monkeypatch.setattr(speed, "BLOCKWISE_DEPTH", set_depth)
    monkeypatch.setattr(TrainerClass, "_available_on_cuda", staticmethod(lambda: available))
    depths, real = [], blockwise_step.make_blockwise_step
    monkeypatch.setattr(blockwise_step, "make_blockwise_step",
                        lambda *args, depth=None, **kwargs: depths.append(depth) or real(*args, depth=depth, **kwargs))
    # MLX's CUDA-graph settings follow the depth, chosen before the model loads (MLX reads them at its
    # first kernel launch): five kernels a graph one stage at a time
    order = []
    monkeypatch.setattr(speed, "configure_cuda_graphs",
                        lambda one_stage_at_a_time=False, unbounded=False:
                        order.append(("graphs", one_stage_at_a_time, unbounded)) or {})
    real_load = loading.load_model
    monkeypatch.setattr(loading, "load_model", lambda *args, **kwargs: order.append("load") or real_load(*args, **kwargs))
    from engine import kernel_warmup  # the warm-up compiles the step as it will run: one stage at a time or not

    monkeypatch.setattr(kernel_warmup, "start", lambda cfg, model, depth, one_stage, *rest:
                        order.append(("warmup", depth, one_stage)) or kernel_warmup.Warmup())
    config = make_training_folder(tmp_path, count=1, gradient_checkpointing=True,
                                  training_loop={"num_epochs": 1, "batch_size": 1})
    with caplog.at_level("INFO", logger="engine.trainer"):
        _, result, _ = run(config)
    assert depths == [depth] and result.step == 1
    assert any("one block at a time" in r.getMessage() for r in caplog.records) == (depth == 0)
    # the warm-up starts before the model loads: its processes compile while this one loads and encodes
    assert order == [("graphs", depth == 0, depth == -1), ("warmup", depth, depth == 0), "load"]


@pytest.mark.parametrize("beside_training", [False, True])
def test_trainer_trains_uncompiled_while_the_kernel_warmup_runs(tmp_path, monkeypatch, beside_training):
    # engine/kernel_warmup.py: started before the model loads, its encoders' helpers ended once the run has
    # encoded. Where its processes fit beside the transformer, the run loads it and trains with MLX's compile
    # off until they end (speed.TRAIN_WHILE_COMPILING), then compiled; where they do not, it waits for them
    # (and says so) before loading the transformer. Stopped when the run ends whatever happens
    import subprocess
    import sys

    from engine import kernel_warmup, training_step
    from engine.trainer import Trainer as TrainerClass

    order, flag = [], tmp_path / "compiled"
    # a warm-up part that ends once the flag exists (the test's stand-in for the kernels being compiled)
    part = subprocess.Popen([sys.executable, "-c", f"import os, time\nwhile not os.path.exists({str(flag)!r}): "
                                                   "time.sleep(0.02)"])

    class FakeWarmup(kernel_warmup.Warmup):
        def wait(self, *args, **kwargs):
            order.append("wait")
            assert kwargs["give_up"]() is False  # the run's stop request, read while waiting
            flag.touch()
            return super().wait(*args, **kwargs)

        def stop_helpers(self):
            order.append("stop helpers")

        def stop(self):
            order.append("stop")
            kernel_warmup._end(part)

    def fake_start(cfg, model, depth, one_stage, steps_left, available, estimate, log_folder):
        order.append(("start", model.transformer is None and model.vae is None, steps_left, estimate.encoding_peak > 0))
        return FakeWarmup(parts=(part,), marker=tmp_path / "marker", beside_training=beside_training)

    real_load = FluxModel.load_transformer
    monkeypatch.setattr(FluxModel, "load_transformer", lambda self: order.append("load") or real_load(self))
    monkeypatch.setattr(kernel_warmup, "start", fake_start)
    monkeypatch.setattr(TrainerClass, "_available_on_cuda", staticmethod(lambda: 2**40))
    real_make = training_step.make_uncompiled_step

    def make_uncompiled_step(*args):
        step = real_make(*args)
        return lambda *arrays: order.append("uncompiled") or step(*arrays)

    monkeypatch.setattr("engine.trainer.make_uncompiled_step", make_uncompiled_step)
    config = make_training_folder(tmp_path, count=3, training_loop={"num_epochs": 2, "batch_size": 1})
    events = []

    def listen(event):
        events.append(event)
        if event["type"] == "step" and event["step"] == 2:  # the kernels are ready, and the part has ended
            flag.touch()
            part.wait(timeout=30)

    try:
        TrainerClass(load_config(config), listen).run()
    finally:
        flag.touch()
    phases = [(e["phase"], e.get("detail")) for e in events if e["type"] == "phase"]
    names = [name for name, _ in phases]
    uncompiled = [e["uncompiled"] for e in events if e["type"] == "step"]
    assert (tmp_path / "marker").exists()  # the warm-up's end was seen: the next run skips it
    if beside_training:
        # step 3 was queued before step 2's loss was read (one step in flight): three uncompiled steps
        assert uncompiled == [True] * 3 + [False] * 3
        assert order == [("start", True, 6, True), "stop helpers", "load", *["uncompiled"] * 3, "stop helpers", "stop"]
        assert "kernels" not in names  # nothing waited for
        assert "compiles its GPU kernels" in phases[names.index("train")][1]
        assert phases[-1] == ("train", "GPU kernels compiled: full speed from step 4")
    else:
        assert uncompiled == [False] * 6
        assert order == [("start", True, 6, True), "stop helpers", "wait", "stop helpers", "load", "stop"]
        assert names.index("encode") < names.index("kernels") < names.index("load_transformer")
        assert names.count("train") == 1
