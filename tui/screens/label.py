"""Label: the trigger word, the class noun and one prompt per photo."""
from __future__ import annotations

import logging

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Input, Label, Static

from tui.screens.step import StepScreen
from tui.screens.trigger_advice import piece_warning, trigger_problems, trigger_warnings
from tui.widgets.prompt_row import PromptRow, default_prompt

log = logging.getLogger(__name__)


class TriggerAdvice(Message):
    def __init__(self, word: str, warning: str | None) -> None:
        self.word = word
        self.warning = warning
        super().__init__()


class LabelScreen(StepScreen):
    STEP = "label"
    BACK = "images"
    NEXT = "template"
    TITLE = "Label"
    CSS_PATH = "label.tcss"
    HELP = """\
The **trigger word** is a made-up word that will mean *your* subject: after training,
"photo of sks dog on a beach" shows your dog. Keep it short and meaningless (sks, ohwx is
long for some tokenizers); a real word such as *dog* or *max* already means something.

The **class noun** says what kind of thing the subject is (dog, cat, person, toy, style): the
model already knows the class and learns how *yours* differs.

Each photo gets a **prompt**, filled in as "photo of sks dog". Describe what is in a photo
besides the subject ("photo of sks dog on a red sofa") so the sofa is not learnt as part of the
dog. To teach **several subjects** in one run, give their photos different trigger words
in the small box before each prompt.

**Tab** moves between the boxes, **Ctrl+N** goes on to the template, **Esc** back.
"""

    def compose_body(self) -> ComposeResult:
        with VerticalScroll(id="label-main"):
            with Horizontal(id="subject"):
                with Vertical(classes="subject-field"):
                    yield Label("Trigger word", classes="section-title")
                    yield Input(self.app.state.trigger, id="trigger", compact=True)
                with Vertical(classes="subject-field"):
                    yield Label("Class noun", classes="section-title")
                    yield Input(self.app.state.class_noun, id="class-noun", compact=True,
                                placeholder="dog, cat, person, toy, style…")
            yield Static("", id="trigger-advice", classes="inline-warning")
            yield Label("Prompts, one per photo (trigger word, then the prompt)", classes="section-title")
            for index, image in enumerate(self.app.state.usable_images):
                yield PromptRow(image, index)
            if not self.app.state.usable_images:
                yield Static("No usable photos: go back (Esc) and add some.", classes="inline-error")

    def on_mount(self) -> None:
        for image in self.app.state.usable_images:
            if not image.trigger:
                image.trigger = self.app.state.trigger
            if not image.prompt:
                image.prompt = default_prompt(image.trigger, self.app.state.class_noun)
        for row in self.query(PromptRow):
            row.prompt_input.value = row.image.prompt
            row.trigger_input.value = row.image.trigger
        self.query_one("#trigger", Input).focus()
        self.advise(self.app.state.trigger)

    @on(Input.Changed, "#trigger")
    def _trigger_changed(self, event: Input.Changed) -> None:
        state = self.app.state
        old, state.trigger = state.trigger, event.value.strip()
        for row in self.query(PromptRow):
            if row.image.trigger == old:  # photos with a trigger of their own keep it
                row.set_trigger(state.trigger)
        self.advise(state.trigger)

    @on(Input.Changed, "#class-noun")
    def _class_noun_changed(self, event: Input.Changed) -> None:
        state = self.app.state
        old, state.class_noun = state.class_noun, event.value.strip()
        for row in self.query(PromptRow):
            if row.image.prompt == default_prompt(row.image.trigger, old):
                row.set_prompt(default_prompt(row.image.trigger, state.class_noun))
        self.advise(state.trigger)

    def advise(self, word: str) -> None:
        """Quick advice now; the tokenizer's opinion comes from a worker."""
        lines = trigger_problems(word) or trigger_warnings(word, self.app.state.class_noun)
        self.query_one("#trigger-advice", Static).update("\n".join(f"⚠ {line}" for line in lines))
        if not lines:
            self.ask_tokenizer(word, self.app.state.model)

    @work(thread=True, exclusive=True, exit_on_error=False, group="tokenizer")
    def ask_tokenizer(self, word: str, model: str) -> None:
        self.post_message(TriggerAdvice(word, piece_warning(word, model)))

    def on_trigger_advice(self, message: TriggerAdvice) -> None:
        if message.word == self.app.state.trigger and message.warning:
            self.query_one("#trigger-advice", Static).update(f"⚠ {message.warning}")

    def problems(self) -> list[str]:
        state = self.app.state
        if not state.usable_images:
            return ["No usable photos: go back to the Images step (Esc) and add some."]
        problems = list(trigger_problems(state.trigger))
        for row in self.query(PromptRow):
            problem = row.problem()
            if problem is None and len(row.image.trigger.split()) > 1:
                problem = f"{row.image.path.name}: the trigger {row.image.trigger!r} must be one word"
            if problem:
                problems.append(problem)
        return problems

    def commit(self) -> None:
        log.info("labels: trigger %s, class %s, %d prompts", self.app.state.trigger, self.app.state.class_noun,
                 len(self.app.state.usable_images))
