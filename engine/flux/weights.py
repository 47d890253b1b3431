"""Read one component folder (config.json + safetensors, sharded or not) into a module.

Every way a folder can be wrong (no config, a shard named in the index but
absent, a tensor of the wrong shape, missing tensors) ends in one
ModelLoadError that names the file and says what to do.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from engine.errors import ModelLoadError

log = logging.getLogger(__name__)

INDEX_SUFFIX = ".safetensors.index.json"


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing", "the model folder is incomplete: download it again")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{path} is not valid JSON ({error})", "the model folder is damaged: download it again") from error


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a component: those named by an index, else all of them."""
    indexes = sorted(folder.glob(f"*{INDEX_SUFFIX}"))
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as error:
            raise ModelLoadError(f"{indexes[0]} is not a valid safetensors index ({error})",
                                 "the model folder is damaged: download it again") from error
        files = [folder / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise ModelLoadError(f"{indexes[0].name} names {', '.join(absent)} but {folder} lacks it",
                                 "the download is incomplete: run the same command again to resume it")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no .safetensors weights in {folder}",
                             "the model folder is incomplete (weights in .bin format are not supported)")
    return files


def read_weights(folder: Path) -> dict[str, mx.array]:
    weights: dict[str, mx.array] = {}
    for path in weight_files(folder):
        try:
            weights.update(mx.load(str(path)))
        except Exception as error:  # mlx raises bare RuntimeError/ValueError on damaged files
            raise ModelLoadError(f"cannot read {path} ({error})",
                                 "the file is damaged: delete it and download again") from error
    return weights


def load_component(folder: Path, build: Callable[[dict], nn.Module],
                   convert: Callable[[dict], dict], dtype: mx.Dtype, quantize: int | None = None) -> tuple[nn.Module, dict]:
    """Build the module from config.json and fill it with the folder's weights, cast to `dtype`.

    With `quantize`, linears are quantized tensor by tensor as they load (mx.load
    is lazy), so the full-precision weights never all sit in memory at once.
    """
    config = read_config(folder)
    try:
        module = build(config)
    except (KeyError, TypeError, ValueError) as error:
        raise ModelLoadError(f"{folder / 'config.json'} does not describe a supported model ({error})",
                             "is this a FLUX.1 model in the diffusers layout?") from error
    weights = convert(read_weights(folder))
    assign_weights(module, weights, folder, dtype, quantize)
    return module, config


def assign_weights(module: nn.Module, weights: dict[str, mx.array], source: Path | str, dtype: mx.Dtype,
                   quantize: int | None = None, chunk_bytes: int = 2**30) -> None:
    expected = dict(tree_flatten(module.parameters()))
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ModelLoadError(
            f"{source} lacks {len(missing)} tensor(s) the config asks for, e.g. {', '.join(missing[:3])}",
            "the weights and config.json do not belong together: download the model again")
    wrong = [(k, tuple(weights[k].shape), tuple(v.shape)) for k, v in expected.items() if weights[k].shape != v.shape]
    if wrong:
        key, got, want = wrong[0]
        raise ModelLoadError(
            f"{source}: tensor {key} has shape {got}, config.json implies {want} ({len(wrong)} mismatch(es))",
            "the weights belong to another model or config.json was edited: download the model again")
    unused = sorted(set(weights) - set(expected))
    if unused:
        log.warning("%s: %d tensor(s) ignored, e.g. %s", source, len(unused), ", ".join(unused[:3]))
    quantized = {}
    if quantize:
        from engine.flux.loading import quantize_module

        quantized = quantize_module(module, quantize, Path(str(source)).name, evaluate=False)
    chunk, size = [], 0
    for key in expected:
        value = weights.pop(key)  # drop our reference: the file tensor is freed once its chunk is evaluated
        value = value.astype(dtype) if mx.issubdtype(value.dtype, mx.floating) else value
        layer, _, name = key.rpartition(".")
        if name == "weight" and layer in quantized:
            packed, scales, biases = mx.quantize(value, quantized[layer], quantize)
            chunk += [(key, packed), (f"{layer}.scales", scales), (f"{layer}.biases", biases)]
        else:
            chunk.append((key, value))
        size += value.nbytes
        if size >= chunk_bytes:
            _load_chunk(module, chunk)
            chunk, size = [], 0
    _load_chunk(module, chunk)


def _load_chunk(module: nn.Module, chunk: list[tuple[str, mx.array]]) -> None:
    """Assign and evaluate a group of tensors: each file tensor is read, cast (and quantized) then freed."""
    if chunk:
        module.load_weights(chunk, strict=False)
        mx.eval([value for _, value in chunk])
