"""`dreambooth-wizard generate`: text to image, with LoRA files and their scales."""
from __future__ import annotations

import argparse
import logging
import time
from dataclasses import replace

log = logging.getLogger(__name__)


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", default="dev", help="dev, schnell, tiny, a Hugging Face repo id or a folder")
    parser.add_argument("--prompt", "-p", required=True)
    parser.add_argument("--lora-paths", nargs="+", default=[], metavar="FILE",
                        help="LoRA files (mflux, diffusers/PEFT or kohya format)")
    parser.add_argument("--lora-scales", nargs="+", type=float, default=[], metavar="SCALE",
                        help="one scale per LoRA file (default 1.0 each)")
    parser.add_argument("--seed", type=int, default=42, help="0 to 2**64-1 (default 42)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 20 for dev, 4 for schnell)")
    parser.add_argument("--guidance", type=float, default=3.5, help="0 or more (default 3.5; schnell ignores it)")
    parser.add_argument("--width", type=int, default=1024, help="pixels, a multiple of 16 (default 1024)")
    parser.add_argument("--height", type=int, default=1024, help="pixels, a multiple of 16 (default 1024)")
    parser.add_argument("--quantize", "-q", type=int, choices=[3, 4, 5, 6, 8], default=None)
    parser.add_argument("--output", "-o", default="image.png")


def run(args: argparse.Namespace) -> int:
    from engine.flux.loading import load_model
    from engine.generate import GenerationRequest, check_output_file, check_request, generate_image, save_png

    request = GenerationRequest(prompt=args.prompt, seed=args.seed, steps=args.steps, guidance=args.guidance,
                                width=args.width, height=args.height, lora_paths=args.lora_paths,
                                lora_scales=args.lora_scales)
    # bad numbers and an unwritable output are reported now, not after minutes of loading and sampling
    # (no --steps: the model picks them once loaded, so any valid count stands in here)
    check_request(request if args.steps is not None else replace(request, steps=1))
    output = check_output_file(args.output)
    phases = PhaseMeter(args.verbose)
    model = load_model(args.model, quantize=args.quantize, transformer=False)
    phases.end("load")
    if args.steps is None:
        request.steps = 20 if model.has_guidance else 4
    image = generate_image(model, request, release_text_encoders=True, on_phase=phases.end)
    path = save_png(image, output, {"prompt": request.prompt, "seed": request.seed, "steps": request.steps,
                                    "guidance": request.guidance, "model": args.model,
                                    "loras": ",".join(request.lora_paths)})
    print(f"saved {path}")
    return 0


class PhaseMeter:
    """With --verbose, prints each phase's time and peak memory."""

    def __init__(self, verbose: bool):
        import mlx.core as mx

        self.verbose, self.mx, self.start = verbose, mx, time.perf_counter()
        mx.reset_peak_memory()

    def end(self, phase: str) -> None:
        if self.verbose:
            peak = self.mx.get_peak_memory() / 2**30
            print(f"{phase}: {time.perf_counter() - self.start:.1f} s, peak memory {peak:.2f} GiB")
        self.mx.reset_peak_memory()
        self.start = time.perf_counter()
