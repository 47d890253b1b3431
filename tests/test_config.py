"""The training config: every validation rule, messages that name the key and the fix, round trips."""
import copy
import dataclasses
import json
import typing
from pathlib import Path

import pytest

from engine import config as config_module
from engine.config import (
    ConfigError,
    TrainingConfig,
    canonical_optimizer,
    config_to_dict,
    help_text,
    infer_trigger,
    load_config,
    lora_targets,
    model_source,
    parse_config,
    save_config,
    validate,
)
from engine.errors import UserError

VALID = {
    "model": "dev",
    "seed": 42,
    "steps": 20,
    "guidance": 3.0,
    "quantize": 4,
    "width": 512,
    "height": 512,
    "training_loop": {"num_epochs": 100, "batch_size": 1},
    "optimizer": {"name": "AdamW", "learning_rate": 1e-4},
    "save": {"output_path": "~/Desktop/train", "checkpoint_frequency": 10},
    "instrumentation": {"plot_frequency": 1, "generate_image_frequency": 25, "validation_prompt": "photo of sks dog"},
    "lora_layers": {
        "single_transformer_blocks": {
            "block_range": {"start": 0, "end": 38},
            "layer_types": ["proj_out", "proj_mlp", "attn.to_q", "attn.to_k", "attn.to_v"],
            "lora_rank": 4,
        }
    },
    "examples": {
        "path": "images/",
        "images": [{"image": f"0{i}.jpeg", "prompt": "photo of sks dog"} for i in range(1, 6)],
    },
}


def make(**changes) -> dict:
    """A copy of VALID with dotted keys replaced ("optimizer.name": "x"); a value of DELETE removes the key."""
    data = copy.deepcopy(VALID)
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = data
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if value is DELETE:
            del node[int(last) if isinstance(node, list) else last]
        else:
            node[int(last) if isinstance(node, list) else last] = value
    return data


DELETE = object()
SINGLE = "lora_layers__single_transformer_blocks"


def problems_of(data, base_dir="/tmp", **kwargs) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, base_dir, **kwargs)
    return caught.value.problems


def only_problem(data, **kwargs) -> str:
    problems = problems_of(data, **kwargs)
    assert len(problems) == 1, problems
    return problems[0]


# ---------------------------------------------------------------- loading


def test_valid_config_parses_every_field(tmp_path):
    cfg = parse_config(VALID, tmp_path)
    assert (cfg.model, cfg.seed, cfg.steps, cfg.guidance, cfg.quantize) == ("dev", 42, 20, 3.0, 4)
    assert cfg.training_loop.num_epochs == 100 and cfg.optimizer.learning_rate == 1e-4
    assert cfg.instrumentation.validation_prompt == "photo of sks dog"
    spec = cfg.lora_layers.single_transformer_blocks
    assert spec.block_range.blocks() == list(range(38)) and spec.lora_rank == 4
    assert cfg.lora_layers.transformer_blocks is None
    assert cfg.examples_dir == tmp_path.resolve() / "images"
    assert cfg.image_paths[0] == tmp_path.resolve() / "images" / "01.jpeg"
    assert cfg.output_dir == Path("~/Desktop/train").expanduser()


def test_load_config_resolves_examples_relative_to_the_config_file(tmp_path, monkeypatch):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "train.json").write_text(json.dumps(make(save__output_path="out")))
    monkeypatch.chdir(tmp_path)  # the working directory must not matter
    cfg = load_config(folder / "train.json")
    assert cfg.examples_dir == folder.resolve() / "images"
    assert cfg.output_dir == folder.resolve() / "out"


def test_absolute_examples_path_is_kept(tmp_path):
    cfg = parse_config(make(examples__path=str(tmp_path / "photos")), "/somewhere/else")
    assert cfg.examples_dir == tmp_path / "photos"


def test_malformed_json_names_line_and_column(tmp_path):
    path = tmp_path / "train.json"
    text = json.dumps(VALID, indent=2).replace('"seed": 42,', '"seed": 42,,')
    path.write_text(text)
    line = next(i for i, row in enumerate(text.splitlines(), 1) if '"seed"' in row)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    (problem,) = caught.value.problems
    assert f"line {line}, column" in problem and "not valid JSON" in problem
    assert str(path) in str(caught.value)


def test_trailing_comma_gets_a_hint(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('{"model": "dev",}')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "comma before }" in caught.value.problems[0]


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "nope.json")
    assert "not found" in caught.value.problems[0]
    assert isinstance(caught.value, UserError)


@pytest.mark.parametrize("text", ["", "\n  \n"])
def test_an_empty_file_is_called_empty_not_bad_json(tmp_path, text):
    path = tmp_path / "train.json"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    (problem,) = caught.value.problems
    assert "empty" in problem and "comma" not in problem and "templates" in problem


def test_a_byte_order_mark_is_accepted(tmp_path):
    # Windows Notepad saves UTF-8 with a BOM
    path = tmp_path / "train.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(VALID).encode())
    assert load_config(path).seed == 42


def test_top_level_must_be_an_object():
    assert "must be an object" in only_problem([1, 2])


# ---------------------------------------------------------------- missing keys and wrong types


@pytest.mark.parametrize(
    "delete, path, fix",
    [
        ("model", "model", '"model": "dev"'),
        ("seed", "seed", '"seed": 42'),
        ("width", "width", '"width": 512'),
        ("training_loop__num_epochs", "training_loop.num_epochs", '"num_epochs": 100'),
        ("optimizer__learning_rate", "optimizer.learning_rate", '"learning_rate"'),
        ("save__output_path", "save.output_path", '"output_path"'),
        ("instrumentation__validation_prompt", "instrumentation.validation_prompt", '"validation_prompt"'),
        (f"{SINGLE}__lora_rank", "lora_layers.single_transformer_blocks.lora_rank", '"lora_rank"'),
        (f"{SINGLE}__block_range", "lora_layers.single_transformer_blocks.block_range", '"block_range"'),
        (f"{SINGLE}__block_range__end", "lora_layers.single_transformer_blocks.block_range.end", '"end": 38'),
        ("examples__images__2__prompt", "examples.images[2].prompt", '"prompt"'),
        ("examples__images__0__image", "examples.images[0].image", '"image"'),
        ("examples__path", "examples.path", '"path"'),
        ("examples", "examples", '"examples"'),
        ("lora_layers", "lora_layers", '"lora_layers"'),
    ],
)
def test_missing_required_key_names_path_and_fix(delete, path, fix):
    problem = only_problem(make(**{delete: DELETE}))
    assert problem.startswith(f"{path}: missing")
    assert fix in problem


def test_missing_quantize_means_no_quantization():
    assert parse_config(make(quantize=DELETE)).quantize is None
    assert parse_config(make(quantize=None)).quantize is None


def test_instrumentation_is_optional():
    assert parse_config(make(instrumentation=DELETE)).instrumentation is None


@pytest.mark.parametrize(
    "key, value, path, words",
    [
        ("seed", "abc", 'seed = "abc"', "whole number"),
        ("seed", "42", 'seed = "42"', "remove the quotes"),
        ("seed", True, "seed = true", "not true/false"),
        ("steps", 2.5, "steps = 2.5", "whole number"),
        ("guidance", "high", 'guidance = "high"', "must be a number"),
        ("model", 3, "model = 3", "text in quotes"),
        ("quantize", "4", 'quantize = "4"', "remove the quotes"),
        ("gradient_checkpointing", "yes", 'gradient_checkpointing = "yes"', "true or false"),
        ("training_loop", [1], "training_loop = [1]", "must be an object"),
        ("optimizer__learning_rate", "1e-4", 'optimizer.learning_rate = "1e-4"', "remove the quotes"),
        (f"{SINGLE}__layer_types", "attn.to_q", 'single_transformer_blocks.layer_types = "attn.to_q"', "list"),
        (f"{SINGLE}__layer_types", ["attn.to_q", 7], "layer_types[1] = 7", "in quotes"),
        (f"{SINGLE}__block_range__start", "0", 'block_range.start = "0"', "remove the quotes"),
        ("examples__images", {"a": 1}, "examples.images = ", "list"),
        ("examples__images__1", "01.jpg", 'examples.images[1] = "01.jpg"', "must be an object"),
    ],
)
def test_wrong_type_names_path_value_and_fix(key, value, path, words):
    problem = only_problem(make(**{key: value}))
    assert path in problem and words in problem


def test_whole_floats_are_accepted_as_ints():
    assert parse_config(make(width=512.0)).width == 512


# ---------------------------------------------------------------- values


@pytest.mark.parametrize(
    "key, value, path",
    [
        ("save__checkpoint_frequency", 0, "save.checkpoint_frequency = 0"),
        ("save__checkpoint_frequency", -5, "save.checkpoint_frequency = -5"),
        ("instrumentation__plot_frequency", 0, "instrumentation.plot_frequency = 0"),
        ("instrumentation__generate_image_frequency", -1, "instrumentation.generate_image_frequency = -1"),
        ("training_loop__num_epochs", 0, "training_loop.num_epochs = 0"),
        ("training_loop__batch_size", 0, "training_loop.batch_size = 0"),
        ("steps", 0, "steps = 0"),
        (f"{SINGLE}__lora_rank", 0, "lora_layers.single_transformer_blocks.lora_rank = 0"),
    ],
)
def test_counts_below_one_are_rejected(key, value, path):
    problem = only_problem(make(**{key: value}))
    assert problem.startswith(path) and "at least 1" in problem


@pytest.mark.parametrize("rate, words", [(0, "above 0"), (-1e-4, "above 0"), (float("nan"), "must be a number")])
def test_learning_rate_must_be_positive(rate, words):
    problem = only_problem(make(optimizer__learning_rate=rate))
    assert problem.startswith("optimizer.learning_rate") and words in problem


def test_size_must_be_a_multiple_of_16():
    assert only_problem(make(width=500)) == "width = 500: must be a multiple of 16, use 496 or 512"
    assert "at least 16" in only_problem(make(height=0))


@pytest.mark.parametrize("bits", [1, 2, 7, 16])
def test_quantize_bits_must_be_supported(bits):
    problem = only_problem(make(quantize=bits))
    assert problem.startswith(f"quantize = {bits}") and "null" in problem and "3, 4, 5, 6, 8" in problem


@pytest.mark.parametrize("bits", [3, 4, 5, 6, 8])
def test_supported_quantize_bits_pass(bits):
    assert parse_config(make(quantize=bits)).quantize == bits


def test_negative_seed_and_guidance_are_rejected():
    assert only_problem(make(seed=-1)).startswith("seed = -1")
    assert only_problem(make(guidance=-2)).startswith("guidance = -2")


@pytest.mark.parametrize("seed", [2**64, 2**70, 1e30])
def test_a_seed_of_2_to_the_64_or_more_is_rejected(seed):
    # MLX's random key takes 64 bits: a larger seed passed the check and crashed training
    problem = only_problem(make(seed=seed))
    assert problem.startswith("seed = ") and str(2**64 - 1) in problem and "e.g. 42" in problem


def test_the_largest_64_bit_seed_is_accepted():
    assert parse_config(make(seed=2**64 - 1)).seed == 2**64 - 1


def test_estimate_refuses_a_huge_seed_with_exit_2(tmp_path, capsys):
    from tui.cli import main

    path = tmp_path / "train.json"
    path.write_text(json.dumps(make(seed=2**64)))
    assert main(["estimate", "--train-config", str(path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "seed = 18446744073709551616" in error and "Traceback" not in error


def test_single_block_range_beyond_38_gives_the_exact_fix():
    problem = only_problem(make(**{f"{SINGLE}__block_range__end": 40}))
    assert problem == (
        "lora_layers.single_transformer_blocks.block_range.end = 40: FLUX.1 has 38 single blocks, use at most 38"
    )


def test_joint_block_range_beyond_19_is_rejected():
    data = make(lora_layers={"transformer_blocks": {"block_range": {"start": 0, "end": 20},
                                                    "layer_types": ["attn.to_q"], "lora_rank": 4}})
    assert only_problem(data) == (
        "lora_layers.transformer_blocks.block_range.end = 20: FLUX.1 has 19 joint blocks, use at most 19"
    )


def test_negative_block_start_is_rejected():
    problem = only_problem(make(**{f"{SINGLE}__block_range__start": -1}))
    assert problem.startswith("lora_layers.single_transformer_blocks.block_range.start = -1")


@pytest.mark.parametrize("start, end", [(10, 10), (20, 5)])
def test_block_range_start_must_be_below_end(start, end):
    data = make(**{f"{SINGLE}__block_range": {"start": start, "end": end}})
    problem = only_problem(data)
    assert problem.startswith("lora_layers.single_transformer_blocks.block_range = ")
    assert "end is exclusive" in problem


def test_indices_inside_block_range_as_mflux_writes_them():
    cfg = parse_config(make(**{f"{SINGLE}__block_range": {"indices": [0, 1, 7, 19, 20]}}))
    assert cfg.lora_layers.single_transformer_blocks.block_range.blocks() == [0, 1, 7, 19, 20]


def test_bare_indices_next_to_layer_types_are_accepted_and_written_mflux_style():
    data = make()
    block = data["lora_layers"]["single_transformer_blocks"]
    del block["block_range"]
    block["indices"] = [2, 3]
    cfg = parse_config(data)
    assert cfg.lora_layers.single_transformer_blocks.block_range.blocks() == [2, 3]
    written = config_to_dict(cfg)["lora_layers"]["single_transformer_blocks"]
    assert written["block_range"] == {"indices": [2, 3]} and "indices" not in written


def test_indices_out_of_range_are_rejected():
    problems = problems_of(make(**{f"{SINGLE}__block_range": {"indices": [0, 38, -1]}}))
    assert problems == [
        "lora_layers.single_transformer_blocks.block_range.indices[1] = 38: FLUX.1 has 38 single blocks, "
        "numbered from 0, use 0 to 37",
        "lora_layers.single_transformer_blocks.block_range.indices[2] = -1: FLUX.1 has 38 single blocks, "
        "numbered from 0, use 0 to 37",
    ]


def test_empty_indices_and_mixed_forms_are_rejected():
    assert "non-empty list" in only_problem(make(**{f"{SINGLE}__block_range": {"indices": []}}))
    problem = only_problem(make(**{f"{SINGLE}__block_range": {"start": 0, "end": 3, "indices": [1]}}))
    assert "keep one" in problem


def test_block_limits_come_from_the_model():
    data = make()
    cfg = parse_config(data, num_single_blocks=None)  # size unknown yet: no upper check
    with pytest.raises(ConfigError) as caught:
        validate(cfg, num_joint_blocks=2, num_single_blocks=4)
    assert caught.value.problems == [
        "lora_layers.single_transformer_blocks.block_range.end = 38: this model has 4 single blocks, use at most 4"
    ]
    small = make(**{f"{SINGLE}__block_range__end": 4})
    assert validate(parse_config(small), num_joint_blocks=2, num_single_blocks=4) is not None


def test_unknown_layer_type_suggests_the_nearest_name():
    problem = only_problem(make(**{f"{SINGLE}__layer_types": ["proj_out", "attn.to_qq"]}))
    assert problem.startswith('lora_layers.single_transformer_blocks.layer_types[1] = "attn.to_qq"')
    assert 'did you mean "attn.to_q"' in problem


def test_layer_type_of_the_other_block_kind_says_where_it_belongs():
    data = make(lora_layers={"transformer_blocks": {"block_range": {"start": 0, "end": 19},
                                                    "layer_types": ["proj_mlp"], "lora_rank": 4}})
    problem = only_problem(data)
    assert problem.startswith('lora_layers.transformer_blocks.layer_types[0] = "proj_mlp"')
    assert "only single_transformer_blocks" in problem


def test_empty_layer_types_and_empty_lora_layers_are_rejected():
    assert "at least one layer" in only_problem(make(**{f"{SINGLE}__layer_types": []}))
    problem = only_problem(make(lora_layers={}))
    assert problem.startswith("lora_layers = {}") and "single_transformer_blocks" in problem


def test_unknown_optimizer_suggests_the_nearest():
    problem = only_problem(make(optimizer__name="adamx"))
    assert problem.startswith('optimizer.name = "adamx"') and 'did you mean "Adamax"' in problem
    assert "AdamW" in problem and "Lion" in problem


@pytest.mark.parametrize("written, canonical", [("adamw", "AdamW"), ("ADAM", "Adam"), ("sgd", "SGD"),
                                                ("rmsprop", "RMSprop"), ("lion", "Lion"), ("muon", "Muon")])
def test_optimizer_names_are_case_insensitive_and_canonicalised(written, canonical):
    assert parse_config(make(optimizer__name=written)).optimizer.name == canonical
    assert canonical_optimizer(written) == canonical


def test_every_listed_optimizer_exists_in_mlx():
    import mlx.optimizers

    for name in config_module.OPTIMIZERS:
        assert hasattr(mlx.optimizers, name), name


def test_empty_images_and_blank_prompts_are_rejected():
    problem = only_problem(make(examples__images=[]))
    assert problem.startswith("examples.images = []") and '"prompt"' in problem
    assert only_problem(make(examples__images__3__prompt="  ")).startswith('examples.images[3].prompt = "  "')
    assert only_problem(make(examples__images__3__image="")).startswith('examples.images[3].image = ""')


def test_unknown_model_is_rejected_with_the_choices():
    problem = only_problem(make(model="flux"))
    assert problem.startswith('model = "flux"') and '"schnell"' in problem and '"tiny"' in problem


def test_model_names(tmp_path):
    (tmp_path / "weights").mkdir()
    assert model_source("dev") == ("hub", "black-forest-labs/FLUX.1-dev")
    assert model_source("schnell") == ("hub", "black-forest-labs/FLUX.1-schnell")
    assert model_source("tiny") == ("tiny", "tiny")
    assert model_source("someone/flux-finetune") == ("hub", "someone/flux-finetune")
    assert model_source("weights", tmp_path) == ("local", str(tmp_path / "weights"))
    for model in ("dev", "tiny", "someone/flux-finetune", str(tmp_path / "weights")):
        assert parse_config(make(model=model)).model == model


def test_config_error_lists_every_problem_at_once():
    data = make(seed="abc", width=500, optimizer__name="adamx", save__checkpoint_frequency=0,
                **{f"{SINGLE}__block_range__end": 40, f"{SINGLE}__layer_types": ["attn.to_qq"],
                   "examples__images__1__prompt": DELETE})
    problems = problems_of(data)
    assert len(problems) == 7
    for path in ("seed", "width", "optimizer.name", "save.checkpoint_frequency", "block_range.end",
                 "layer_types[0]", "examples.images[1].prompt"):
        assert sum(path in p for p in problems) == 1, (path, problems)
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    assert str(caught.value).count("\n  - ") == 7  # one line each


def test_a_broken_section_is_reported_once():
    assert len(problems_of(make(**{f"{SINGLE}__block_range": "0-38"}))) == 1
    assert len(problems_of(make(**{SINGLE: "all"}))) == 1
    assert len(problems_of(make(examples="images/"))) == 1


# ---------------------------------------------------------------- warnings


def warnings_of(data, **kwargs) -> list[str]:
    return validate(parse_config(data), **kwargs)


def test_valid_config_has_no_warnings():
    assert warnings_of(VALID) == []


@pytest.mark.parametrize("rate, warned", [(1e-4, False), (1e-5, False), (1e-3, False), (5e-6, True), (1e-2, True)])
def test_learning_rate_outside_the_usual_range_warns(rate, warned):
    warnings = warnings_of(make(optimizer__learning_rate=rate))
    assert any(w.startswith("optimizer.learning_rate") for w in warnings) == warned


def test_rank_above_64_warns():
    warnings = warnings_of(make(**{f"{SINGLE}__lora_rank": 128}))
    assert any("lora_rank = 128" in w for w in warnings)
    assert warnings_of(make(**{f"{SINGLE}__lora_rank": 64})) == []


def test_unknown_keys_are_warned_about_everywhere():
    data = make(foo=1, optimizer__momentum=0.9, seeds=1)
    data["examples"]["images"][0]["caption"] = "x"
    warnings = warnings_of(data)
    assert 'unknown key "foo" ignored' in warnings
    assert 'unknown key "optimizer.momentum" ignored' in warnings
    assert any(w.startswith('unknown key "seeds" ignored (did you mean "seed"?)') for w in warnings)
    assert any('"examples.images[0].caption"' in w for w in warnings)


def test_a_misspelled_lora_section_is_an_error_not_a_warning():
    # "transformer_block" would silently train only the single blocks
    data = make(lora_layers={"transformer_block": {"block_range": {"start": 0, "end": 19}, "layer_types": ["attn.to_q"],
                                                   "lora_rank": 4},
                             "single_transformer_blocks": VALID["lora_layers"]["single_transformer_blocks"]})
    problem = only_problem(data)
    assert problem.startswith("lora_layers.transformer_block: ") and 'did you mean "transformer_blocks"?' in problem
    data = make(lora_layers={"single_transformer_block": VALID["lora_layers"]["single_transformer_blocks"]})
    assert 'did you mean "single_transformer_blocks"?' in only_problem(data)  # not also "lora_layers = {}"


def test_misspelled_keys_deeper_in_lora_layers_are_errors_reported_once():
    # indices next to start/end would be ignored: other blocks trained than asked for
    problem = only_problem(make(**{f"{SINGLE}__block_range__indice": [0, 1]}))
    assert problem.startswith(f"{SINGLE.replace('__', '.')}.block_range.indice: ") and '"indices"' in problem
    data = make(**{f"{SINGLE}__lora_rnak": 8})
    del data["lora_layers"]["single_transformer_blocks"]["lora_rank"]
    assert 'did you mean "lora_rank"?' in only_problem(data)  # not also "lora_rank: missing"


def test_keys_in_lora_layers_unlike_any_known_one_stay_warnings():
    warnings = warnings_of(make(lora_layers__notes="my first try", lora_layers__state_path=None))
    assert warnings == ['unknown key "lora_layers.notes" ignored']


def test_mflux_resume_keys_are_not_unknown():
    data = make(statistics={"state_path": None}, optimizer__state_path=None)
    data["training_loop"]["iterator_state_path"] = None
    assert warnings_of(data) == []


@pytest.mark.parametrize("count, warned", [(1, True), (4, True), (5, False), (30, False), (31, True)])
def test_image_count_outside_5_to_30_warns(count, warned):
    images = [{"image": f"{i}.jpg", "prompt": "photo of sks dog"} for i in range(count)]
    warnings = warnings_of(make(examples__images=images))
    assert any(w.startswith("examples.images:") for w in warnings) == warned


def test_prompt_without_the_trigger_word_warns():
    warnings = warnings_of(make(examples__images__2__prompt="photo of a dog"))
    assert warnings == ['examples.images[2].prompt = "photo of a dog": no trigger word "sks"; '
                        'add it, e.g. "photo of sks ..."']


def test_explicit_trigger_is_checked_in_every_prompt_and_the_validation_prompt():
    warnings = warnings_of(VALID, trigger="ohwx")
    assert len(warnings) == 6  # five prompts and the validation prompt
    assert warnings_of(VALID, trigger="SKS") == []


def test_validation_prompt_without_trigger_warns():
    warnings = warnings_of(make(instrumentation__validation_prompt="a dog on a beach"))
    assert len(warnings) == 1 and warnings[0].startswith("instrumentation.validation_prompt")


def test_prompts_without_any_shared_trigger_warn():
    images = [{"image": f"{i}.jpg", "prompt": p} for i, p in enumerate(["a dog", "a cat", "a bird", "a dog", "a cat"])]
    data = make(examples__images=images, instrumentation=DELETE)
    assert any("no trigger word shared" in w for w in warnings_of(data))


@pytest.mark.parametrize(
    "prompts, trigger",
    [
        (["photo of sks dog"] * 3, "sks"),
        (["a photo of ohwx man", "ohwx man smiling", "close up of ohwx man, studio light"], "ohwx"),
        (["portrait of zwx person", "photo of a person"], "zwx"),
        (["artwork in sks style"], "sks"),
        (["a dog", "a cat in a park"], None),
        ([], None),
    ],
)
def test_infer_trigger(prompts, trigger):
    assert infer_trigger(prompts) == trigger


def test_batch_larger_than_the_dataset_warns():
    assert any("batch_size = 8" in w for w in warnings_of(make(training_loop__batch_size=8)))


# ---------------------------------------------------------------- validate on edited configs


def test_validate_catches_wizard_edits_of_any_kind():
    cfg = parse_config(VALID)
    cfg.seed = "abc"
    cfg.lora_layers.single_transformer_blocks.block_range.end = 40
    cfg.optimizer.name = "Adamm"
    with pytest.raises(ConfigError) as caught:
        validate(cfg)
    assert len(caught.value.problems) == 3


def test_validate_can_require_the_image_files(tmp_path):
    cfg = parse_config(VALID, tmp_path)
    with pytest.raises(ConfigError) as caught:
        validate(cfg, check_files=True)
    assert len(caught.value.problems) == 5
    assert str(tmp_path.resolve() / "images" / "01.jpeg") in caught.value.problems[0]
    (tmp_path / "images").mkdir()
    for i in range(1, 6):
        (tmp_path / "images" / f"0{i}.jpeg").write_bytes(b"x")
    assert validate(cfg, check_files=True) == []


def test_validate_names_image_files_it_may_not_read(tmp_path, monkeypatch):
    import os

    cfg = parse_config(VALID, tmp_path)
    (tmp_path / "images").mkdir()
    for i in range(1, 6):
        (tmp_path / "images" / f"0{i}.jpeg").write_bytes(b"x")
    blocked = tmp_path.resolve() / "images" / "02.jpeg"
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != blocked and real_access(path, mode, **kw))
    with pytest.raises(ConfigError) as caught:
        validate(cfg, check_files=True)
    (problem,) = caught.value.problems
    assert problem.startswith('examples.images[1].image = "02.jpeg": ') and "permission" in problem
    assert "chmod" in problem and "damaged" not in problem


def crop_config(folder: Path, size=(300, 200), crop=None, width=64, height=64) -> dict:
    from PIL import Image

    (folder / "images").mkdir(exist_ok=True)
    Image.new("RGB", size, (90, 120, 150)).save(folder / "images" / "01.png")
    images = [{"image": "01.png", "prompt": "photo of sks dog", **({"crop": crop} if crop else {})}]
    return make(width=width, height=height, examples__images=images)


def test_a_crop_beyond_the_photo_names_its_key_and_the_photo_s_size(tmp_path):
    problem = only_problem(crop_config(tmp_path, crop=[0, 0, 10000, 10000]), base_dir=tmp_path)
    assert problem.startswith("examples.images[0].crop = [0, 0, 10000, 10000]: ")
    assert "300x200" in problem and "CropBox" not in problem
    assert "[50, 0, 200, 200]" in problem  # the centred box, as a fix
    problem = only_problem(crop_config(tmp_path, crop=[250, 0, 100, 100]), base_dir=tmp_path)
    assert "right edge at 350" in problem and "bottom" not in problem


def test_a_crop_of_another_shape_than_the_training_size_is_a_problem(tmp_path):
    problem = only_problem(crop_config(tmp_path, crop=[0, 0, 300, 100]), base_dir=tmp_path)
    assert problem.startswith("examples.images[0].crop = [0, 0, 300, 100]: ") and "64x64" in problem
    assert "default_crop" not in problem


def test_crops_inside_the_photo_pass_and_missing_photos_are_left_to_the_file_check(tmp_path):
    cfg = parse_config(crop_config(tmp_path, crop=[100, 0, 200, 200]), tmp_path)
    assert cfg.examples.images[0].crop == (100, 0, 200, 200)
    assert parse_config(crop_config(tmp_path, crop=[0, 0, 300, 100], width=192, height=64), tmp_path)
    data = crop_config(tmp_path, crop=[0, 0, 10000, 10000])
    data["examples"]["images"][0]["image"] = "not-there.png"
    parse_config(data, tmp_path)


def test_a_crop_is_checked_against_the_photo_as_displayed(tmp_path):
    # a portrait phone photo: stored 300x200 with EXIF orientation 6, seen as 200x300
    from PIL import Image

    data = crop_config(tmp_path, crop=[0, 50, 200, 200])
    image = Image.new("RGB", (300, 200))
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "images" / "01.png", exif=exif)
    assert parse_config(data, tmp_path).examples.images[0].crop == (0, 50, 200, 200)
    data["examples"]["images"][0]["crop"] = [50, 0, 200, 200]
    assert "200x300" in only_problem(data, base_dir=tmp_path)


def test_estimate_refuses_a_crop_beyond_the_photo(tmp_path, capsys):
    from tui.cli import main

    path = tmp_path / "train.json"
    path.write_text(json.dumps(crop_config(tmp_path, crop=[0, 0, 10000, 10000])))
    assert main(["estimate", "--train-config", str(path)]) == 2
    assert "examples.images[0].crop" in capsys.readouterr().err


# ---------------------------------------------------------------- LoRA targets


def test_mflux_spellings_map_to_diffusers_names_and_are_written_back_as_given():
    data = make(lora_layers={
        "transformer_blocks": {"block_range": {"start": 0, "end": 2},
                               "layer_types": ["attn.to_out", "ff.linear1", "ff.linear2", "ff_context.linear1",
                                               "ff_context.linear2", "attn.to_add_out"],
                               "lora_rank": 8}})
    cfg = parse_config(data)
    targets = dict(lora_targets(cfg))
    assert targets["transformer_blocks.1.attn.to_out.0"] == 8
    assert "transformer_blocks.0.ff.net.0.proj" in targets and "transformer_blocks.0.ff.net.2" in targets
    assert "transformer_blocks.0.ff_context.net.0.proj" in targets and "transformer_blocks.1.ff_context.net.2" in targets
    assert len(targets) == 12
    assert config_to_dict(cfg)["lora_layers"] == data["lora_layers"]


def test_diffusers_names_are_accepted_for_every_layer():
    data = make(lora_layers={
        "transformer_blocks": {"block_range": {"start": 18, "end": 19},
                               "layer_types": list(config_module.JOINT_LAYER_TYPES), "lora_rank": 2},
        "single_transformer_blocks": {"block_range": {"indices": [37]},
                                      "layer_types": list(config_module.SINGLE_LAYER_TYPES), "lora_rank": 3}})
    targets = lora_targets(parse_config(data))
    assert len(targets) == 14 + 6
    assert ("single_transformer_blocks.37.norm.linear", 3) in targets
    assert ("transformer_blocks.18.norm1_context.linear", 2) in targets


def test_lora_targets_of_the_guide_example():
    targets = lora_targets(parse_config(VALID))
    assert len(targets) == 38 * 5
    assert targets[0] == ("single_transformer_blocks.0.proj_out", 4)
    assert ("single_transformer_blocks.3.attn.to_q", 4) in targets


def test_lora_targets_check_the_model_size():
    with pytest.raises(ConfigError) as caught:
        lora_targets(parse_config(VALID), num_joint_blocks=2, num_single_blocks=4)
    assert "this model has 4 single blocks" in caught.value.problems[0]


# ---------------------------------------------------------------- writing


def test_round_trip_load_dict_load(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(VALID))
    cfg = load_config(path)
    assert config_to_dict(cfg) == VALID
    again = parse_config(config_to_dict(cfg), tmp_path)
    assert again == cfg


def test_round_trip_keeps_gradient_checkpointing_only_when_on():
    cfg = parse_config(make(gradient_checkpointing=True))
    assert cfg.gradient_checkpointing is True
    assert config_to_dict(cfg)["gradient_checkpointing"] is True
    assert "gradient_checkpointing" not in config_to_dict(parse_config(VALID))


def test_absolute_paths_for_checkpoints(tmp_path):
    data = config_to_dict(parse_config(VALID, tmp_path), absolute_paths=True)
    assert data["examples"]["path"] == str(tmp_path.resolve() / "images")
    assert data["save"]["output_path"] == str(Path("~/Desktop/train").expanduser())


def test_save_config_rebases_relative_paths(tmp_path):
    source = tmp_path / "a"
    cfg = parse_config(make(save__output_path="out"), source)
    written = save_config(cfg, tmp_path / "b" / "nested" / "train.json")
    again = load_config(written)
    assert again.examples_dir == cfg.examples_dir and again.output_dir == cfg.output_dir
    assert json.loads(written.read_text())["examples"]["path"] == "../../a/images"
    assert not list(written.parent.glob("*.tmp"))
    same_folder = save_config(cfg, source / "train.json")
    assert json.loads(same_folder.read_text()) == make(save__output_path="out")


# ---------------------------------------------------------------- help


def test_every_field_has_help():
    classes = [TrainingConfig]
    seen = set()
    while classes:
        cls = classes.pop()
        if cls in seen:
            continue
        seen.add(cls)
        for f in dataclasses.fields(cls):
            if f.name in ("base_dir", "unknown_keys"):
                continue
            assert len(f.metadata.get("help", "")) > 10, (cls.__name__, f.name)
            inner = config_module._dataclass_inside(typing.get_type_hints(cls)[f.name])
            if inner is not None:
                classes.append(inner)
    assert len(seen) >= 9


def test_help_text_by_key_path():
    assert "exclusive" in help_text("lora_layers.single_transformer_blocks.block_range.end")
    assert "trigger" in help_text("examples.images[3].prompt")
    assert "mlx.optimizers" in help_text("optimizer.name")
    with pytest.raises(KeyError):
        help_text("optimizer.momentum")
