"""The estimated peak against the memory this machine has for training, as one bar."""
from __future__ import annotations

from rich.text import Text
from textual.widget import Widget

GIB = 2**30


class MemoryBar(Widget):
    """`show(peak, available)`: green when it fits, red past the available mark."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.peak = 0
        self.available = 0

    def show(self, peak: int, available: int) -> None:
        self.peak, self.available = peak, available
        self.refresh()

    def render(self) -> Text:
        width = max(10, self.size.width - 2)
        if not self.available:
            return Text(f"{self.peak / GIB:.1f} GiB needed (this machine's memory is unknown)")
        scale = max(self.peak, self.available)
        used = round(width * min(self.peak, self.available) / scale)
        over = round(width * max(0, self.peak - self.available) / scale)
        free = width - used - over
        fits = self.peak <= self.available
        bar = Text("▕")
        bar.append("█" * used, style="green" if fits else "yellow")
        bar.append("█" * over, style="bold red")
        bar.append("░" * free, style="dim")
        bar.append("▏\n")
        share = self.peak / self.available
        verdict = "fits" if fits else "does NOT fit"
        bar.append(f"{self.peak / GIB:.1f} GiB needed of {self.available / GIB:.1f} GiB available "
                   f"({share:.0%}): {verdict}", style="bold" if not fits else "")
        return bar
