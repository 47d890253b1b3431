"""The row of wizard steps at the top of each setup screen, the current one lit."""
from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

STEPS = (("images", "Images"), ("label", "Label"), ("template", "Template"), ("memory", "Memory"),
         ("review", "Review"), ("train", "Train"))


class StepHeader(Static):
    def __init__(self, current: str, **kwargs):
        super().__init__(**kwargs)
        self.current = current

    def on_mount(self) -> None:
        self.update(self.render_steps())

    def render_steps(self) -> Text:
        text = Text(" DreamBooth Wizard  ", style="bold")
        names = [name for name, _ in STEPS]
        current_index = names.index(self.current) if self.current in names else -1
        for index, (name, title) in enumerate(STEPS):
            if index:
                text.append(" › ", style="dim")
            label = f"{index + 1} {title}"
            if index == current_index:
                text.append(label, style="bold reverse")
            elif index < current_index:
                text.append(label)
            else:
                text.append(label, style="dim")
        return text
