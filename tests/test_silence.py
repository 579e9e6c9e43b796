"""Silence → source frames, with a short cross-fade into and out of speech."""

from __future__ import annotations

import numpy as np

from musetalk.config import AudioConfig
from musetalk.pipeline.silence import face_weights, frame_rms_db

RATE = 16000
FPS = 25


def _speech_mask(pattern: str) -> np.ndarray:
    """'S' = speech frame (loud tone), '.' = silent frame → samples."""
    per = RATE // FPS
    t = np.arange(per) / RATE
    loud = (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32)
    return np.concatenate([loud if c == "S" else np.zeros(per, np.float32) for c in pattern])


def test_rms_levels_per_frame() -> None:
    samples = _speech_mask("S.S")
    db = frame_rms_db(samples, 3, FPS, RATE)
    assert db[0] > -20 and db[2] > -20 and db[1] <= -100


def test_weights_ramp_in_the_silence_and_ignore_short_gaps() -> None:
    cfg = AudioConfig(silence_min_frames=4, crossfade_frames=3, silence_threshold_db=-45)
    pattern = "SSSS" + "." * 10 + "SS" + ".." + "SS"
    w = face_weights(frame_rms_db(_speech_mask(pattern), len(pattern), FPS, RATE), cfg)
    assert w[:4].tolist() == [1, 1, 1, 1]
    assert np.allclose(w[4:7], [0.75, 0.5, 0.25])  # fade out after speech
    assert w[7:11].tolist() == [0, 0, 0, 0]  # far from speech: the source frame, no model call
    assert np.allclose(w[11:14], [0.25, 0.5, 0.75])  # fade in before speech
    assert w[14:].tolist() == [1] * 6  # the 2-frame gap is shorter than silence_min_frames: keeps talking


def test_all_silent_or_disabled() -> None:
    cfg = AudioConfig()
    silent = np.zeros(RATE, np.float32)
    assert face_weights(frame_rms_db(silent, 25, FPS, RATE), cfg).tolist() == [0.0] * 25
    off = AudioConfig(silence_enabled=False)
    assert face_weights(frame_rms_db(silent, 25, FPS, RATE), off).tolist() == [1.0] * 25
