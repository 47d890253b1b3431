"""A labelled, validated value of the training config, with its one-line explanation.

The field never raises: what is wrong with the typed text appears under it in
red, and `parsed()` answers (value, None) or (None, message).
"""
from __future__ import annotations

from typing import Any, Callable

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Checkbox, Input, Label, Static

Parser = Callable[[str], Any]  # raises ValueError("what to type instead")


class ConfigField(Vertical):
    def __init__(self, label: str, value: str, help_text: str, parse: Parser, *, id: str):
        super().__init__(id=id, classes="config-field")
        self.label = label
        self.initial = value
        self.help_text = help_text
        self.parse = parse

    def compose(self) -> ComposeResult:
        with Horizontal(classes="field-line"):
            yield Label(self.label, classes="field-label")
            yield Input(self.initial, compact=True, classes="field-input")
        yield Static(self.help_text, classes="field-help")
        yield Static("", classes="field-error")

    @property
    def input(self) -> Input:
        return self.query_one(".field-input", Input)

    def set_text(self, text: str) -> None:
        with self.input.prevent(Input.Changed):
            self.input.value = text
        self.parsed()

    def parsed(self) -> tuple[Any, str | None]:
        try:
            value, problem = self.parse(self.input.value.strip()), None
        except ValueError as error:
            value, problem = None, str(error)
        error_line = self.query_one(".field-error", Static)
        error_line.update(f"✗ {problem}" if problem else "")
        self.set_class(problem is not None, "invalid")
        return value, problem

    def on_input_changed(self, event: Input.Changed) -> None:
        self.parsed()


class ToggleField(Vertical):
    """An on/off value (a checkbox: space toggles)."""

    def __init__(self, label: str, value: bool, help_text: str, *, id: str):
        super().__init__(id=id, classes="config-field")
        self.label = label
        self.initial = value
        self.help_text = help_text

    def compose(self) -> ComposeResult:
        yield Checkbox(self.label, self.initial, compact=True, classes="field-toggle")
        yield Static(self.help_text, classes="field-help")

    def set_value(self, value: bool) -> None:
        self.query_one(Checkbox).value = value

    def parsed(self) -> tuple[bool, None]:
        return self.query_one(Checkbox).value, None


# ---------------------------------------------------------------- parsers


def whole_number(low: int, high: int, name: str) -> Parser:
    def parse(text: str) -> int:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"type a whole number from {low} to {high}") from None
        if value != int(value):
            raise ValueError(f"{name} must be a whole number, e.g. {max(low, round(value))}")
        if not low <= value <= high:
            raise ValueError(f"{name} must be from {low} to {high}")
        return int(value)

    return parse


def learning_rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("type a number such as 1e-4 or 0.0001") from None
    if not 0 < value <= 0.1:
        raise ValueError("must be above 0 and at most 0.1; 1e-5 to 1e-3 is usual, 1e-4 a safe start")
    return value


def quantize_bits(text: str) -> int | None:
    from engine.config import QUANTIZE_BITS

    if text.lower() in ("", "none", "null", "no", "off", "0"):
        return None
    if text.isdigit() and int(text) in QUANTIZE_BITS:
        return int(text)
    raise ValueError(f"type one of {', '.join(map(str, QUANTIZE_BITS))}, or none for full precision")


def resolution(text: str) -> tuple[int, int]:
    """'512' or '768x512' (width x height), multiples of 16 from 16 to 2048."""
    parts = text.lower().replace("×", "x").split("x")
    if len(parts) not in (1, 2) or not all(part.strip().isdigit() for part in parts):
        raise ValueError("type a size such as 512 (square) or 768x512 (width x height)")
    width, height = (int(parts[0]), int(parts[-1]))
    for side in (width, height):
        if not 16 <= side <= 2048:
            raise ValueError("each side must be from 16 to 2048 pixels; 512 is usual")
        if side % 16:
            lower = side // 16 * 16
            raise ValueError(f"{side} is not a multiple of 16: use {max(16, lower)} or {lower + 16}")
    return width, height


def block_range(limit: int) -> Parser:
    """'0-38' (end not included), '0,1,7' (exact blocks) or '' (none of these blocks)."""
    def parse(text: str) -> tuple[int, int] | list[int] | None:
        text = text.replace(" ", "")
        if not text or text.lower() == "none":
            return None
        if "," in text or text.isdigit():
            try:
                indices = [int(part) for part in text.split(",") if part]
            except ValueError:
                raise ValueError("type blocks as 0-38 (a range) or 0,1,7 (exact blocks)") from None
            outside = [i for i in indices if not 0 <= i < limit]
            if outside:
                raise ValueError(f"this model has blocks 0 to {limit - 1}; {outside[0]} is not one of them")
            return sorted(set(indices))
        start_text, _, end_text = text.partition("-")
        if not (start_text.isdigit() and end_text.isdigit()):
            raise ValueError(f"type a range such as 0-{limit} (the end is not included), or leave empty for none")
        start, end = int(start_text), int(end_text)
        if end > limit:
            raise ValueError(f"this model has {limit} of these blocks: the end can be at most {limit}")
        if start >= end:
            raise ValueError(f"the start must be below the end: {start}-{start + 1} trains block {start} alone")
        return start, end

    return parse


def block_range_text(spec) -> str:
    if spec is None:
        return ""
    if spec.block_range.indices is not None:
        return ",".join(str(i) for i in spec.block_range.indices)
    return f"{spec.block_range.start}-{spec.block_range.end}"
