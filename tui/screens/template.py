"""Template: a starting point for pets, people, a style or an object, each value explained and editable."""
from __future__ import annotations

import copy
import logging

from textual import on
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import Label, RadioButton, RadioSet, Static

from engine.config import (TEMPLATE_DESCRIPTIONS, BlockRange, LoraBlockSpec, TrainingConfig,
                           config_to_dict, help_text, list_templates, parse_config)
from engine.errors import ConfigError
from tui.screens.config_builder import build_config, images_folder, model_block_counts, template_config
from tui.screens.step import StepScreen, training_size
from tui.widgets import config_field as fields
from tui.widgets.choice_row import ChoiceRow
from tui.widgets.config_field import ConfigField, ToggleField

log = logging.getLogger(__name__)

# layers a block kind gets when the template had none of these blocks and the user adds some
DEFAULT_JOINT_LAYERS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"]
DEFAULT_SINGLE_LAYERS = ["proj_out", "proj_mlp", "attn.to_q", "attn.to_k", "attn.to_v"]
BLOCK_KINDS = (("joint", "transformer_blocks", DEFAULT_JOINT_LAYERS),
               ("single", "single_transformer_blocks", DEFAULT_SINGLE_LAYERS))


class TemplateScreen(StepScreen):
    STEP = "template"
    BACK = "label"
    NEXT = "memory"
    TITLE = "Template"
    CSS_PATH = "template.tcss"
    HELP = """\
A **template** is a tested starting point; each value has a one-line explanation under it.

- **pets**: light LoRA over all single blocks. **people**: later blocks, gentler learning rate.
- **style**: joint and single blocks, higher rank. **object**: all single blocks, rank 8.

**Epochs**: more epochs learn more but overfit (every picture looks like the training photos);
watch the previews and pick the best checkpoint at the end. **Rank**: the LoRA's size.
**Quantize**: 4 bits shrinks the frozen model most, 8 is closer to full quality, none uses most
memory. **Blocks**: which transformer blocks learn (from-to, the end not included, e.g. 0-38;
or a list 0,1,7; empty for none). **Resolution**: 512 is usual; larger is slower and needs more memory.

**Up/Down or Tab** move between values; the template row takes **arrows and Enter**.
**Ctrl+N** checks everything and goes on to the memory estimate, **Esc** back.
"""

    def compose_body(self) -> ComposeResult:
        joint, single = model_block_counts(self.app.state.model)
        with VerticalScroll(id="template-main"):
            yield Label("Template", classes="section-title")
            with ChoiceRow(id="template-choice"):
                for name in list_templates():
                    yield RadioButton(name, value=name == self.app.state.template, name=name)
            yield Static("", id="template-about", classes="hint")
            yield ConfigField("Epochs", "", help_text("training_loop.num_epochs"),
                              fields.whole_number(1, 10000, "epochs"), id="epochs")
            yield ConfigField("Learning rate", "", help_text("optimizer.learning_rate"), fields.learning_rate,
                              id="learning-rate")
            yield ConfigField("Batch size", "", help_text("training_loop.batch_size"),
                              fields.whole_number(1, 64, "the batch size"), id="batch-size")
            yield ConfigField("Quantize", "", help_text("quantize"), fields.quantize_bits, id="quantize")
            yield ConfigField("Resolution", "", "Training size: 512 (square) or width x height such as 768x512; "
                              "multiples of 16.", fields.resolution, id="resolution")
            yield ConfigField("Joint blocks", "", f"{help_text('lora_layers.transformer_blocks')} "
                              f"This model: 0-{joint}; empty for none.", fields.block_range(joint), id="joint-blocks")
            yield ConfigField("Joint rank", "", help_text("lora_layers.transformer_blocks.lora_rank"),
                              fields.whole_number(1, 256, "the rank"), id="joint-rank")
            yield ConfigField("Single blocks", "", f"{help_text('lora_layers.single_transformer_blocks')} "
                              f"This model: 0-{single}; empty for none.", fields.block_range(single),
                              id="single-blocks")
            yield ConfigField("Single rank", "", help_text("lora_layers.single_transformer_blocks.lora_rank"),
                              fields.whole_number(1, 256, "the rank"), id="single-rank")
            yield ToggleField("Gradient checkpointing", False, help_text("gradient_checkpointing"),
                              id="gradient-checkpointing")
            yield Static("", id="template-warnings", classes="inline-warning")

    def on_mount(self) -> None:
        self.show_config(self.current_config())
        self.query_one("#template-choice", ChoiceRow).focus()

    def current_config(self) -> TrainingConfig:
        """The values edited earlier if they belong to this model and template, else the template's."""
        state = self.app.state
        if state.config and state.config.get("model") == state.model:
            joint, single = model_block_counts(state.model)
            try:
                return parse_config(self._with_examples(state.config), images_folder(state),
                                    num_joint_blocks=joint, num_single_blocks=single)
            except ConfigError as error:
                log.info("edited config no longer valid, template reloaded: %s", error)
        return template_config(state.template, state.model)

    def _with_examples(self, data: dict) -> dict:
        # parse_config wants at least one example; the real ones are added by build_config
        return dict(data, examples=data.get("examples") or {"path": ".", "images": [{"image": "x", "prompt": "x"}]})

    def show_config(self, cfg: TrainingConfig) -> None:
        self.config = cfg
        self.query_one("#template-about", Static).update(TEMPLATE_DESCRIPTIONS.get(self.app.state.template, ""))
        texts = {
            "epochs": str(cfg.training_loop.num_epochs),
            "learning-rate": f"{cfg.optimizer.learning_rate:g}",
            "batch-size": str(cfg.training_loop.batch_size),
            "quantize": "none" if cfg.quantize is None else str(cfg.quantize),
            "resolution": str(cfg.width) if cfg.width == cfg.height else f"{cfg.width}x{cfg.height}",
        }
        for label, kind, _ in BLOCK_KINDS:
            spec = getattr(cfg.lora_layers, kind)
            texts[f"{label}-blocks"] = fields.block_range_text(spec)
            texts[f"{label}-rank"] = str(spec.lora_rank if spec is not None else 4)
        for field_id, text in texts.items():
            self.query_one(f"#{field_id}", ConfigField).set_text(text)
        self.query_one("#gradient-checkpointing", ToggleField).set_value(bool(cfg.gradient_checkpointing))

    @on(RadioSet.Changed, "#template-choice")
    def _template_changed(self, event: RadioSet.Changed) -> None:
        name = event.pressed.name
        if name and name != self.app.state.template:
            self.app.state.template = name
            log.info("template %s", name)
            self.show_config(template_config(name, self.app.state.model))

    # ---------------------------------------------------------------- reading the fields

    def edited_config(self) -> tuple[TrainingConfig | None, list[str]]:
        """The template with the typed values, or the problems of the fields."""
        values, problems = {}, []
        for field in self.query(".config-field"):
            value, problem = field.parsed()
            if problem:
                problems.append(f"{field.label}: {problem}")
            values[field.id] = value
        if problems:
            return None, problems
        cfg = copy.deepcopy(self.config)
        cfg.training_loop.num_epochs = values["epochs"]
        cfg.training_loop.batch_size = values["batch-size"]
        cfg.optimizer.learning_rate = values["learning-rate"]
        cfg.quantize = values["quantize"]
        cfg.width, cfg.height = values["resolution"]
        cfg.gradient_checkpointing = values["gradient-checkpointing"]
        for label, kind, default_layers in BLOCK_KINDS:
            blocks, rank = values[f"{label}-blocks"], values[f"{label}-rank"]
            spec = getattr(cfg.lora_layers, kind)
            if blocks is None:
                setattr(cfg.lora_layers, kind, None)
                continue
            if spec is None:
                spec = LoraBlockSpec(BlockRange(), list(default_layers), rank)
                setattr(cfg.lora_layers, kind, spec)
            spec.block_range = BlockRange(indices=blocks) if isinstance(blocks, list) else BlockRange(*blocks)
            spec.lora_rank = rank
        if cfg.lora_layers.transformer_blocks is None and cfg.lora_layers.single_transformer_blocks is None:
            return None, ["No blocks to train: give joint or single blocks, e.g. single blocks 0-38."]
        return cfg, []

    def problems(self) -> list[str]:
        cfg, problems = self.edited_config()
        if cfg is None:
            return problems
        from engine.config import validate

        state = self.app.state
        trial = copy.copy(state)  # the state is only changed by commit()
        trial.config = self._as_state_dict(cfg)
        try:
            joint, single = model_block_counts(state.model)
            warnings = validate(build_config(trial), joint, single, trigger=state.trigger)
        except ConfigError as error:
            return list(error.problems)
        self.query_one("#template-warnings", Static).update("\n".join(f"⚠ {w}" for w in warnings))
        return []

    def _as_state_dict(self, cfg: TrainingConfig) -> dict:
        return config_to_dict(cfg, absolute_paths=True)

    def commit(self) -> None:
        cfg, problems = self.edited_config()
        if cfg is None:  # going back with a typo keeps the earlier values
            return
        state = self.app.state
        old_size = training_size(state)
        state.config = self._as_state_dict(cfg)
        if training_size(state) != old_size:
            from tui.screens.images import refit_crops

            refit_crops(state.usable_images, *training_size(state))
        log.info("template %s committed", state.template)
