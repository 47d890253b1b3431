"""Compiling the training step's CUDA kernels in other processes while the run encodes.

MLX compiles each of its CUDA kernels (NVRTC) the first time a process needs it and keeps it in
a disk cache (engine/paths.py: keep_compiled_gpu_kernels). On a fresh machine a first people
4-bit run spent 82 s compiling the encoders' kernels and then about 105 s the training step's,
one after the other (H200, bench/NOTES.md item 32). The step's kernels depend on the layers'
sizes, the dtype, the quantization, the image size and which layers train, not on the weights
nor on how many blocks of each kind there are. So a process that trains a copy of the model
with one or two blocks of each kind (random weights, the run's LoRA layers and ranks, the run's
shapes, the same switches) compiles them; started before the run loads its model (planned from
the folder's configs: engine/flux/loading.py, describe_model), it does so while the run loads and
encodes, and the run's first step finds the kernels on disk. MLX writes each kernel to its cache
by renaming a finished file, so two processes compiling one kernel both read a whole file.

In one process the small step compiled its forward (70 s on an H200) and then its backward (60 s),
longer than the encoding it hides behind (bench/NOTES.md item 34). But NVRTC compiles a kernel on
one core, and a machine has several. So the block-by-block step's compile is shared out: up to
MAX_PARTS processes each trace the whole small step and run only their share of its stage functions
(those whose position, modulo the number of processes, is theirs), each on random stand-ins of its
inputs (engine/blockwise_step.py: compile_only). Together they compile every kernel a real step does
(tests/test_kernel_warmup.py checks it kernel by kernel on MLX's CPU backend, which names and caches
its fused kernels the same way). The one-graph step (no checkpointing) is one graph, for one
process; but most of its fused kernels are the block-by-block step's too (31 of its 34 for pets on
the CPU backend), so the other processes compile the block-by-block step's shares beside it, and
it finds most of its kernels on disk when it gets to them. Helpers, one
per encoder (T5, the VAE, then CLIP: the run encodes CLIP first), compile the encoders' kernels with
random encoders (the text encoders cut to two layers) while the run encodes; they are ended once
it has. (The encoders run with MLX's compile off, engine/flux/uncompiled.py, so what is left for them
to compile is MLX's own kernels that it compiles at run time, its gathers among them.) Where the step's
processes fit beside the loaded transformer, the run loads it and trains without waiting for them: its
steps run with MLX's compile off (unfused, so no kernel to compile: engine/training_step.py,
make_uncompiled_step) until every process has ended, then compiled, finding the kernels on disk
(speed.TRAIN_WHILE_COMPILING; `Warmup.poll`). Where they do not fit, it waits for them before loading the
transformer. The marker is written when every one of them finished.

It runs only on CUDA, only where the cache lacks this run's marker (a file the warm-up writes
when all its processes finished), and each process only where the memory free leaves room for it beside the
encoders and the processes started before it, and the CPU cores for it;
DREAMBOOTH_WIZARD_KERNEL_WARMUP=0 turns it off. Whatever happens to it, the run goes on: at
worst its first step compiles what the warm-up did not. This module is the run's side (plan,
start, wait); each process runs engine/kernel_warmup_process.py.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

ENV_SWITCH = "DREAMBOOTH_WIZARD_KERNEL_WARMUP"
MAX_PARTS = 8  # processes sharing the step's kernels; people's small step has 8 stage functions and the update
# the encoders' helpers in the order they are started; the run encodes CLIP, T5, then the VAE
ENCODERS = ("t5", "vae", "clip")
WAIT_LIMIT_S = 900  # longer than the step's compiles on a fresh machine (about 105 s on an H200)
CUDA_CONTEXT_BYTES = 2**30  # a second process's CUDA context and cuBLAS workspace, beside its arrays


def _runs_of_specs(specs: list[tuple]) -> list[int]:
    """Indices of the blocks to keep: each run of identical consecutive specs kept to its first two (the
    first trained block's backward takes no gradient for its input, the ones after do: both compile)."""
    kept, previous, count = [], object(), 0
    for index, spec in enumerate(specs):
        count = count + 1 if spec == previous else 1
        previous = spec
        if count <= 2:
            kept.append(index)
    return kept


def mini_model(transformer_config: dict, targets: list[tuple[str, int]]) -> tuple[dict, list[tuple[str, int]]]:
    """A transformer config with one or two blocks of each kind the run has (`_runs_of_specs`), and the
    run's LoRA targets moved onto it: each stage of the real step has the same layout in the small one."""
    config = dict(transformer_config)
    moved: list[tuple[str, int]] = []
    for kind, count_key, default in (("transformer_blocks", "num_layers", 19),
                                     ("single_transformer_blocks", "num_single_layers", 38)):
        count = int(transformer_config.get(count_key, default))
        specs = [tuple(sorted((path.split(".", 2)[2], rank) for path, rank in targets
                              if path.startswith(f"{kind}.{block}."))) for block in range(count)]
        kept = _runs_of_specs(specs)
        config[count_key] = len(kept)
        for new_index, block in enumerate(kept):
            moved += [(f"{kind}.{new_index}.{layer}", rank) for layer, rank in specs[block]]
    return config, moved


@dataclass
class WarmupPlan:
    """Everything the warm-up process needs, as JSON (it imports no config code of the run's)."""

    transformer_config: dict
    targets: list
    quantize: int | None
    dtype: str
    checkpointing: bool
    depth: int | None
    one_stage: bool
    steps_left: int
    optimizer: str
    learning_rate: float
    latent_shape: list  # (height, width) of the latents
    t5_length: int
    pooled_width: int
    guidance: bool
    batch_size: int
    image_size: list = None  # (height, width) in pixels, for the encoders' helper
    encoder_configs: dict = None  # {"vae", "clip", "t5"}: the encoders' configs, text encoders cut to 2 layers

    def key(self) -> str:
        """What the compiled kernels depend on, and the MLX version that compiled them: the run's length
        only through the kernels it switches off (engine/flux/speed.py), so runs of other lengths share it."""
        import mlx.core as mx

        from engine.flux import speed

        fields = dict(self.__dict__, steps_left=speed.kernels_not_worth_compiling(self.steps_left))
        text = json.dumps([fields, mx.__version__], sort_keys=True, default=str)
        return hashlib.sha1(text.encode()).hexdigest()[:16]


def marker_path(plan: WarmupPlan, cache_folder: str | os.PathLike) -> Path:
    return Path(cache_folder) / f"dreambooth-wizard-warm-{plan.key()}"


def make_plan(cfg, model, depth: int | None, one_stage: bool, steps_left: int) -> WarmupPlan:
    """The warm-up for training `cfg` on `model` (loaded without its transformer)."""
    from engine.config import lora_targets
    from engine.flux.latents import latent_size

    config, targets = mini_model(model.transformer_config,
                                 lora_targets(cfg, model.num_joint_blocks, model.num_single_blocks))
    folder = Path(model.path)
    if model.vae is not None:
        scale = model.vae.scale_factor
    else:  # a description (engine/flux/loading.py: describe_model): the VAE's config says it
        from engine.flux.vae import VAEConfig
        from engine.flux.weights import read_config

        scale = VAEConfig.from_dict(read_config(folder / "vae")).scale_factor
    latent_h, latent_w = latent_size(cfg.height, cfg.width, scale)
    encoder_configs = None
    if all((folder / sub / "config.json").is_file() for sub in ("vae", "text_encoder", "text_encoder_2")):
        from engine.flux.weights import read_config

        encoder_configs = {"vae": read_config(folder / "vae"),
                           "clip": dict(read_config(folder / "text_encoder"), num_hidden_layers=2),
                           "t5": dict(read_config(folder / "text_encoder_2"), num_layers=2)}
    return WarmupPlan(
        transformer_config=config, targets=[list(t) for t in targets], quantize=cfg.quantize,
        dtype=str(model.dtype).removeprefix("mlx.core."), checkpointing=bool(cfg.gradient_checkpointing),
        depth=depth, one_stage=one_stage, steps_left=int(steps_left), optimizer=cfg.optimizer.name,
        learning_rate=float(cfg.optimizer.learning_rate), latent_shape=[latent_h, latent_w],
        t5_length=int(model.t5_max_length), pooled_width=int(config.get("pooled_projection_dim", 768)),
        guidance=bool(model.has_guidance), batch_size=int(cfg.training_loop.batch_size),
        image_size=[int(cfg.height), int(cfg.width)], encoder_configs=encoder_configs)


def warmup_bytes(plan: WarmupPlan, estimate, full_config: dict) -> int:
    """The warm-up process's peak, from the run's estimate: what grows with the blocks scaled to the small
    model's share of them, plus a second CUDA context. The block-by-block step's run-ahead and workspace
    are a few stages' worth whatever the block count, so they stay whole there; the one-graph step's
    run-ahead is the whole graph's, so it scales too."""
    blocks = lambda config: int(config.get("num_layers", 19)) + int(config.get("num_single_layers", 38))  # noqa: E731
    share = blocks(plan.transformer_config) / max(blocks(full_config), 1)
    fixed = 0
    if plan.checkpointing:
        fixed = sum(estimate.parts.get(name, 0) for name in ("CUDA graph run-ahead", "workspace (training)"))
    return int((estimate.training_peak - fixed) * share + fixed + CUDA_CONTEXT_BYTES)


def encoders_warmup_bytes(estimate) -> dict[str, int]:
    """Each encoder's helper's peak: the VAE encoder or CLIP as the run has them, or two of T5-XXL's 24
    layers, beside the encoding's activations and a CUDA context of its own."""
    parts = estimate.parts
    beside = parts.get("encoding activations", 0) + parts.get("workspace (encoding)", 0) + CUDA_CONTEXT_BYTES
    return {"t5": int(parts.get("T5 encoder", 0) * 2 / 24 + beside),
            "vae": int(parts.get("VAE encoder", 0) + beside),
            "clip": int(parts.get("CLIP encoder", 0) + beside)}


class Warmup:
    """A running warm-up (`start`): the processes waited for (`parts`: each its share of the block-by-block
    step's stage functions, or the one-graph step), the block-by-block step's shares compiled beside a
    one-graph step's process (`shares`, ended with it), and helpers that compile the encoders' kernels
    (ended once the run has encoded); or nothing to wait for. `beside_training`: the processes fit beside
    the loaded transformer, so the run loads it before waiting for them."""

    def __init__(self, parts: tuple = (), marker: Path | None = None, log_path: Path | None = None,
                 helpers: tuple = (), beside_training: bool = False, shares: tuple = ()):
        self.parts, self.marker, self.log_path = tuple(parts), marker, log_path
        self.helpers, self.beside_training, self.shares = tuple(helpers), beside_training, tuple(shares)
        self.started = time.perf_counter()
        self.outcome: str | None = None

    @property
    def running(self) -> bool:
        return any(part.poll() is None for part in self.parts)

    def wait(self, limit_s: float = WAIT_LIMIT_S, give_up=lambda: False, poll_s: float = 0.25) -> str:
        """Wait for every part; 'none', 'done' (the marker is written), 'failed' (a part's log says why), 'cut'
        (past `limit_s` from the start) or 'stopped' (`give_up()` turned true: a user's stop is not kept
        waiting). A cut or stopped warm-up is ended. A second call returns the first one's outcome."""
        while True:
            outcome = self.poll(limit_s)
            if outcome is not None:
                return outcome
            if give_up():
                self.stop()
                self.outcome = "stopped"
                return self.outcome
            try:
                next(part for part in self.parts if part.poll() is None).wait(timeout=poll_s)
            except (StopIteration, subprocess.TimeoutExpired):
                pass

    def poll(self, limit_s: float = WAIT_LIMIT_S) -> str | None:
        """`wait`'s outcome without waiting: None while a part still runs (and `limit_s` from the start has not
        passed), else the outcome, settled (helpers ended, the marker written) on the first call that sees it."""
        if not self.parts:
            return "none"
        if self.outcome is not None:
            return self.outcome
        if any(part.poll() is None for part in self.parts):
            if time.perf_counter() - self.started <= limit_s:
                return None
            self.stop()
            self.outcome = "cut"
            return self.outcome
        self.stop_helpers()  # the parts compiled whatever they had not
        for share in self.shares:
            _end(share)
        self.outcome = "failed"
        if all(part.returncode == 0 for part in self.parts) and self.marker is not None:
            seconds = time.perf_counter() - self.started
            self.marker.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.marker.with_suffix(".tmp")
            temporary.write_text(json.dumps({"seconds": round(seconds, 1), "parts": len(self.parts)}))
            temporary.replace(self.marker)
            self.outcome = "done"
        return self.outcome

    def stop_helpers(self) -> None:
        for helper in self.helpers:
            _end(helper)

    def stop(self) -> None:
        self.stop_helpers()
        for process in self.parts + self.shares:
            _end(process)


def _end(process) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def count_processes(plan: WarmupPlan, cores: int, room: int, part_bytes: int,
                    encoder_bytes: dict[str, int]) -> tuple[int, list[str]]:
    """How many processes compile the step's kernels, and which encoders get a helper, for `cores` CPU
    cores and `room` bytes of GPU memory beside the run's encoding. Each kernel compiles on one core, so
    the step's processes take up to MAX_PARTS cores, leaving the run's process and the encoders' helpers
    theirs. Without the block-by-block step there is one graph, for one process."""
    if room < part_bytes:
        return 0, []
    parts = 1
    if _blockwise():
        parts = max(1, min(MAX_PARTS, cores - 1 - len(ENCODERS), room // max(part_bytes, 1)))
    room -= parts * part_bytes
    helpers = []
    for name in ENCODERS if plan.encoder_configs else ():
        if len(helpers) < cores - 1 - parts and encoder_bytes.get(name, room + 1) <= room:
            helpers.append(name)
            room -= encoder_bytes[name]
    return parts, helpers


def _blockwise() -> bool:
    from engine.flux import speed

    return speed.BLOCKWISE_CHECKPOINTING


def start(cfg, model, depth: int | None, one_stage: bool, steps_left: int, available: int | None,
          estimate, log_folder: Path) -> Warmup:
    """Start the warm-up for this run where it helps and fits (module docstring); else a Warmup with no process.
    `estimate`: the run's memory estimate (engine/memory.py), against `available` bytes."""
    from engine.flux import speed

    if available is None or not speed.on_cuda() or os.environ.get(ENV_SWITCH, "1") == "0":
        return Warmup()
    cache_folder = os.environ.get("MLX_PTX_CACHE_DIR")
    if not cache_folder:
        return Warmup()
    plan = make_plan(cfg, model, depth, one_stage, steps_left)
    marker = marker_path(plan, cache_folder)
    if marker.exists():
        return Warmup()
    need, encoding = warmup_bytes(plan, estimate, model.transformer_config), estimate.encoding_peak
    parts, encoders = count_processes(plan, usable_cores(), available - encoding, need, encoders_warmup_bytes(estimate))
    if not parts:
        log.info("no kernel warm-up: %.1f GiB free, the encoders need %.1f and the warm-up %.1f",
                 available / 2**30, encoding / 2**30, need / 2**30)
        return Warmup()
    log_folder.mkdir(parents=True, exist_ok=True)
    plan_path = log_folder / "kernel-warmup.json"
    plan_path.write_text(json.dumps({"plan": plan.__dict__, "marker": str(marker)}))
    # the encoders' helpers first: the run starts encoding right away
    helpers = [_spawn(plan_path, log_folder / f"kernel-warmup-{name}.log", "--encoder", name) for name in encoders]
    shares = []
    if plan.checkpointing or parts == 1:
        processes = [_spawn(plan_path, log_folder / f"kernel-warmup-{index}.log", "--part", f"{index}/{parts}")
                     for index in range(parts)]
    else:  # one graph, in one process; the block-by-block step's shares compile most of its kernels beside it
        processes = [_spawn(plan_path, log_folder / "kernel-warmup-0.log")]
        shares = [_spawn(plan_path, log_folder / f"kernel-warmup-{index + 1}.log", "--part", f"{index}/{parts - 1}",
                         "--blockwise") for index in range(parts - 1)]
    beside_training = estimate.training_peak + parts * need <= available
    log.info("compiling the step's GPU kernels in %d processes, the encoders' (%s) in %d, while encoding (%s)",
             parts, ", ".join(encoders) or "none", len(helpers), log_folder / "kernel-warmup-*.log")
    return Warmup(processes, marker, log_folder / "kernel-warmup-0.log", helpers, beside_training, shares)


def start_for_run(cfg, model, depth: int | None, one_stage: bool, available: int | None, steps_done: int) -> Warmup | None:
    """The trainer's call, before it loads the model (`model` may be describe_model's description): `start`
    with the steps left and the run's estimate (None where no memory was measured: off CUDA). Never
    raises: the warm-up is an aid to the run."""
    from engine.dataset import BatchIterator
    from engine.memory import ModelConfigs
    from engine.memory_limit import graph_memory_estimate
    from engine.paths import log_dir

    if available is None:
        return None
    try:
        loop = cfg.training_loop
        total = BatchIterator(len(cfg.image_paths), loop.batch_size, loop.num_epochs, cfg.seed).total_steps
        estimate = graph_memory_estimate(cfg, ModelConfigs(transformer=model.transformer_config), "cuda", available)
        return start(cfg, model, depth, one_stage, max(total - steps_done, 0), available, estimate, log_dir())
    except Exception as error:
        log.warning("kernel warm-up not started: %s", error)
        return None


def _spawn(plan_path: Path, log_path: Path, *arguments: str) -> subprocess.Popen:
    with open(log_path, "w") as log_file:
        return subprocess.Popen([sys.executable, "-m", "engine.kernel_warmup_process", str(plan_path), *arguments],
                                stdout=log_file, stderr=subprocess.STDOUT, env=dict(os.environ),
                                cwd=str(Path(__file__).resolve().parent.parent))
