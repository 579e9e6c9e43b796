"""Blending on the device: the same frames as the CPU blend pool (exact outside the paste, within a level inside)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from musetalk.avatar.cache import AvatarCache
from musetalk.config import load_config
from musetalk.models import load_models
from musetalk.pipeline.blend import Blender
from musetalk.pipeline.composite import DeviceCompositor, bgr_to_i420, supports
from musetalk.pipeline.engine import Engine
from musetalk.pipeline.generate import MuseTalkFaces
from musetalk.pipeline.synthetic import synthetic_avatar
from musetalk.types import Audio


def _speech_with_gap(seconds: float, gap_s: tuple[float, float], rate: int = 16000) -> Audio:
    t = np.arange(round(seconds * rate)) / rate
    x = 0.3 * np.sin(2 * np.pi * 190 * t) * (1 + 0.5 * np.sin(2 * np.pi * 4 * t))
    x[(t >= gap_s[0]) & (t < gap_s[1])] = 0.0
    return Audio(x.astype(np.float32), rate)


def test_i420_is_bit_identical_to_opencv() -> None:
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 48, 64, 3), dtype=np.uint8)
    ours = bgr_to_i420(torch.from_numpy(frames)).numpy()
    for frame, mine in zip(frames, ours, strict=True):
        np.testing.assert_array_equal(mine, cv2.cvtColor(frame, cv2.COLOR_BGR2YUV_I420))


def _cpu_i420(blender: Blender, cache: AvatarCache, index: int, face: np.ndarray, weight: float) -> np.ndarray:
    frame = blender.blend(cache, index, face, weight)
    h, w = frame.shape[:2]
    return np.asarray(cv2.cvtColor(frame[: h - h % 2, : w - w % 2], cv2.COLOR_BGR2YUV_I420))


def _outside(region: tuple[int, int, int, int], h: int, w: int) -> np.ndarray:
    """(H·3/2, W) bool: I420 samples no pixel of `region` can reach (chroma: its 2×2 blocks, one block margin)."""
    x1, y1, x2, y2 = region
    mask = np.ones((h * 3 // 2, w), dtype=bool)
    mask[y1:y2, x1:x2] = False
    chroma = np.ones((h // 2, w // 2), dtype=bool)
    chroma[max(0, y1 // 2 - 1) : y2 // 2 + 1, max(0, x1 // 2 - 1) : x2 // 2 + 1] = False
    q = (h // 2) * (w // 2)
    flat = mask.reshape(-1)
    flat[h * w : h * w + q] = chroma.reshape(-1)
    flat[h * w + q :] = chroma.reshape(-1)
    return mask


@pytest.mark.parametrize("subpixel", [True, False])
def test_device_paste_matches_the_cpu_blender(subpixel: bool) -> None:
    cfg = load_config(overrides=[f"blend.subpixel_enabled={str(subpixel).lower()}"])
    cache = synthetic_avatar(n_frames=6, height=121, width=161, seed=4)  # odd sizes: last row/column dropped
    rng = np.random.default_rng(1)
    # Smooth faces (like decoder output) with some texture.
    faces = cv2.GaussianBlur(rng.integers(0, 256, (4, 256, 256, 3), dtype=np.uint8).reshape(4 * 256, 256, 3), (9, 9), 3)
    faces = faces.reshape(4, 256, 256, 3)
    ids, weights = [0, 3, 5, 3], [1.0, 0.4, 1.0, 0.0]
    blender = Blender(cfg.blend, cfg.prep.expand)
    comp = DeviceCompositor(cfg.blend, cfg.prep.expand, torch.device("cpu"))
    out = comp.compose(cache, torch.from_numpy(faces), ids, weights).numpy()
    h, w = comp.frame_size_hw(cache)
    assert out.shape == (4, h * 3 // 2, w) and (h, w) == (120, 160)
    for k, (i, wt) in enumerate(zip(ids, weights, strict=True)):
        ref = _cpu_i420(blender, cache, i, faces[k], wt)
        diff = np.abs(out[k].astype(np.int16) - ref.astype(np.int16))
        if wt == 0.0:
            assert diff.max() == 0  # the source frame, exactly
            continue
        outside = _outside(blender.frame_alpha(cache, i).region, h, w)
        assert diff[outside].max() == 0, "pixels the paste cannot reach changed"
        assert diff.max() <= 2 and diff[~outside].mean() < 0.15, (diff.max(), diff[~outside].mean())
        assert np.abs(ref.astype(np.int16) - cv2.cvtColor(cache.frames[i][:h, :w], cv2.COLOR_BGR2YUV_I420)).max() > 20


def test_only_plain_feather_blending_runs_on_the_device() -> None:
    assert supports(load_config().blend)
    for extra in ("blend.color_match=true", "blend.blend_mode=poisson", "blend.temporal_smoothing=0.5"):
        assert not supports(load_config(overrides=[extra]).blend)
        with pytest.raises(ValueError):
            DeviceCompositor(load_config(overrides=[extra]).blend, 1.5, torch.device("cpu"))


def test_engine_frames_with_device_compositing_match_the_blend_pool(tiny_models_dir: Path) -> None:
    """Through the scheduler: composed I420 frames come back in order and equal the CPU blend within a level."""
    cfg = load_config(overrides=[f"models.dir={tiny_models_dir}", "runtime.device=cpu", "audio.silence_enabled=true"])
    bundle = load_models(cfg)
    cache = synthetic_avatar(n_frames=5, height=96, width=128, vae=bundle.vae, vae_scale=bundle.vae_scale)
    audio = _speech_with_gap(1.2, gap_s=(0.4, 0.9))  # a silent stretch: frames that bypass the source
    results = []
    for composite in (False, True):
        source = MuseTalkFaces(bundle, cfg, composite=composite)
        assert source.composites is composite
        engine = Engine(cfg, source)
        try:
            with engine.frames(audio, cache, cursor=3, yuv=True) as stream:
                weights = stream.plan.weights
                results.append(np.stack(list(stream)))
        finally:
            engine.close()
    assert source.compositor is not None and source.compositor.frames_composed == int((weights > 0).sum())
    plain, composed = results
    assert plain.shape == composed.shape and 0 < int((weights == 0).sum()) < len(weights)
    diff = np.abs(plain.astype(np.int16) - composed.astype(np.int16))
    assert diff[weights == 0].max() == 0  # silent frames: the CPU path in both
    assert diff.max() <= 2 and diff.mean() < 0.1


@pytest.mark.gpu
def test_cuda_compositing_through_graphs_matches_the_cpu_blend(tiny_models_dir: Path) -> None:
    """On CUDA (graph replay, pinned copies, batches mixing two avatars) composed frames equal the CPU blend."""
    cfg = load_config(overrides=[f"models.dir={tiny_models_dir}", "runtime.device=cuda", "batch_size=8"])
    bundle = load_models(cfg)
    caches = [
        synthetic_avatar(n_frames=5, height=h, width=w, seed=s, vae=bundle.vae, vae_scale=bundle.vae_scale,
                         avatar_id=f"a{s}")
        for s, (h, w) in enumerate(((96, 128), (72, 100)))
    ]  # fmt: skip
    audio = _speech_with_gap(1.0, gap_s=(0.5, 0.7))
    results: dict[bool, list[np.ndarray]] = {}
    for composite in (False, True):
        source = MuseTalkFaces(bundle, cfg, composite=composite)
        source.warmup()  # graphs for every batch shape
        engine = Engine(cfg, source)
        try:
            streams = [engine.frames(audio, c, yuv=True) for c in caches]  # both in flight: shared batches
            results[composite] = [np.stack(list(s)) for s in streams]
            for s in streams:
                s.close()
        finally:
            engine.close()
    for plain, composed in zip(results[False], results[True], strict=True):
        assert plain.shape == composed.shape
        diff = np.abs(plain.astype(np.int16) - composed.astype(np.int16))
        assert diff.max() <= 2 and diff.mean() < 0.1


def test_a_batch_mixing_avatars_pastes_each_face_with_its_own_weight(tiny_models_dir: Path) -> None:
    """Composed requests of two avatars interleaved in one batch: every frame gets its own source and weight."""
    from musetalk.pipeline.generate import FaceRequest

    cfg = load_config(overrides=[f"models.dir={tiny_models_dir}", "runtime.device=cpu"])
    bundle = load_models(cfg)
    caches = [
        synthetic_avatar(n_frames=4, height=h, width=w, seed=s, vae=bundle.vae, vae_scale=bundle.vae_scale)
        for s, (h, w) in enumerate(((96, 128), (72, 100)))
    ]
    plain, composing = MuseTalkFaces(bundle, cfg, composite=False), MuseTalkFaces(bundle, cfg, composite=True)
    samples = _speech_with_gap(0.4, gap_s=(1.0, 1.0)).samples  # 10 frames, all voiced
    plans = [(0, 1, 1.0), (1, 2, 0.3), (0, 3, 0.6), (1, 0, 0.9)]  # (avatar, source frame, weight), interleaved
    conds = {name: [src.prepare(c, samples, 10) for c in caches] for name, src in (("p", plain), ("c", composing))}
    faces = plain.submit([FaceRequest(conds["p"][a], k, sid) for k, (a, sid, _) in enumerate(plans)]).wait()
    frames = composing.submit([FaceRequest(conds["c"][a], k, sid, w) for k, (a, sid, w) in enumerate(plans)]).wait()
    blender = Blender(cfg.blend, cfg.prep.expand)
    for (a, sid, w), face, frame in zip(plans, faces, frames, strict=True):
        ref = _cpu_i420(blender, caches[a], sid, np.asarray(face), w)
        assert frame.shape == ref.shape
        assert np.abs(frame.astype(np.int16) - ref.astype(np.int16)).max() <= 2
