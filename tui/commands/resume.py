"""`dreambooth-wizard resume [output_dir]`: the wizard's Resume screen, listing a run's checkpoints."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output_dir", nargs="?", default=None, type=Path,
                        help="the training's output folder (with _checkpoints/); asked for when left out")


def run(args: argparse.Namespace) -> int:
    from tui.commands.wizard import run_wizard
    from tui.state import WizardState

    state = WizardState()
    if args.output_dir is not None:
        state.output_dir = args.output_dir.expanduser().resolve()
    return run_wizard(start="resume", state=state)
