"""`dreambooth-wizard generate`: text to image, with LoRA files and their scales."""
from __future__ import annotations

import argparse
import logging
import time

log = logging.getLogger(__name__)


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", default="dev", help="dev, schnell, tiny, a Hugging Face repo id or a folder")
    parser.add_argument("--prompt", "-p", required=True)
    parser.add_argument("--lora-paths", nargs="+", default=[], metavar="FILE",
                        help="LoRA files (mflux, diffusers/PEFT or kohya format)")
    parser.add_argument("--lora-scales", nargs="+", type=float, default=[], metavar="SCALE",
                        help="one scale per LoRA file (default 1.0 each)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 20 for dev, 4 for schnell)")
    parser.add_argument("--guidance", type=float, default=3.5)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--quantize", "-q", type=int, choices=[3, 4, 5, 6, 8], default=None)
    parser.add_argument("--output", "-o", default="image.png")


def run(args: argparse.Namespace) -> int:
    from engine.flux.loading import load_model
    from engine.generate import GenerationRequest, generate_image, save_png

    phases = PhaseMeter(args.verbose)
    model = load_model(args.model, quantize=args.quantize, transformer=False)
    phases.end("load")
    request = GenerationRequest(prompt=args.prompt, seed=args.seed, steps=args.steps or (20 if model.has_guidance else 4),
                                guidance=args.guidance, width=args.width, height=args.height,
                                lora_paths=args.lora_paths, lora_scales=args.lora_scales)
    image = generate_image(model, request, release_text_encoders=True, on_phase=phases.end)
    path = save_png(image, args.output, {"prompt": request.prompt, "seed": request.seed, "steps": request.steps,
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
