"""FLUX.1's VAE: diffusers' AutoencoderKL in MLX, channels last (NHWC).

Parameter names equal diffusers' state_dict keys, so a checkpoint maps one to
one; only the layout differs (MLX convolutions want (out, kh, kw, in)), which
`convert_hf_weights` / `export_hf_weights` translate.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from engine.errors import ModelLoadError
from engine.flux.bounded_queue import BoundedQueue
from engine.flux.uncompiled import uncompiled

# diffusers hard-codes this epsilon for every norm of the VAE, whatever the config says
NORM_EPS = 1e-6


@dataclass(frozen=True)
class VAEConfig:
    """The keys of a diffusers vae/config.json that shape the model; defaults are diffusers'."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_dict(cls, config: dict) -> VAEConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in config.items() if k in known}
        for key in ("down_block_types", "up_block_types", "block_out_channels"):
            if key in values:
                values[key] = tuple(values[key])
        result = cls(**values)
        result.check()
        return result

    @property
    def scale_factor(self) -> int:
        """Pixels per latent along each side."""
        return 2 ** (len(self.block_out_channels) - 1)

    def check(self) -> None:
        problems = []
        if self.act_fn not in ("silu", "swish"):
            problems.append(f"act_fn {self.act_fn!r} (only silu is supported)")
        if set(self.down_block_types) - {"DownEncoderBlock2D"}:
            problems.append(f"down_block_types {list(self.down_block_types)} (only DownEncoderBlock2D)")
        if set(self.up_block_types) - {"UpDecoderBlock2D"}:
            problems.append(f"up_block_types {list(self.up_block_types)} (only UpDecoderBlock2D)")
        blocks = len(self.block_out_channels)
        if not (blocks == len(self.down_block_types) == len(self.up_block_types)):
            problems.append("block_out_channels, down_block_types and up_block_types differ in length")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            problems.append(f"block_out_channels {list(self.block_out_channels)} not divisible by norm_num_groups")
        if problems:
            raise ModelLoadError(
                "This VAE config is not a FLUX-style AutoencoderKL: " + "; ".join(problems),
                hint="use the vae/ folder of a FLUX.1 model",
            )


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=NORM_EPS, pytorch_compatible=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def __call__(self, x: mx.array) -> mx.array:
        h = self.conv1(nn.silu(self.norm1(x)))
        h = self.conv2(nn.silu(self.norm2(h)))
        if "conv_shortcut" in self:
            x = self.conv_shortcut(x)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over all pixels, with group norm and residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = group_norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = [nn.Linear(channels, channels)]

    def __call__(self, x: mx.array) -> mx.array:
        batch, height, width, channels = x.shape
        # channels last: pixels are already tokens, (B, 1 head, H*W, C) is a free reshape
        h = self.group_norm(x).reshape(batch, 1, height * width, channels)
        h = mx.fast.scaled_dot_product_attention(
            self.to_q(h), self.to_k(h), self.to_v(h), scale=channels**-0.5
        )
        h = self.to_out[0](h).reshape(batch, height, width, channels)
        return x + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def __call__(self, x: mx.array) -> mx.array:
        # diffusers pads only bottom and right before its unpadded stride-2 conv
        return self.conv(mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)]))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        batch, height, width, channels = x.shape
        # nearest 2x: one broadcast + reshape, a single copy
        x = mx.broadcast_to(x[:, :, None, :, None, :], (batch, height, 2, width, 2, channels))
        return self.conv(x.reshape(batch, height * 2, width * 2, channels))


class DownBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = [
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(layers)
        ]
        if downsample:
            self.downsamplers = [Downsample(out_channels)]

    def __call__(self, x: mx.array) -> mx.array:
        for resnet in self.resnets:
            x = resnet(x)
        for downsampler in self.get("downsamplers", []):
            x = downsampler(x)
        return x


class UpBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = [
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(layers)
        ]
        if upsample:
            self.upsamplers = [Upsample(out_channels)]

    def __call__(self, x: mx.array) -> mx.array:
        for resnet in self.resnets:
            x = resnet(x)
        for upsampler in self.get("upsamplers", []):
            x = upsampler(x)
        return x


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = [ResnetBlock(channels, channels, groups) for _ in range(2)]
        if add_attention:
            self.attentions = [AttentionBlock(channels, groups)]

    def __call__(self, x: mx.array) -> mx.array:
        x = self.resnets[0](x)
        for attention in self.get("attentions", []):
            x = attention(x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        channels, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.down_blocks = [
            DownBlock(
                channels[max(i - 1, 0)], channels[i], config.layers_per_block, groups,
                downsample=i < len(channels) - 1,
            )
            for i in range(len(channels))
        ]
        self.mid_block = MidBlock(channels[-1], groups, config.mid_block_add_attention)
        self.conv_norm_out = group_norm(channels[-1], groups)
        # mean and log-variance of the posterior
        self.conv_out = nn.Conv2d(channels[-1], 2 * config.latent_channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(nn.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        channels, groups = config.block_out_channels[::-1], config.norm_num_groups
        self.conv_in = nn.Conv2d(config.latent_channels, channels[0], 3, padding=1)
        self.mid_block = MidBlock(channels[0], groups, config.mid_block_add_attention)
        self.up_blocks = [
            UpBlock(
                channels[max(i - 1, 0)], channels[i], config.layers_per_block + 1, groups,
                upsample=i < len(channels) - 1,
            )
            for i in range(len(channels))
        ]
        self.conv_norm_out = group_norm(channels[-1], groups)
        self.conv_out = nn.Conv2d(channels[-1], config.out_channels, 3, padding=1)

    def pieces(self):
        """The call as a sequence of functions, each resnet and upsampler its own."""
        yield lambda z: self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            yield from block.resnets
            yield from block.get("upsamplers", [])
        yield lambda x: self.conv_out(nn.silu(self.conv_norm_out(x)))

    def __call__(self, z: mx.array, depth: int | None = None) -> mx.array:
        """`depth`: queue each piece on its own, at most that many ahead of the GPU, so only their
        temporaries are held at once (engine/flux/bounded_queue.py); not inside `mx.compile`."""
        queue = None if depth is None else BoundedQueue(depth)
        x = z
        for piece in self.pieces():
            x = piece(x)
            if queue is not None:
                queue.push([x])
        return x


class AutoencoderKL(nn.Module):
    """Images (B, H, W, 3) in [-1, 1] <-> latents (B, H/f, W/f, latent_channels)."""

    def __init__(self, config: dict | VAEConfig):
        super().__init__()
        self.config = config if isinstance(config, VAEConfig) else VAEConfig.from_dict(config)
        latent = self.config.latent_channels
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
        if self.config.use_quant_conv:
            self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1)
        if self.config.use_post_quant_conv:
            self.post_quant_conv = nn.Conv2d(latent, latent, 1)

    @property
    def scale_factor(self) -> int:
        return self.config.scale_factor

    @property
    def dtype(self) -> mx.Dtype:
        return self.decoder.conv_in.weight.dtype

    @uncompiled  # once per training image: MLX's fused activations would cost a compile for microseconds saved
    def encode(self, images: mx.array) -> mx.array:
        """Posterior mean, unscaled: training uses the mean, never a sample (engine/flux/uncompiled.py)."""
        if "encoder" not in self:
            raise RuntimeError("the VAE encoder was released; build the VAE again to encode images")
        moments = self.encoder(images.astype(self.encoder.conv_in.weight.dtype))
        if "quant_conv" in self:
            moments = self.quant_conv(moments)
        return moments[..., : self.config.latent_channels]

    def decode(self, latents: mx.array, depth: int | None = None) -> mx.array:
        """`depth`: queued piece by piece (Decoder.__call__), for inference."""
        z = latents.astype(self.dtype)
        if "post_quant_conv" in self:
            z = self.post_quant_conv(z)
        return self.decoder(z, depth)

    def normalize(self, latents: mx.array) -> mx.array:
        """VAE latents -> the distribution the transformer was trained on."""
        return (latents - (self.config.shift_factor or 0.0)) * self.config.scaling_factor

    def denormalize(self, latents: mx.array) -> mx.array:
        return latents / self.config.scaling_factor + (self.config.shift_factor or 0.0)

    def release_encoder(self) -> None:
        """Drop the encoder once the training images are encoded; the decoder stays for previews."""
        for name in ("encoder", "quant_conv"):
            if name in self:
                del self[name]


# names that checkpoints from before diffusers 0.14 use for the attention block
_OLD_ATTENTION_NAMES = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
_ATTENTION_LINEARS = (".to_q.", ".to_k.", ".to_v.", ".to_out.0.")


def _is_attention_linear(key: str) -> bool:
    return ".attentions." in key and key.endswith(".weight") and any(n in key for n in _ATTENTION_LINEARS)


def convert_hf_weights(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """diffusers AutoencoderKL state_dict -> this module's names and layouts."""
    converted = {}
    for key, value in weights.items():
        for old, new in _OLD_ATTENTION_NAMES.items():
            if ".attentions." in key:
                key = key.replace(old, new)
        if _is_attention_linear(key) and value.ndim == 4:
            # old checkpoints store these linears as 1x1 convolutions (out, in, 1, 1)
            value = value.reshape(value.shape[0], value.shape[1])
        elif value.ndim == 4:
            value = value.transpose(0, 2, 3, 1)
        converted[key] = value
    return converted


def export_hf_weights(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """This module's weights -> a current diffusers AutoencoderKL state_dict."""
    return {key: value.transpose(0, 3, 1, 2) if value.ndim == 4 else value for key, value in weights.items()}
