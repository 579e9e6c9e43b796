"""The warm engine: audio → frame plan → faces (FaceSource) → blended frames → encoded clip, overlapped.

Threads of one clip:
- the caller: decodes the audio and plans the frames, then consumes frames in order (encoding them,
  for `render`);
- the frame scheduler's single, long-lived GPU thread (pipeline/scheduler.py), shared by every clip of
  every session: generates the faces of all clips in flight in shared, deadline-ordered batches;
- the clip's feeder thread: takes its faces in frame order and hands every frame to the blend pool
  (silent frames need no face at all);
- the blend pool (shared by all clips, `engine.blend_workers` threads): pastes faces, converts to YUV.
A bounded queue of `engine.queue_frames` futures between feeder and caller gives back-pressure; a slow
caller only slows its own clip. The engine holds no per-session state: the avatar cycle position comes
in as `cursor` and goes out as `next_cursor`, so consecutive clips of a session continue the avatar's
motion instead of restarting at frame 0 (upstream MuseTalk restarts every clip).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import NamedTuple, TypeVar

import cv2
import numpy as np
from numpy.typing import NDArray

from musetalk.avatar.cache import AvatarCache, cycle_index
from musetalk.config import AppConfig, EngineConfig
from musetalk.errors import InputError
from musetalk.pipeline.audio import (
    WHISPER_RATE_HZ,
    AudioSource,
    context_samples,
    load_audio,
    num_frames,
    resample,
)
from musetalk.pipeline.blend import Blender
from musetalk.pipeline.encode import write_clip
from musetalk.pipeline.generate import FaceSource
from musetalk.pipeline.scheduler import FrameScheduler, Utterance, UtteranceCancelled
from musetalk.pipeline.silence import face_weights, frame_rms_db
from musetalk.pipeline.temporal import TemporalSmoother
from musetalk.types import Audio, Clip

log = logging.getLogger(__name__)
T = TypeVar("T")

_POLL_S = 0.1
_ABANDONED_AFTER_S = 120.0  # a full queue nobody drains for this long means the consumer is gone


FrameTap = Callable[["FrameStream"], Iterator[NDArray[np.uint8]]]  # Engine.render's optional view of its frames


class RenderResult(NamedTuple):
    """A finished clip and where the avatar cycle continues for the next clip of the session."""

    clip: Clip
    next_cursor: int


@dataclass(frozen=True)
class FramePlan:
    """What each frame of a clip shows."""

    cursor: int  # avatar cycle position of the clip's first frame
    source_ids: NDArray[np.int64]  # (T,) avatar source frame of each clip frame (ping-pong cycle)
    weights: NDArray[np.float32]  # (T,) generated-face weight; 0 = source frame untouched, no model call

    @property
    def n_frames(self) -> int:
        """Frames in the clip."""
        return len(self.source_ids)

    def next_cursor(self, n_source_frames: int, n_shown: int | None = None) -> int:
        """Cycle position after this clip, or after its first `n_shown` frames (below one ping-pong cycle)."""
        shown = self.n_frames if n_shown is None else n_shown
        return (self.cursor + shown) % (2 * n_source_frames)


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class FrameStream(Iterator[NDArray[np.uint8]]):
    """Blended frames of one clip, in order, produced in the background; use as a context manager.

    Yields BGR (H, W, 3) uint8 frames, or I420 (H·3/2, W) uint8 with `yuv=True`. The first frame is
    available as soon as the scheduler's first (small) batch for this clip is generated and blended.
    A feeder thread takes the clip's faces from the scheduler in frame order and hands each frame to the
    shared blend pool; a bounded queue of `engine.queue_frames` futures gives back-pressure.
    """

    def __init__(
        self,
        engine: Engine,
        cache: AvatarCache,
        audio: Audio,
        samples_16k: NDArray[np.float32],
        plan: FramePlan,
        t_start: float,
        timings_ms: dict[str, float],
        yuv: bool,
        context_16k: NDArray[np.float32] | None = None,
        timed: bool = True,
    ) -> None:
        self.engine, self.cache, self.audio, self.plan = engine, cache, audio, plan
        self.n_frames = plan.n_frames
        self.next_cursor = plan.next_cursor(cache.n_frames)
        self.timings_ms = timings_ms
        self._t_start = t_start
        self._yuv = yuv
        self._queue: queue.Queue[Future[NDArray[np.uint8]] | _Failure] = queue.Queue(engine.cfg.engine.queue_frames)
        self._stop = threading.Event()
        self._blend_s: list[float] = []
        self._emitted = 0
        needed = np.flatnonzero(plan.weights > 0).astype(np.int64)
        # A source that composites (MuseTalk on CUDA) returns finished I420 frames: no CPU blending for them.
        self._composed = yuv and engine.source.composites
        self.utterance: Utterance | None = None
        if len(needed):
            # Left context (the previous sentence): the source hears it first; clip frame i is its frame k + i.
            ctx = context_16k if context_16k is not None else np.zeros(0, np.float32)
            k = num_frames(len(ctx), engine.cfg.fps)
            joined = np.concatenate([ctx, samples_16k]) if k else samples_16k
            phonemes = tuple((t + k / engine.cfg.fps, p) for t, p in audio.phonemes)
            self.utterance = engine.scheduler.submit(
                cache,
                joined,
                k + plan.n_frames,
                needed + k,
                plan.source_ids[needed],
                phonemes,
                first_frame=k,
                blend_weights=plan.weights[needed] if self._composed else None,
                timed=timed,
            )
        self._feeder = threading.Thread(target=self._feed, name="musetalk-feed", daemon=True)
        self._feeder.start()

    # consumer side

    def __next__(self) -> NDArray[np.uint8]:
        if self._emitted >= self.n_frames or self._stop.is_set():
            raise StopIteration
        while True:
            try:
                item = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if not self._feeder.is_alive() and self._queue.empty():
                    raise RuntimeError("frame feeder stopped without finishing the clip") from None
        if isinstance(item, _Failure):
            self.close()
            raise item.exc
        frame = item.result()
        self._emitted += 1
        now_ms = (time.perf_counter() - self._t_start) * 1000
        if self._emitted == 1:
            self.timings_ms["first_frame_ms"] = now_ms
        if self._emitted == self.n_frames:
            self._feeder.join()
            self.timings_ms["frames_ms"] = now_ms
            self.timings_ms["blend_ms"] = sum(self._blend_s) * 1000
            if self.utterance is not None:
                self.timings_ms.update(self.utterance.timings_ms())
        return frame

    def plays_in(self, seconds: float) -> None:
        """Its first frame plays `seconds` from now (after other speech): later deadlines, so the scheduler
        serves the frames that are needed sooner first."""
        if self.utterance is not None:
            self.engine.scheduler.plays_in(self.utterance, seconds)

    def needed_whole(self) -> None:
        """Nobody watches the frames as they come (they are only encoded): the scheduler ranks them all by the
        clip's end, so clips that started together are finished in turn rather than all at the end."""
        if self.utterance is not None and self.engine.cfg.engine.whole_clip_deadline:
            self.engine.scheduler.needed_whole(self.utterance)

    def close(self) -> None:
        """Stop producing (if still running): the scheduler drops this clip's remaining frames."""
        self._stop.set()
        if self.utterance is not None:
            self.engine.scheduler.cancel(self.utterance)
        while self._feeder.is_alive():
            with contextlib.suppress(queue.Empty):
                self._queue.get(timeout=_POLL_S)  # unblock a feeder waiting on a full queue

    def __enter__(self) -> FrameStream:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # feeder side

    def _put(self, item: Future[NDArray[np.uint8]] | _Failure) -> bool:
        deadline = time.monotonic() + _ABANDONED_AFTER_S
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                if time.monotonic() > deadline:
                    # Nobody consumes (a stream dropped without close()): free the GPU for other clips.
                    log.warning("frame stream abandoned by its consumer; stopping generation")
                    self._stop.set()
                    if self.utterance is not None:
                        self.engine.scheduler.cancel(self.utterance)
        return False

    def _blend(self, index: int, face: NDArray[np.uint8] | None, weight: float) -> NDArray[np.uint8]:
        t0 = time.perf_counter()
        frame = self.engine.blender.blend(self.cache, int(self.plan.source_ids[index]), face, weight)
        if self._yuv:
            h, w = frame.shape[:2]
            # yuv420p needs even sizes: an odd last row/column is dropped rather than failing the clip.
            frame = np.asarray(cv2.cvtColor(frame[: h - h % 2, : w - w % 2], cv2.COLOR_BGR2YUV_I420))
        self._blend_s.append(time.perf_counter() - t0)  # list.append is atomic under the GIL
        return frame

    def _next_face(self) -> NDArray[np.uint8] | None:
        """The clip's next face from the scheduler; None once this stream is stopped."""
        assert self.utterance is not None
        while not self._stop.is_set():
            try:
                return self.utterance.next_face(timeout_s=_POLL_S)
            except TimeoutError:
                continue
        return None

    def _feed(self) -> None:
        try:
            smooth = TemporalSmoother(self.engine.cfg.blend.temporal_smoothing)  # this utterance's faces, in order
            for i in range(self.plan.n_frames):
                weight = float(self.plan.weights[i])
                face = None
                if weight > 0:
                    face = self._next_face()
                    if face is None:
                        return
                    if self._composed:  # already the finished I420 frame
                        done: Future[NDArray[np.uint8]] = Future()
                        done.set_result(face)
                        if not self._put(done):
                            return
                        continue
                    face = smooth(face)
                else:
                    smooth.reset()  # a silent gap: the next face starts fresh
                if not self._put(self.engine.pool.submit(self._blend, i, face, weight)):
                    return
        except UtteranceCancelled:
            return
        except BaseException as exc:  # handed to the consumer, which re-raises it
            self._put(_Failure(exc))


class Engine:
    """Audio → clip for any AvatarCache and FaceSource; thread-safe; no per-session state."""

    def __init__(self, cfg: AppConfig, source: FaceSource) -> None:
        self.cfg = cfg
        self.source = source
        self.blender = Blender(cfg.blend, cfg.prep.expand, cfg.engine.mask_cache_frames)
        self.pool = ThreadPoolExecutor(blend_workers(cfg.engine), thread_name_prefix="musetalk-blend")
        # The scheduler's thread owns every model call (and so CUDA), for all clips of all sessions; one
        # long-lived thread also keeps cuBLAS/cuDNN handles warm (a fresh thread per clip cost ~170 ms).
        self.scheduler = FrameScheduler(source, cfg.fps, cfg.engine.queue_frames, cfg.engine.start_budget_ms / 1000)
        self._warned_fps: set[str] = set()

    def plan(self, samples_16k: NDArray[np.float32], cache: AvatarCache, cursor: int = 0) -> FramePlan:
        """Frame count, avatar source frame and face weight of every frame of a clip."""
        if cursor < 0:
            raise ValueError(f"cursor must be >= 0, got {cursor}")
        fps = self.cfg.fps
        n = num_frames(len(samples_16k), fps)
        if n == 0:
            raise InputError(f"audio of {len(samples_16k) / WHISPER_RATE_HZ * 1000:.0f} ms is shorter than one frame")
        n_src = cache.n_frames
        source_ids = np.array([cycle_index(cursor + i, n_src) for i in range(n)], dtype=np.int64)
        weights = face_weights(frame_rms_db(samples_16k, n, fps, WHISPER_RATE_HZ), self.cfg.audio)
        return FramePlan(cursor=cursor, source_ids=source_ids, weights=weights)

    def frames(
        self,
        audio: AudioSource,
        cache: AvatarCache,
        cursor: int = 0,
        *,
        yuv: bool = False,
        left_context_16k: NDArray[np.float32] | None = None,
        timed: bool = True,
    ) -> FrameStream:
        """Start a clip; returns its frame iterator at once (audio errors raise here, as InputError).

        left_context_16k: 16 kHz audio that preceded this clip (the previous sentence); its last whole frames
        (≤ 2 s) are heard by the face source first, so the clip's first frames are conditioned as in one
        continuous rendering. It adds no frames to the clip. timed=False: a warm-up, left out of the
        scheduler's lateness figures.
        """
        t0 = time.perf_counter()
        if cache.fps != self.cfg.fps and cache.avatar_id not in self._warned_fps:
            self._warned_fps.add(cache.avatar_id)
            log.warning("avatar %s was prepared at %d fps, output is %d fps", cache.avatar_id, cache.fps, self.cfg.fps)
        decoded = load_audio(audio)
        samples_16k = resample(decoded, WHISPER_RATE_HZ)  # (n,) float32
        t1 = time.perf_counter()
        plan = self.plan(samples_16k, cache, cursor)
        timings = {
            "audio_ms": (t1 - t0) * 1000,
            "plan_ms": (time.perf_counter() - t1) * 1000,
            "frames": float(plan.n_frames),
            "silent_frames": float(np.sum(plan.weights == 0)),
        }
        context = context_samples(left_context_16k, self.cfg.fps)  # the caller chose how much to pass
        return FrameStream(self, cache, decoded, samples_16k, plan, t0, timings, yuv, context, timed)

    def render(
        self,
        audio: AudioSource,
        cache: AvatarCache,
        out_path: Path,
        cursor: int = 0,
        *,
        left_context_16k: NDArray[np.float32] | None = None,
        frame_tap: FrameTap | None = None,
        timed: bool = True,
        on_audio: Callable[[NDArray[np.float32]], None] | None = None,
    ) -> RenderResult:
        """Audio → finished clip at `out_path` (mp4 + wav), plus the cursor for the session's next clip.

        frame_tap: sees the stream and passes its I420 frames on to the encoder (e.g. showing each on a live
        stream first); when it ends early the clip holds only the frames it passed, audio cut to match.
        timed=False: a warm-up clip, left out of the scheduler's lateness figures.
        on_audio: gets the clip's audio as its WAV will hold it once the first frame is here (write_clip).
        """
        t0 = time.perf_counter()
        with self.frames(audio, cache, cursor, yuv=True, left_context_16k=left_context_16k, timed=timed) as stream:
            if frame_tap is None:
                stream.needed_whole()  # only the encoder sees these frames (a tap decides for its own stream)
            frames = frame_tap(stream) if frame_tap is not None else stream
            clip = write_clip(
                frames, stream.audio, out_path, stream.n_frames, self.cfg.fps, self.cfg.encode, "yuv420p",
                allow_fewer=frame_tap is not None,
                on_audio=on_audio,
            )
            timings = {**stream.timings_ms, **clip.timings_ms}
        total_ms = (time.perf_counter() - t0) * 1000
        timings["total_ms"] = total_ms
        timings["fps"] = clip.n_frames / (total_ms / 1000) if total_ms > 0 else 0.0
        # The clip may have been cut short (frame_tap): the avatar continues after the frames it holds.
        return RenderResult(replace(clip, timings_ms=timings), stream.plan.next_cursor(cache.n_frames, clip.n_frames))

    def on_gpu_thread(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the scheduler's GPU thread, between batches, and wait for it."""
        return self.scheduler.call(fn)

    def close(self) -> None:
        """Stop the scheduler and the blend threads."""
        self.scheduler.close()
        self.pool.shutdown(wait=True)


def blend_workers(cfg: EngineConfig) -> int:
    """Blend threads: engine.blend_workers, or (0 = auto) every core but one, at least 2."""
    return cfg.blend_workers or max(2, (os.cpu_count() or 2) - 1)
