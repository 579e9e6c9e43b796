"""Temporal smoothing of generated faces: shimmer is averaged, motion passes, off is identity, wired into the engine."""

from __future__ import annotations

import numpy as np
import pytest

from musetalk.avatar import PrepResult, load_avatar
from musetalk.config import AppConfig, with_overrides
from musetalk.pipeline.engine import Engine
from musetalk.pipeline.temporal import TemporalSmoother
from musetalk.render.preview import PreviewFaces
from musetalk.types import Audio


def _faces(n: int, shimmer: float, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.integers(60, 190, (64, 64, 3)).astype(np.float32)
    return [np.clip(base + rng.normal(0, shimmer, base.shape), 0, 255).astype(np.uint8) for _ in range(n)]


def test_shimmer_is_reduced_and_off_is_identity() -> None:
    faces = _faces(30, shimmer=4.0)
    off = TemporalSmoother(0.0)
    assert all(off(f) is f for f in faces)
    smooth = TemporalSmoother(0.7)
    out = [smooth(f) for f in faces]
    assert np.array_equal(out[0], faces[0])  # the first face passes

    def flicker(seq: list[np.ndarray]) -> float:
        steps = [np.abs(a.astype(float) - b.astype(float)).mean() for a, b in zip(seq[:-1], seq[1:], strict=True)]
        return float(np.mean(steps))

    assert flicker(out[5:]) < 0.5 * flicker(faces[5:])


def test_real_motion_passes_through() -> None:
    smooth = TemporalSmoother(0.8)
    dark = np.full((32, 32, 3), 40, np.uint8)
    bright = np.full((32, 32, 3), 200, np.uint8)  # the mouth opens: a 160-level change
    smooth(dark)
    moved = smooth(bright)
    assert np.abs(moved.astype(int) - 200).max() <= 2
    smooth.reset()
    assert np.array_equal(smooth(dark), dark)  # after a reset nothing is carried over


def test_bad_strength_is_refused() -> None:
    with pytest.raises(ValueError):
        TemporalSmoother(1.0)


def _render(cfg: AppConfig) -> list[np.ndarray]:
    cache = load_avatar(cfg, cfg.avatar_id)
    rng = np.random.default_rng(1)
    t = np.arange(2 * 16000) / 16000
    envelope = 0.2 * np.clip(np.sin(2 * np.pi * 3 * t), 0, None)
    audio = Audio((envelope * rng.standard_normal(len(t))).astype(np.float32), 16000)
    engine = Engine(cfg, PreviewFaces(cfg.fps, cfg.batch_size))
    try:
        with engine.frames(audio, cache) as stream:
            return list(stream)
    finally:
        engine.close()


def test_engine_applies_the_configured_smoothing(prepared_avatar: tuple[AppConfig, PrepResult]) -> None:
    base = with_overrides(prepared_avatar[0], ["audio.silence_enabled=false"])
    plain = _render(base)
    smoothed = _render(with_overrides(base, ["blend.temporal_smoothing=0.8"]))
    assert np.array_equal(plain[0], smoothed[0])  # the first face of the utterance is untouched
    assert any(not np.array_equal(a, b) for a, b in zip(plain[1:], smoothed[1:], strict=True))
