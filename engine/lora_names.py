"""The names each LoRA format gives FLUX.1's layers (FORMATS.md s.4): ours are diffusers'
module paths; BFL's (kohya, ComfyUI) fuse some of them; mflux spells the feed-forwards its own way."""
from __future__ import annotations

from engine.config_schema import JOINT_LAYER_TYPES, SINGLE_LAYER_TYPES

# the mflux release whose trainer wrote the files we imitate (FORMATS.md)
MFLUX_VERSION = "0.15.5"

# every linear of a joint / single block, in diffusers names (the config's layer types)
JOINT_BLOCK_LAYERS = JOINT_LAYER_TYPES
SINGLE_BLOCK_LAYERS = SINGLE_LAYER_TYPES
GLOBAL_LAYERS = (
    "x_embedder", "context_embedder", "proj_out", "norm_out.linear",
    "time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
    "time_text_embed.text_embedder.linear_1", "time_text_embed.text_embedder.linear_2",
    "time_text_embed.guidance_embedder.linear_1", "time_text_embed.guidance_embedder.linear_2",
)

# BFL names (kohya, ComfyUI) -> ours; fused layers list their parts in output order
BFL_JOINT = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn_proj": ("attn.to_out.0",),
    "txt_attn_proj": ("attn.to_add_out",),
    "img_mlp_0": ("ff.net.0.proj",),
    "img_mlp_2": ("ff.net.2",),
    "txt_mlp_0": ("ff_context.net.0.proj",),
    "txt_mlp_2": ("ff_context.net.2",),
    "img_mod_lin": ("norm1.linear",),
    "txt_mod_lin": ("norm1_context.linear",),
}
BFL_SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation_lin": ("norm.linear",),
}
BFL_GLOBAL = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer_linear": "proj_out",
    "final_layer_adaLN_modulation_1": "norm_out.linear",
}
BFL_ROOTS = ("double_blocks", "single_blocks", "img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer")
# BFL's final modulation emits (shift, scale), diffusers' norm_out.linear (scale, shift);
# the per-block modulations share one order. diffusers' swap_scale_shift does the same.
SWAPPED_HALVES = "norm_out.linear"

# mflux's own model spells the feed-forwards linear1/linear2
MFLUX_NAMES = {
    "ff.net.0.proj": "ff.linear1", "ff.net.2": "ff.linear2",
    "ff_context.net.0.proj": "ff_context.linear1", "ff_context.net.2": "ff_context.linear2",
}

SUFFIXES = (  # (suffix, format, what the tensor is)
    (".lora_down.weight", "kohya", "A"), (".lora_up.weight", "kohya", "B"),
    (".lora_A.weight", "diffusers", "A"), (".lora_B.weight", "diffusers", "B"),
    (".lora_A", "mflux", "A"), (".lora_B", "mflux", "B"),
    (".alpha", None, "alpha"),
)
DOTTED_PREFIXES = ("base_model.model.", "transformer.", "model.diffusion_model.", "diffusion_model.")
TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "text_encoders.", "te1.", "te2.")
SD_MARKERS = ("down_blocks", "up_blocks", "mid_block", "input_blocks", "output_blocks", "middle_block")
