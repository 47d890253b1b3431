"""`dreambooth-wizard export`: a checkpoint's LoRA for mflux, diffusers or kohya/ComfyUI."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a NNNNNNN_checkpoint.zip (in <output>/_checkpoints/)")
    parser.add_argument("--format", default="diffusers", choices=["mflux", "diffusers", "kohya"],
                        help="mflux; diffusers (also loads in ComfyUI); kohya with BFL names (ComfyUI, Forge)")
    parser.add_argument("--output", "-o", required=True, help="the .safetensors file to write")


def run(args: argparse.Namespace) -> int:
    from engine.export import export_checkpoint
    from engine.paths import output_file

    # an empty -o or a folder is reported before the checkpoint is read
    output_file(args.output, f"{Path(args.checkpoint).stem.removesuffix('_checkpoint')}_{args.format}.safetensors",
                "LoRA file")
    path = export_checkpoint(args.checkpoint, args.format, args.output)
    print(f"wrote {args.format} LoRA {path}")
    return 0
