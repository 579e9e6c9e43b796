"""Test doubles at the server's seams (renderer, voice). Everything behind the seams is the real code.

SyntheticTestRenderer stands in for the MuseTalk engine: it draws small synthetic frames (a "face"
whose mouth opens with the audio level, and a marker that moves with the frame cursor) and encodes
them with the real clip encoder (musetalk/pipeline/encode.py write_clip), so clips have the real
codec parameters, exact frame counts and the PCM .wav the session stitcher uses.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from musetalk.config import AppConfig, TTSConfig
from musetalk.errors import AvatarNotFound, AvatarNotPrepared
from musetalk.pipeline.encode import write_clip
from musetalk.tts.tone import ToneTTS
from musetalk.types import Audio, Clip

FRAME_PX = 64
PREPARED = ("demo", "other")
UNPREPARED = ("unprepared",)


class SyntheticTestRenderer:
    """Renderer test double: synthetic frames + the given audio through the real encoder."""

    def __init__(self, cfg: AppConfig, frame_px: int = FRAME_PX) -> None:
        self.cfg = cfg
        self.frame_px = frame_px
        self.ready = False
        self.calls: list[tuple[str, int, int]] = []  # (avatar_id, cursor, n_frames), in call order
        self.thread_names: set[str] = set()  # threads that ran render()

    def describe(self) -> dict[str, Any]:
        """Name, device, dtype, avatars."""
        return {"name": "synthetic-test-double", "device": "cpu", "dtype": "uint8", "avatars": list(PREPARED)}

    def warm_up(self) -> None:
        """Nothing to compile; mark ready."""
        self.ready = True

    def check_avatar(self, avatar_id: str) -> None:
        """Known: PREPARED; known but without a cache: UNPREPARED; anything else is unknown."""
        if avatar_id in UNPREPARED:
            raise AvatarNotPrepared(
                f"avatar {avatar_id!r} is not prepared: run python -m scripts.force_prep --avatar-id {avatar_id}"
            )
        if avatar_id not in PREPARED:
            raise AvatarNotFound(f"unknown avatar {avatar_id!r}; loaded: {', '.join(PREPARED)}")

    def _frames(self, audio: Audio, n_frames: int, cursor: int, avatar_id: str) -> Iterator[NDArray[np.uint8]]:
        fps = self.cfg.fps
        per_frame = max(1, int(audio.sample_rate / fps))
        base = 90 if avatar_id == "demo" else 160
        for i in range(n_frames):
            chunk = audio.samples[i * per_frame : (i + 1) * per_frame]
            level = float(np.sqrt(np.mean(chunk**2))) if len(chunk) else 0.0
            frame = np.full((self.frame_px, self.frame_px, 3), base, np.uint8)  # (H, W, 3) BGR
            s = self.frame_px
            frame[s // 4 : 3 * s // 4, s // 4 : 3 * s // 4] = (150, 180, 220)  # face
            mouth_px = 1 + int(min(level * 4, 1.0) * s // 8)
            frame[5 * s // 8 - mouth_px : 5 * s // 8 + mouth_px, 3 * s // 8 : 5 * s // 8] = (40, 40, 120)
            x = (cursor + i) % s  # head-motion stand-in: continues across clips through the cursor
            frame[:4, x] = 255
            yield frame

    def render(
        self, audio: Audio, out_path: Path, avatar_id: str, cursor: int, left_context: Audio | None = None
    ) -> tuple[Clip, int]:
        """One clip of round(duration x fps) frames (at least 1) starting at `cursor`."""
        self.check_avatar(avatar_id)
        self.thread_names.add(threading.current_thread().name)
        n_frames = max(1, round(audio.duration_s * self.cfg.fps))
        self.calls.append((avatar_id, cursor, n_frames))
        frames = self._frames(audio, n_frames, cursor, avatar_id)
        clip = write_clip(frames, audio, out_path, n_frames, self.cfg.fps, self.cfg.encode)
        return clip, cursor + n_frames


def make_test_renderer(cfg: AppConfig) -> SyntheticTestRenderer:
    """Renderer plugin factory for `server.renderer=doubles:make_test_renderer` (subprocess tests)."""
    return SyntheticTestRenderer(cfg)


class GatedRenderer(SyntheticTestRenderer):
    """Blocks each render until `gate` is set; `started` is set when a render begins."""

    def __init__(self, cfg: AppConfig) -> None:
        super().__init__(cfg)
        self.gate = threading.Event()
        self.started = threading.Event()

    def render(
        self, audio: Audio, out_path: Path, avatar_id: str, cursor: int, left_context: Audio | None = None
    ) -> tuple[Clip, int]:
        """Wait for the gate, then render."""
        self.started.set()
        if not self.gate.wait(timeout=30):
            raise TimeoutError("test gate never opened")
        return super().render(audio, out_path, avatar_id, cursor, left_context)


class OomOnceRenderer(SyntheticTestRenderer):
    """The first render raises torch's CUDA out-of-memory error (as a real GPU would), later ones work."""

    def __init__(self, cfg: AppConfig) -> None:
        super().__init__(cfg)
        self.failed = False

    def render(
        self, audio: Audio, out_path: Path, avatar_id: str, cursor: int, left_context: Audio | None = None
    ) -> tuple[Clip, int]:
        """Fail once with torch.OutOfMemoryError."""
        import torch

        if not self.failed:
            self.failed = True
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().render(audio, out_path, avatar_id, cursor, left_context)


class CorruptClipRenderer(SyntheticTestRenderer):
    """After `good` clips, writes clips whose mp4 is garbage, so stitching fails inside FFmpeg."""

    def __init__(self, cfg: AppConfig, good: int = 1) -> None:
        super().__init__(cfg)
        self.good = good

    def render(
        self, audio: Audio, out_path: Path, avatar_id: str, cursor: int, left_context: Audio | None = None
    ) -> tuple[Clip, int]:
        """Render, then (past the good ones) overwrite the mp4 with bytes no demuxer accepts."""
        clip, nxt = super().render(audio, out_path, avatar_id, cursor, left_context)
        if len(self.calls) > self.good:
            clip.path.write_bytes(b"\x00\x00\x00\x18ftypisom" + bytes(range(256)) * 8)
        return clip, nxt


class SlowToneVoice(ToneTTS):
    """The tone voice, but texts starting with "slow" take `delay_s` longer to synthesise."""

    def __init__(self, delay_s: float = 0.5) -> None:
        super().__init__(TTSConfig(engine="tone"))
        self.delay_s = delay_s

    def synthesize(self, text: str, voice: str | None = None, rate: float | None = None) -> Audio:
        """Delay "slow…" texts, then synthesise."""
        if text.startswith("slow"):
            time.sleep(self.delay_s)
        return super().synthesize(text, voice, rate)


class BrokenVoice:
    """A voice engine whose backend fails with an arbitrary exception (as a crashed TTS library would)."""

    name = "broken"

    def synthesize(self, text: str, voice: str | None = None, rate: float | None = None) -> Audio:
        """Always fail."""
        raise RuntimeError("synthesis backend crashed")
