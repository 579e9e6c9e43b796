"""Value types passed between stages."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import NDArray


@dataclass(frozen=True)
class Audio:
    """Mono float32 samples in [-1, 1] at `sample_rate` Hz."""

    samples: NDArray[np.float32]  # (n,)
    sample_rate: int

    @property
    def duration_s(self) -> float:
        """Length in seconds."""
        return len(self.samples) / self.sample_rate


@dataclass(frozen=True)
class Clip:
    """One rendered utterance on disk: H.264 + AAC mp4 (and its PCM audio for session stitching)."""

    path: Path
    n_frames: int
    fps: int
    audio_path: Path | None = None  # 16-bit PCM WAV of exactly n_frames / fps seconds
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def duration_s(self) -> float:
        """Video duration in seconds (n_frames / fps); the audio is trimmed/padded to match."""
        return self.n_frames / self.fps
