"""One photo's line on the Label screen: its name, its trigger word and its prompt, both editable."""
from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Input, Label, Static

from tui.state import ImageChoice


def default_prompt(trigger: str, class_noun: str) -> str:
    """'photo of sks dog'; a style is described as 'artwork in sks style'."""
    trigger, class_noun = trigger.strip(), class_noun.strip()
    if class_noun.lower() == "style":
        return f"artwork in {trigger} style"
    return " ".join(part for part in ("photo of", trigger, class_noun) if part)


class PromptRow(Horizontal):
    """Edits `image.trigger` and `image.prompt` in place; marks a prompt that lacks its trigger."""

    def __init__(self, image: ImageChoice, index: int):
        super().__init__(classes="prompt-row")
        self.image = image
        self.index = index

    def compose(self) -> ComposeResult:
        name = self.image.path.name
        yield Label(name if len(name) <= 16 else name[:15] + "…", classes="prompt-name")
        yield Input(self.image.trigger, placeholder="trigger", compact=True, classes="prompt-trigger",
                    id=f"trigger-{self.index}")
        yield Input(self.image.prompt, placeholder="prompt", compact=True, classes="prompt-text",
                    id=f"prompt-{self.index}")
        yield Static("", classes="prompt-mark")

    def on_mount(self) -> None:
        self.refresh_mark()

    @property
    def trigger_input(self) -> Input:
        return self.query_one(".prompt-trigger", Input)

    @property
    def prompt_input(self) -> Input:
        return self.query_one(".prompt-text", Input)

    def on_input_changed(self, event: Input.Changed) -> None:
        event.stop()
        if event.input is self.trigger_input:
            self._change_trigger(event.value.strip())
        else:
            self.image.prompt = event.value
        self.refresh_mark()

    def _change_trigger(self, trigger: str) -> None:
        old_trigger, self.image.trigger = self.image.trigger, trigger
        # a prompt the user never edited follows its trigger word
        class_noun = self.app.state.class_noun
        if self.image.prompt == default_prompt(old_trigger, class_noun):
            self.set_prompt(default_prompt(trigger, class_noun))

    def set_prompt(self, prompt: str) -> None:
        """Change the prompt from outside (the class noun changed); not reported back as an edit."""
        self.image.prompt = prompt
        with self.prompt_input.prevent(Input.Changed):
            self.prompt_input.value = prompt
        self.refresh_mark()

    def set_trigger(self, trigger: str) -> None:
        """Follow the screen's trigger word; the prompt follows too unless it was edited."""
        self._change_trigger(trigger)
        with self.trigger_input.prevent(Input.Changed):
            self.trigger_input.value = trigger
        self.refresh_mark()

    def problem(self) -> str | None:
        if not self.image.trigger:
            return f"{self.image.path.name}: the trigger word is empty"
        if not self.image.prompt.strip():
            return f"{self.image.path.name}: the prompt is empty"
        return None

    def lacks_trigger(self) -> bool:
        from engine.config import prompt_tokens

        trigger = self.image.trigger.lower()
        return bool(trigger) and trigger not in prompt_tokens(self.image.prompt)

    def refresh_mark(self) -> None:
        mark = self.query_one(".prompt-mark", Static)
        if self.problem():
            mark.update("✗")
            mark.tooltip = self.problem()
        elif self.lacks_trigger():
            mark.update("⚠")
            mark.tooltip = f"the prompt does not contain {self.image.trigger!r}"
        else:
            mark.update("✓")
            mark.tooltip = None
        mark.set_class(bool(self.problem()), "bad")
        mark.set_class(not self.problem() and self.lacks_trigger(), "doubtful")
