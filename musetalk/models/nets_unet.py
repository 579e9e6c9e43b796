"""Plain-torch MuseTalk UNet: diffusers' UNet2DConditionModel forward math and state-dict names, for its configs only.

MuseTalk's musetalk.json is a Stable-Diffusion-1.x-shaped UNet: cross-attention down blocks then one plain down
block, a cross-attention mid block, the mirror image going up, sinusoidal timestep features with cos first, GEGLU
feed-forwards and 1×1-conv projections into and out of each transformer. `unet_spec` accepts the keys of that
family (the widths, depths, head counts and group counts may differ, as in the tiny test models) and raises
WeightsInvalid for any other value of a key that changes the network, so a different checkpoint fails loudly
instead of computing something else.

Naming quirk kept from diffusers: the config's `attention_head_dim` is the number of attention HEADS (each head is
channels / attention_head_dim wide); diffusers documents this in UNet2DConditionModel.__init__.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from musetalk.errors import WeightsInvalid
from musetalk.models.nets_blocks import (
    Downsample2D,
    ResnetBlock2D,
    Upsample2D,
    check_config,
    check_divisible,
    int_list,
    positive_float,
    positive_int,
)

CROSS_DOWN, PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
CROSS_UP, PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"

# diffusers keys whose value must be exactly this (absent = diffusers' default, which is this value too).
_FIXED: dict[str, Any] = {
    "act_fn": "silu",
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "use_linear_projection": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "upcast_attention": False,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
}
_FREE = (
    "in_channels",
    "out_channels",
    "block_out_channels",
    "layers_per_block",
    "cross_attention_dim",
    "attention_head_dim",
    "norm_num_groups",
    "norm_eps",
    "down_block_types",
    "up_block_types",
)
# sample_size is metadata; dropout is off in inference; the extra heads only exist with addition_embed_type.
_IGNORED = ("sample_size", "dropout", "addition_embed_type_num_heads")
_TRANSFORMER_GROUPNORM_EPS = 1e-6  # Transformer2DModel's GroupNorm (not the config's norm_eps)
_TRANSFORMER_LAYERNORM_EPS = 1e-5  # BasicTransformerBlock's LayerNorms (Transformer2DModel's default norm_eps)


@dataclass(frozen=True)
class UNetSpec:
    """The free parameters of the supported UNet family (diffusers defaults where musetalk.json omits a key)."""

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    cross_attention_dim: int = 1280
    attention_heads: int = 8  # diffusers' attention_head_dim
    norm_num_groups: int = 32
    norm_eps: float = 1e-5


def unet_spec(config: Mapping[str, Any], source: str = "UNet config") -> UNetSpec:
    """Validate a musetalk.json dict (metadata keys already dropped) → UNetSpec, or raise WeightsInvalid."""
    check_config(source, config, _FIXED, _FREE, _IGNORED)
    d = UNetSpec()
    channels = int_list(source, config, "block_out_channels", d.block_out_channels)
    n = len(channels)
    want_down = [CROSS_DOWN] * (n - 1) + [PLAIN_DOWN]
    want_up = [PLAIN_UP] + [CROSS_UP] * (n - 1)
    down = list(config.get("down_block_types", [CROSS_DOWN] * 3 + [PLAIN_DOWN]))
    up = list(config.get("up_block_types", [PLAIN_UP] + [CROSS_UP] * 3))
    if n < 2 or down != want_down or up != want_up:
        raise WeightsInvalid(
            f"{source}: down_block_types={down} / up_block_types={up} are not supported; with {n} "
            f"block_out_channels the native UNet computes {want_down} / {want_up} (at least 2 blocks)"
        )
    spec = UNetSpec(
        in_channels=positive_int(source, config, "in_channels", d.in_channels),
        out_channels=positive_int(source, config, "out_channels", d.out_channels),
        block_out_channels=channels,
        layers_per_block=positive_int(source, config, "layers_per_block", d.layers_per_block),
        cross_attention_dim=positive_int(source, config, "cross_attention_dim", d.cross_attention_dim),
        attention_heads=positive_int(source, config, "attention_head_dim", d.attention_heads),
        norm_num_groups=positive_int(source, config, "norm_num_groups", d.norm_num_groups),
        norm_eps=positive_float(source, config, "norm_eps", d.norm_eps),
    )
    for width in spec.block_out_channels:
        check_divisible(source, "norm_num_groups", width, spec.norm_num_groups)
        check_divisible(source, "attention heads (attention_head_dim)", width, spec.attention_heads)
    return spec


def timestep_features(timesteps: torch.Tensor, channels: int) -> torch.Tensor:
    """(B,) timesteps → (B, channels) float32 [cos ‖ sin] of t·10000^(−k/(channels/2)) (flip_sin_to_cos, shift 0)."""
    half = channels // 2
    # Same operation order as diffusers' get_timestep_embedding, so the features are bit-identical.
    exponent = -math.log(10000) * torch.arange(0, half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / half)  # (half,)
    args = timesteps[:, None].float() * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2·half)
    if channels % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """Linear → SiLU → Linear on the sinusoidal features (diffusers' time_embedding)."""

    def __init__(self, in_features: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_features, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_features) → (B, dim)."""
        return self.linear_2(F.silu(self.linear_1(x)))


class Attention(nn.Module):
    """Multi-head (cross-)attention without q/k/v biases; diffusers' to_q / to_k / to_v / to_out.0 names."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None) -> None:
        super().__init__()
        self.heads = heads
        kv_dim = dim if context_dim is None else context_dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(kv_dim, dim, bias=False)
        self.to_v = nn.Linear(kv_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # index 1 is diffusers' (parameterless) dropout

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, N, C), context: (B, M, Cc) or None (self-attention) → (B, N, C)."""
        kv = x if context is None else context
        b = x.shape[0]
        q = self.to_q(x).view(b, -1, self.heads, x.shape[-1] // self.heads).transpose(1, 2)  # (B, h, N, d)
        k = self.to_k(kv).view(b, -1, self.heads, x.shape[-1] // self.heads).transpose(1, 2)  # (B, h, M, d)
        v = self.to_v(kv).view(b, -1, self.heads, x.shape[-1] // self.heads).transpose(1, 2)  # (B, h, M, d)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, d), scale 1/√d
        out = out.transpose(1, 2).reshape(b, -1, x.shape[-1])  # (B, N, C)
        return self.to_out[0](out)


class GEGLU(nn.Module):
    """Linear to 2·inner, then value · GELU(gate) (exact GELU)."""

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, dim) → (B, N, inner)."""
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU(dim → 4·dim) then Linear(4·dim → dim); `net` indices match diffusers (1 is its dropout)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, dim) → (B, N, dim)."""
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention to the audio tokens, GEGLU feed-forward; each residual."""

    def __init__(self, dim: int, heads: int, context_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=_TRANSFORMER_LAYERNORM_EPS)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=_TRANSFORMER_LAYERNORM_EPS)
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm3 = nn.LayerNorm(dim, eps=_TRANSFORMER_LAYERNORM_EPS)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x: (B, N, C), context: (B, M, Cc) → (B, N, C)."""
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class Transformer2DModel(nn.Module):
    """GroupNorm → 1×1 conv → one transformer block over the H·W positions → 1×1 conv, plus the input."""

    def __init__(self, channels: int, heads: int, context_dim: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=_TRANSFORMER_GROUPNORM_EPS)
        self.proj_in = nn.Conv2d(channels, channels, kernel_size=1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(channels, heads, context_dim)])
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W), context: (B, M, Cc) → (B, C, H, W)."""
        b, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x)).permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, HW, C)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        out = tokens.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()  # (B, C, H, W)
        return self.proj_out(out) + x


@dataclass(frozen=True)
class _BlockShape:
    """Constructor arguments every UNet block shares."""

    temb: int
    groups: int
    eps: float
    heads: int
    context: int


class DownBlock(nn.Module):
    """CrossAttnDownBlock2D (cross_attention) or DownBlock2D: resnets (+ transformers), then a stride-2 conv."""

    def __init__(
        self, in_ch: int, out_ch: int, layers: int, shape: _BlockShape, cross_attention: bool, downsample: bool
    ) -> None:
        super().__init__()
        resnets, attentions = [], []
        for i in range(layers):  # diffusers' construction order: same random init for the same seed
            resnets.append(ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, shape.groups, shape.eps, shape.temb))
            if cross_attention:
                attentions.append(Transformer2DModel(out_ch, shape.heads, shape.context, shape.groups))
        # diffusers registers `attentions` before `resnets`: same order keeps state_dict() key order identical.
        self.attentions = nn.ModuleList(attentions) if cross_attention else None
        self.resnets = nn.ModuleList(resnets)
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch, padding=1)]) if downsample else None

    def forward(
        self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(B, Cin, H, W) → (B, Cout, H', W') and every intermediate output (the skips for the up path)."""
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """UNetMidBlock2DCrossAttn: resnet → transformer → resnet at the lowest resolution."""

    def __init__(self, channels: int, shape: _BlockShape) -> None:
        super().__init__()
        first = ResnetBlock2D(channels, channels, shape.groups, shape.eps, shape.temb)  # built in diffusers' order
        attention = Transformer2DModel(channels, shape.heads, shape.context, shape.groups)
        second = ResnetBlock2D(channels, channels, shape.groups, shape.eps, shape.temb)
        self.attentions = nn.ModuleList([attention])
        self.resnets = nn.ModuleList([first, second])

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) → (B, C, h, w)."""
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, temb)


class UpBlock(nn.Module):
    """CrossAttnUpBlock2D (cross_attention) or UpBlock2D: each resnet takes [x ‖ skip]; then nearest ×2 + conv."""

    def __init__(
        self,
        skip_channels: list[int],
        prev_ch: int,
        out_ch: int,
        shape: _BlockShape,
        cross_attention: bool,
        upsample: bool,
    ) -> None:
        super().__init__()
        resnets, attentions = [], []
        for i, skip in enumerate(skip_channels):  # diffusers' construction order (see DownBlock)
            in_ch = (prev_ch if i == 0 else out_ch) + skip
            resnets.append(ResnetBlock2D(in_ch, out_ch, shape.groups, shape.eps, shape.temb))
            if cross_attention:
                attentions.append(Transformer2DModel(out_ch, shape.heads, shape.context, shape.groups))
        self.attentions = nn.ModuleList(attentions) if cross_attention else None
        self.resnets = nn.ModuleList(resnets)
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)]) if upsample else None

    def forward(
        self,
        x: torch.Tensor,
        skips: list[torch.Tensor],
        temb: torch.Tensor,
        context: torch.Tensor,
        size: tuple[int, int] | None,
    ) -> torch.Tensor:
        """x: (B, Cprev, h, w); skips: this block's skips, oldest first (consumed newest first) → (B, Cout, 2h, 2w)."""
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips[-1 - i]], dim=1), temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, size)
        return x


class UNet2DCondition(nn.Module):
    """The MuseTalk UNet: (B, Cin, H, W) latents + timestep + (B, M, Cc) audio tokens → (B, Cout, H, W)."""

    def __init__(self, spec: UNetSpec) -> None:
        super().__init__()
        self.config = spec
        ch = spec.block_out_channels
        n = len(ch)
        temb = 4 * ch[0]
        shape = _BlockShape(temb, spec.norm_num_groups, spec.norm_eps, spec.attention_heads, spec.cross_attention_dim)
        layers = spec.layers_per_block
        # Registration order (state_dict() key order) and construction order (random init for a given seed) both
        # follow diffusers: conv_in, time_embedding, down_blocks, up_blocks (registered empty, filled after the mid
        # block is built), mid_block, conv_norm_out, conv_out.
        self.conv_in = nn.Conv2d(spec.in_channels, ch[0], kernel_size=3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        self.down_blocks = nn.ModuleList(
            [
                DownBlock(ch[max(i - 1, 0)], ch[i], layers, shape, cross_attention=i < n - 1, downsample=i < n - 1)
                for i in range(n)
            ]
        )
        self.up_blocks = nn.ModuleList()
        self.mid_block = MidBlock(ch[-1], shape)
        rev = ch[::-1]
        for i in range(n):
            prev_ch, out_ch, in_ch = rev[max(i - 1, 0)], rev[i], rev[min(i + 1, n - 1)]
            # Skip widths, popped newest first: `layers` at this width, then the next block's input width.
            skip_channels = [out_ch] * layers + [in_ch]
            self.up_blocks.append(
                UpBlock(skip_channels, prev_ch, out_ch, shape, cross_attention=i > 0, upsample=i < n - 1)
            )
        self.conv_norm_out = nn.GroupNorm(spec.norm_num_groups, ch[0], eps=spec.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], spec.out_channels, kernel_size=3, padding=1)

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        """(B, Cin, H, W) latents, a () / (1,) / (B,) timestep tensor, (B, M, Cc) tokens → (B, Cout, H, W).

        Returns the tensor itself (diffusers wraps it: `.sample` / `[0]`).
        """
        b = sample.shape[0]
        t = timestep.reshape(-1).expand(b)  # (B,)
        temb = self.time_embedding(timestep_features(t, self.config.block_out_channels[0]).to(sample.dtype))  # (B, T)
        x = self.conv_in(sample)  # (B, C0, H, W)
        skips = [x]
        for down in self.down_blocks:
            x, block_skips = down(x, temb, encoder_hidden_states)
            skips.extend(block_skips)
        x = self.mid_block(x, temb, encoder_hidden_states)
        # Shapes are static: this is decided once per input size, never by tensor values.
        stride = 2 ** (len(self.up_blocks) - 1)
        explicit_sizes = any(dim % stride for dim in sample.shape[-2:])
        for up in self.up_blocks:
            n_skips = self.config.layers_per_block + 1  # one per resnet of the up block
            block_skips, skips = skips[-n_skips:], skips[:-n_skips]
            # The next skip's size: diffusers' upsample_size, for inputs that are not a multiple of the stride.
            size = (skips[-1].shape[-2], skips[-1].shape[-1]) if explicit_sizes and skips else None
            x = up(x, block_skips, temb, encoder_hidden_states, size)
        return self.conv_out(F.silu(self.conv_norm_out(x)))
