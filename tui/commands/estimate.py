"""`dreambooth-wizard estimate`: the memory a training config needs, against this machine's.

Nothing is downloaded or loaded: the FLUX.1 sizes are built in (a local model
folder's config.json files are read). When the run does not fit, the fixes
the wizard would offer are listed with the peak each one leads to.
"""
from __future__ import annotations

import argparse
import json
import math

GIB = 2**30


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train-config", required=True, metavar="CONFIG.json",
                        help="an mflux DreamBooth training config")
    parser.add_argument("--json", action="store_true", help="print the estimate as JSON")
    parser.add_argument("--memory", type=float, default=None, metavar="GIB",
                        help="compare with this much memory (GiB) instead of what this machine offers")


def run(args: argparse.Namespace) -> int:
    check_memory_flag(args.memory)
    from engine.config import load_config
    from engine.machine import detect_machine
    from engine.memory import estimate_memory, inputs_for_run
    from engine.memory_fixes import suggest_fixes

    # block numbers are checked against the model's own counts once its config is known
    cfg = load_config(args.train_config, num_joint_blocks=None, num_single_blocks=None)
    machine = detect_machine()
    available = int(args.memory * GIB) if args.memory is not None else machine.available_for_training
    inputs = inputs_for_run(cfg, machine, available_bytes=available)
    estimate = estimate_memory(inputs)
    fits = estimate.fits(available)
    fixes = [] if fits else suggest_fixes(inputs, available)
    if args.json:
        result = estimate.to_dict()
        result.update(available=available, fits=fits, machine=machine.to_dict(), fixes=[fix.to_dict() for fix in fixes])
        print(json.dumps(result, indent=2))
        return 0
    _print_report(estimate, machine, available, fits, fixes)
    return 0


def check_memory_flag(memory_gib: float | None) -> None:
    """--memory must be a real amount: a positive, finite number of GiB."""
    from engine.errors import UserError

    if memory_gib is not None and not (math.isfinite(memory_gib) and memory_gib > 0):
        raise UserError(f"--memory {memory_gib:g}: must be a positive number of GiB",
                        "give the memory to compare with, e.g. --memory 24, or leave it out for this machine's")


def _print_report(estimate, machine, available: int, fits: bool, fixes) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title="Memory estimate")
    table.add_column("part")
    table.add_column("GiB", justify="right")
    table.add_column("phase")
    rows = estimate.describe()
    for name, gib, phase in rows[:-2]:
        table.add_row(name, gib, phase)
    table.add_section()
    for name, gib, phase in rows[-2:]:
        table.add_row(name, gib, phase)
    table.add_row("[bold]peak[/bold]", f"[bold]{estimate.peak / GIB:.2f}[/bold]", "")
    console.print(table)
    console.print(f"this machine: {machine.describe()}")
    for note in machine.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    verdict = "[green]fits[/green]" if fits else "[red]does not fit[/red]"
    console.print(f"{estimate.peak / GIB:.1f} GiB needed, {available / GIB:.1f} GiB available: {verdict}")
    if fits and estimate.details.get("held_back_to_fit"):
        from engine.memory import HELD_BACK_NOTE

        console.print(HELD_BACK_NOTE)
    if fixes:
        table = Table(title="Ways to make it fit")
        for column in ("key", "change", "peak GiB", "fits"):
            table.add_column(column)
        for fix in fixes:
            table.add_row(fix.key, fix.label, f"{fix.estimate.peak / GIB:.1f}", "yes" if fix.fits else "no")
        console.print(table)
