"""What each kernel warm-up process runs (engine/kernel_warmup.py plans and starts them, and waits).

    python -m engine.kernel_warmup_process PLAN.json [--part I/N [--blockwise]] [--encoder NAME]

A share of the block-by-block step's stage functions (`--part`), a one-graph step (no `--part`),
a share of the block-by-block step beside a one-graph step's process (`--blockwise`), or one
encoder's kernels (`--encoder`). The marker is the waiting run's to write.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from engine.kernel_warmup import ENCODERS, WarmupPlan

log = logging.getLogger(__name__)


def run_plan(plan: WarmupPlan, steps: int = 2, part: tuple[int, int] | None = None) -> float:
    """Train the small model for `steps` steps as the run will (the kernels compile on the way); its peak GiB.
    `part` (index, count) of a block-by-block step: one step running only the stage functions whose
    position is index modulo count, on stand-ins (engine/blockwise_step.py: compile_only)."""
    import mlx.core as mx

    from engine.flux import speed
    from engine.flux.latents import latent_image_ids, text_ids
    from engine.flux.loading import quantize_module
    from engine.flux.transformer import FluxTransformer
    from engine.lora import apply_lora
    from engine.optimizers import build_optimizer
    from engine.training_step import make_train_step

    speed.configure_cuda_graphs(one_stage_at_a_time=plan.one_stage, unbounded=plan.depth is not None and plan.depth < 0)
    speed.configure_for_training(steps=plan.steps_left)
    dtype = getattr(mx, plan.dtype)
    mx.random.seed(0)
    transformer = FluxTransformer(plan.transformer_config)
    transformer.set_dtype(dtype)
    mx.eval(transformer.parameters())
    if plan.quantize:
        quantize_module(transformer, plan.quantize, "transformer")
    transformer.gradient_checkpointing = plan.checkpointing
    apply_lora(transformer, [tuple(t) for t in plan.targets], key=mx.random.key(0))
    optimizer = build_optimizer(plan.optimizer, plan.learning_rate)
    optimizer.init(transformer.trainable_parameters())
    compile_only = None
    if part is not None and plan.checkpointing and speed.BLOCKWISE_CHECKPOINTING:
        share, parts = part
        compile_only, steps = (lambda position: position % parts == share), 1
    step = make_train_step(transformer, optimizer, dtype, plan.guidance, blockwise_depth=plan.depth,
                           compile_only=compile_only)
    latent_h, latent_w = plan.latent_shape
    tokens = (latent_h // 2) * (latent_w // 2)
    channels = int(plan.transformer_config.get("in_channels", 64))
    img_ids, txt_ids = latent_image_ids(latent_h, latent_w), text_ids(plan.t5_length)
    joint_width = int(plan.transformer_config.get("joint_attention_dim", 4096))
    batch = plan.batch_size
    for index in range(steps):
        latents = mx.random.normal((batch, tokens, channels))  # float32, as the run's cached latents
        noise = mx.random.normal((batch, tokens, channels))
        hidden = mx.random.normal((batch, plan.t5_length, joint_width)).astype(dtype)
        pooled = mx.random.normal((batch, plan.pooled_width)).astype(dtype)
        sigma = mx.full((batch,), 0.5 + 0.1 * index, dtype=mx.float32)
        guidance = mx.full((batch,), 3.5, dtype=mx.float32)
        loss = step(latents, noise, hidden, pooled, sigma, guidance, img_ids, txt_ids)
        mx.eval(loss)
    return mx.get_peak_memory() / 2**30


def run_encoders(plan: WarmupPlan, names=ENCODERS) -> float:
    """Encode a random image or prompt as the run will, with random encoders (the text encoders cut to
    two layers), for each of `names` ("t5", "vae", "clip"); the peak GiB."""
    import mlx.core as mx

    from engine.flux.clip import CLIPTextModel
    from engine.flux.latents import pack_latents
    from engine.flux.loading import quantize_module
    from engine.flux.t5 import T5Encoder
    from engine.flux.vae import AutoencoderKL

    dtype = getattr(mx, plan.dtype)
    mx.random.seed(0)
    configs = plan.encoder_configs
    for name in names:
        started = time.perf_counter()
        if name == "vae":
            vae = AutoencoderKL(configs["vae"])
            vae.set_dtype(dtype)
            height, width = plan.image_size
            pixels = mx.random.uniform(-1, 1, (1, height, width, 3))  # float32, as the run's crop_and_resize
            mean = vae.encode(pixels.astype(dtype))
            mx.eval(pack_latents(vae.normalize(mean.astype(mx.float32)))[0])
            del vae
            log.info("vae encoded in %.1f s", time.perf_counter() - started)
            continue
        build, length = {"t5": (T5Encoder, plan.t5_length), "clip": (CLIPTextModel, 77)}[name]
        encoder = build(configs[name])
        encoder.set_dtype(dtype)
        if plan.quantize:
            quantize_module(encoder, plan.quantize, name)
        built = time.perf_counter()
        ids = mx.random.randint(0, int(configs[name].get("vocab_size", 1000)), (1, length))
        out = encoder(ids)
        mx.eval([a.astype(dtype) for a in (out if isinstance(out, tuple) else (out,))])
        log.info("%s built in %.1f s, encoded in %.1f s", name, built - started, time.perf_counter() - built)
        del encoder
    return mx.get_peak_memory() / 2**30


def main(argv: list[str]) -> int:
    """The command line (module docstring); 0 once the kernels are compiled."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    plan = WarmupPlan(**json.loads(Path(argv[0]).read_text())["plan"])
    started = time.perf_counter()
    if "--encoder" in argv:
        name = argv[argv.index("--encoder") + 1]
        peak = run_encoders(plan, [name])
        log.info("%s's kernels done in %.1f s, peak %.2f GiB", name, time.perf_counter() - started, peak)
        return 0
    index, count = (int(n) for n in argv[argv.index("--part") + 1].split("/")) if "--part" in argv else (0, 1)
    if "--blockwise" in argv:  # a share of the block-by-block step's kernels, beside a one-graph step's process
        plan.checkpointing = True
    peak = run_plan(plan, part=(index, count) if "--part" in argv else None)
    log.info("step kernels, part %d of %d, done in %.1f s, peak %.2f GiB", index + 1, count,
             time.perf_counter() - started, peak)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
