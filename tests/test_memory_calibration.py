"""The memory estimate against the peak a real training run on the tiny model reaches (CPU).

The same estimator is calibrated on GPU runs of full-size FLUX.1 (bench/RESULTS.md);
here it must stay within 10% of what MLX reports for whole tiny runs.
"""
from __future__ import annotations

import mlx.core as mx
import pytest

from engine.config import load_config
from engine.memory import estimate_memory, inputs_from_config, model_configs_for
from engine.trainer import Trainer
from tests.helpers import make_training_folder


@pytest.mark.parametrize("size,checkpointing", [(64, False), (128, True), (256, False)])
def test_estimate_is_within_ten_percent_of_a_tiny_run(tmp_path, size, checkpointing):
    # a preview after every step: the estimate's training phase holds the larger of a step and a
    # preview (engine/memory.py), and a run that made none would not show the preview's share
    config = make_training_folder(tmp_path, count=2, size=max(96, size), width=size, height=size,
                                  gradient_checkpointing=checkpointing,
                                  training_loop={"num_epochs": 1, "batch_size": 1},
                                  instrumentation={"generate_image_frequency": 1})
    cfg = load_config(config)
    events = []
    mx.reset_peak_memory()
    Trainer(cfg, events.append).run()
    measured = [e for e in events if e["type"] == "finished"][0]["peak_memory_gib"] * 2**30
    estimate = estimate_memory(inputs_from_config(cfg, model_configs_for("tiny"), backend="cpu", dtype_bytes=4))
    assert abs(estimate.peak / measured - 1) <= 0.10, (estimate.peak, measured)
