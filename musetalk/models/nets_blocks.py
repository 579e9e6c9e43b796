"""Building blocks shared by the native UNet and VAE (diffusers' layouts and parameter names), and config checks.

Every module here keeps diffusers' attribute names so that checkpoints written by diffusers load strictly, and
computes what the diffusers module computes in inference (eval, no dropout) for the settings the MuseTalk UNet and
sd-vae-ft-mse use. Forward passes branch only on construction-time structure or static shapes, never on tensor
values: the networks are captured as CUDA graphs and compiled.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from musetalk.errors import WeightsInvalid


def check_config(
    source: str,
    config: Mapping[str, Any],
    fixed: Mapping[str, Any],
    free: Collection[str],
    ignored: Collection[str] = (),
) -> None:
    """Raise WeightsInvalid for an unknown key or a `fixed` key whose value differs from the one implemented.

    `free` keys are read (and checked) by the caller; `ignored` keys do not change the inference math.
    """
    unknown = sorted(set(config) - set(fixed) - set(free) - set(ignored))
    if unknown:
        raise WeightsInvalid(f"{source}: config keys {unknown} are not supported by the native implementation")
    for key, want in fixed.items():
        if key in config and config[key] != want:
            raise WeightsInvalid(
                f"{source}: {key}={config[key]!r} is not supported (the native implementation computes {key}={want!r})"
            )


def positive_int(source: str, config: Mapping[str, Any], key: str, default: int) -> int:
    """config[key] (or `default` when absent) as a positive int, else WeightsInvalid."""
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise WeightsInvalid(f"{source}: {key}={value!r} must be a positive integer")
    return value


def positive_float(source: str, config: Mapping[str, Any], key: str, default: float) -> float:
    """config[key] (or `default` when absent) as a positive number, else WeightsInvalid."""
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise WeightsInvalid(f"{source}: {key}={value!r} must be a positive number")
    return float(value)


def int_list(source: str, config: Mapping[str, Any], key: str, default: tuple[int, ...]) -> tuple[int, ...]:
    """config[key] (or `default`) as a non-empty tuple of positive ints, else WeightsInvalid."""
    value = config.get(key, default)
    if (
        not isinstance(value, list | tuple)
        or not value
        or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in value)
    ):
        raise WeightsInvalid(f"{source}: {key}={value!r} must be a non-empty list of positive integers")
    return tuple(value)


def check_divisible(source: str, what: str, channels: int, by: int) -> None:
    """GroupNorm groups and attention heads must divide the channel count; diffusers would fail later, less clearly."""
    if channels % by:
        raise WeightsInvalid(f"{source}: {channels} channels are not divisible by {what} {by}")


class ResnetBlock2D(nn.Module):
    """GroupNorm → SiLU → conv3×3 (+ time embedding) → GroupNorm → SiLU → conv3×3, plus a (1×1-projected) skip."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, eps: float, temb_channels: int | None) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        # The VAE's blocks have no time embedding (diffusers builds them with temb_channels=None).
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels is not None else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.conv_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None
        )

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, Cin, H, W), temb: (B, T) or None → (B, Cout, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))  # (B, Cout, H, W)
        if self.time_emb_proj is not None:
            assert temb is not None, "this block was built with a time embedding"
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]  # (B, Cout, 1, 1) broadcast
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        # diffusers divides by output_scale_factor; every block we build has 1.0 (x / 1.0 is exact, so omitted).
        return skip + h


class Downsample2D(nn.Module):
    """Stride-2 conv3×3. padding=0 pads one zero row/column at the bottom/right first (the VAE encoder's way)."""

    def __init__(self, channels: int, padding: int) -> None:
        super().__init__()
        self.pad_bottom_right = padding == 0
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → (B, C, ⌈H/2⌉, ⌈W/2⌉)."""
        if self.pad_bottom_right:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour ×2 (or to an explicit size) followed by conv3×3."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, C, H, W) → (B, C, 2H, 2W), or (B, C, *size) when the UNet input is not a multiple of its stride."""
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)
