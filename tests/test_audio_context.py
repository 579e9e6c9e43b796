"""Left audio context for sentences rendered one by one: tokens, and the engine's left_context_16k keyword."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from musetalk.config import AppConfig, load_config
from musetalk.models import load_models
from musetalk.pipeline.audio import (
    WindowSpec,
    audio_tokens,
    audio_tokens_with_context,
    context_samples,
    num_frames,
)
from musetalk.pipeline.engine import Engine
from musetalk.pipeline.generate import MuseTalkFaces
from musetalk.pipeline.synthetic import synthetic_avatar
from musetalk.types import Audio


def _speech(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    voiced = 0.3 * np.sin(2 * np.pi * 180 * t) * (1 + 0.5 * np.sin(2 * np.pi * 4 * t))
    return (voiced + 0.02 * rng.standard_normal(len(t))).astype(np.float32)


def _cfg(models: Path, *extra: str) -> AppConfig:
    return load_config(overrides=[f"models.dir={models}", "runtime.device=cpu", "engine.blend_workers=2", *extra])


def test_context_is_trimmed_to_whole_frames_and_two_seconds() -> None:
    assert len(context_samples(None, 25)) == 0
    assert len(context_samples(np.ones(1000, np.float32), 25)) == 640  # one whole 25 fps frame
    long = np.arange(5 * 16000, dtype=np.float32)
    ctx = context_samples(long, 25)
    assert len(ctx) == 2 * 16000 and ctx[-1] == long[-1]  # the most recent 2 s
    with pytest.raises(ValueError):
        context_samples(long, 24)  # 666.67 samples per frame


def test_tokens_with_context_are_the_joined_rendering(tiny_models_dir: Path) -> None:
    bundle = load_models(_cfg(tiny_models_dir), parts={"whisper"})
    assert bundle.whisper is not None and bundle.feature_extractor is not None and bundle.pe is not None
    models = (bundle.whisper, bundle.feature_extractor, bundle.pe)
    spec = WindowSpec(25)
    before, clip = _speech(1.0, 1), _speech(0.6, 2)
    alone = audio_tokens(clip, spec, *models)
    with_ctx = audio_tokens_with_context(clip, before, spec, *models)
    joined = audio_tokens(np.concatenate([before, clip]), spec, *models)
    assert with_ctx.shape == alone.shape == (num_frames(len(clip), 25), *alone.shape[1:])
    assert torch.equal(with_ctx, joined[25 : 25 + 15])
    assert not torch.allclose(with_ctx[0], alone[0])  # the first frame now hears the previous sentence
    assert torch.equal(audio_tokens_with_context(clip, None, spec, *models), alone)


def test_engine_left_context_matches_one_long_rendering(tiny_models_dir: Path) -> None:
    cfg = _cfg(tiny_models_dir, "batch_size=4", "audio.silence_enabled=false")
    avatar = synthetic_avatar(n_frames=6, height=72, width=96)
    engine = Engine(cfg, MuseTalkFaces(load_models(cfg), cfg))
    before, clip = _speech(0.4, 3), _speech(0.32, 4)  # 10 + 8 frames
    try:
        with engine.frames(Audio(np.concatenate([before, clip]), 16000), avatar, cursor=0) as stream:
            long = list(stream)
        with engine.frames(Audio(clip, 16000), avatar, cursor=10, left_context_16k=before) as stream:
            continued = list(stream)
        with engine.frames(Audio(clip, 16000), avatar, cursor=10) as stream:
            alone = list(stream)
    finally:
        engine.close()
    assert len(continued) == len(alone) == 8
    for a, b in zip(continued, long[10:], strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2  # the same frames as one continuous rendering
    assert any(np.abs(a.astype(int) - b.astype(int)).max() > 2 for a, b in zip(alone, long[10:], strict=True))
