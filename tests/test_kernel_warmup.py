"""The kernel warm-up (engine/kernel_warmup.py): a small copy of the model whose training step
compiles what the run's step compiles, in a second process, once per machine."""
from __future__ import annotations

import json
import os

import mlx.core as mx
import pytest

from engine import kernel_warmup, kernel_warmup_process
from engine.config import load_config, load_template, lora_targets
from engine.flux import speed
from engine.flux.latents import latent_image_ids, text_ids
from engine.flux.tiny import TRANSFORMER_CONFIG
from engine.flux.transformer import FluxTransformer
from engine.lora import apply_lora
from engine.memory import ENCODING, TRAINING, MemoryEstimate
from engine.optimizers import build_optimizer
from engine.training_step import make_train_step
from tests.helpers import make_training_folder

FLUX_DEV = {"num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128, "num_attention_heads": 24}


def test_the_small_model_keeps_one_or_two_blocks_of_each_kind_the_run_has():
    people = lora_targets(load_template("people"))  # single blocks 10-38
    config, moved = kernel_warmup.mini_model(FLUX_DEV, people)
    # 19 frozen joint blocks -> 2; 10 frozen single blocks -> 2, 29 trained -> 2
    assert (config["num_layers"], config["num_single_layers"]) == (2, 4)
    assert config["attention_head_dim"] == 128  # the layers' sizes stay the run's
    trained = sorted({path.split(".")[1] for path, _ in moved})
    assert trained == ["2", "3"] and all(path.startswith("single_transformer_blocks.") for path, _ in moved)
    layers = {(path.split(".", 2)[2], rank) for path, rank in people if path.startswith("single_transformer_blocks.10.")}
    assert {(path.split(".", 2)[2], rank) for path, rank in moved if ".2." in path} == layers

    style = lora_targets(load_template("style"))  # joint 5-15 (q/k/v), single 20-38 (proj)
    config, moved = kernel_warmup.mini_model(FLUX_DEV, style)
    # joint: 5 frozen, 11 trained, 3 frozen after them (their backward runs too) -> 2 + 2 + 2
    assert (config["num_layers"], config["num_single_layers"]) == (6, 4)
    assert sorted({int(p.split(".")[1]) for p, _ in moved if p.startswith("transformer_blocks.")}) == [2, 3]
    assert sorted({int(p.split(".")[1]) for p, _ in moved if p.startswith("single_")}) == [2, 3]


def _stage_functions(transformer_config, targets, checkpointing=True, compile_only=None):
    """The compiled stage functions (kind, run, layout, gradients taken) one blockwise step makes."""
    mx.random.seed(0)
    transformer = FluxTransformer(transformer_config)
    mx.eval(transformer.parameters())
    transformer.gradient_checkpointing = checkpointing
    apply_lora(transformer, targets, key=mx.random.key(0))
    optimizer = build_optimizer("AdamW", 1e-4)
    optimizer.init(transformer.trainable_parameters())
    step = make_train_step(transformer, optimizer, mx.float32, True, compile_only=compile_only)
    height = width = 4
    tokens, channels = (height // 2) * (width // 2), transformer_config["in_channels"]
    loss = step(mx.random.normal((1, tokens, channels)), mx.random.normal((1, tokens, channels)),
                mx.random.normal((1, 8, transformer_config["joint_attention_dim"])),
                mx.random.normal((1, transformer_config["pooled_projection_dim"])), mx.array([0.5]),
                mx.array([3.5]), latent_image_ids(height, width), text_ids(8))
    mx.eval(loss)
    # the embedders' and head's run functions are closures made per model: compare them by name
    return {(kind, run.__name__, tuple(layout), *rest)
            for (kind, (run, *layout), *rest) in step.stage_functions._compiled}


@pytest.mark.parametrize("template", ["people", "pets", "style"])
def test_the_small_models_step_compiles_every_stage_function_of_the_runs(template):
    # the same compiled stage functions (and so the same kernels) as the full step, none missing
    targets = lora_targets(load_template(template))
    full = _stage_functions(TRANSFORMER_CONFIG, targets)
    config, moved = kernel_warmup.mini_model(TRANSFORMER_CONFIG, targets)
    assert config["num_layers"] + config["num_single_layers"] < 19 + 38
    assert _stage_functions(config, moved) == full


def test_the_warmup_trains_the_small_model_as_planned():
    plan = kernel_warmup.WarmupPlan(
        transformer_config=kernel_warmup.mini_model(TRANSFORMER_CONFIG, lora_targets(load_template("people")))[0],
        targets=[list(t) for t in kernel_warmup.mini_model(TRANSFORMER_CONFIG,
                                                           lora_targets(load_template("people")))[1]],
        quantize=4, dtype="float32", checkpointing=True, depth=1, one_stage=False, steps_left=100,
        optimizer="AdamW", learning_rate=1e-4, latent_shape=[8, 8], t5_length=16, pooled_width=32, guidance=True,
        batch_size=1)
    assert kernel_warmup_process.run_plan(plan) > 0
    assert kernel_warmup_process.run_plan(plan, part=(1, 3)) > 0  # a share of the stage functions, on stand-ins
    # what the kernels depend on decides the marker: another image size is another warm-up
    other = kernel_warmup.WarmupPlan(**dict(plan.__dict__, latent_shape=[16, 16]))
    assert plan.key() != other.key() and plan.key() == kernel_warmup.WarmupPlan(**plan.__dict__).key()
    # a run's length matters only through the kernels it switches off (speed.kernels_not_worth_compiling)
    assert kernel_warmup.WarmupPlan(**dict(plan.__dict__, steps_left=101)).key() == plan.key()
    assert kernel_warmup.WarmupPlan(**dict(plan.__dict__, steps_left=100_000)).key() != plan.key()


def _run_config(tmp_path):
    from engine.flux.loading import load_model

    config = load_config(make_training_folder(tmp_path, count=2, gradient_checkpointing=True,
                                              training_loop={"num_epochs": 1, "batch_size": 1}))
    return config, load_model("tiny", transformer=False)


def _estimate(encoding_gib: float, training_gib: float, run_ahead_gib: float = 1.0):
    gib = lambda value: int(value * 2**30)  # noqa: E731
    return MemoryEstimate(parts={"encoders": gib(encoding_gib), "weights": gib(training_gib - run_ahead_gib),
                                 "CUDA graph run-ahead": gib(run_ahead_gib)},
                          phases={ENCODING: ("encoders",), TRAINING: ("weights", "CUDA graph run-ahead")})


def test_the_warmup_needs_the_small_models_share_of_the_run_beside_a_context():
    plan = kernel_warmup.make_plan(load_template("people"), _Model(FLUX_DEV), 1, False, 100)
    # 6 of 57 blocks: 6/57 of the 9 GiB that grow with the blocks, the 1 GiB run-ahead, a context
    need = kernel_warmup.warmup_bytes(plan, _estimate(3.0, 10.0), FLUX_DEV)
    assert not plan.checkpointing  # the template's own setting
    assert need == int(10 * 2**30 * 6 / 57 + kernel_warmup.CUDA_CONTEXT_BYTES)  # the one-graph run-ahead scales too
    plan.checkpointing = True  # the block-by-block step's run-ahead is a few stages' whatever the blocks
    need = kernel_warmup.warmup_bytes(plan, _estimate(3.0, 10.0), FLUX_DEV)
    assert need == int(9 * 2**30 * 6 / 57 + 2**30 + kernel_warmup.CUDA_CONTEXT_BYTES)


class _Model:
    """What make_plan reads of a loaded model."""

    def __init__(self, transformer_config):
        self.transformer_config = dict(transformer_config, in_channels=64, joint_attention_dim=4096)
        self.num_joint_blocks = transformer_config["num_layers"]
        self.num_single_blocks = transformer_config["num_single_layers"]
        self.dtype, self.t5_max_length, self.has_guidance = mx.bfloat16, 512, True
        self.path = "/nowhere"  # no encoder configs: no encoders' helper

        class Vae:
            scale_factor = 8

        self.vae = Vae()


def test_the_warmup_runs_once_per_machine_in_other_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_PTX_CACHE_DIR", str(tmp_path / "kernels"))
    monkeypatch.delenv(kernel_warmup.ENV_SWITCH, raising=False)
    monkeypatch.setattr(kernel_warmup, "usable_cores", lambda: 6)  # two parts beside three encoders' helpers
    config, model = _run_config(tmp_path)  # checkpointed
    room = _estimate(0.001, 0.002, 0.0005)
    # off CUDA (or with no memory measured) nothing starts
    assert kernel_warmup.start(config, model, 1, False, 10, None, room, tmp_path / "logs").parts == ()
    assert kernel_warmup.start(config, model, 1, False, 10, 2**40, room, tmp_path / "logs").parts == ()
    monkeypatch.setattr(speed, "on_cuda", lambda: True)
    # no room beside the encoders: nothing starts
    assert kernel_warmup.start(config, model, 1, False, 10, 2**30, _estimate(1.0, 2.0), tmp_path / "logs").parts == ()
    warmup = kernel_warmup.start(config, model, 1, False, 10, 2**40, room, tmp_path / "logs")
    assert [part.args[-2:] for part in warmup.parts] == [["--part", "0/2"], ["--part", "1/2"]]
    assert [helper.args[-1] for helper in warmup.helpers] == ["t5", "vae", "clip"]
    assert warmup.beside_training and os.getpid() not in [p.pid for p in warmup.parts]
    assert warmup.wait(limit_s=300) == "done", (tmp_path / "logs" / "kernel-warmup-0.log").read_text()[-2000:]
    assert warmup.wait() == "done"  # asked again: the same answer, nothing waited for
    assert all(helper.poll() is not None for helper in warmup.helpers)  # ended with the step's parts
    logs = {path.name: path.read_text() for path in (tmp_path / "logs").glob("kernel-warmup-*.log")}
    assert "part 1 of 2, done" in logs["kernel-warmup-0.log"] and "part 2 of 2, done" in logs["kernel-warmup-1.log"]
    assert json.loads(warmup.marker.read_text())["parts"] == 2 and warmup.marker.parent == tmp_path / "kernels"
    # the marker is there: the next run of the same shapes starts none; another image size does
    assert kernel_warmup.start(config, model, 1, False, 10, 2**40, room, tmp_path / "logs").parts == ()
    config.width = config.height = config.width * 2
    again = kernel_warmup.start(config, model, 1, False, 10, 2**40, room, tmp_path / "logs")
    assert again.parts
    again.stop()
    assert again.wait(limit_s=30) == "failed" and not again.marker.exists()  # ended: no marker
    # turned off by the user
    monkeypatch.setenv(kernel_warmup.ENV_SWITCH, "0")
    config.width = config.height = config.width * 2
    assert kernel_warmup.start(config, model, 1, False, 10, 2**40, room, tmp_path / "logs").parts == ()


def test_a_failed_part_is_reported_the_wait_ends_and_no_marker_is_written(tmp_path):
    import subprocess
    import sys

    broken = tmp_path / "plan.json"
    broken.write_text("{}")
    failing = subprocess.Popen([sys.executable, "-m", "engine.kernel_warmup_process", str(broken), "--part", "1/2"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    fine = subprocess.Popen([sys.executable, "-c", "pass"])
    warmup = kernel_warmup.Warmup((fine, failing), tmp_path / "marker")
    assert warmup.wait(limit_s=120) == "failed" and not (tmp_path / "marker").exists()
    assert kernel_warmup.Warmup().wait() == "none"


def test_polling_the_warmup_waits_for_nothing_and_settles_it_once_it_ends(tmp_path):
    # the trainer polls it between steps it runs uncompiled (speed.TRAIN_WHILE_COMPILING)
    import subprocess
    import sys
    import time

    flag = tmp_path / "flag"
    part = subprocess.Popen([sys.executable, "-c", f"import os, time\nwhile not os.path.exists({str(flag)!r}): "
                                                   "time.sleep(0.02)"])
    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    warmup = kernel_warmup.Warmup((part,), tmp_path / "marker", helpers=(helper,))
    asked = time.perf_counter()
    assert warmup.poll() is None and warmup.poll() is None and time.perf_counter() - asked < 1
    assert helper.poll() is None and not (tmp_path / "marker").exists()
    flag.touch()
    part.wait(timeout=30)
    assert warmup.poll() == "done" and (tmp_path / "marker").exists()
    assert helper.wait(timeout=20) is not None  # the encoders' helpers are ended with it
    assert warmup.wait() == "done" and warmup.poll() == "done"
    slow = kernel_warmup.Warmup((subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]),),
                                tmp_path / "marker2")
    assert slow.poll(limit_s=60) is None
    assert slow.poll(limit_s=0) == "cut" and slow.parts[0].wait(timeout=20) is not None
    assert not (tmp_path / "marker2").exists()


def test_waiting_for_the_warmup_gives_way_to_a_stop_and_to_its_limit(tmp_path):
    import subprocess
    import sys
    import time

    def sleeper():
        return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])

    warmup = kernel_warmup.Warmup((sleeper(), sleeper()), tmp_path / "marker", helpers=(sleeper(),))
    asked = time.perf_counter()
    assert warmup.wait(limit_s=60, give_up=lambda: time.perf_counter() - asked > 0.5, poll_s=0.1) == "stopped"
    assert time.perf_counter() - asked < 20  # every process ended, none left running
    assert all(p.poll() is not None for p in warmup.parts + warmup.helpers)
    warmup = kernel_warmup.Warmup((sleeper(),), tmp_path / "marker")
    assert warmup.wait(limit_s=0.3, poll_s=0.1) == "cut" and warmup.parts[0].poll() is not None
    assert not (tmp_path / "marker").exists()


@pytest.mark.parametrize("update_in_backward", [True, False])
def test_each_part_runs_its_share_of_the_stage_functions_on_stand_ins(monkeypatch, update_in_backward):
    # engine/blockwise_step.py: compile_only. Every stage function is traced in every part, in the same
    # order; a part queues only those whose position it takes (a whole update at the step's end: its
    # position after them all; updates inside the backward stages: theirs)
    from engine.flux import bounded_queue, speed

    monkeypatch.setattr(speed, "BLOCKWISE_UPDATE_IN_BACKWARD", update_in_backward)
    update = 0 if update_in_backward else 1  # the whole update, a position and a piece of its own

    targets = lora_targets(load_template("people"))
    config, moved = kernel_warmup.mini_model(TRANSFORMER_CONFIG, targets)
    pushes = []
    real_push = bounded_queue.BoundedQueue.push
    monkeypatch.setattr(bounded_queue.BoundedQueue, "push",
                        lambda self, arrays: pushes.append(len(arrays)) or real_push(self, arrays))
    whole = _stage_functions(config, moved)
    stages = 1 + config["num_layers"] + 1 + config["num_single_layers"] + 1  # embedders, blocks, join, head
    first_trained = 1 + config["num_layers"] + 1 + 2  # single blocks 2 and 3 train
    assert len(pushes) == (stages - 1) + (stages - first_trained) + 1  # a real step queues every stage
    asked = []
    queued = []
    for index in range(3):
        pushes[:] = []
        functions = _stage_functions(config, moved, compile_only=lambda p, i=index: asked.append(p) or p % 3 == i)
        assert functions == whole  # all traced in every part
        queued.append(len(pushes))
    positions = sorted(set(asked))
    assert positions == list(range(len(whole) + update))  # each stage function's position (then the update's)
    # every stage queued once over the three parts (calls of one function share its position)
    assert sum(queued) == (stages - 1) + (stages - first_trained) + update
    assert all(0 < count < sum(queued) for count in queued)


_KERNELS_SCRIPT = """
import glob, json, os, re, sys
import mlx.core as mx
from engine import kernel_warmup, kernel_warmup_process
plan = kernel_warmup.WarmupPlan(**json.loads(sys.argv[1]))
part = tuple(json.loads(sys.argv[2])) if len(sys.argv) > 2 else None
kernel_warmup_process.run_plan(plan, steps=1) if part is None else kernel_warmup_process.run_plan(plan, part=part)
names = set()  # a kernel's name without its variant (contiguous or strided: on CUDA one module has all)
for path in glob.glob(os.path.join(os.environ["TMPDIR"], "mlx", "**", "*.cpp"), recursive=True):
    name = re.search(r"void (\w+)\(", open(path).read()).group(1)  # a long one's file name is cut short
    names.add(re.sub(r"_(contiguous|strided_\d+)$", "", name))
print(json.dumps(sorted(names)))
"""


def test_the_parts_together_compile_every_kernel_a_real_step_compiles(tmp_path):
    # MLX's CPU backend compiles each fused kernel (named as on CUDA: its ops, dtypes and constants)
    # into a cache under TMPDIR: a fresh one per process shows which kernels a process compiled
    import subprocess
    import sys

    targets = lora_targets(load_template("people"))
    config, moved = kernel_warmup.mini_model(TRANSFORMER_CONFIG, targets)
    plan = kernel_warmup.WarmupPlan(
        transformer_config=config, targets=[list(t) for t in moved], quantize=None, dtype="float32",
        checkpointing=True, depth=1, one_stage=False, steps_left=100, optimizer="AdamW", learning_rate=1e-4,
        latent_shape=[4, 4], t5_length=8, pooled_width=TRANSFORMER_CONFIG["pooled_projection_dim"],
        guidance=True, batch_size=1)

    def start(name, *part):  # started side by side: each compiles its own kernels on one core
        folder = tmp_path / name
        folder.mkdir()
        return subprocess.Popen([sys.executable, "-c", _KERNELS_SCRIPT, json.dumps(plan.__dict__),
                                 *[json.dumps(list(part))] * bool(part)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=dict(os.environ, TMPDIR=str(folder)))

    def compiled(process):
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-2000:]
        return set(json.loads(out.splitlines()[-1]))

    processes = [start("real")] + [start(f"part{index}", index, 3) for index in range(3)]
    plan.checkpointing = False
    processes.append(start("one_graph"))  # the step without checkpointing: one compiled graph
    real, *shares, one_graph = map(compiled, processes)  # a real step, as the run's first step; the parts
    assert len(real) > 10
    assert set().union(*shares) >= real  # nothing left for the run's first step to compile
    # most of the one-graph step's kernels too: its warm-up compiles the shares beside it
    assert len(one_graph & set().union(*shares)) >= 0.8 * len(one_graph)
    assert all(len(share) < len(real) for share in shares)  # each part compiled only a share


def test_the_stages_update_kernels_are_compiled_early_in_the_joins_share(tmp_path):
    # the backward stages update their own arrays (speed.BLOCKWISE_UPDATE_IN_BACKWARD): the update's kernels
    # would come last in each trained backward, the warm-up's longest parts (run 26: 64-68 s against 30-38 s
    # for the rest). The share holding the join (a concatenation) compiles them first instead. In bfloat16
    # with 4-bit layers, as on CUDA: some gradients reach the update in bfloat16 (the cast joins its kernel)
    import subprocess
    import sys

    targets = lora_targets(load_template("people"))
    config, moved = kernel_warmup.mini_model(TRANSFORMER_CONFIG, targets)
    plan = kernel_warmup.WarmupPlan(
        transformer_config=config, targets=[list(t) for t in moved], quantize=4, dtype="bfloat16",
        checkpointing=True, depth=1, one_stage=False, steps_left=100, optimizer="AdamW", learning_rate=1e-4,
        latent_shape=[4, 4], t5_length=8, pooled_width=TRANSFORMER_CONFIG["pooled_projection_dim"],
        guidance=True, batch_size=1)
    # people's small step: embedders, joint block, join, two single-block forwards, the head's backward,
    # then the two trained single blocks' backward with their update (positions 6 and 7): one share each
    parts, join, trained_backward = 8, 2, 6

    def start(name, share, update_in_backward):
        folder = tmp_path / name
        folder.mkdir()
        script = (f"from engine.flux import speed; speed.DEFAULTS['BLOCKWISE_UPDATE_IN_BACKWARD'] = "
                  f"{update_in_backward}\n" + _KERNELS_SCRIPT)
        return subprocess.Popen([sys.executable, "-c", script, json.dumps(plan.__dict__), json.dumps([share, parts])],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=dict(os.environ, TMPDIR=str(folder)))

    def compiled(process):
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-2000:]
        return set(json.loads(out.splitlines()[-1]))

    processes = [start("join", join, True), start("backward", trained_backward, True),
                 start("backward_alone", trained_backward, False)]
    join_share, backward, backward_alone = map(compiled, processes)
    update_kernels = backward - backward_alone
    assert len(update_kernels) >= 2 and any("AsType" in name for name in update_kernels)
    assert update_kernels <= join_share  # compiled in the join's share, before its own stage
    assert len(join_share - update_kernels) <= 1  # the join itself: a copy at most


def test_processes_are_counted_from_the_cores_and_the_room(monkeypatch):
    plan = kernel_warmup.make_plan(load_template("people"), _Model(FLUX_DEV), 1, False, 100)
    plan.checkpointing, plan.encoder_configs = True, {"t5": {}, "vae": {}, "clip": {}}
    encoders = {"t5": 3, "vae": 2, "clip": 2}
    count = kernel_warmup.count_processes
    assert count(plan, 16, 10**6, 10, encoders) == (kernel_warmup.MAX_PARTS, ["t5", "vae", "clip"])
    assert count(plan, 8, 10**6, 10, encoders) == (4, ["t5", "vae", "clip"])  # the run keeps a core
    assert count(plan, 4, 10**6, 10, encoders) == (1, ["t5", "vae"])
    assert count(plan, 2, 10**6, 10, encoders) == (1, [])
    assert count(plan, 16, 30, 10, encoders) == (3, [])  # the room: three parts, nothing beside them
    assert count(plan, 16, 35, 10, encoders) == (3, ["t5", "vae"])  # helpers in what parts leave
    assert count(plan, 16, 44, 10, encoders) == (4, ["t5"])
    assert count(plan, 16, 9, 10, encoders) == (0, [])  # not even one part
    plan.checkpointing = False  # the one-graph step's process, the block-by-block step's shares beside it
    assert count(plan, 16, 10**6, 10, encoders) == (kernel_warmup.MAX_PARTS, ["t5", "vae", "clip"])
    plan.encoder_configs = None  # no encoders' configs in the model folder
    assert count(plan, 16, 10**6, 10, encoders) == (kernel_warmup.MAX_PARTS, [])
    monkeypatch.setattr(speed, "BLOCKWISE_CHECKPOINTING", False)  # no block-by-block step: one graph, one process
    assert count(plan, 16, 10**6, 10, encoders) == (1, [])


def test_a_one_graph_step_is_compiled_in_one_process_with_block_by_block_shares_beside_it(tmp_path, monkeypatch):
    # most of the one-graph step's fused kernels are the block-by-block step's: shares of those compile
    # beside the one process that compiles the whole graph, are not waited for, and end with it
    monkeypatch.setenv("MLX_PTX_CACHE_DIR", str(tmp_path / "kernels"))
    monkeypatch.delenv(kernel_warmup.ENV_SWITCH, raising=False)
    monkeypatch.setattr(speed, "on_cuda", lambda: True)
    monkeypatch.setattr(kernel_warmup, "usable_cores", lambda: 7)  # three step processes, three helpers
    config, model = _run_config(tmp_path)
    config.gradient_checkpointing = False
    room = _estimate(0.001, 0.002, 0.0005)
    warmup = kernel_warmup.start(config, model, None, False, 10, 2**40, room, tmp_path / "logs")
    assert len(warmup.parts) == 1 and "--part" not in warmup.parts[0].args
    assert [share.args[-3:] for share in warmup.shares] == [["--part", "0/2", "--blockwise"],
                                                            ["--part", "1/2", "--blockwise"]]
    assert warmup.wait(limit_s=300) == "done", (tmp_path / "logs" / "kernel-warmup-0.log").read_text()[-2000:]
    assert all(share.poll() is not None for share in warmup.shares)  # ended with the one-graph process
    assert "part 1 of 1, done" in (tmp_path / "logs" / "kernel-warmup-0.log").read_text()
    warmup.stop()


def test_the_encoders_helpers_encode_as_the_run_does(tmp_path, monkeypatch):
    # random encoders from the model's own configs, the text encoders cut to two layers
    config, model = _run_config(tmp_path)
    plan = kernel_warmup.make_plan(config, model, 1, False, 10)
    assert plan.encoder_configs["t5"]["num_layers"] == 2 and plan.encoder_configs["clip"]["num_hidden_layers"] == 2
    assert plan.encoder_configs["vae"] == json.loads((model.path / "vae" / "config.json").read_text())
    assert plan.image_size == [config.height, config.width]
    # the trainer plans before it loads anything, from the folder's configs: the same plan
    from engine.flux.loading import describe_model

    description = describe_model("tiny")
    assert description.vae is None and description.t5 is None and description.transformer is None
    assert kernel_warmup.make_plan(config, description, 1, False, 10) == plan
    calls = []
    from engine.flux import clip, t5, vae

    for module, name in ((vae.AutoencoderKL, "encode"), (t5.T5Encoder, "__call__"), (clip.CLIPTextModel, "__call__")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda self, *args, _real=real, _name=module.__name__, **kwargs:
                            calls.append((_name, tuple(args[0].shape))) or _real(self, *args, **kwargs))
    assert kernel_warmup_process.run_encoders(plan) > 0
    assert calls == [("T5Encoder", (1, model.t5_max_length)), ("AutoencoderKL", (1, config.height, config.width, 3)),
                     ("CLIPTextModel", (1, 77))]
    calls[:] = []
    assert kernel_warmup_process.run_encoders(plan, ["vae"]) > 0 and [name for name, _ in calls] == ["AutoencoderKL"]


def test_the_encoders_helpers_start_only_where_they_fit(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_PTX_CACHE_DIR", str(tmp_path / "kernels"))
    monkeypatch.delenv(kernel_warmup.ENV_SWITCH, raising=False)
    monkeypatch.setattr(speed, "on_cuda", lambda: True)
    monkeypatch.setattr(kernel_warmup, "usable_cores", lambda: 5)  # one step's process, one core for a helper
    config, model = _run_config(tmp_path)
    config.gradient_checkpointing = False
    room = _estimate(0.001, 0.002, 0.0005)
    plan = kernel_warmup.make_plan(config, model, None, False, 10)
    need = kernel_warmup.warmup_bytes(plan, room, model.transformer_config)
    encoders = kernel_warmup.encoders_warmup_bytes(room)
    assert min(encoders.values()) >= kernel_warmup.CUDA_CONTEXT_BYTES
    tight = int(room.encoding_peak + need + encoders["t5"] - 1)
    warmup = kernel_warmup.start(config, model, None, False, 10, tight, room, tmp_path / "logs")
    assert len(warmup.parts) == 1 and warmup.helpers == ()
    warmup.stop()
    warmup = kernel_warmup.start(config, model, None, False, 10, tight + 1, room, tmp_path / "logs")
    assert [helper.args[-1] for helper in warmup.helpers] == ["t5"]
    helper_log = tmp_path / "logs" / "kernel-warmup-t5.log"
    assert warmup.helpers[0].wait(timeout=300) == 0, helper_log.read_text()[-2000:]
    assert "t5's kernels done" in helper_log.read_text()
    assert warmup.wait(limit_s=300) == "done"
    assert "part 1 of 1, done" in (tmp_path / "logs" / "kernel-warmup-0.log").read_text()


def test_the_trainers_call_counts_the_steps_left_and_never_raises(tmp_path, monkeypatch, caplog):
    config, model = _run_config(tmp_path)  # two photos, one epoch, batch 1: two steps
    assert kernel_warmup.start_for_run(config, model, 1, False, None, 0) is None  # nothing measured: off CUDA
    seen = []
    monkeypatch.setattr(kernel_warmup, "start", lambda cfg, model, depth, one_stage, steps_left, available, estimate,
                        log_folder: seen.append((steps_left, estimate.training_peak > 0)) or kernel_warmup.Warmup())
    kernel_warmup.start_for_run(config, model, 1, False, 2**40, 1)  # resumed after one step
    assert seen == [(1, True)]

    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr(kernel_warmup, "start", broken)
    with caplog.at_level("WARNING", logger="engine.kernel_warmup"):
        assert kernel_warmup.start_for_run(config, model, 1, False, 2**40, 0) is None
    assert "disk full" in caplog.text
