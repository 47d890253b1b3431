"""The four templates: they load as plain mflux configs, validate, and say what the guide says."""
import json

import pytest

from engine.config import (
    TEMPLATE_DESCRIPTIONS,
    TEMPLATES_DIR,
    ConfigError,
    config_to_dict,
    infer_trigger,
    list_templates,
    load_config,
    load_template,
    lora_targets,
    validate,
)

NAMES = ["object", "people", "pets", "style"]
GUIDE_SINGLE_TYPES = ["proj_out", "proj_mlp", "attn.to_q", "attn.to_k", "attn.to_v"]


def test_list_templates():
    assert list_templates() == NAMES
    assert sorted(TEMPLATE_DESCRIPTIONS) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_template_loads_and_validates_without_errors(name):
    cfg = load_config(TEMPLATES_DIR / f"{name}.json")  # as a user's file, through the same door
    warnings = validate(cfg)
    # only the guide's style example is short of images; nothing else may be doubtful
    assert all(w.startswith("examples.images: only") for w in warnings), warnings
    assert lora_targets(cfg)
    assert cfg.model == "dev" and (cfg.width, cfg.height) == (512, 512)
    assert cfg.examples.path == "images/" and cfg.examples.images
    assert infer_trigger(cfg.prompts) == "sks"


@pytest.mark.parametrize("name", NAMES)
def test_template_round_trips_to_the_same_json(name):
    path = TEMPLATES_DIR / f"{name}.json"
    assert config_to_dict(load_config(path)) == json.loads(path.read_text())


def test_pets_is_the_guides_pet_config():
    cfg = load_template("pets")
    spec = cfg.lora_layers.single_transformer_blocks
    assert cfg.lora_layers.transformer_blocks is None
    assert (spec.block_range.start, spec.block_range.end, spec.lora_rank) == (0, 38, 4)
    assert spec.layer_types == GUIDE_SINGLE_TYPES
    assert (cfg.quantize, cfg.optimizer.learning_rate, cfg.training_loop.num_epochs) == (4, 1e-4, 100)
    assert len(lora_targets(cfg)) == 38 * 5


def test_people_is_the_guides_people_config():
    cfg = load_template("people")
    spec = cfg.lora_layers.single_transformer_blocks
    assert (spec.block_range.start, spec.block_range.end, spec.lora_rank) == (10, 38, 8)
    assert spec.layer_types == GUIDE_SINGLE_TYPES
    assert (cfg.optimizer.learning_rate, cfg.training_loop.num_epochs) == (5e-5, 150)
    assert cfg.instrumentation.validation_prompt == "portrait of sks person"


def test_style_is_the_guides_style_config():
    cfg = load_template("style")
    joint, single = cfg.lora_layers.transformer_blocks, cfg.lora_layers.single_transformer_blocks
    assert (joint.block_range.start, joint.block_range.end, joint.lora_rank) == (5, 15, 16)
    assert joint.layer_types == ["attn.to_q", "attn.to_k", "attn.to_v"]
    assert (single.block_range.start, single.block_range.end, single.lora_rank) == (20, 38, 8)
    assert single.layer_types == ["proj_out", "proj_mlp"]
    ranks = dict(lora_targets(cfg))
    assert ranks["transformer_blocks.5.attn.to_q"] == 16 and "transformer_blocks.15.attn.to_q" not in ranks
    assert ranks["single_transformer_blocks.37.proj_mlp"] == 8


def test_object_trains_more_than_pets():
    pets, obj = load_template("pets"), load_template("object")
    assert obj.lora_layers.single_transformer_blocks.lora_rank > pets.lora_layers.single_transformer_blocks.lora_rank
    assert len(lora_targets(obj)) > len(lora_targets(pets))


def test_template_images_resolve_against_the_chosen_folder(tmp_path):
    cfg = load_template("pets", base_dir=tmp_path)
    assert cfg.examples_dir == tmp_path.resolve() / "images"


def test_unknown_template_lists_the_choices():
    with pytest.raises(ConfigError) as caught:
        load_template("cars")
    assert "pets" in caught.value.problems[0] and "style" in caught.value.problems[0]
