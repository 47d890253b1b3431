"""How much memory a LoRA training run needs, estimated before anything is loaded.

A run has two phases that never overlap. Encoding: every component is loaded
(transformer, VAE, T5, CLIP) and each image and prompt is encoded once.
Training: the text encoders and the VAE encoder are gone, the LoRA weights,
their gradients, the optimizer state and the activations of a training step
are there. The peak is the larger phase, not the sum.

Weights are counted exactly from the model's config.json (engine/model_size.py:
the transformer's linears are listed by name, as LoRA targets are); activations are counted in
tensors of (tokens x hidden) per block and scaled by the coefficients in
CALIBRATION, which are meant to be refitted against peaks measured on real
runs (`mx.get_peak_memory()`), so keep every guess there.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from engine.config import trains_joint_blocks
from engine.memory_calibration import CALIBRATION, GIB
from engine.memory_cuda import (  # noqa: F401  (HELD_BACK_NOTE: said by the wizard)
    HELD_BACK_NOTE,
    blockwise_default_depth,
    cuda_preview_run_ahead,
    cuda_run_ahead,
)
from engine.model_size import (
    FLUX1_VAE,
    ModelConfigs,
    clip_linears,
    clip_other_parameters,
    linear_bytes,
    model_configs_for,
    t5_linears,
    t5_other_parameters,
    transformer_linears,
    transformer_norm_parameters,
    transformer_parameter_count,
    vae_parameter_counts,
)

FLOAT32_BYTES = 4
# VAE downsamples 8x, then latents are packed in 2x2 patches (FORMATS.md s.2)
PIXELS_PER_TOKEN_SIDE = 16

# mlx.optimizers state per parameter, in float32 copies of it (SGD always keeps "v", even without momentum)
OPTIMIZER_STATE_COPIES = {
    "adam": 2, "adamw": 2, "adamax": 2, "adadelta": 2, "lion": 1, "sgd": 1, "rmsprop": 1, "adagrad": 1, "muon": 1,
}  # fmt: skip
FACTORED_OPTIMIZERS = ("adafactor",)  # a row and a column vector per matrix

# (tokens x hidden) tensors the contiguous route adds: copies of q, k, v, the incoming gradient,
# and the output of the fused forward run again inside the backward
CONTIGUOUS_BACKWARD_COPIES = 5


@dataclass(frozen=True)
class MemoryInputs:
    """Everything the estimate depends on; `inputs_from_config` fills it from a training config."""

    model: ModelConfigs
    lora_targets: tuple[tuple[str, int], ...]  # (module path in diffusers names, rank)
    width: int = 512
    height: int = 512
    batch_size: int = 1
    quantize: int | None = None
    optimizer: str = "AdamW"
    gradient_checkpointing: bool = False
    t5_length: int = 512
    dtype_bytes: int = 2  # bf16 on a GPU, float32 (4) on a CPU
    backend: str = "apple"  # "apple", "cuda" or "cpu": decides whether attention's backward is fused
    num_prompts: int = 1  # distinct prompts cached (training prompts plus the validation prompt)
    num_images: int = 1
    # what the run may use (the machine's available_for_training). On CUDA the trainer caps a run's
    # memory with checkpointing always, and without it only where a quantized run would not fit
    # uncapped (engine/memory_limit.py); None: not known, never capped for that
    available_bytes: int | None = None


def inputs_for_run(cfg, machine=None, available_bytes: int | None = None) -> MemoryInputs:
    """The inputs for training `cfg` (an engine.config.TrainingConfig) on `machine` (detected when
    None), with the machine's available memory unless `available_bytes` says otherwise."""
    if machine is None:
        from engine.machine import detect_machine

        machine = detect_machine()
    available = machine.available_for_training if available_bytes is None else available_bytes
    return inputs_from_config(cfg, model_configs_for(cfg.model, cfg.base_dir), backend=machine.kind,
                              dtype_bytes=machine.compute_dtype_bytes, available_bytes=available)


def inputs_from_config(cfg, model: ModelConfigs | dict, *, backend: str = "apple",
                       dtype_bytes: int = 2, available_bytes: int | None = None) -> MemoryInputs:
    """The estimate's inputs for an engine.config.TrainingConfig and the model's configs (or just its
    transformer config.json dict); raises ConfigError for LoRA blocks the model lacks."""
    from engine.config import lora_targets

    if isinstance(model, dict):
        model = ModelConfigs(transformer=model)
    targets = lora_targets(cfg, int(model.transformer.get("num_layers", 19)),
                           int(model.transformer.get("num_single_layers", 38)))
    prompts = set(cfg.prompts)
    if cfg.instrumentation is not None:
        prompts.add(cfg.instrumentation.validation_prompt)
    return MemoryInputs(
        model=model, lora_targets=tuple(targets), width=cfg.width, height=cfg.height,
        batch_size=cfg.training_loop.batch_size, quantize=cfg.quantize, optimizer=cfg.optimizer.name,
        gradient_checkpointing=bool(cfg.gradient_checkpointing), t5_length=model.t5_length,
        dtype_bytes=dtype_bytes, backend=backend, num_prompts=max(1, len(prompts)),
        num_images=max(1, len(cfg.examples.images)), available_bytes=available_bytes,
    )  # fmt: skip


# ---------------------------------------------------------------- the estimate

ENCODING, TRAINING = "encoding", "training"


@dataclass
class MemoryEstimate:
    """Bytes per part and the parts alive in each phase; the peak is the larger phase."""

    parts: dict[str, int]
    phases: dict[str, tuple[str, ...]]
    details: dict = field(default_factory=dict)  # counts behind the numbers: tokens, blocks, parameters

    def phase_peak(self, phase: str) -> int:
        return sum(self.parts[name] for name in self.phases[phase])

    @property
    def encoding_peak(self) -> int:
        return self.phase_peak(ENCODING)

    @property
    def training_peak(self) -> int:
        return self.phase_peak(TRAINING)

    @property
    def peak(self) -> int:
        return max(self.encoding_peak, self.training_peak)

    def fits(self, available_bytes: int) -> bool:
        return self.peak <= available_bytes

    def phase_of(self, name: str) -> str:
        inside = [phase for phase, names in self.phases.items() if name in names]
        return "both" if len(inside) > 1 else (inside[0] if inside else "")

    def describe(self) -> list[tuple[str, str, str]]:
        """Table rows (part, GiB, phase), parts first, then the two phase peaks."""
        rows = [(name, f"{size / GIB:.2f}", self.phase_of(name)) for name, size in self.parts.items()]
        rows.append(("encoding peak", f"{self.encoding_peak / GIB:.2f}", ENCODING))
        rows.append(("training peak", f"{self.training_peak / GIB:.2f}", TRAINING))
        return rows

    def to_dict(self) -> dict:
        return {
            "parts": dict(self.parts),
            "phases": {phase: list(names) for phase, names in self.phases.items()},
            "encoding_peak": self.encoding_peak,
            "training_peak": self.training_peak,
            "peak": self.peak,
            "peak_gib": round(self.peak / GIB, 3),
            "details": dict(self.details),
        }


def estimate_memory(inputs: MemoryInputs) -> MemoryEstimate:
    """The estimate for `inputs`; see the module docstring for the model behind it."""
    model, bits, dtype = inputs.model, inputs.quantize, inputs.dtype_bytes
    linears = transformer_linears(model.transformer)
    transformer = (sum(linear_bytes(i, o, bits, dtype) for i, o in linears.values())
                   + transformer_norm_parameters(model.transformer) * dtype)
    vae_encoder, vae_decoder = vae_parameter_counts(model.vae)  # load_model never quantizes the VAE
    t5 = (sum(linear_bytes(i, o, bits, dtype, bias=False) for i, o in t5_linears(model.t5))
          + t5_other_parameters(model.t5) * dtype)
    clip = (sum(linear_bytes(i, o, bits, dtype) for i, o in clip_linears(model.clip))
            + clip_other_parameters(model.clip) * dtype)

    lora_parameters = 0
    for path, rank in inputs.lora_targets:
        in_features, out_features = _target_shape(linears, path)
        lora_parameters += rank * (in_features + out_features)
    activations, details = _training_activations(inputs, linears)

    parts = {
        "transformer weights": transformer,
        "VAE decoder": vae_decoder * dtype,
        "VAE encoder": vae_encoder * dtype,
        "T5 encoder": t5,
        "CLIP encoder": clip,
        "encoding activations": _encoding_activations(inputs),
        "cached encodings": _cached_encodings(inputs),
        "LoRA weights": lora_parameters * FLOAT32_BYTES,
        "LoRA gradients": lora_parameters * FLOAT32_BYTES,
        "optimizer state": _optimizer_state_bytes(inputs, linears),
        # on CUDA the preview is weighed against the step's activations and run-ahead together (below)
        "activations": activations if inputs.backend == "cuda" else max(activations, _preview_activations(inputs, linears)),
    }
    # the trainer loads the transformer only after the encoders are freed (engine/trainer.py)
    encoding = ("VAE decoder", "VAE encoder", "T5 encoder", "CLIP encoder",
                "encoding activations", "cached encodings")
    training = ("transformer weights", "VAE decoder", "cached encodings", "LoRA weights", "LoRA gradients",
                "optimizer state", "activations")
    blockwise_cuda = inputs.backend == "cuda" and inputs.gradient_checkpointing
    for phase, names in ((ENCODING, encoding), (TRAINING, training)):
        # the block-by-block step's stage volume (below) was fitted with the allocator's overhead in it
        backend = "cpu" if blockwise_cuda and phase == TRAINING else inputs.backend
        parts[f"workspace ({phase})"] = _workspace(sum(parts[name] for name in names), backend)
    phases = {ENCODING: encoding + ("workspace (encoding)",), TRAINING: training + ("workspace (training)",)}
    details["graph_memory_capped"] = details["held_back_to_fit"] = False
    if inputs.backend == "cuda":
        run_ahead, capped, depth = cuda_run_ahead(inputs, linears, sum(parts[name] for name in phases[TRAINING]),
                                                  details["hidden_tensor_bytes"])
        details["blockwise_depth"] = depth  # what the trainer runs the block-by-block step at (None: not it)
        parts["CUDA graph run-ahead"] = run_ahead
        phases[TRAINING] += ("CUDA graph run-ahead",)
        # a preview runs between steps: the phase holds the larger of a step and a preview
        preview_excess = _preview_activations(inputs, linears) - parts["activations"] - run_ahead
        details["preview_sets_peak"] = preview_excess > 0
        parts["activations"] += max(preview_excess, 0)
        details["graph_memory_capped"] = capped
        details["held_back_to_fit"] = capped or (depth == 0 and blockwise_default_depth() > 0)  # see HELD_BACK_NOTE
    details.update(lora_parameters=lora_parameters,
                   transformer_parameters=transformer_parameter_count(model.transformer))
    return MemoryEstimate(parts, phases, details)


def _workspace(phase_bytes: int, backend: str) -> int:
    # MLX's CPU allocator hands out exactly what is asked (measured on the tiny model); GPU heaps fragment
    if backend == "cpu":
        return 0
    return int(phase_bytes * CALIBRATION["workspace_fraction"] + CALIBRATION["workspace_minimum_bytes"])


def _target_shape(linears: dict[str, tuple[int, int]], path: str) -> tuple[int, int]:
    from engine.config import MFLUX_JOINT_ALIASES as _MFLUX_ALIASES

    path = path.removeprefix("transformer.")
    if path not in linears:
        match = re.match(r"^(transformer_blocks\.\d+\.)(.+)$", path)
        if match and match.group(2) in _MFLUX_ALIASES:
            path = match.group(1) + _MFLUX_ALIASES[match.group(2)]
    if path not in linears:
        from engine.errors import ConfigError

        raise ConfigError([f"LoRA target {path!r} is not a linear layer of this model"])
    return linears[path]


def _block_position(path: str, num_joint: int, num_single: int) -> int:
    """Where a layer runs in the forward pass: joint blocks 0.., then single blocks, embedders before, output after."""
    path = path.removeprefix("transformer.")
    if match := re.match(r"^transformer_blocks\.(\d+)\.", path):
        return int(match.group(1))
    if match := re.match(r"^single_transformer_blocks\.(\d+)\.", path):
        return num_joint + int(match.group(1))
    return num_joint + num_single if path.startswith(("norm_out", "proj_out")) else -1


def _training_activations(inputs: MemoryInputs, linears: dict) -> tuple[int, dict]:
    config = inputs.model.transformer
    num_joint, num_single = config.get("num_layers", 19), config.get("num_single_layers", 38)
    heads = config.get("num_attention_heads", 24)
    dim = heads * config.get("attention_head_dim", 128)
    image_tokens = (inputs.height // PIXELS_PER_TOKEN_SIDE) * (inputs.width // PIXELS_PER_TOKEN_SIDE)
    tokens = image_tokens + inputs.t5_length
    backward = _attention_backward(inputs, tokens)
    hidden = inputs.batch_size * tokens * dim * inputs.dtype_bytes  # one (tokens x hidden) tensor
    details = {"image_tokens": image_tokens, "sequence_length": tokens, "stored_joint_blocks": 0,
               "stored_single_blocks": 0, "attention_backward": backward,
               "attention_backward_fused": backward in ("fused", "contiguous"), "hidden_tensor_bytes": hidden}
    if not inputs.lora_targets:
        return 0, details
    # Blocks before the first trained one need no backward: they run, hand on their output and
    # free everything. From the first trained block on, every block's activations must be kept,
    # trained or not, because the gradient flows back through them.
    first = min(_block_position(path, num_joint, num_single) for path, _ in inputs.lora_targets)
    stored_joint = num_joint - min(max(first, 0), num_joint)
    stored_single = num_single - min(max(first - num_joint, 0), num_single)
    details.update(stored_joint_blocks=stored_joint, stored_single_blocks=stored_single)

    c = CALIBRATION
    probabilities = inputs.batch_size * heads * tokens**2 * inputs.dtype_bytes
    if backward != "autodiff":  # the fused backward and ours keep no probabilities
        probabilities = 0
    joint_block = c["joint_block_saved_tensors"] * hidden + c["attention_probabilities_saved"] * probabilities
    single_block = c["single_block_saved_tensors"] * hidden + c["attention_probabilities_saved"] * probabilities
    transient = c["backward_transient_tensors"] * hidden + c["attention_backward_transient"] * probabilities
    if backward == "contiguous":
        # contiguous copies of q, k, v and the incoming gradient, and the forward run again
        transient += CONTIGUOUS_BACKWARD_COPIES * hidden
    if inputs.gradient_checkpointing and inputs.backend == "cuda":
        # only block inputs are kept; the stages in flight are the run-ahead (estimate_memory)
        return int((stored_joint + stored_single) * c["checkpoint_saved_tensors"] * hidden), details
    if inputs.gradient_checkpointing:
        # only block inputs are kept; the backward recomputes one block at a time
        saved = (stored_joint + stored_single) * c["checkpoint_saved_tensors"] * hidden
        largest = max(joint_block if stored_joint else 0, single_block if stored_single else 0)
        saved += min(stored_joint + stored_single, c["checkpoint_recomputed_blocks"]) * largest
    else:
        saved = stored_joint * joint_block + stored_single * single_block
    output = c["output_layer_saved_tensors"] * inputs.batch_size * image_tokens * dim * inputs.dtype_bytes
    return int(saved + transient + output), details


def _attention_backward(inputs: MemoryInputs, tokens: int) -> str:
    """How attention's backward runs with the trainer's routes (engine/flux/layers.py: attention):
    "fused" (cuDNN: MLX 0.32 on CUDA, lengths in whole 128-token tiles), "contiguous" (the fused
    one on contiguous copies: CUDA runs that train joint blocks, where it failed on the arrays as
    they come) or "autodiff" (the unfused fallback, which keeps the probabilities). The recomputed
    backward (speed.CONTIGUOUS_JOINT_ATTENTION off, a bench probe) is not modelled: ~0.26 GB more."""
    if inputs.backend != "cuda" or tokens % 128:
        # on CUDA other lengths take MLX's unfused fallback: single blocks keep its probabilities
        # (joint blocks' custom backward keeps only q, k and v: counted as if it kept them too)
        return "autodiff"
    return "contiguous" if trains_joint_blocks(path for path, _ in inputs.lora_targets) else "fused"


def _full_resolution_channels(inputs: MemoryInputs) -> int:
    channels = inputs.model.vae.get("block_out_channels", FLUX1_VAE["block_out_channels"])
    # the decoder's last upsample lands the second-narrowest width at full resolution
    return channels[1] if len(channels) > 1 else channels[0]


def _vae_attention(inputs: MemoryInputs) -> float:
    channels = inputs.model.vae.get("block_out_channels", FLUX1_VAE["block_out_channels"])
    pixels = (inputs.height >> (len(channels) - 1)) * (inputs.width >> (len(channels) - 1))
    return CALIBRATION["vae_attention_tensors"] * pixels**2 * inputs.dtype_bytes


def _encoding_activations(inputs: MemoryInputs) -> int:
    """Images and prompts are encoded one at a time: the larger of a VAE encode and a T5 forward."""
    channels = inputs.model.vae.get("block_out_channels", FLUX1_VAE["block_out_channels"])[0]
    vae = (CALIBRATION["vae_encode_tensors"] * inputs.height * inputs.width * channels * inputs.dtype_bytes
           + _vae_attention(inputs))
    t5 = inputs.model.t5
    # T5 adds its position bias to unfused float32 attention scores
    t5_bytes = (CALIBRATION["t5_encode_tensors"] * inputs.t5_length * t5.get("d_ff", 10240) * inputs.dtype_bytes
                + 2 * t5.get("num_heads", 64) * inputs.t5_length**2 * FLOAT32_BYTES)
    return int(max(vae, t5_bytes))


def _preview_activations(inputs: MemoryInputs, linears: dict[str, tuple[int, int]]) -> int:
    """A preview image during training: batch-1 inference, then a VAE decode at the training size."""
    config = inputs.model.transformer
    dim = config.get("num_attention_heads", 24) * config.get("attention_head_dim", 128)
    tokens = (inputs.height // PIXELS_PER_TOKEN_SIDE) * (inputs.width // PIXELS_PER_TOKEN_SIDE) + inputs.t5_length
    if inputs.backend == "cuda":  # queued block by block: a few blocks' buffers, dense copies included
        transformer = cuda_preview_run_ahead(inputs, linears, tokens * dim * inputs.dtype_bytes)
    else:
        transformer = CALIBRATION["preview_transformer_tensors"] * tokens * dim * inputs.dtype_bytes
    if inputs.backend == "cpu":  # the CPU has no fused attention even for inference
        transformer += config.get("num_attention_heads", 24) * tokens**2 * inputs.dtype_bytes
    tensors = CALIBRATION[{"cpu": "vae_decode_tensors_cpu", "cuda": "vae_decode_tensors_cuda"}.get(
        inputs.backend, "vae_decode_tensors")]
    decode = (tensors * inputs.height * inputs.width * _full_resolution_channels(inputs)
              * inputs.dtype_bytes + _vae_attention(inputs))
    return int(max(transformer, decode))


def _cached_encodings(inputs: MemoryInputs) -> int:
    config = inputs.model.transformer
    image_tokens = (inputs.height // PIXELS_PER_TOKEN_SIDE) * (inputs.width // PIXELS_PER_TOKEN_SIDE)
    latents = inputs.num_images * image_tokens * config.get("in_channels", 64) * FLOAT32_BYTES  # dataset keeps float32
    prompt = inputs.t5_length * config.get("joint_attention_dim", 4096) + config.get("pooled_projection_dim", 768)
    return latents + inputs.num_prompts * prompt * inputs.dtype_bytes


def _optimizer_state_bytes(inputs: MemoryInputs, linears: dict) -> int:
    name = inputs.optimizer.lower()
    if name in FACTORED_OPTIMIZERS:
        # A (r, in) keeps r + in numbers, B (out, r) keeps out + r
        numbers = sum(2 * rank + sum(_target_shape(linears, path)) for path, rank in inputs.lora_targets)
        return numbers * FLOAT32_BYTES
    copies = OPTIMIZER_STATE_COPIES.get(name, 2)  # an unknown optimizer is assumed to be Adam-like
    numbers = sum(rank * sum(_target_shape(linears, path)) for path, rank in inputs.lora_targets)
    return copies * numbers * FLOAT32_BYTES
