"""A second process on a session, for tests: append clips to a session, optionally hold it open.

    python tests/session_child.py RESULTS_DIR N_CLIPS [--hold]

Appends N_CLIPS clips (lengths from CLIP_FRAMES, a click 100 ms into each) to the default session of
a SessionStore on RESULTS_DIR, printing "appended <n>" after each. With --hold it then prints
"holding" and keeps the session until a line arrives on stdin. The fault hook of the stitcher
(MUSETALK_TEST_FAULT) applies, so a test can kill it at any step of an append.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from musetalk.config import EncodeConfig
from musetalk.pipeline.encode import write_clip
from musetalk.session.store import SessionStore
from musetalk.types import Audio, Clip

FPS = 25
CLIP_FRAMES = (13, 9, 21, 17, 11)
CLICK_AT_S = 0.1


def make_clip(store: SessionStore, session: str, n_frames: int, seed: int) -> Clip:
    """A 64 px clip of `n_frames` with a 1 kHz click CLICK_AT_S after its start, in the session's clips folder."""
    t = np.arange(int(n_frames / FPS * 16000)) / 16000
    audio = np.zeros_like(t)
    start = int(CLICK_AT_S * 16000)
    audio[start : start + 160] = 0.6 * np.sin(2 * np.pi * 1000 * t[:160])
    frames = [np.full((64, 64, 3), (seed * 37 + i) % 256, np.uint8) for i in range(n_frames)]
    return write_clip(
        iter(frames), Audio(audio.astype(np.float32), 16000), store.new_clip_path(session), n_frames, FPS,
        EncodeConfig(preset="ultrafast"),
    )  # fmt: skip


def main() -> None:
    """Append, report, hold."""
    results, n_clips = Path(sys.argv[1]), int(sys.argv[2])
    store = SessionStore(results, "default", FPS, EncodeConfig())
    for i in range(n_clips):
        store.append("default", make_clip(store, "default", CLIP_FRAMES[i % len(CLIP_FRAMES)], i), i, "demo")
        print(f"appended {i + 1}", flush=True)
    if "--hold" in sys.argv:
        print("holding", flush=True)
        sys.stdin.readline()


if __name__ == "__main__":
    main()
