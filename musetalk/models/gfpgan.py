"""GFPGAN v1.4 face restoration network ("clean" architecture), with the module names of `GFPGANv1.4.pth`.

Our own implementation of the published architecture (Wang et al. 2021, "GFP-GAN: Towards Real-World
Blind Face Restoration with Generative Facial Prior"): a U-Net encoder turns a 512×512 aligned face into
a per-layer style code (W+) and multi-scale spatial feature transforms (SFT); a StyleGAN2 generator,
modulated by both, decodes the restored face. The "clean" variant uses plain bilinear resampling
instead of StyleGAN2's compiled ops. v1.4 is built with out_size 512, 512 style features, an 8-layer
style MLP, channel multiplier 2, W+ codes (`different_w`) and SFT on half of the channels; the
checkpoint holds its weights under the key `params_ema`.

The hyper-parameters are read back from the checkpoint's tensor shapes (`spec_from_state`), so a tiny
checkpoint in the same key format builds a tiny network through the same loader.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from musetalk.errors import WeightsInvalid
from musetalk.models.checkpoint import build_on_meta, load_strict

CHECKPOINT_KEYS = ("params_ema", "params")  # GFPGAN's own loader prefers the EMA weights
_LEAK = 0.2
_BASE_CHANNELS = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256, 128: 128, 256: 64, 512: 32, 1024: 16}
_MULTIPLIED = frozenset({64, 128, 256, 512, 1024})  # resolutions whose width scales with channel_multiplier


@dataclass(frozen=True)
class GFPGANSpec:
    """Shape-defining hyper-parameters; v1.4 is the default."""

    out_size: int = 512
    num_style_feat: int = 512
    num_mlp: int = 8
    channel_multiplier: int = 2
    narrow: float = 1.0

    @property
    def log_size(self) -> int:
        """log2 of the output size (9 for 512)."""
        return int(math.log2(self.out_size))

    def decoder_channels(self, res: int) -> int:
        """StyleGAN2 generator width at resolution `res`."""
        mult = self.channel_multiplier if res in _MULTIPLIED else 1
        return int(_BASE_CHANNELS[res] * mult * self.narrow)

    def encoder_channels(self, res: int) -> int:
        """U-Net width at resolution `res`: half of the generator's."""
        mult = self.channel_multiplier if res in _MULTIPLIED else 1
        return int(_BASE_CHANNELS[res] * mult * self.narrow * 0.5)


class ModulatedConv2d(nn.Module):
    """StyleGAN2 convolution whose weights are scaled per sample by a style vector (optionally demodulated)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, n_style: int, demodulate: bool, upsample: bool) -> None:
        super().__init__()
        self.c_out, self.kernel, self.demodulate, self.upsample = c_out, kernel, demodulate, upsample
        self.modulation = nn.Linear(n_style, c_in, bias=True)
        self.weight = nn.Parameter(torch.randn(1, c_out, c_in, kernel, kernel) / math.sqrt(c_in * kernel**2))

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        """x (B, C_in, H, W), style (B, S) → (B, C_out, H', W'), H' = 2H when upsampling."""
        b, c_in = x.shape[:2]
        weight = self.weight * self.modulation(style).view(b, 1, c_in, 1, 1)  # (B, C_out, C_in, k, k)
        if self.demodulate:
            # Summed in float32: a sum of C_in·k² squares can overflow float16.
            demod = torch.rsqrt(weight.float().pow(2).sum(dim=(2, 3, 4), keepdim=True) + 1e-8)
            weight = weight * demod.to(weight.dtype)
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        h, w = x.shape[2:]
        # One grouped convolution applies each sample's own weights.
        out = F.conv2d(
            x.reshape(1, b * c_in, h, w),
            weight.reshape(b * self.c_out, c_in, self.kernel, self.kernel),
            padding=self.kernel // 2,
            groups=b,
        )
        return out.view(b, self.c_out, *out.shape[2:])


class StyleConv(nn.Module):
    """Modulated 3×3 conv + scaled noise + bias + leaky ReLU."""

    def __init__(self, c_in: int, c_out: int, n_style: int, upsample: bool) -> None:
        super().__init__()
        self.modulated_conv = ModulatedConv2d(c_in, c_out, 3, n_style, demodulate=True, upsample=upsample)
        self.weight = nn.Parameter(torch.zeros(1))  # noise strength
        self.bias = nn.Parameter(torch.zeros(1, c_out, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """`noise` (1 or B, 1, H, W); None draws fresh noise (the training-time behaviour)."""
        out = self.modulated_conv(x, style) * math.sqrt(2.0)  # gain of the leaky ReLU that follows
        if noise is None:
            noise = out.new_empty(out.shape[0], 1, *out.shape[2:]).normal_()
        out = out + self.weight * noise + self.bias
        return F.leaky_relu(out, _LEAK)


class ToRGB(nn.Module):
    """Modulated 1×1 conv to RGB, added to the upsampled RGB of the previous resolution."""

    def __init__(self, c_in: int, n_style: int, upsample: bool) -> None:
        super().__init__()
        self.upsample = upsample
        self.modulated_conv = ModulatedConv2d(c_in, 3, 1, n_style, demodulate=False, upsample=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        """(B, C, H, W) → (B, 3, H, W)."""
        out = self.modulated_conv(x, style) + self.bias
        if skip is not None:
            if self.upsample:
                skip = F.interpolate(skip, scale_factor=2, mode="bilinear", align_corners=False)
            out = out + skip
        return out


class ConstantInput(nn.Module):
    """The learned 4×4 input of the generator."""

    def __init__(self, channels: int, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, channels, size, size))

    def forward(self, batch: int) -> torch.Tensor:
        """(B, C, 4, 4)."""
        return self.weight.expand(batch, -1, -1, -1)


class NormStyleCode(nn.Module):
    """Pixel norm of the style code (first layer of the style MLP)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S) → (B, S) with unit RMS."""
        return x * torch.rsqrt(torch.mean(x**2, dim=1, keepdim=True) + 1e-8)


class StyleGAN2Decoder(nn.Module):
    """StyleGAN2 generator whose features are modulated by SFT conditions after every upsampling conv."""

    def __init__(self, spec: GFPGANSpec) -> None:
        super().__init__()
        n_style = spec.num_style_feat
        layers: list[nn.Module] = [NormStyleCode()]
        for _ in range(spec.num_mlp):
            layers += [nn.Linear(n_style, n_style), nn.LeakyReLU(_LEAK)]
        # Unused when the input is already a W+ latent (v1.4), but part of the checkpoint.
        self.style_mlp = nn.Sequential(*layers)
        c4 = spec.decoder_channels(4)
        self.constant_input = ConstantInput(c4, 4)
        self.style_conv1 = StyleConv(c4, c4, n_style, upsample=False)
        self.to_rgb1 = ToRGB(c4, n_style, upsample=False)
        self.num_layers = (spec.log_size - 2) * 2 + 1
        self.style_convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        # Fixed noise maps, one per style conv: used instead of fresh noise for repeatable output.
        self.noises = nn.Module()
        for i in range(self.num_layers):
            res = 2 ** ((i + 5) // 2)
            self.noises.register_buffer(f"noise{i}", torch.randn(1, 1, res, res))
        c_in = c4
        for lg in range(3, spec.log_size + 1):
            c_out = spec.decoder_channels(2**lg)
            self.style_convs.append(StyleConv(c_in, c_out, n_style, upsample=True))
            self.style_convs.append(StyleConv(c_out, c_out, n_style, upsample=False))
            self.to_rgbs.append(ToRGB(c_out, n_style, upsample=True))
            c_in = c_out

    def forward(self, latent: torch.Tensor, conditions: list[torch.Tensor], fixed_noise: bool) -> torch.Tensor:
        """latent (B, L, S) W+ codes, conditions [scale, shift] per resolution → (B, 3, out, out) in ~[-1, 1]."""
        noise: list[torch.Tensor | None] = (
            [getattr(self.noises, f"noise{i}") for i in range(self.num_layers)]
            if fixed_noise
            else [None] * self.num_layers
        )
        out = self.style_conv1(self.constant_input(latent.shape[0]), latent[:, 0], noise[0])
        skip = self.to_rgb1(out, latent[:, 1], None)
        i = 1
        for level, to_rgb in enumerate(self.to_rgbs):
            conv_up, conv = self.style_convs[2 * level], self.style_convs[2 * level + 1]
            out = conv_up(out, latent[:, i], noise[i])
            if i < len(conditions):
                # SFT on the second half of the channels: the first half keeps the generative prior.
                keep, sft = torch.split(out, out.shape[1] // 2, dim=1)
                out = torch.cat([keep, sft * conditions[i - 1] + conditions[i]], dim=1)
            out = conv(out, latent[:, i + 1], noise[i + 1])
            skip = to_rgb(out, latent[:, i + 2], skip)
            i += 2
        assert skip is not None
        return skip


class ResBlock(nn.Module):
    """Residual block that halves or doubles the resolution (bilinear)."""

    def __init__(self, c_in: int, c_out: int, scale: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_in, 3, 1, 1)
        self.conv2 = nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.skip = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) → (B, C_out, H·scale, W·scale)."""
        out = F.leaky_relu(self.conv1(x), _LEAK)
        out = F.interpolate(out, scale_factor=self.scale, mode="bilinear", align_corners=False)
        out = F.leaky_relu(self.conv2(out), _LEAK)
        x = F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)
        return out + self.skip(x)


def _sft_branch(channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, 1, 1), nn.LeakyReLU(_LEAK), nn.Conv2d(channels, channels, 3, 1, 1)
    )


class GFPGANv1Clean(nn.Module):
    """U-Net encoder + SFT-modulated StyleGAN2 decoder; (B, 3, 512, 512) RGB in [-1, 1] → same."""

    def __init__(self, spec: GFPGANSpec = GFPGANSpec()) -> None:
        super().__init__()
        self.spec = spec
        log_size = spec.log_size
        enc = spec.encoder_channels
        c_first = enc(2**log_size)
        self.conv_body_first = nn.Conv2d(3, c_first, 1)
        self.conv_body_down = nn.ModuleList()
        c_in = c_first
        for lg in range(log_size, 2, -1):
            self.conv_body_down.append(ResBlock(c_in, enc(2 ** (lg - 1)), 0.5))
            c_in = enc(2 ** (lg - 1))
        self.final_conv = nn.Conv2d(c_in, enc(4), 3, 1, 1)
        self.conv_body_up = nn.ModuleList()
        self.toRGB = nn.ModuleList()
        self.condition_scale = nn.ModuleList()
        self.condition_shift = nn.ModuleList()
        c_in = enc(4)
        for lg in range(3, log_size + 1):
            c_out = enc(2**lg)
            self.conv_body_up.append(ResBlock(c_in, c_out, 2.0))
            self.toRGB.append(nn.Conv2d(c_out, 3, 1))
            self.condition_scale.append(_sft_branch(c_out))
            self.condition_shift.append(_sft_branch(c_out))
            c_in = c_out
        self.n_latent = log_size * 2 - 2
        self.final_linear = nn.Linear(enc(4) * 4 * 4, self.n_latent * spec.num_style_feat)
        self.stylegan_decoder = StyleGAN2Decoder(spec)

    def forward(self, x: torch.Tensor, fixed_noise: bool = True) -> torch.Tensor:
        """Restore aligned faces; `fixed_noise` uses the stored noise maps (repeatable, less flicker)."""
        feat = F.leaky_relu(self.conv_body_first(x), _LEAK)
        skips = []
        for block in self.conv_body_down:
            feat = block(feat)
            skips.append(feat)
        feat = F.leaky_relu(self.final_conv(feat), _LEAK)
        latent = self.final_linear(feat.flatten(1)).view(feat.shape[0], self.n_latent, self.spec.num_style_feat)
        conditions: list[torch.Tensor] = []
        for i, block in enumerate(self.conv_body_up):
            feat = block(feat + skips[-1 - i])
            conditions += [self.condition_scale[i](feat), self.condition_shift[i](feat)]
        return self.stylegan_decoder(latent, conditions, fixed_noise)


def spec_from_state(state: Mapping[str, torch.Tensor], source: Path) -> GFPGANSpec:
    """Read the architecture's hyper-parameters back from the checkpoint's tensor shapes."""
    try:
        n_style = int(state["stylegan_decoder.style_mlp.1.weight"].shape[0])
        num_mlp = sum(1 for k in state if k.startswith("stylegan_decoder.style_mlp.") and k.endswith(".weight"))
        log_size = sum(1 for k in state if k.startswith("conv_body_down.") and k.endswith(".conv1.weight")) + 2
        narrow = int(state["stylegan_decoder.constant_input.weight"].shape[1]) / 512
        # style_convs.{2(lg-3)} is the upsampling conv into resolution 2**lg; 64 px is the first multiplied width.
        c64 = int(state["stylegan_decoder.style_convs.6.bias"].shape[1])
    except KeyError as exc:
        raise WeightsInvalid(f"{source}: not a GFPGAN clean-architecture state dict (no {exc})") from None
    return GFPGANSpec(
        out_size=2**log_size,
        num_style_feat=n_style,
        num_mlp=num_mlp,
        channel_multiplier=max(1, round(c64 / (256 * narrow))),
        narrow=narrow,
    )


def read_gfpgan_state(path: Path) -> dict[str, torch.Tensor]:
    """The network weights of a GFPGAN training checkpoint (`params_ema`, else `params`)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise WeightsInvalid(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc})") from exc
    for key in CHECKPOINT_KEYS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            return dict(obj[key])
    raise WeightsInvalid(f"{path}: expected a GFPGAN checkpoint with one of the keys {list(CHECKPOINT_KEYS)}")


def load_gfpgan(path: Path, dtype: torch.dtype | None = None) -> GFPGANv1Clean:
    """Build the network the checkpoint describes and load it strictly, in eval mode."""
    state = read_gfpgan_state(path)
    spec = spec_from_state(state, path)
    net = load_strict(build_on_meta(lambda: GFPGANv1Clean(spec)), state, path, dtype)
    return net.eval()


def parameter_count(spec: GFPGANSpec = GFPGANSpec()) -> int:
    """Number of trainable parameters (86,444,252 for v1.4), counted without allocating weights."""
    return sum(p.numel() for p in build_on_meta(lambda: GFPGANv1Clean(spec)).parameters())
