"""Value types passed between stages."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray


@dataclass(frozen=True)
class Audio:
    """Mono float32 samples in [-1, 1] at `sample_rate` Hz."""

    samples: NDArray[np.float32]  # (n,)
    sample_rate: int
    # (start_s, phoneme) in time order when the TTS reports them (espeak-ng mnemonics, e.g. "m", "aI").
    phonemes: tuple[tuple[float, str], ...] = ()

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


class Renderer(Protocol):
    """The engine seam of the server: audio in, one clip of an avatar out (MuseTalk, or a test double).

    The factory and warm_up run once at start; render is called from several render threads at once (one
    per session speaking), so it must be thread-safe — the built-in engine hands all model work to its one
    GPU thread (the frame scheduler). describe and check_avatar are called from the event loop and must be
    cheap and thread-safe.
    """

    @property
    def ready(self) -> bool:
        """True once models and avatars are loaded and warmed up."""

    def describe(self) -> dict[str, Any]:
        """What /health reports: at least "name", "device", "dtype" and "avatars" (list of ids)."""

    def warm_up(self) -> None:
        """Run one small render so that the first request pays no compile/allocation cost."""

    def check_avatar(self, avatar_id: str) -> None:
        """Raise AvatarNotFound (unknown id) or AvatarNotPrepared (no usable cache) unless it can render it."""

    def render(
        self, audio: Audio, out_path: Path, avatar_id: str, cursor: int, left_context: Audio | None = None
    ) -> tuple[Clip, int]:
        """Render `audio` as a clip at `out_path` (+ its PCM .wav) starting at frame cursor `cursor`.

        `left_context`: the audio that came just before on this session (the previous sentence), which a
        renderer may let its model hear first (audio.context_ms); it adds nothing to the clip.

        `audio` is mono float32 at the voice's or upload's own rate (espeak-ng: 22050 Hz): resample to
        what the model needs (Whisper: 16 kHz). The clip must be H.264 + AAC with a PCM .wav beside it,
        as musetalk/pipeline/encode.py write_clip writes them. Returns the clip and the next cursor, so
        that the next clip of the session continues the head motion where this one stopped.
        """
