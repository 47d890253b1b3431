"""`dreambooth-wizard export`: a checkpoint's LoRA for mflux, diffusers or kohya/ComfyUI."""
from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a NNNNNNN_checkpoint.zip (in <output>/_checkpoints/)")
    parser.add_argument("--format", default="diffusers", choices=["mflux", "diffusers", "kohya"],
                        help="mflux; diffusers (also loads in ComfyUI); kohya with BFL names (ComfyUI, Forge)")
    parser.add_argument("--output", "-o", required=True, help="the .safetensors file to write")


def run(args: argparse.Namespace) -> int:
    from engine.export import export_checkpoint

    _check_output(args.output, f"{Path(args.checkpoint).stem.removesuffix('_checkpoint')}_{args.format}.safetensors")
    path = export_checkpoint(args.checkpoint, args.format, args.output)
    print(f"wrote {args.format} LoRA {path}")
    return 0


def _check_output(output: str, suggested_name: str) -> None:
    """-o must name a file: an empty name or a folder would end in a puzzling OS error (writing onto ".")."""
    from engine.errors import UserError

    if not output.strip():
        raise UserError("no output file given (-o is empty)", f"name the LoRA file to write, e.g. -o {suggested_name}")
    path = Path(output).expanduser()
    if output.endswith(("/", os.sep)) or path.is_dir():
        raise UserError(f"{output} is a folder; -o names the LoRA file to write",
                        f"name a file in it, e.g. -o {path / suggested_name}")
