"""Plain-torch KL autoencoder: diffusers' AutoencoderKL (sd-vae-ft-mse family) forward math and state-dict names.

Encoder: conv → down blocks of resnets (stride-2 conv after all but the last) → resnet / single-head self-attention /
resnet → GroupNorm, SiLU, conv to 2·latent channels → quant_conv; the posterior mean is the first half of the
channels. Decoder: post_quant_conv → conv → the same mid block → up blocks (nearest ×2 + conv after all but the last)
→ GroupNorm, SiLU, conv to RGB. `vae_spec` accepts sd-vae-ft-mse's config and narrower/shallower variants of it
(the tiny test VAE) and raises WeightsInvalid for any other value of a key that changes the network.
"""

from __future__ import annotations

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

DOWN_BLOCK, UP_BLOCK = "DownEncoderBlock2D", "UpDecoderBlock2D"
_EPS = 1e-6  # every GroupNorm of diffusers' VAE encoder/decoder (the config has no eps)
_FIXED: dict[str, Any] = {
    "act_fn": "silu",
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}
_FREE = (
    "in_channels",
    "out_channels",
    "down_block_types",
    "up_block_types",
    "block_out_channels",
    "layers_per_block",
    "latent_channels",
    "norm_num_groups",
    "scaling_factor",
)
# sample_size only sizes tiles (off); force_upcast is advice to pipelines, not part of the network.
_IGNORED = ("sample_size", "force_upcast")


@dataclass(frozen=True)
class VAESpec:
    """The free parameters of the supported VAE family (diffusers' AutoencoderKL defaults for absent keys)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215


def vae_spec(config: Mapping[str, Any], source: str = "VAE config") -> VAESpec:
    """Validate a VAE config.json dict ('_' metadata keys allowed) → VAESpec, or raise WeightsInvalid."""
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise WeightsInvalid(f"{source}: _class_name is {config['_class_name']!r}, expected AutoencoderKL")
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    check_config(source, config, _FIXED, _FREE, _IGNORED)
    d = VAESpec()
    channels = int_list(source, config, "block_out_channels", d.block_out_channels)
    down = list(config.get("down_block_types", [DOWN_BLOCK]))
    up = list(config.get("up_block_types", [UP_BLOCK]))
    if down != [DOWN_BLOCK] * len(channels) or up != [UP_BLOCK] * len(channels):
        raise WeightsInvalid(
            f"{source}: down_block_types={down} / up_block_types={up} are not supported; the native VAE computes "
            f"{len(channels)} × {DOWN_BLOCK} / {UP_BLOCK} (one per block_out_channels entry)"
        )
    spec = VAESpec(
        in_channels=positive_int(source, config, "in_channels", d.in_channels),
        out_channels=positive_int(source, config, "out_channels", d.out_channels),
        block_out_channels=channels,
        layers_per_block=positive_int(source, config, "layers_per_block", d.layers_per_block),
        latent_channels=positive_int(source, config, "latent_channels", d.latent_channels),
        norm_num_groups=positive_int(source, config, "norm_num_groups", d.norm_num_groups),
        scaling_factor=positive_float(source, config, "scaling_factor", d.scaling_factor),
    )
    for width in spec.block_out_channels:
        check_divisible(source, "norm_num_groups", width, spec.norm_num_groups)
    return spec


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over H·W positions with a GroupNorm in front and the input added back."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # index 1 is diffusers' (parameterless) dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → (B, C, H, W)."""
        b, c, h, w = x.shape
        tokens = self.group_norm(x.view(b, c, h * w)).transpose(1, 2)  # (B, HW, C)
        q = self.to_q(tokens).view(b, -1, 1, c).transpose(1, 2)  # (B, 1, HW, C)
        k = self.to_k(tokens).view(b, -1, 1, c).transpose(1, 2)
        v = self.to_v(tokens).view(b, -1, 1, c).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C), scale 1/√C
        out = self.to_out[0](out.transpose(1, 2).reshape(b, -1, c))  # (B, HW, C)
        return out.transpose(-1, -2).reshape(b, c, h, w) + x


class VAEMidBlock(nn.Module):
    """UNetMidBlock2D as the VAE builds it: resnet → self-attention → resnet, no time embedding."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        first = ResnetBlock2D(channels, channels, groups, _EPS, None)  # built in diffusers' order (same random init)
        attention = SpatialSelfAttention(channels, groups)
        second = ResnetBlock2D(channels, channels, groups, _EPS, None)
        self.attentions = nn.ModuleList([attention])
        self.resnets = nn.ModuleList([first, second])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) → (B, C, h, w)."""
        x = self.resnets[0](x)
        x = self.attentions[0](x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nn.Module):
    """Resnets, then (except in the last block) a stride-2 conv after bottom/right zero padding."""

    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, downsample: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, groups, _EPS, None) for i in range(layers)]
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch, padding=0)]) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Cin, H, W) → (B, Cout, H/2, W/2) (H, W kept in the last block)."""
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nn.Module):
    """Resnets, then (except in the last block) nearest ×2 + conv."""

    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, upsample: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, groups, _EPS, None) for i in range(layers)]
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Cin, h, w) → (B, Cout, 2h, 2w) (h, w kept in the last block)."""
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Module):
    """(B, 3, H, W) image in [-1, 1] → (B, 2·latent, H/2^(n−1), W/2^(n−1)) posterior moments (before quant_conv)."""

    def __init__(self, spec: VAESpec) -> None:
        super().__init__()
        ch, groups, n = spec.block_out_channels, spec.norm_num_groups, len(spec.block_out_channels)
        self.conv_in = nn.Conv2d(spec.in_channels, ch[0], kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList(
            [
                DownEncoderBlock2D(ch[max(i - 1, 0)], ch[i], spec.layers_per_block, groups, downsample=i < n - 1)
                for i in range(n)
            ]
        )
        self.mid_block = VAEMidBlock(ch[-1], groups)
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * spec.latent_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """See the class docstring."""
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """(B, latent, h, w) → (B, 3, h·2^(n−1), w·2^(n−1)) image in about [-1, 1] (after post_quant_conv)."""

    def __init__(self, spec: VAESpec) -> None:
        super().__init__()
        ch, groups, n = spec.block_out_channels, spec.norm_num_groups, len(spec.block_out_channels)
        rev = ch[::-1]
        self.conv_in = nn.Conv2d(spec.latent_channels, ch[-1], kernel_size=3, padding=1)
        # As diffusers: up_blocks registered (state_dict() key order) before mid_block, but built after it (init).
        self.up_blocks = nn.ModuleList()
        self.mid_block = VAEMidBlock(ch[-1], groups)
        for i in range(n):
            layers = spec.layers_per_block + 1
            self.up_blocks.append(UpDecoderBlock2D(rev[max(i - 1, 0)], rev[i], layers, groups, upsample=i < n - 1))
        self.conv_norm_out = nn.GroupNorm(groups, ch[0], eps=_EPS)
        self.conv_out = nn.Conv2d(ch[0], spec.out_channels, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """See the class docstring."""
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    """The VAE: `encode` → posterior mean latents, `decode` → images; `config.scaling_factor` scales latents."""

    def __init__(self, spec: VAESpec) -> None:
        super().__init__()
        self.config = spec
        self.encoder = Encoder(spec)
        self.decoder = Decoder(spec)
        self.quant_conv = nn.Conv2d(2 * spec.latent_channels, 2 * spec.latent_channels, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(spec.latent_channels, spec.latent_channels, kernel_size=1)

    @property
    def scaling_factor(self) -> float:
        """Latent scaling factor from the config (0.18215 for sd-vae-ft-mse)."""
        return self.config.scaling_factor

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] → (B, latent, H/8, W/8) posterior mean (diffusers' `.latent_dist.mean`, = `.mode()`).

        Unscaled, as diffusers: multiply by `scaling_factor` for UNet latents.
        """
        moments = self.quant_conv(self.encoder(x))  # (B, 2·latent, h, w): [mean ‖ log-variance]
        return moments[:, : self.config.latent_channels]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, latent, h, w) unscaled latents → (B, 3, 8h, 8w) image (diffusers' `.decode(z).sample`)."""
        return self.decoder(self.post_quant_conv(z))
