"""GPU benchmark: time from launching `dreambooth-wizard train` on 5 images to the
first finished step, with full-size random FLUX.1-dev weights on local disk in
the Hugging Face layout (transformer, VAE, CLIP-L, T5-XXL; tiny tokenizers,
whose ids fit the real vocabularies).

    python bench/time_to_first_step.py [--model-dir /tmp/flux-random] [--template people] [--quantize 4] [--checkpointing]

Writing the weights is not timed. Each run starts from an empty run folder and
encodings cache, as a user's first run does. Prints the phases (load, quantize,
encode, compile, first step), the trainer's log lines on the first step and the
whole-run peak memory as one JSON row; with $OUT set, writes $OUT/ttfs.json and
the trainer's log, $OUT/train_stderr.log.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FULL_T5 = {"architectures": ["T5EncoderModel"], "model_type": "t5", "vocab_size": 32128, "d_model": 4096, "d_kv": 64,
           "d_ff": 10240, "num_layers": 24, "num_heads": 64, "relative_attention_num_buckets": 32,
           "relative_attention_max_distance": 128, "dropout_rate": 0.0, "layer_norm_epsilon": 1e-6,
           "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new", "is_gated_act": True,
           "tie_word_embeddings": False, "pad_token_id": 0, "eos_token_id": 1}
FULL_CLIP = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": 49408,
             "hidden_size": 768, "intermediate_size": 3072, "projection_dim": 768, "num_hidden_layers": 12,
             "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
             "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
FULL_VAE_CHANGES = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
                    "sample_size": 1024}
SHARD_BYTES = 5 * 2**30
# MLX's CUDA kernel cache for these runs (the trainer's own default is in its cache folder)
KERNEL_CACHE = "/tmp/ttfs-mlx-kernels"


def write_random_model(folder: Path) -> None:
    import engine  # noqa: F401
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from bench.bench_train import DEV_CONFIG
    from engine.flux import clip, t5, transformer, vae
    from engine.flux.tiny import MODEL_INDEX, SCHEDULER_CONFIG, VAE_CONFIG, _write_json
    from engine.flux.tiny_tokenizers import write_clip_tokenizer, write_t5_tokenizer

    write_clip_tokenizer(folder / "tokenizer")
    write_t5_tokenizer(folder / "tokenizer_2")
    components = (
        ("transformer", transformer.FluxTransformer, transformer.export_hf_weights,
         dict(DEV_CONFIG, _class_name="FluxTransformer2DModel"), "diffusion_pytorch_model"),
        ("vae", vae.AutoencoderKL, vae.export_hf_weights, dict(VAE_CONFIG, **FULL_VAE_CHANGES), "diffusion_pytorch_model"),
        ("text_encoder", clip.CLIPTextModel, clip.export_hf_weights, FULL_CLIP, "model"),
        ("text_encoder_2", t5.T5Encoder, t5.export_hf_weights, FULL_T5, "model"),
    )
    mx.random.seed(0)
    for name, build, export, config, stem in components:
        module = build(config)
        module.set_dtype(mx.bfloat16)
        weights = export(dict(tree_flatten(module.parameters())))
        shards, current, size = [], {}, 0
        for key in sorted(weights):
            nbytes = weights[key].size * 2
            if current and size + nbytes > SHARD_BYTES:
                shards.append(current)
                current, size = {}, 0
            current[key] = weights[key]
            size += nbytes
        shards.append(current)
        (folder / name).mkdir(parents=True, exist_ok=True)
        weight_map = {}
        for index, shard in enumerate(shards, 1):
            filename = f"{stem}-{index:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else f"{stem}.safetensors"
            mx.eval(shard)
            mx.save_safetensors(str(folder / name / filename), shard, metadata={"format": "pt"})
            weight_map.update({key: filename for key in shard})
        if len(shards) > 1:
            _write_json(folder / name / f"{stem}.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})
        _write_json(folder / name / "config.json", config)
        del module, weights, shards, current
        mx.clear_cache()
    _write_json(folder / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)
    _write_json(folder / "model_index.json", MODEL_INDEX)


def make_run_folder(folder: Path, model_dir: Path, template: str, quantize: int | None, checkpointing: bool,
                    preview_every: int | None = None, epochs: int = 1) -> Path:
    from engine.config import config_to_dict, load_template
    from tests.helpers import draw_subject

    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    entries = []
    for index in range(5):
        draw_subject(index, 768).save(images / f"{index}.png")
        entries.append({"image": f"{index}.png", "prompt": "photo of sks toy"})
    data = config_to_dict(load_template(template))
    data.update(model=str(model_dir), quantize=quantize, width=512, height=512, gradient_checkpointing=checkpointing,
                examples={"path": "images/", "images": entries},
                save={"output_path": str(folder / "out"), "checkpoint_frequency": 1000},
                training_loop={"num_epochs": epochs, "batch_size": 1})
    if preview_every:  # the template's preview (its prompt, 25 steps at 512) this often
        data["instrumentation"] = dict(data.get("instrumentation") or {"validation_prompt": "photo of sks toy"},
                                       generate_image_frequency=preview_every, plot_frequency=preview_every)
    else:
        data.pop("instrumentation", None)
    path = folder / "config.json"
    path.write_text(json.dumps(data, indent=2))
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", default="/tmp/flux-random")
    parser.add_argument("--run-dir", default="/tmp/ttfs-run")
    parser.add_argument("--template", default="people")
    parser.add_argument("--quantize", type=int, default=4)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=1,
                        help="steps to wait for before stopping the trainer (each one's time and peak is kept: "
                             "the last one's peak is the whole run's so far, encoding included)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs over the 5 images (the run's length)")
    parser.add_argument("--compiled-steps", type=int, default=0,
                        help="after --steps, go on until this many compiled steps have finished (on a machine's "
                             "first run the first steps run uncompiled while the GPU kernels compile: the whole "
                             "run's peak then covers both)")
    parser.add_argument("--preview-every", type=int,
                        help="make the template's preview image every this many steps (default: none)")
    args = parser.parse_args()
    model_dir = Path(args.model_dir)
    write_s = None
    if not (model_dir / "model_index.json").is_file():
        start = time.perf_counter()
        write_random_model(model_dir)
        write_s = round(time.perf_counter() - start, 1)
    run_dir = Path(args.run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)  # a user's first run: no encodings cached yet
    config = make_run_folder(run_dir, model_dir, args.template, args.quantize or None, args.checkpointing,
                             args.preview_every, args.epochs)
    log_path = Path(os.environ.get("OUT", run_dir), "train_stderr.log")
    launched = time.time()
    # the trainer's own home (encodings cache, logs) in the fresh run folder; --verbose logs where
    # the first step's time goes (traced and queued, then ran)
    # MLX's compiled kernels stay outside it (KERNEL_CACHE): a cold cache is measured by removing that
    env = dict(os.environ, DREAMBOOTH_WIZARD_HOME=str(run_dir / "home"), MLX_PTX_CACHE_DIR=KERNEL_CACHE)
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "tui.cli", "train", "--train-config", str(config), "--json",
                                    "--verbose"], cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        # stopped from outside (a timeout's SIGTERM): take the trainer down too, or it keeps the GPU
        # and holds any pipe this script's output goes into open
        signal.signal(signal.SIGTERM, lambda *_: (process.kill(), sys.exit(143)))
        phases, steps, progress = {}, [], {}
        try:
            for line in process.stdout:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event["type"] == "phase":
                    at = round(event["time"] - launched, 2)
                    if event["phase"] in phases:  # a second "train": the GPU kernels are compiled (engine/trainer.py)
                        phases["kernels_ready"] = at
                    phases.setdefault(event["phase"], at)
                    # as it happens, so a run cut by its timeout still says how far it got
                    print(f"phase {event['phase']} at {at} s: {event.get('detail')}", file=sys.stderr, flush=True)
                if event["type"] == "progress":  # each progress phase's first and last event (encode prompts, ...)
                    seen = progress.setdefault(event["phase"], [round(event["time"] - launched, 2)] * 2)
                    seen[1] = round(event["time"] - launched, 2)
                if event["type"] == "step":
                    steps.append({"s": round(event["time"] - launched, 2), "peak_gib": round(event["peak_memory_gib"], 2),
                                  "uncompiled": bool(event.get("uncompiled"))})
                    print(f"step {len(steps)} at {steps[-1]['s']} s, peak {steps[-1]['peak_gib']} GiB"
                          f"{' (uncompiled)' if steps[-1]['uncompiled'] else ''}", file=sys.stderr, flush=True)
                    compiled = sum(not step["uncompiled"] for step in steps)
                    if len(steps) >= args.steps and compiled >= args.compiled_steps and process.poll() is None:
                        process.terminate()  # SIGTERM: the trainer checkpoints and exits
            process.wait(timeout=600)
        finally:
            if process.poll() is None:
                process.kill()
    first_step_log = [line.split(": ", 1)[-1].strip() for line in log_path.read_text().splitlines()
                      if "first step" in line]
    first_step = steps[0] if steps else None
    kernels = sum(len(files) for _, _, files in os.walk(KERNEL_CACHE))
    row = {"template": args.template, "quantize": args.quantize, "checkpointing": args.checkpointing,
           "preview_every": args.preview_every, "model_write_s": write_s, "phases_s_from_launch": phases,
           "progress_s_from_launch": progress, "first_step": first_step,
           "time_to_first_step_s": first_step["s"] if first_step else None, "first_step_log": first_step_log,
           "steps": steps, "whole_run_peak_gib": steps[-1]["peak_gib"] if steps else None,
           "uncompiled_steps": sum(step["uncompiled"] for step in steps),
           "uncompiled_peak_gib": max((step["peak_gib"] for step in steps if step["uncompiled"]), default=None),
           "kernel_cache_files": kernels, "exit_code": process.returncode}
    print(json.dumps(row), flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "ttfs.json").write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
