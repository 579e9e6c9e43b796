"""LatentSync's 16-frame pixel-space SyncNet (`latentsync_syncnet.pt`), used to score lip sync (LSE-C / LSE-D).

Architecture (LatentSync `stable_syncnet`, configured as MuseTalk's `configs/training/syncnet.yaml`): two
convolutional encoders of residual blocks, each block GroupNorm(32)-SiLU-conv3×3-GroupNorm-SiLU-conv3×3 with a
1×1 shortcut when the width changes, followed by a strided 3×3 "downsample" conv after asymmetric zero padding;
the encoder ends with GroupNorm + ReLU and the 1×1 map is the embedding (L2-normalised).

- audio encoder: input (1, 80, 52) — an 80-bin log-mel spectrogram of 0.64 s (16 video frames at 25 fps);
  widths 32…2048 over 7 blocks, strides (2,1), 2, 2, 1, 2, 2, (2,3);
- visual encoder: input (48, 128, 256) — the lower half of 16 RGB 256² face crops stacked on channels, in
  [-1, 1]; widths 64…2048 over 8 blocks, strides (1,2), 2, 2, 2, 2, 2, 2, 2.

The checkpoint is a pickle `{"state_dict": {...}, ...}` with keys `audio_encoder.*` / `visual_encoder.*`
(`conv_in`, `down_blocks.<i>.{norm1,conv1,norm2,conv2,conv_shortcut,downsample_conv}`, `norm_out`). Widths
and block counts are read from the checkpoint, so a tiny random checkpoint in the same format (written by
musetalk.testing) loads through the same function. The full-size network has FULL_PARAMETERS parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from musetalk.errors import WeightsInvalid, WeightsMissing

Stride = int | tuple[int, int]

AUDIO_STRIDES: tuple[Stride, ...] = ((2, 1), 2, 2, 1, 2, 2, (2, 3))
VISUAL_STRIDES: tuple[Stride, ...] = ((1, 2), 2, 2, 2, 2, 2, 2, 2)
FULL_AUDIO_WIDTHS = (32, 64, 128, 256, 512, 1024, 2048)
FULL_VISUAL_WIDTHS = (64, 128, 256, 256, 512, 1024, 2048, 2048)
N_FRAMES = 16  # video frames per SyncNet window
MEL_BINS = 80
MEL_FRAMES = 52  # 0.64 s at a 12.5 ms hop (rounded up)
FACE_PX = 256
GROUPS = 32
# Parameters of the full-size network; the published latentsync_syncnet.pt (1.49 GB of float32) holds this many.
FULL_PARAMETERS = 371_766_496


def _pad_for(stride: Stride) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding before a 3×3 strided conv: keeps the checkpoint's geometry."""
    if isinstance(stride, tuple):
        if stride[0] == 1:
            return (0, 1, 1, 1)
        if stride[1] == 1:
            return (1, 1, 0, 1)
    return (0, 1, 0, 1)


class ResBlock(nn.Module):
    """Pre-activation residual block with an optional strided downsampling conv after the sum."""

    def __init__(self, in_ch: int, out_ch: int, stride: Stride) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(GROUPS, in_ch, eps=1e-6)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(GROUPS, out_ch, eps=1e-6)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None
        self.downsample_conv = nn.Conv2d(out_ch, out_ch, 3, stride=stride) if stride != 1 else None
        self.pad = _pad_for(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_ch, H, W) → (B, out_ch, H', W')."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        h = h + (self.conv_shortcut(x) if self.conv_shortcut is not None else x)
        if self.downsample_conv is not None:
            h = self.downsample_conv(F.pad(h, self.pad))
        return h


class Encoder(nn.Module):
    """conv_in → residual blocks → GroupNorm + ReLU; a (B, C, h, w) input becomes a (B, widths[-1], 1, 1) code."""

    def __init__(self, in_ch: int, widths: tuple[int, ...], strides: tuple[Stride, ...]) -> None:
        super().__init__()
        if len(widths) != len(strides):
            raise ValueError(f"{len(widths)} block widths but {len(strides)} strides")
        self.conv_in = nn.Conv2d(in_ch, widths[0], 3, padding=1)
        chans = (widths[0], *widths)
        self.down_blocks = nn.ModuleList(ResBlock(chans[i], chans[i + 1], s) for i, s in enumerate(strides))
        self.norm_out = nn.GroupNorm(GROUPS, widths[-1], eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_ch, H, W) → (B, C, 1, 1)."""
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        return F.relu(self.norm_out(h))


@dataclass(frozen=True)
class SyncNetShape:
    """Block widths of both encoders (strides are fixed by the architecture)."""

    audio_widths: tuple[int, ...] = FULL_AUDIO_WIDTHS
    visual_widths: tuple[int, ...] = FULL_VISUAL_WIDTHS


class SyncNet(nn.Module):
    """Audio and visual encoders whose unit-length embeddings agree (cosine ≈ 1) when lips match speech."""

    def __init__(self, shape: SyncNetShape = SyncNetShape()) -> None:
        super().__init__()
        self.audio_encoder = Encoder(1, shape.audio_widths, AUDIO_STRIDES)
        self.visual_encoder = Encoder(3 * N_FRAMES, shape.visual_widths, VISUAL_STRIDES)

    def embed_audio(self, mel: torch.Tensor) -> torch.Tensor:
        """(B, 1, 80, 52) log-mel → (B, D) unit vectors."""
        return F.normalize(self.audio_encoder(mel).flatten(1), dim=1)

    def embed_faces(self, faces: torch.Tensor) -> torch.Tensor:
        """(B, 48, 128, 256) stacked lower-half RGB crops in [-1, 1] → (B, D) unit vectors."""
        return F.normalize(self.visual_encoder(faces).flatten(1), dim=1)


def shape_from_state_dict(state: dict[str, torch.Tensor]) -> SyncNetShape:
    """Block widths read from the checkpoint's conv2 weights; WeightsInvalid when the layout is not SyncNet's."""

    def widths(prefix: str, n_blocks: int) -> tuple[int, ...]:
        out = []
        for i in range(n_blocks):
            key = f"{prefix}.down_blocks.{i}.conv2.weight"
            if key not in state:
                raise WeightsInvalid(f"SyncNet checkpoint lacks {key}")
            out.append(int(state[key].shape[0]))
        if f"{prefix}.down_blocks.{n_blocks}.conv1.weight" in state:
            raise WeightsInvalid(f"SyncNet checkpoint has more than {n_blocks} {prefix} blocks")
        return tuple(out)

    return SyncNetShape(widths("audio_encoder", len(AUDIO_STRIDES)), widths("visual_encoder", len(VISUAL_STRIDES)))


def load_syncnet(path: Path) -> SyncNet:
    """Load latentsync_syncnet.pt (or a tiny checkpoint in its format) on the CPU in float32, eval mode."""
    if not path.is_file():
        raise WeightsMissing([path])
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated download or another file under that name
        raise WeightsInvalid(f"{path}: not a readable torch checkpoint ({exc})") from exc
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict):
        raise WeightsInvalid(f"{path}: expected a dict with a 'state_dict'")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    net = SyncNet(shape_from_state_dict(state))
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsInvalid(f"{path}: does not match the SyncNet architecture: {exc}") from exc
    return net.eval().requires_grad_(False)


def write_syncnet(path: Path, shape: SyncNetShape, seed: int = 0) -> Path:
    """Random SyncNet weights of `shape` saved like LatentSync's checkpoints ({"state_dict", "global_step"})."""
    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": SyncNet(shape).state_dict(), "global_step": 0}, path)
    return path
