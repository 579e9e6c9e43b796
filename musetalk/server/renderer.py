"""Which renderer the server runs (`server.renderer`): auto | musetalk | preview | "package.module:factory".

`musetalk` is the real engine (UNet + VAE + Whisper, musetalk/pipeline). `preview` needs no weights:
the avatar's own mouth opens with the audio loudness (musetalk/render/preview.py), through the same
blending and encoding path. `auto` picks musetalk when its weights are present, else preview.
"""

from __future__ import annotations

import importlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from musetalk.avatar import AvatarCache, load_avatar, prepare_avatar
from musetalk.avatar.cache import FrameStore
from musetalk.avatar.store import avatar_dir
from musetalk.config import AppConfig, project_path
from musetalk.errors import AvatarNotFound, AvatarNotPrepared, ConfigError, WeightsMissing
from musetalk.models import SERVE_PARTS, ModelBundle, load_models, missing_files
from musetalk.pipeline.audio import WHISPER_RATE_HZ, resample
from musetalk.pipeline.engine import Engine, FrameTap
from musetalk.pipeline.generate import FaceSource, MuseTalkFaces
from musetalk.render.preview import PreviewFaces
from musetalk.types import Audio, Clip, Renderer
from musetalk.utils import gc_pauses
from musetalk.utils.logs import kv

log = logging.getLogger(__name__)

RendererFactory = Callable[[AppConfig], Renderer]
CAPACITY_HEADROOM = 0.8  # auto max_live_sessions keeps this share of the measured frames/s
BUILT_IN = ("auto", "musetalk", "preview")
PREVIEW_BATCH_FRAMES = 4
SWITCH_HINT = "preview renderer (no MuseTalk weights): run `make weights`, then restart, to serve MuseTalk"


@runtime_checkable
class LiveRenderer(Protocol):
    """A renderer that can feed a session's live stream: it shows an avatar's source frames while idle and
    lets a frame tap see each frame of a clip as it is blended (EngineRenderer does)."""

    def avatar_frames(self, avatar_id: str) -> FrameStore:
        """The avatar's source frames, (H, W, 3) BGR uint8 each (its idle cycle)."""

    def render(
        self,
        audio: Audio,
        out_path: Path,
        avatar_id: str,
        cursor: int,
        left_context: Audio | None = None,
        frame_tap: FrameTap | None = None,
        on_audio: Callable[[NDArray[np.float32]], None] | None = None,
    ) -> tuple[Clip, int]:
        """As Renderer.render; `frame_tap` passes the I420 frames on to the encoder and may end the clip early;
        `on_audio` gets the clip's audio (as its WAV will hold it) with its first frame, before any is encoded."""


def resolve_renderer(cfg: AppConfig) -> str:
    """'musetalk' or 'preview' for the built-in choices; auto = musetalk when every weight file is there."""
    name = cfg.server.renderer
    if name == "auto":
        return "preview" if missing_files(cfg.models) else "musetalk"
    return name


def ensure_prepared(cfg: AppConfig, avatar_id: str) -> AvatarCache:
    """Load the avatar; with `preparation: true`, (re)build a missing or stale cache of cfg.video_path first."""
    try:
        return load_avatar(cfg, avatar_id)
    except AvatarNotPrepared as exc:
        video = project_path(cfg.video_path)
        if not (cfg.preparation and avatar_id == cfg.avatar_id and video.is_file()):
            raise
        log.info("preparing avatar %s from %s (%s)", avatar_id, video, exc)
        prepare_avatar(cfg, avatar_id, video, progress=False)
        return load_avatar(cfg, avatar_id)


class EngineRenderer:
    """The server's Renderer over the warm Engine, with the avatars it can render; thread-safe."""

    def __init__(self, cfg: AppConfig, engine: Engine, avatars: dict[str, AvatarCache], device: str, dtype: str):
        self.cfg, self.engine = cfg, engine
        self.name = engine.source.name
        self._avatars = dict(avatars)
        self._lock = threading.Lock()
        self._device, self._dtype = device, dtype
        self._host_ms_per_frame: float | None = None  # CPU ms per frame (blend + encode [+ CPU faces]), warm-up
        self._gen_fps: float | None = None  # face generation frames/s, warm-up (GPU: full-batch replay)
        self._accelerator: threading.Thread | None = None
        self.ready = False

    def describe(self) -> dict[str, Any]:
        """Name, device, dtype, avatars; for the preview, how to switch to MuseTalk."""
        info: dict[str, Any] = {
            "name": self.name,
            "device": self._device,
            "dtype": self._dtype,
            "avatars": sorted(self._avatars),
        }
        if self.name == "preview":
            info["note"] = SWITCH_HINT
        return info

    def _usable(self, cache: AvatarCache) -> AvatarCache:
        if self.name == "musetalk" and cache.latents is None:
            raise AvatarNotPrepared(
                f"avatar {cache.avatar_id!r} was prepared without MuseTalk weights (preview only); rebuild it: "
                f"python -m scripts.force_prep --avatar-id {cache.avatar_id} --force"
            )
        return cache

    def _cache(self, avatar_id: str) -> AvatarCache:
        with self._lock:
            cache = self._avatars.get(avatar_id)
        if cache is None:
            if not avatar_dir(self.cfg, avatar_id).exists():
                raise AvatarNotFound(f"unknown avatar {avatar_id!r}; loaded: {', '.join(sorted(self._avatars))}")
            cache = load_avatar(self.cfg, avatar_id)  # AvatarNotPrepared / AvatarCacheStale name the fix
            with self._lock:
                self._avatars[avatar_id] = cache
        return self._usable(cache)

    def check_avatar(self, avatar_id: str) -> None:
        """AvatarNotFound for an unknown id, AvatarNotPrepared for a cache this renderer cannot use."""
        self._cache(avatar_id)

    def warm_up(self) -> None:
        """Warm the audio path, start accelerating the batch shapes, render one short clip end to end.

        With MuseTalk on CUDA and runtime.background_accelerate (default) the server is ready once the weights
        are on the GPU: CUDA graphs are captured, modules compiled and the warm-up clip rendered in
        background threads while requests are already served eagerly. Otherwise all of it happens here
        first. The warm-up clip measures the host's cost per frame, from which capacity() is estimated.
        """
        source = self.engine.source
        if isinstance(source, MuseTalkFaces):
            t0 = time.perf_counter()
            # Before serving: the audio path at one window; the other Whisper batch sizes warm in the background.
            self.engine.on_gpu_thread(lambda: source.warm_audio(shapes=(1,)))
            log.info("audio path warmed in %.0f ms", (time.perf_counter() - t0) * 1000)
            if self.cfg.runtime.background_accelerate:
                self._accelerator = threading.Thread(target=self._accelerate, name="musetalk-accelerate", daemon=True)
                self._accelerator.start()
                if self._device.startswith("cuda"):
                    # The warm-up clip's eager batches autotune cuDNN for seconds; requests need not wait.
                    threading.Thread(target=self._warm_clip_logged, name="musetalk-warmup", daemon=True).start()
                    self.ready = True
                    return
            else:
                self.engine.on_gpu_thread(source.warm_audio)
                self.engine.on_gpu_thread(source.accelerate)
                self._gen_fps = _full_batch_fps(source)
        self._warm_clip()
        self.ready = True

    def _warm_clip(self) -> None:
        """Render 0.5 s of noise end to end; keep the host's measured cost per frame."""
        rng = np.random.default_rng(0)
        audio = Audio((0.05 * rng.standard_normal(8000)).astype(np.float32), 16000)  # 0.5 s of noise
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            # Untimed: rendered eagerly while graphs are captured (seconds per frame batch), nobody waits for
            # it, and its lateness would fill /health's scheduler figures for the next 10 s.
            clip = self.engine.render(
                audio, self._cache(self.cfg.avatar_id), Path(tmp) / "warmup.mp4", 0, timed=False
            ).clip
        t = clip.timings_ms
        frames = max(clip.n_frames, 1)
        gpu_faces = self._device.startswith("cuda")
        faces_ms = 0.0 if gpu_faces else t.get("unet_ms", 0.0) + t.get("vae_ms", 0.0) + t.get("preview_ms", 0.0)
        self._host_ms_per_frame = (t.get("blend_ms", 0.0) + t.get("encode_ms", 0.0) + faces_ms) / frames
        if not gpu_faces and faces_ms > 0:
            self._gen_fps = 1000.0 * frames / faces_ms
        log.info("warm-up clip rendered in %.0f ms", (time.perf_counter() - t0) * 1000)

    def _warm_clip_logged(self) -> None:
        try:
            self._warm_clip()
        except Exception:  # requests still render (eagerly); only the capacity estimate waits for acceleration
            log.exception("background warm-up clip failed")

    def _accelerate(self) -> None:
        source = self.engine.source
        assert isinstance(source, MuseTalkFaces)
        try:
            source.warm_audio()
            source.accelerate()
            self._gen_fps = _full_batch_fps(source)
            log.info("all batch shapes accelerated: %s", source.accelerated())
            if self.cfg.server.gc_freeze:
                gc_pauses.freeze("accelerated")  # compiling left many long-lived objects behind
        except Exception:  # the server keeps serving with whatever shapes are ready (eager otherwise)
            log.exception("background acceleration failed; serving with %s", source.accelerated())

    def capacity(self) -> dict[str, Any]:
        """Estimated frames/s this renderer sustains (faces vs host blend+encode) and sessions that fit."""
        host_fps = None
        if self._host_ms_per_frame:
            host_fps = (os.cpu_count() or 1) * 1000.0 / self._host_ms_per_frame
        known = [f for f in (self._gen_fps, host_fps) if f]
        fps = min(known) if known else None
        configured = self.cfg.server.max_live_sessions
        sessions = configured or (max(1, int(fps * CAPACITY_HEADROOM / self.cfg.fps)) if fps else None)
        return {
            "max_live_sessions": sessions,
            "source": "config" if configured else "measured",
            "frames_per_s": fps,
            "generate_fps": self._gen_fps,
            "host_fps": host_fps,
        }

    def stats(self) -> dict[str, Any]:
        """The scheduler's live figures and how each batch shape runs."""
        return {**self.engine.scheduler.stats(), "accelerated": self.engine.source.accelerated()}

    def render(
        self,
        audio: Audio,
        out_path: Path,
        avatar_id: str,
        cursor: int,
        left_context: Audio | None = None,
        frame_tap: FrameTap | None = None,
        on_audio: Callable[[NDArray[np.float32]], None] | None = None,
    ) -> tuple[Clip, int]:
        """One clip of `avatar_id` from `cursor`; returns it and the next cursor (callable from many threads).
        `frame_tap` sees every frame before the encoder (the live stream) and may end the clip early."""
        context = resample(left_context, WHISPER_RATE_HZ) if left_context is not None else None
        cache = self._cache(avatar_id)
        result = self.engine.render(
            audio, cache, out_path, cursor, left_context_16k=context, frame_tap=frame_tap, on_audio=on_audio
        )
        return result.clip, result.next_cursor

    def avatar_frames(self, avatar_id: str) -> FrameStore:
        """The avatar's source frames (what the live stream shows while idle)."""
        return self._cache(avatar_id).frames

    def close(self) -> None:
        """Stop the engine's threads."""
        self.engine.close()


def _full_batch_fps(source: MuseTalkFaces) -> float | None:
    """Frames/s of a full batch, from the replay time measured when its shape was accelerated."""
    ms = source.batch_ms.get(source.batch_size)
    return 1000.0 * source.batch_size / ms if ms else None


def build_renderer(cfg: AppConfig) -> Renderer:
    """The built-in renderer named by server.renderer, with cfg.avatar_id (+ server.avatars) loaded.

    Missing weights (musetalk) or an unprepared avatar raise before anything is served; with
    `preparation: true` the default avatar is prepared from `video_path` first when needed.
    """
    name = resolve_renderer(cfg)
    # The optional enhance stage restores generated mouths with GFPGAN: its weights are then needed too.
    parts = SERVE_PARTS | {"gfpgan"} if cfg.enhance.enabled else SERVE_PARTS
    if name == "musetalk":
        missing = missing_files(cfg.models, parts)
        if missing:
            raise WeightsMissing(missing)
    t0 = time.perf_counter()
    avatars = {a: ensure_prepared(cfg, a) for a in dict.fromkeys([cfg.avatar_id, *cfg.server.avatars])}
    t1 = time.perf_counter()
    bundle = load_models(cfg, parts) if name == "musetalk" else None
    t2 = time.perf_counter()
    renderer = engine_renderer(cfg, avatars, bundle)
    # Where start-up time goes (the "ready" line has the total as load_ms).
    log.info("renderer built: %s", kv(avatars_ms=round((t1 - t0) * 1000, 1), models_ms=round((t2 - t1) * 1000, 1),
                                      engine_ms=round((time.perf_counter() - t2) * 1000, 1)))  # fmt: skip
    return renderer


def engine_renderer(cfg: AppConfig, avatars: dict[str, AvatarCache], bundle: ModelBundle | None) -> EngineRenderer:
    """The engine renderer over loaded avatars: MuseTalk with a model bundle, the preview without one."""
    source: FaceSource
    if bundle is not None:
        source = MuseTalkFaces(bundle, cfg)
        device, dtype = str(bundle.device), str(bundle.dtype).removeprefix("torch.")
    else:
        # The preview makes faces one at a time on the CPU, so a batch only sets how many are handed over at
        # once: small batches reach the live stream sooner at the same throughput.
        source = PreviewFaces(cfg.fps, min(cfg.batch_size, PREVIEW_BATCH_FRAMES))
        device, dtype = "cpu", "uint8"
    renderer = EngineRenderer(cfg, Engine(cfg, source), avatars, device, dtype)
    for cache in avatars.values():
        renderer.check_avatar(cache.avatar_id)
    name = source.name
    log.info("renderer: %s on %s (%s)%s", name, device, dtype, f"; {SWITCH_HINT}" if name == "preview" else "")
    return renderer


def renderer_factory(cfg: AppConfig) -> RendererFactory:
    """The factory named by cfg.server.renderer: a built-in name or "package.module:callable"."""
    spec = cfg.server.renderer
    if spec in BUILT_IN:
        return build_renderer
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"server.renderer: expected one of {BUILT_IN} or 'package.module:factory', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"server.renderer: cannot import {module_name!r}: {exc}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"server.renderer: {module_name!r} has no callable {attr!r}")
    return factory
