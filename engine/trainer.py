"""The DreamBooth LoRA training loop, driven by a config and steered by controls.

A library first: it reports through a callback (engine/events.py) and polls
its controls between steps, so the wizard runs it in a thread, the CLI prints
its events and tests inspect them. Nothing here prints.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_unflatten

from engine.checkpoint import CheckpointContents, flatten_optimizer_state, read_checkpoint, write_checkpoint
from engine.config import TrainingConfig, config_to_dict, lora_targets, parse_config, validate
from engine.dataset import BatchIterator, build_training_set
from engine.errors import CheckpointError, UserError
from engine.export import adapter_from_bytes, adapter_metadata, adapter_to_bytes
from engine.events import EventCallback, TrainingControls, make_event
from engine.flux import speed
from engine.flux.latents import latent_image_ids, latent_size, text_ids
from engine.flux.sampler import sigma_grid
from engine.instrumentation import write_loss_history, write_validation_image
from engine.lora import apply_lora, load_lora_parameters, lora_parameters
from engine.optimizers import build_optimizer, state_mismatch
from engine.paths import prepare_output_folder
from engine.training_step import make_train_step, make_uncompiled_step

log = logging.getLogger(__name__)

ADAPTER_NAME = "adapter.safetensors"


@dataclass
class TrainingResult:
    step: int
    total_steps: int
    adapter_path: Path | None
    checkpoint_path: Path | None
    stopped: bool
    loss_history: list[dict]
    output_dir: Path


class Trainer:
    def __init__(self, config: TrainingConfig, callback: EventCallback | None = None,
                 controls: TrainingControls | None = None, resume_from: Path | None = None):
        self.config = config
        self.callback = callback or (lambda event: None)
        self.controls = controls or TrainingControls()
        self.resume_from = Path(resume_from) if resume_from else None
        self.model = None
        self.output_dir: Path | None = None
        self._warmup = None  # engine/kernel_warmup.py, on CUDA
        self._one_stage_at_a_time = False  # the checkpointed step at depth 0 (decided before the model loads)

    @classmethod
    def from_checkpoint(cls, checkpoint: Path, callback: EventCallback | None = None,
                        controls: TrainingControls | None = None) -> "Trainer":
        contents = read_checkpoint(checkpoint)
        base_dir = Path(contents.config.get("examples", {}).get("path", ".")).parent
        config = parse_config(contents.config, base_dir)
        return cls(config, callback, controls, resume_from=checkpoint)

    def emit(self, kind: str, **fields) -> None:
        try:
            self.callback(make_event(kind, **fields))
        except Exception:  # a broken listener must not kill a long training run
            log.exception("event listener failed on %s", kind)

    def run(self) -> TrainingResult:
        try:
            return self._run()
        except UserError as error:
            self.emit("error", message=error.message, hint=error.hint)
            raise
        except Exception as error:
            self.emit("error", message=f"{type(error).__name__}: {error}", hint="see the log file for details")
            raise
        finally:
            if self._warmup is not None:  # a run that failed or stopped early leaves no process behind
                self._warmup.stop()

    # -- phases ---------------------------------------------------------------------------------

    def _run(self) -> TrainingResult:
        from engine.flux.loading import load_model

        cfg = self.config
        resume = read_checkpoint(self.resume_from) if self.resume_from else None
        # missing photos are named now, before minutes of loading (block limits are checked once the model is known)
        validate(cfg, None, None, check_files=True)
        self.output_dir = prepare_output_folder(cfg.output_dir, fresh=resume is None)
        started = datetime.now()
        if resume and resume.iterator.get("start_date_time"):
            try:
                started = datetime.fromisoformat(resume.iterator["start_date_time"])
            except ValueError:
                pass

        # what this run may use, measured before it loads anything: it decides whether a run that
        # would not fit is held to the estimate (engine/memory_limit.py)
        available = self._available_on_cuda()
        self.emit("phase", phase="load", detail=f"loading {cfg.model}")
        progress = lambda done, total: self.emit("progress", phase="download", done=done, total=total)  # noqa: E731
        steps_done = int(resume.iterator.get("num_iterations", 0)) if resume else 0
        depth = self._settle_cuda_graphs(cfg.model, available, progress, steps_done)
        # encoders first, transformer after they are freed: T5-XXL and the transformer never share memory
        model = self.model = load_model(cfg.model, quantize=cfg.quantize, transformer=False, progress=progress)
        # the block limits come from the model's config (a custom model may have fewer blocks than FLUX.1)
        for warning in validate(cfg, model.num_joint_blocks, model.num_single_blocks):
            self.emit("warning", message=warning)

        self.emit("phase", phase="encode", detail="encoding images and prompts")
        validation_prompt = cfg.instrumentation.validation_prompt if cfg.instrumentation else None
        examples = [(path, image.prompt, getattr(image, "crop", None))
                    for path, image in zip(cfg.image_paths, cfg.examples.images)]
        dataset, extra = build_training_set(
            model, examples, cfg.width, cfg.height, extra_prompts=[validation_prompt] if validation_prompt else [],
            progress=lambda phase, done, total: self.emit("progress", phase=phase, done=done, total=total),
            warn=lambda message: self.emit("warning", message=message))
        model.release_text_encoders()
        model.release_vae_encoder()
        validation = extra.get(validation_prompt) if validation_prompt else None

        if self._warmup is not None:
            self._warmup.stop_helpers()  # the encoders' kernels are compiled now
            if not self._warmup.beside_training:  # the warm-up's processes would not fit beside the transformer
                self._wait_for_kernel_warmup()
        detail = f"quantizing to {cfg.quantize} bits as it loads" if cfg.quantize else "bf16" if model.dtype == mx.bfloat16 else "float32"
        self.emit("phase", phase="load_transformer", detail=detail)
        transformer = model.load_transformer()
        compiling = self._warmup_still_running() and speed.TRAIN_WHILE_COMPILING
        if not compiling:
            self._wait_for_kernel_warmup()
        self._limit_graph_memory(model, available)
        transformer.gradient_checkpointing = bool(cfg.gradient_checkpointing)
        targets = lora_targets(cfg, model.num_joint_blocks, model.num_single_blocks)
        apply_lora(transformer, targets, key=mx.random.key(cfg.seed))
        optimizer = build_optimizer(cfg.optimizer.name, cfg.optimizer.learning_rate)
        optimizer.init(transformer.trainable_parameters())
        self._optimizer = optimizer

        iterator = BatchIterator(len(dataset), cfg.training_loop.batch_size, cfg.training_loop.num_epochs, cfg.seed)
        loss_history: list[dict] = []
        if resume:
            iterator, loss_history = self._restore(resume, transformer, optimizer, len(dataset))

        switched_off = speed.configure_for_training(steps=iterator.total_steps - iterator.num_iterations)
        if switched_off:
            log.info("speed switches off for this run: %s (engine/flux/speed.py)", ", ".join(switched_off))
        self.emit("phase", phase="compile", detail="compiling the training step")
        step_fn = make_train_step(transformer, optimizer, model.dtype, model.has_guidance,
                                  blockwise_depth=depth)
        # while the warm-up's processes compile step_fn's kernels, steps run uncompiled rather than wait
        uncompiled_step = make_uncompiled_step(transformer, optimizer, model.dtype, model.has_guidance) \
            if compiling else None
        latent_h, latent_w = latent_size(cfg.height, cfg.width, model.vae.scale_factor)
        img_ids, txt_ids = latent_image_ids(latent_h, latent_w), text_ids(model.t5_max_length)
        sigmas = sigma_grid(cfg.steps, img_ids.shape[0], _scheduler(model)).astype(np.float32)

        state = _RunState(iterator=iterator, loss_history=loss_history, started=started,
                          window_start=time.perf_counter())
        self.emit("phase", phase="train", detail=f"{iterator.total_steps} steps" + (
            "; the first ones slower while this machine compiles its GPU kernels (once)" if compiling else ""))
        last_checkpoint = None
        # One step in flight: step n+1 is queued before step n's loss is read, so the host builds
        # the next graph while the GPU works. A step whose state must be saved or shown (checkpoint,
        # preview, a request, the end) is read before anything else is queued.
        pending: _QueuedStep | None = None
        while True:
            if pending and (iterator.finished or self.controls.wants_attention or self._wants_state(pending.step)):
                last_checkpoint = self._finish_step(pending, state, model, validation) or last_checkpoint
                pending = None
            if iterator.finished:
                break
            if self.controls.paused:
                self.emit("paused", step=iterator.num_iterations)
                self.controls.wait_while_paused()
                self.emit("resumed", step=iterator.num_iterations)
                state.window_start, state.window_steps = time.perf_counter(), 0
            if self.controls.stop_requested:
                break
            indices = iterator.next_batch()
            latents, hidden, pooled = dataset.batch(indices)
            t_index = iterator.draw_timesteps(len(indices), cfg.steps)
            noise = mx.array(iterator.draw_noise(tuple(latents.shape)))
            sigma = mx.array(sigmas[t_index])
            guidance = mx.full((len(indices),), cfg.guidance, dtype=mx.float32)
            compiling = compiling and self._kernels_still_compiling(iterator.num_iterations)
            queue_call_began = time.perf_counter()
            queued = _QueuedStep(iterator.num_iterations, (uncompiled_step if compiling else step_fn)(
                latents, noise, hidden, pooled, sigma, guidance, img_ids, txt_ids), queued_at=time.perf_counter(),
                uncompiled=compiling)
            if not state.first_step_queued:  # the trace (and compile, unless uncompiled) happen in this first call
                state.first_step_queued = True
                log.info("first step traced and queued in %.1f s%s", queued.queued_at - queue_call_began,
                         " (uncompiled, while the kernel warm-up runs)" if compiling else "")
            if pending:
                self._finish_step(pending, state, model, validation, state_is_current=False)
            pending = queued
        if pending:  # a stop arriving between the checks above
            last_checkpoint = self._finish_step(pending, state, model, validation) or last_checkpoint

        stopped = not iterator.finished
        step = iterator.num_iterations
        checkpoint = last_checkpoint
        if last_checkpoint is None or not last_checkpoint.name.startswith(f"{step:07d}"):
            checkpoint = self._write_checkpoint(step, state)
        adapter_path = None
        if not stopped:
            adapter_path = self._save_final_adapter()
        self.emit("finished", step=step, adapter_path=str(adapter_path) if adapter_path else None,
                  checkpoint_path=str(checkpoint) if checkpoint else None, stopped=stopped,
                  peak_memory_gib=mx.get_peak_memory() / 2**30)
        return TrainingResult(step=step, total_steps=iterator.total_steps, adapter_path=adapter_path,
                              checkpoint_path=checkpoint, stopped=stopped, loss_history=loss_history,
                              output_dir=self.output_dir)

    # -- pieces ---------------------------------------------------------------------------------

    @staticmethod
    def _available_on_cuda() -> int | None:
        """The memory a run may use on CUDA (engine/machine.py); None elsewhere."""
        from engine.flux.quantized import prefer_dequantizing

        if not (prefer_dequantizing() and mx.default_device() == mx.gpu):  # CUDA: Metal keeps its own default
            return None
        from engine.machine import detect_machine

        return detect_machine().available_for_training

    def _limit_graph_memory(self, model, available: int | None) -> None:
        from engine.memory import ModelConfigs
        from engine.memory_limit import apply_graph_memory_limit

        if available is not None:
            limit = apply_graph_memory_limit(self.config, ModelConfigs(transformer=model.transformer_config), "cuda",
                                             available_bytes=available)
            if limit:
                log.info("graph memory limit %.1f GiB", limit / 2**30)

    def _wait_for_kernel_warmup(self) -> None:
        if self._warmup is None or not self._warmup.parts or self._warmup.outcome is not None:
            return
        if self._warmup.running:
            self.emit("phase", phase="kernels", detail="compiling GPU kernels (once per machine)")
        outcome = self._warmup.wait(give_up=lambda: self.controls.stop_requested)
        log.info("kernel warm-up %s after %.1f s (%s)", outcome, time.perf_counter() - self._warmup.started,
                 self._warmup.log_path)

    def _warmup_still_running(self) -> bool:
        return self._warmup is not None and bool(self._warmup.parts) and self._warmup.poll() is None

    def _kernels_still_compiling(self, step: int) -> bool:
        """Whether the kernel warm-up still runs before step `step` is queued. Once it has ended, says so
        (the log, and a `train` phase event): the compiled step takes over from this step."""
        if self._warmup_still_running():
            return True
        log.info("kernel warm-up %s after %.1f s (%s): compiled steps from step %d, peak %.2f GiB so far",
                 self._warmup.outcome, time.perf_counter() - self._warmup.started, self._warmup.log_path, step,
                 mx.get_peak_memory() / 2**30)
        self.emit("phase", phase="train", detail=f"GPU kernels compiled: full speed from step {step}" if (
            self._warmup.outcome == "done") else f"compiling GPU kernels in this process from step {step}")
        return False

    def _settle_cuda_graphs(self, model_name: str, available: int | None, progress, steps_done: int) -> int | None:
        """On CUDA, before the first kernel runs: the depth the checkpointed step will run at (one stage at
        a time where its default depth would not fit what is free), and MLX's CUDA-graph settings for it
        (engine/flux/speed.py: configure_cuda_graphs). On a machine whose kernel cache lacks this run's,
        other processes then compile the step's GPU kernels while this one loads and encodes
        (engine/kernel_warmup.py). None elsewhere: the engine's default depth."""
        if available is None:
            return None
        from engine import kernel_warmup
        from engine.flux.loading import describe_model
        from engine.memory import ModelConfigs
        from engine.memory_limit import blockwise_depth

        description = describe_model(model_name, self.config.quantize, progress=progress)  # load_model finds it again
        depth = blockwise_depth(self.config, ModelConfigs(transformer=description.transformer_config), "cuda", available)
        checkpointed = bool(self.config.gradient_checkpointing)
        one_stage = checkpointed and depth == 0 and speed.blockwise_depth(cuda=True) != 0
        if one_stage:
            log.info("the checkpointed step runs one block at a time to fit %.1f GiB (slower steps)", available / 2**30)
        self._one_stage_at_a_time = one_stage
        chosen = speed.configure_cuda_graphs(one_stage_at_a_time=one_stage,
                                             unbounded=checkpointed and depth is not None and depth < 0)
        if chosen:
            log.info("MLX CUDA graph settings: %s", ", ".join(f"{k}={v}" for k, v in chosen.items()))
        self._warmup = kernel_warmup.start_for_run(self.config, description, depth, one_stage, available, steps_done)
        return depth

    def _wants_state(self, step: int) -> bool:
        """Whether step `step` ends with a checkpoint or a preview (both read the model)."""
        cfg = self.config
        return step % cfg.save.checkpoint_frequency == 0 or bool(
            cfg.instrumentation and step % cfg.instrumentation.generate_image_frequency == 0)

    def _finish_step(self, queued: "_QueuedStep", state: "_RunState", model, validation,
                     state_is_current: bool = True) -> Path | None:
        """Read a queued step's loss, report it and, when the model still holds that step's
        weights (`state_is_current`), write its checkpoint and preview."""
        step, loss_value = queued.step, float(queued.loss)
        if not state.loss_history and not state.first_step_reported:
            state.first_step_reported = True  # on a first run on CUDA this includes compiling MLX's kernels
            log.info("first step ran in %.1f s after it was queued", time.perf_counter() - queued.queued_at)
        if not math.isfinite(loss_value):
            raise UserError(f"the loss became {loss_value} at step {step}",
                            "lower optimizer.learning_rate (e.g. by 10x) and resume from the last checkpoint")
        iterator = state.iterator
        state.loss_history.append({"step": step, "loss": loss_value, "time": time.time()})
        state.window_steps += 1
        elapsed = time.perf_counter() - state.window_start
        it_per_s = state.window_steps / elapsed if elapsed > 0 else 0.0
        remaining = iterator.total_steps - step
        self.emit("step", step=step, total_steps=iterator.total_steps, epoch=iterator.epoch + 1,
                  num_epochs=iterator.num_epochs, loss=loss_value, it_per_s=it_per_s,
                  eta_s=remaining / it_per_s if it_per_s else None,
                  peak_memory_gib=mx.get_peak_memory() / 2**30, uncompiled=queued.uncompiled)
        return self._instrument(step, state, model, validation, state_is_current)

    def _instrument(self, step: int, state: "_RunState", model, validation, state_is_current: bool) -> Path | None:
        cfg = self.config
        instrumentation = cfg.instrumentation
        checkpoint = None
        if instrumentation and step % instrumentation.plot_frequency == 0:
            path = write_loss_history(self.output_dir, step, state.loss_history)
            self.emit("plot", step=step, path=str(path))
        if not state_is_current:  # requests wait for the next step, whose weights will be current
            return None
        if step % cfg.save.checkpoint_frequency == 0 or self.controls.take_checkpoint_request():
            checkpoint = self._write_checkpoint(step, state)
        wants_preview = self.controls.take_preview_request()
        if validation is not None and (wants_preview or step % instrumentation.generate_image_frequency == 0):
            path = write_validation_image(self.output_dir, step, model, validation, cfg)
            self.emit("preview", step=step, path=str(path))
        return checkpoint

    def _write_checkpoint(self, step: int, state: "_RunState") -> Path:
        contents = CheckpointContents(
            step=step, adapter=adapter_to_bytes(lora_parameters(self.model.transformer), self._adapter_metadata()),
            optimizer=flatten_optimizer_state(self._optimizer.state),
            iterator=state.iterator.state(state.started.isoformat()), loss=state.loss_history,
            config=config_to_dict(self.config, absolute_paths=True))
        path = write_checkpoint(self.output_dir, contents, state.started)
        self.emit("checkpoint", step=step, path=str(path))
        return path

    def _adapter_metadata(self) -> dict[str, str]:
        return adapter_metadata(self.config)

    def _save_final_adapter(self) -> Path:
        from engine.lora_formats import save_mflux

        path = self.output_dir / ADAPTER_NAME
        save_mflux(path, lora_parameters(self.model.transformer), self._adapter_metadata())
        return path

    def _restore(self, resume: CheckpointContents, transformer, optimizer, num_examples: int):
        adapter, _ = adapter_from_bytes(resume.adapter)
        expected = lora_parameters(transformer)
        if set(adapter) != set(expected) or any(adapter[k].shape != expected[k].shape for k in expected):
            raise CheckpointError(
                f"{self.resume_from.name} holds a LoRA for other layers or another model than its config describes",
                "resume with the checkpoint's own config and model, or start a new training")
        load_lora_parameters(transformer, adapter)
        if resume.optimizer:
            state = tree_unflatten(list(resume.optimizer.items()))
            problem = state_mismatch(optimizer, state)  # MLX would take any dict, AdamW's moments into SGD
            if problem:
                raise CheckpointError(f"{self.resume_from.name} has an optimizer state that does not fit ({problem})",
                                      "resume with the optimizer the checkpoint was written with "
                                      "(its config's optimizer.name), or start a new training")
            optimizer.state = state
        saved_examples = resume.iterator.get("num_examples", num_examples)
        if saved_examples != num_examples:
            raise CheckpointError(
                f"{self.resume_from.name} was trained on {saved_examples} images, the config now lists {num_examples}",
                "restore the original images, or start a new training")
        iterator = BatchIterator.from_state(resume.iterator, num_examples, self.config.seed)
        return iterator, list(resume.loss)


@dataclass
class _RunState:
    iterator: BatchIterator
    loss_history: list[dict]
    started: datetime
    window_start: float = 0.0  # it/s is measured since the start or the last pause
    window_steps: int = 0
    first_step_queued: bool = False  # both only for the log: where the time to a first step goes
    first_step_reported: bool = False


@dataclass
class _QueuedStep:
    step: int  # the iteration count once this step is done
    loss: mx.array  # not yet evaluated
    queued_at: float = 0.0  # time.perf_counter() when the call that queued it returned
    uncompiled: bool = False  # queued with MLX's compile off, while the kernel warm-up ran


def _scheduler(model) -> dict:
    from engine.generate import scheduler_for

    return scheduler_for(model)
