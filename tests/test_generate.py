"""MuseTalk face generation: upstream math reproduced exactly; batching does not change the faces."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from upstream import upstream_whisper_chunks

from musetalk.avatar.cache import AvatarCache, cycle_index
from musetalk.config import AppConfig, load_config
from musetalk.errors import AvatarNotPrepared
from musetalk.models import ModelBundle, load_models
from musetalk.pipeline.generate import MuseTalkFaces
from musetalk.pipeline.synthetic import synthetic_avatar


def _cfg(models_dir: Path, *extra: str) -> AppConfig:
    return load_config(overrides=[f"models.dir={models_dir}", "runtime.device=cpu", *extra])


@pytest.fixture(scope="module")
def bundle(tiny_models_dir: Path) -> ModelBundle:
    return load_models(_cfg(tiny_models_dir))


@pytest.fixture(scope="module")
def avatar(bundle: ModelBundle) -> AvatarCache:
    return synthetic_avatar(n_frames=5, height=96, width=128, vae=bundle.vae, vae_scale=bundle.vae_scale)


def _speech(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = round(seconds * 16000)
    t = np.arange(n) / 16000
    return (0.2 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t)) + 0.02 * rng.standard_normal(n)).astype(
        np.float32
    )


def _upstream_faces(bundle: ModelBundle, avatar: AvatarCache, samples: np.ndarray, batch_size: int) -> np.ndarray:
    """The realtime_inference.py chain in fp32 with the same modules."""
    assert bundle.unet is not None and bundle.vae is not None and bundle.pe is not None
    assert bundle.whisper is not None and bundle.feature_extractor is not None and avatar.latents is not None
    mel = bundle.feature_extractor(samples, sampling_rate=16000, return_tensors="pt").input_features
    with torch.inference_mode():
        states = bundle.whisper(mel, output_hidden_states=True).hidden_states
        chunks = upstream_whisper_chunks(torch.stack(states, dim=2), len(samples))
        cycle = [avatar.latents[cycle_index(i, avatar.n_frames)][None] for i in range(2 * avatar.n_frames)]
        timesteps = torch.tensor([0])
        out = []
        for start in range(0, len(chunks), batch_size):  # datagen: latent index = i mod 2N
            idx = range(start, min(start + batch_size, len(chunks)))
            whisper_batch = chunks[start : idx.stop]
            latent_batch = torch.cat([cycle[i % len(cycle)] for i in idx])
            audio_feature_batch = bundle.pe(whisper_batch)
            pred = bundle.unet(latent_batch, timesteps, audio_feature_batch)
            latents = (1 / bundle.vae_scale) * pred
            decoded = bundle.vae.decode(latents)
            decoded = (decoded / 2 + 0.5).clamp(0, 1)
            image = decoded.detach().cpu().permute(0, 2, 3, 1).float().numpy()
            image = (image * 255).round().astype("uint8")
            out.append(image[..., ::-1])  # RGB → BGR
    return np.concatenate(out)


def _ours(source: MuseTalkFaces, avatar: AvatarCache, samples: np.ndarray, batch: int, cursor: int = 0) -> np.ndarray:
    n = math.floor(len(samples) * 25 // 16000)
    job = source.start(avatar, samples, n)
    try:
        faces = []
        for start in range(0, n, batch):
            ids = list(range(start, min(start + batch, n)))
            sources = [cycle_index(cursor + i, avatar.n_frames) for i in ids]
            faces.append(np.array(job.submit(ids, sources).wait()))
        timings = job.timings_ms()
    finally:
        job.close()
    assert timings["generated_frames"] == n and timings["unet_ms"] > 0 and timings["vae_ms"] > 0
    return np.concatenate(faces)


def test_faces_equal_the_upstream_chain_bit_for_bit(
    tiny_models_dir: Path, bundle: ModelBundle, avatar: AvatarCache
) -> None:
    source = MuseTalkFaces(bundle, _cfg(tiny_models_dir, "batch_size=4"))
    samples = _speech(0.48)  # 12 frames: several cycles of the 5-frame avatar (ping-pong length 10)
    ours = _ours(source, avatar, samples, batch=4)
    theirs = _upstream_faces(bundle, avatar, samples, batch_size=4)
    assert ours.shape == (12, 256, 256, 3) and ours.dtype == np.uint8
    assert np.array_equal(ours, theirs)


def test_batched_generation_equals_one_by_one(tiny_models_dir: Path, bundle: ModelBundle, avatar: AvatarCache) -> None:
    source = MuseTalkFaces(bundle, _cfg(tiny_models_dir, "batch_size=8"))
    samples = _speech(0.32, seed=4)  # 8 frames
    batched = _ours(source, avatar, samples, batch=8, cursor=3)
    single = _ours(source, avatar, samples, batch=1, cursor=3)
    # Identical inputs per frame; the only freedom is float summation order inside batched kernels.
    diff = np.abs(batched.astype(int) - single.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.999


def test_faces_depend_on_audio_and_avatar_frame(
    tiny_models_dir: Path, bundle: ModelBundle, avatar: AvatarCache
) -> None:
    source = MuseTalkFaces(bundle, _cfg(tiny_models_dir))
    a = _ours(source, avatar, _speech(0.16, seed=1), batch=4)
    b = _ours(source, avatar, _speech(0.16, seed=2), batch=4)
    c = _ours(source, avatar, _speech(0.16, seed=1), batch=4, cursor=2)
    assert not np.array_equal(a, b) and not np.array_equal(a, c)


def test_submit_rejects_oversized_batches_and_missing_latents(tiny_models_dir: Path, bundle: ModelBundle,
                                                               avatar: AvatarCache) -> None:
    source = MuseTalkFaces(bundle, _cfg(tiny_models_dir, "batch_size=2"))
    job = source.start(avatar, _speech(0.2), 5)
    try:
        with pytest.raises(ValueError):
            job.submit([0, 1, 2], [0, 1, 2])
    finally:
        job.close()
    from dataclasses import replace

    with pytest.raises(AvatarNotPrepared):
        source.start(replace(avatar, latents=None), _speech(0.2), 5)
    # The lock is released after a failed start: the next job can run.
    source.start(avatar, _speech(0.2), 5).close()


@pytest.mark.gpu
def test_cuda_graphs_match_eager_on_gpu(tiny_models_dir: Path) -> None:
    # compile off: this compares graph replay with eager execution of the same kernels (compiled kernels
    # round differently, which the default runtime.compile would mix in).
    base = [f"models.dir={tiny_models_dir}", "runtime.device=cuda", "batch_size=8", "runtime.compile=false"]
    cfg = load_config(overrides=base)
    bundle = load_models(cfg)
    avatar = synthetic_avatar(n_frames=5, vae=bundle.vae, vae_scale=bundle.vae_scale)
    samples = _speech(0.52)  # 13 frames: batches of 4, 8 and a padded 1
    eager_cfg = load_config(overrides=[*base, "runtime.cuda_graphs=false"])
    graphs = MuseTalkFaces(bundle, cfg)
    graphs.warmup()
    with_graphs = _ours(graphs, avatar, samples, batch=8)
    eager = _ours(MuseTalkFaces(bundle, eager_cfg), avatar, samples, batch=8)
    assert np.abs(with_graphs.astype(int) - eager.astype(int)).max() <= 1


def test_prepare_many_equals_prepare_one_by_one(
    bundle: ModelBundle, avatar: AvatarCache, tiny_models_dir: Path
) -> None:
    from musetalk.pipeline.generate import PrepareItem

    source = MuseTalkFaces(bundle, _cfg(tiny_models_dir))
    clips = [_speech(0.4, seed=1), _speech(0.84, seed=2)]
    items = [PrepareItem(avatar, c, math.floor(len(c) * 25 // 16000)) for c in clips]
    many = source.prepare_many(items)
    for item, cond in zip(items, many, strict=True):
        alone = source.prepare(item.cache, item.samples_16k, item.n_frames)
        torch.testing.assert_close(cond.tokens, alone.tokens, rtol=1e-4, atol=1e-5)
        assert cond.cache is avatar and cond.latents is alone.latents  # the avatar's latents moved once
    with pytest.raises(ValueError, match="expects"):
        source.prepare_many([items[0], items[1]._replace(n_frames=3)])
