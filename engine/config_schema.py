"""The training config's schema: mflux's JSON as dataclasses whose fields carry their help
text, the names and limits the checks use, and where a model name points."""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FLUX1_JOINT_BLOCKS = 19
FLUX1_SINGLE_BLOCKS = 38

# diffusers names; lora_targets() always answers with these
JOINT_LAYER_TYPES = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    "norm1.linear", "norm1_context.linear",
)  # fmt: skip
SINGLE_LAYER_TYPES = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out", "norm.linear")
# mflux's own spellings of joint-block layers, accepted and written back as the user wrote them
MFLUX_JOINT_ALIASES = {
    "attn.to_out": "attn.to_out.0",
    "ff.linear1": "ff.net.0.proj",
    "ff.linear2": "ff.net.2",
    "ff_context.linear1": "ff_context.net.0.proj",
    "ff_context.linear2": "ff_context.net.2",
}
# what mlx.optimizers offers (mflux itself knows only Adam and AdamW)
OPTIMIZERS = ("Adam", "AdamW", "SGD", "RMSprop", "Adagrad", "AdaDelta", "Adamax", "Lion", "Adafactor", "Muon")
QUANTIZE_BITS = (3, 4, 5, 6, 8)
MODEL_ALIASES = {
    "dev": "black-forest-labs/FLUX.1-dev",
    "schnell": "black-forest-labs/FLUX.1-schnell",
    "krea-dev": "black-forest-labs/FLUX.1-Krea-dev",
    "dev-krea": "black-forest-labs/FLUX.1-Krea-dev",
    "flux.1-dev": "black-forest-labs/FLUX.1-dev",
    "flux.1-schnell": "black-forest-labs/FLUX.1-schnell",
}
TINY_MODEL = "tiny"
TEMPLATES_DIR = Path(__file__).resolve().parents[1] / "templates"
TEMPLATE_DESCRIPTIONS = {
    "pets": "a dog, a cat, any animal: light LoRA on every single block (rank 4)",
    "people": "a person's face and likeness: later single blocks, rank 8, gentler learning rate",
    "style": "an art style: joint blocks 5-14 attention (rank 16) and later single blocks (rank 8)",
    "object": "a product or thing with fine detail (logos, lettering): all single blocks and late joint attention, rank 8",
}
_HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _field(default: Any = dataclasses.MISSING, help: str = "", factory: Any = dataclasses.MISSING):
    """A dataclass field that documents itself (mlx-lm's TrainingArgs style)."""
    return field(default=default, default_factory=factory, metadata={"help": help})


@dataclass
class TrainingLoop:
    num_epochs: int = _field(100, "How many times every image is seen; 50-200 is typical.")
    batch_size: int = _field(1, "Images per optimizer step; 1 keeps memory lowest.")


@dataclass
class OptimizerSpec:
    name: str = _field("AdamW", "Optimizer from mlx.optimizers; mflux itself only knows Adam and AdamW.")
    learning_rate: float = _field(1e-4, "Step size; 1e-5 to 1e-3, 1e-4 is a safe start.")


@dataclass
class SaveSpec:
    output_path: str = _field("~/Desktop/my_lora", "Folder for checkpoints, previews and the LoRA; ~ expands.")
    checkpoint_frequency: int = _field(20, "Optimizer steps between checkpoint zips (resume points).")


@dataclass
class Instrumentation:
    plot_frequency: int = _field(5, "Optimizer steps between loss-plot updates.")
    generate_image_frequency: int = _field(20, "Optimizer steps between preview images (each costs a full generation).")
    validation_prompt: str = _field("photo of sks dog", "Prompt of the preview images; include the trigger word.")


@dataclass
class BlockRange:
    start: int | None = _field(None, "First block to train (counting from 0).")
    end: int | None = _field(None, "Block after the last one trained (exclusive): 0-38 trains all 38.")
    indices: list[int] | None = _field(None, "Exact blocks to train, instead of start/end, e.g. [0, 1, 7].")

    def blocks(self) -> list[int]:
        if self.indices is not None:
            return list(self.indices)
        return list(range(self.start or 0, self.end or 0))


@dataclass
class LoraBlockSpec:
    block_range: BlockRange = _field(help="Which blocks get LoRA layers.", factory=lambda: BlockRange(0, 38))
    layer_types: list[str] = _field(help="Linear layers inside each block that get a LoRA.", factory=list)
    lora_rank: int = _field(4, "Size of each LoRA; 4-16 typical, higher learns more and costs memory.")


@dataclass
class LoraLayers:
    transformer_blocks: LoraBlockSpec | None = _field(
        None, "Joint (text+image) blocks, 19 in FLUX.1: early, general features; slower to train."
    )
    single_transformer_blocks: LoraBlockSpec | None = _field(
        None, "Single blocks, 38 in FLUX.1: later, specific details; the usual choice."
    )


@dataclass
class ExampleImage:
    image: str = _field("01.jpg", "Image file, relative to examples.path.")
    prompt: str = _field("photo of sks dog", "Caption with the trigger word, e.g. 'photo of sks dog'.")
    crop: tuple[int, int, int, int] | None = _field(
        None, "Ours: [left, top, width, height] of the region to train on, in the photo's pixels; "
              "default a centre crop to the training aspect.")


@dataclass
class Examples:
    path: str = _field("images/", "Folder of the images, relative to the config file's folder, or absolute.")
    images: list[ExampleImage] = _field(help="The training images and their prompts; 10-20 is ideal.", factory=list)


def _pets_layers() -> LoraLayers:
    return LoraLayers(
        single_transformer_blocks=LoraBlockSpec(
            BlockRange(0, 38), ["proj_out", "proj_mlp", "attn.to_q", "attn.to_k", "attn.to_v"], 4
        )
    )


@dataclass
class TrainingConfig:
    model: str = _field("dev", "Base model: dev, schnell, a Hugging Face repo id, a local folder, or tiny.")
    seed: int = _field(42, "Seeds the LoRA init and every random draw, so runs repeat exactly.")
    steps: int = _field(20, "Size of the noise-level grid training draws from; also the preview's denoising steps.")
    guidance: float = _field(3.0, "Guidance value fed to dev's guidance embedder (schnell ignores it).")
    quantize: int | None = _field(4, "Bits for the frozen base model (3, 4, 5, 6, 8) or null for none; 4 saves most memory.")
    width: int = _field(512, "Training width in pixels, a multiple of 16.")
    height: int = _field(512, "Training height in pixels, a multiple of 16.")
    training_loop: TrainingLoop = _field(help="How long to train.", factory=TrainingLoop)
    optimizer: OptimizerSpec = _field(help="How the LoRA weights are updated.", factory=OptimizerSpec)
    save: SaveSpec = _field(help="Where and how often to save.", factory=SaveSpec)
    instrumentation: Instrumentation | None = _field(None, "Optional loss plots and preview images during training.")
    lora_layers: LoraLayers = _field(help="Which layers of the transformer learn.", factory=_pets_layers)
    examples: Examples = _field(help="The training images and their prompts.", factory=Examples)
    gradient_checkpointing: bool = _field(False, "Recompute activations in the backward pass: far less memory, ~30% slower.")
    # not part of the JSON: where relative paths start, and what parsing noticed
    base_dir: Path = field(default_factory=Path.cwd, compare=False, repr=False)
    unknown_keys: list[str] = field(default_factory=list, compare=False, repr=False)

    @property
    def examples_dir(self) -> Path:
        path = Path(self.examples.path).expanduser()
        return path if path.is_absolute() else (self.base_dir / path).resolve()

    @property
    def image_paths(self) -> list[Path]:
        return [self.examples_dir / example.image for example in self.examples.images]

    @property
    def output_dir(self) -> Path:
        # relative to the config file (mflux: the working directory), so a run does not depend on where it starts
        path = Path(self.save.output_path).expanduser()
        return path if path.is_absolute() else (self.base_dir / path).resolve()

    @property
    def prompts(self) -> list[str]:
        return [example.prompt for example in self.examples.images]


def canonical_optimizer(name: str) -> str | None:
    """'adamw' -> 'AdamW'; None if mlx.optimizers has no such optimizer."""
    return {known.lower(): known for known in OPTIMIZERS}.get(name.strip().lower())


def canonical_layer_type(name: str, joint: bool) -> str | None:
    """The diffusers name of a layer type (mflux spellings mapped), None if unknown there."""
    if joint:
        name = MFLUX_JOINT_ALIASES.get(name, name)
        return name if name in JOINT_LAYER_TYPES else None
    return name if name in SINGLE_LAYER_TYPES else None


def model_source(model: str, base_dir: Path | None = None) -> tuple[str, str]:
    """Where a model name points: ("tiny", "tiny"), ("hub", repo_id) or ("local", folder); ("unknown", name)."""
    if model.strip().lower() == TINY_MODEL:
        return "tiny", TINY_MODEL
    if model.strip().lower() in MODEL_ALIASES:
        return "hub", MODEL_ALIASES[model.strip().lower()]
    folder = Path(model).expanduser()
    if not folder.is_absolute() and base_dir is not None:
        folder = base_dir / folder
    if model and folder.is_dir():
        return "local", str(folder.resolve())
    if _HUB_REPO_ID.match(model):
        return "hub", model
    return "unknown", model


def show_value(value: Any) -> str:
    """A value as JSON, cut to 60 characters: how messages quote what the user wrote."""
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
