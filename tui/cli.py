"""`dreambooth-wizard`: the wizard with no arguments, headless subcommands otherwise.

Each subcommand lives in tui/commands/<name>.py with `add_parser` and `run`;
they are imported only when chosen, so `--help` answers instantly. A UserError
from the engine is printed once (no traceback) and exits 2; Ctrl+C exits 130.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = {
    "generate": "make an image with FLUX.1 and LoRA files",
    "train": "train a DreamBooth LoRA headless (mflux config or checkpoint)",
    "export": "export a checkpoint's LoRA for mflux, diffusers or kohya/ComfyUI",
    "estimate": "estimate the memory a training config needs",
    "resume": "open the wizard on the resume screen",
    "demo": "the whole flow on the built-in tiny model",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dreambooth-wizard", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version="%(prog)s 0.1.0")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--verbose", "-v", action="store_true", help="more detail, peak memory per phase")
        _command_module(name).add_parser(sub)
    return parser


def _command_module(name: str):
    return importlib.import_module(f"tui.commands.{name}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        from tui.commands.wizard import run_wizard

        return run_wizard()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from engine import blas
    from engine.errors import UserError

    if blas.loaded_blas:
        logging.getLogger("engine").info("CPU matmuls use the system BLAS %s", blas.loaded_blas)

    try:
        return int(_command_module(args.command).run(args) or 0)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
