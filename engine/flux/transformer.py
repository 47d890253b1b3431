"""The FLUX.1 transformer (diffusers' FluxTransformer2DModel) in MLX.

Parameter names equal diffusers' state_dict keys, so a diffusers checkpoint
loads as is (see `convert_hf_weights`). The call takes the same arguments
with the same meaning as diffusers' forward.
"""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from engine.flux import speed
from engine.flux.bounded_queue import BoundedQueue
from engine.flux.fused_inputs import project
from engine.flux.layers import (
    AdaptiveModulation,
    FeedForward,
    FluxAttention,
    TimeTextEmbedding,
    gelu_tanh,
    modulate,
)
from engine.flux.rope import rope_inverse_frequencies, rope_rotation

ROPE_THETA = 10000.0


class FluxTransformerBlock(nn.Module):
    """Joint (double-stream) block: image and text keep separate weights but
    attend together."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm1 = AdaptiveModulation(dim, 6)
        self.norm1_context = AdaptiveModulation(dim, 6)
        self.attn = FluxAttention(dim, heads, head_dim, joint=True)
        self.ff = FeedForward(dim)
        self.ff_context = FeedForward(dim)

    def __call__(self, hidden, context, temb, rope):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(temb)
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(temb)

        attn_out, context_attn_out = self.attn(
            modulate(hidden, shift_msa, scale_msa), rope, context=modulate(context, c_shift_msa, c_scale_msa)
        )
        hidden = hidden + gate_msa * attn_out
        hidden = hidden + gate_mlp * self.ff(modulate(hidden, shift_mlp, scale_mlp))

        context = context + c_gate_msa * context_attn_out
        context = context + c_gate_mlp * self.ff_context(modulate(context, c_shift_mlp, c_scale_mlp))
        return hidden, context


class FluxSingleTransformerBlock(nn.Module):
    """Single-stream block over the joined [text, image] sequence: attention and
    MLP run in parallel from the same normed input and share one output layer."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm = AdaptiveModulation(dim, 3)
        self.proj_mlp = nn.Linear(dim, mlp_ratio * dim)
        self.proj_out = nn.Linear(dim + mlp_ratio * dim, dim)
        self.attn = FluxAttention(dim, heads, head_dim, joint=False)

    def __call__(self, x, temb, rope):
        shift, scale, gate = self.norm(temb)
        normed = modulate(x, shift, scale)
        if speed.FUSED_SINGLE_INPUTS and "fused_inputs" in self:  # q, k, v and the MLP's input as one product
            query, key, value, mlp = project(self, normed)
            mlp = gelu_tanh(mlp)
            attn = self.attn(normed, rope, projected=[query, key, value])
        else:
            mlp = gelu_tanh(self.proj_mlp(normed))
            attn = self.attn(normed, rope)
        return x + gate * self.proj_out(mx.concatenate([attn, mlp], axis=-1))


class FluxTransformer(nn.Module):
    """FLUX.1 transformer from a diffusers `transformer/config.json` dict.

    Runs in the dtype of its parameters (inputs are cast to it); timestep,
    guidance and rotary angles are computed in float32 first. Set
    `gradient_checkpointing = True` to recompute each block in the backward pass.
    """

    def __init__(self, config: dict):
        super().__init__()
        heads = config.get("num_attention_heads", 24)
        head_dim = config.get("attention_head_dim", 128)
        patch_size = config.get("patch_size", 1)
        in_channels = config.get("in_channels", 64)
        out_channels = config.get("out_channels") or in_channels
        axes_dims = list(config.get("axes_dims_rope", (16, 56, 56)))
        if sum(axes_dims) != head_dim:
            raise ValueError(f"axes_dims_rope {axes_dims} must add up to attention_head_dim {head_dim}")
        dim = heads * head_dim

        self.guidance_embeds = bool(config.get("guidance_embeds", False))
        self.gradient_checkpointing = False
        self.x_embedder = nn.Linear(in_channels, dim)
        self.context_embedder = nn.Linear(config.get("joint_attention_dim", 4096), dim)
        self.time_text_embed = TimeTextEmbedding(dim, config.get("pooled_projection_dim", 768), self.guidance_embeds)
        self.transformer_blocks = [
            FluxTransformerBlock(dim, heads, head_dim) for _ in range(config.get("num_layers", 19))
        ]
        self.single_transformer_blocks = [
            FluxSingleTransformerBlock(dim, heads, head_dim) for _ in range(config.get("num_single_layers", 38))
        ]
        self.norm_out = AdaptiveModulation(dim, 2)
        self.proj_out = nn.Linear(dim, patch_size * patch_size * out_channels)
        # underscore names are not parameters: not saved, loaded, cast or trained
        self._rope_frequencies, self._rope_axis_of_pair = rope_inverse_frequencies(axes_dims, ROPE_THETA)

    @property
    def dtype(self) -> mx.Dtype:
        """The compute dtype: that of the RMSNorm weights, which neither
        quantization nor LoRA wrapping replace."""
        blocks = self.transformer_blocks or self.single_transformer_blocks
        return blocks[0].attn.norm_q.weight.dtype if blocks else mx.float32

    def __call__(
        self,
        hidden_states: mx.array,
        encoder_hidden_states: mx.array,
        pooled_projections: mx.array,
        timestep: mx.array,
        img_ids: mx.array,
        txt_ids: mx.array,
        guidance: mx.array | None = None,
        depth: int | None = None,
    ) -> mx.array:
        """`depth`, for inference: queue each block on its own, at most that many ahead of the GPU
        (engine/flux/bounded_queue.py), so only their temporaries (over a quantized base, each
        layer's dense copy) are held at once rather than every block's; not inside `mx.compile`
        or a gradient transform, which cannot queue."""
        queue = None if depth is None else BoundedQueue(depth)
        hidden, context, temb = self.embed(hidden_states, encoder_hidden_states, pooled_projections, timestep, guidance)
        rope = self.rope(img_ids, txt_ids)
        for block in self.transformer_blocks:
            hidden, context = self._run_block(block, hidden, context, temb, rope)
            if queue is not None:
                queue.push([hidden, context])
        text_length = context.shape[1]
        joined = join_streams(hidden, context)
        for block in self.single_transformer_blocks:
            joined = self._run_block(block, joined, temb, rope)
            if queue is not None:
                queue.push([joined])
        return self.head(joined, temb, text_length)

    # The pieces of a call, in order; engine/blockwise_step.py runs them one at a time.

    def embed(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, guidance=None):
        """(image stream, text stream, silu(temb)) in the compute dtype."""
        if self.guidance_embeds and guidance is None:
            raise ValueError("this model has a guidance embedder: pass guidance (B,)")
        dtype = self.dtype
        hidden = self.x_embedder(hidden_states.astype(dtype))
        context = self.context_embedder(encoder_hidden_states.astype(dtype))
        # every block's modulation starts with silu(temb): computed once here, not 57 times
        temb = nn.silu(self.time_text_embed(timestep, guidance, pooled_projections.astype(dtype)))
        return hidden, context, temb

    def rope(self, img_ids: mx.array, txt_ids: mx.array):
        """The rotary angles of the joined [text, image] sequence, shared by every block."""
        return rope_rotation(_join_ids(txt_ids, img_ids), self._rope_frequencies, self._rope_axis_of_pair)

    def head(self, joined: mx.array, temb: mx.array, text_length: int) -> mx.array:
        """The prediction for the image tokens of the single blocks' output."""
        hidden = joined[:, text_length:]
        scale, shift = self.norm_out(temb)
        return self.proj_out(modulate(hidden, shift, scale))

    def _run_block(self, block: nn.Module, *arrays: mx.array):
        if self.gradient_checkpointing:
            # recompute the block in backward; gradients still reach the
            # block's trainable parameters (LoRA or full)
            return nn.utils.checkpoint(block)(*arrays)
        return block(*arrays)


def join_streams(hidden: mx.array, context: mx.array) -> mx.array:
    """The single blocks' sequence: [text, image], joined once for all of them (diffusers joins per block)."""
    return mx.concatenate([context, hidden], axis=1)


def _join_ids(txt_ids: mx.array, img_ids: mx.array) -> mx.array:
    """Text ids then image ids along the sequence; each (L, 3) or (B, L, 3)."""
    txt_ids, img_ids = txt_ids.astype(mx.float32), img_ids.astype(mx.float32)
    if txt_ids.ndim == img_ids.ndim == 2:
        return mx.concatenate([txt_ids, img_ids], axis=0)
    txt_ids = txt_ids if txt_ids.ndim == 3 else txt_ids[None]
    img_ids = img_ids if img_ids.ndim == 3 else img_ids[None]
    batch = max(txt_ids.shape[0], img_ids.shape[0])
    txt_ids = mx.broadcast_to(txt_ids, (batch, *txt_ids.shape[1:]))
    img_ids = mx.broadcast_to(img_ids, (batch, *img_ids.shape[1:]))
    return mx.concatenate([txt_ids, img_ids], axis=1)


def convert_hf_weights(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """diffusers transformer weights -> this model's. Names are identical and
    MLX's Linear stores (out, in) like torch, so only a copy of the mapping."""
    return dict(weights)


def export_hf_weights(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """This model's weights -> diffusers' names and layout (the inverse of
    `convert_hf_weights`)."""
    return dict(weights)
