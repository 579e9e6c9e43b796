"""The prepared avatar held in memory while serving (read-only), and its frame-cycle arithmetic.

Geometry convention: the model sees an upright 256×256 face crop. `face_to_frame[i]` is the 2×3
affine matrix mapping crop pixel coordinates (u, v) in [0, 256) to frame-i pixel coordinates
(x, y). It encodes the stabilised float box (position and scale, sub-pixel) and the head roll from
Lucas-Kanade tracking. Prep crops with its inverse; blending pastes with it — so both agree exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from numpy.typing import NDArray

FACE_SIZE_PX = 256  # MuseTalk generates 256×256 faces


class FrameStore(Protocol):
    """Random access to the N source frames (BGR uint8), e.g. a memory-mapped array."""

    def __len__(self) -> int:
        """Number of source frames N."""

    def __getitem__(self, index: int) -> NDArray[np.uint8]:
        """Frame `index` as (H, W, 3) BGR uint8; must not be modified by the caller."""


@dataclass(frozen=True)
class AvatarCache:
    """Everything the runtime needs about one avatar; built by force_prep, never mutated."""

    avatar_id: str
    root: Path
    fps: int
    frames: FrameStore  # N source frames, (H, W, 3) BGR uint8 each
    landmarks: NDArray[np.float32]  # (N, 68, 2) iBUG 68-point landmarks, frame px
    boxes: NDArray[np.float32]  # (N, 4) x1, y1, x2, y2: stabilised face box (incl. extra_margin), float px
    face_to_frame: NDArray[np.float32]  # (N, 2, 3) crop (256² px) → frame px affine
    masks: Sequence[NDArray[np.uint8]]  # N hard (unblurred) blend masks, 0/255, each (h_i, w_i) over its mask box
    mask_boxes: NDArray[np.int32]  # (N, 4) x1, y1, x2, y2 (end-exclusive) in frame px, inside the frame
    latents: torch.Tensor | None  # (N, 8, 32, 32) float32 [masked ‖ reference] scaled VAE latents; None = preview only
    manifest: dict[str, Any] = field(default_factory=dict)
    # (N, 68, 2) landmarks as detected (before smoothing; the smoothed ones where no face was accepted), or None.
    # Smoothing flattens fast lip motion, so whatever measures the mouth reads these.
    raw_landmarks: NDArray[np.float32] | None = None

    @property
    def n_frames(self) -> int:
        """Number of source frames N (the ping-pong cycle has 2N)."""
        return len(self.frames)

    @property
    def frame_size_hw(self) -> tuple[int, int]:
        """(height, width) of the source frames."""
        h, w = self.frames[0].shape[:2]
        return int(h), int(w)


def cycle_index(position: int, n_frames: int) -> int:
    """Source frame shown at cycle position `position`: 0,1,…,N-1,N-1,…,1,0,0,1,… (ping-pong)."""
    if n_frames <= 0:
        raise ValueError("an avatar needs at least one frame")
    p = position % (2 * n_frames)
    return p if p < n_frames else 2 * n_frames - 1 - p
