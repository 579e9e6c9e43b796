"""A session's live stream: one clock that shows the idle avatar and plays utterances as they render.

`LiveSession` ticks once per video frame on the event loop. Each tick puts one frame (I420) and its
48000 / fps samples of audio on air, together — audio and video share this one clock, so the lips are
where the audio is by construction. While nothing is being said the tick shows the avatar's ping-pong
cycle from an idle cursor (mouth closed, silence). An utterance being rendered is a `LiveUtterance`: the
render thread pushes its blended frames as they come out of the engine, the clock takes one per tick,
and the encoder of the session's record only receives a frame once it has been on air — so an
interrupt cuts the record at exactly the frame where the stream stopped. WebRTC is not in this layer
(musetalk/server/webrtc.py sends the ticks).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from musetalk.avatar.cache import FrameStore, cycle_index
from musetalk.errors import Interrupted
from musetalk.pipeline.encode import fit_audio
from musetalk.pipeline.engine import FrameStream
from musetalk.utils.recent import RecentValues

log = logging.getLogger(__name__)

AUDIO_RATE_HZ = 48_000  # WebRTC's Opus clock
LATE_RESYNC_S = 0.2  # a clock this late (the loop was blocked) restarts from now instead of bursting frames
SUBSCRIBER_TICKS = 4  # video frames a viewer may fall behind before its oldest are dropped (bounds its latency)
AUDIO_BACKLOG_TICKS = 250  # audio a viewer may fall behind (10 s at 25 fps) before its oldest is dropped
STATS_WINDOW_S = 10.0  # the stream figures in /health cover this much recent time
QUEUED_SPEECH_MARGIN_S = 0.5  # a queued utterance's frames are due this long before the speech ahead ends


@dataclass(frozen=True)
class Tick:
    """What the stream shows during one frame: the frame, its audio, and whose utterance it is."""

    index: int  # frame number on the stream's timeline (0 = the first tick since the stream started)
    frame: NDArray[np.uint8]  # (H·3/2, W) I420 uint8
    pcm: NDArray[np.int16]  # (48000 / fps,) mono int16
    t_loop_s: float  # event-loop time at which it went on air
    utterance: int | None  # id of the utterance on air, None while idle


def stream_size(height: int, width: int, max_height: int) -> tuple[int, int]:
    """(height, width) of a frame on the stream: scaled down to `max_height` (0 = never), kept even."""
    if max_height <= 0 or height <= max_height:
        return height - height % 2, width - width % 2
    h = max_height - max_height % 2
    return h, max(2, round(width * h / height / 2) * 2)


def to_i420(bgr: NDArray[np.uint8], max_height: int = 0) -> NDArray[np.uint8]:
    """(H, W, 3) BGR → (H'·3/2, W') I420, scaled to `max_height` if taller; an odd row/column is dropped."""
    h, w = stream_size(bgr.shape[0], bgr.shape[1], max_height)
    picture = cv2.resize(bgr, (w, h), interpolation=cv2.INTER_AREA) if h < bgr.shape[0] - 1 else bgr[:h, :w]
    return np.asarray(cv2.cvtColor(np.ascontiguousarray(picture), cv2.COLOR_BGR2YUV_I420))


def scale_i420(frame: NDArray[np.uint8], max_height: int) -> NDArray[np.uint8]:
    """(H·3/2, W) I420 → the same picture at most `max_height` tall (each plane resized; 0 = unchanged)."""
    height, width = frame.shape[0] * 2 // 3, frame.shape[1]
    h, w = stream_size(height, width, max_height)
    if h == height:
        return frame
    flat, luma, chroma = frame.reshape(-1), height * width, height * width // 4
    out = np.empty(h * w * 3 // 2, np.uint8)
    out[: h * w] = cv2.resize(flat[:luma].reshape(height, width), (w, h), interpolation=cv2.INTER_AREA).reshape(-1)
    for k in range(2):  # U, then V: (height/2, width/2) planes laid out one after the other
        plane = flat[luma + k * chroma : luma + (k + 1) * chroma].reshape(height // 2, width // 2)
        start = h * w + k * (h * w // 4)
        out[start : start + h * w // 4] = cv2.resize(plane, (w // 2, h // 2), interpolation=cv2.INTER_AREA).reshape(-1)
    return out.reshape(h * 3 // 2, w)


class StreamFrames:
    """An avatar's source frames as its streams show them while idle (I420, at most `max_height` tall).

    Converting one costs a JPEG decode and a scale (~10 ms at 1080p on one core); every idle stream needs
    25 a second. Converted frames are kept up to `budget_bytes` — the first frames of the avatar, a fixed
    set rather than the most recent ones, because the idle cycle would evict every frame before it came
    round again — and shared by every stream of the avatar (`stream_frames`).
    """

    def __init__(self, frames: FrameStore, max_height: int, budget_bytes: int) -> None:
        # Only a weak reference: the registry below must not keep an avatar's frames alive once nothing
        # shows them (every stream of the avatar holds the store itself).
        self._frames = weakref.ref(frames)
        self.max_height, self.budget_bytes = max_height, budget_bytes
        self.capacity: int | None = None  # frames that fit the budget (known once one is converted)
        self._kept: dict[int, NDArray[np.uint8]] = {}  # index → (H'·3/2, W') I420; only ever added to

    def __getitem__(self, index: int) -> NDArray[np.uint8]:
        """Source frame `index` as a stream frame (H'·3/2, W') I420 uint8; must not be modified."""
        frame = self._kept.get(index)
        if frame is None:
            frames = self._frames()
            if frames is None:
                raise RuntimeError("the avatar's frames are gone")  # a caller always holds them
            frame = to_i420(frames[index], self.max_height)
            if self.capacity is None:
                self.capacity = self.budget_bytes // max(1, frame.nbytes)
            if index < self.capacity:
                self._kept[index] = frame  # a race makes the same frame twice at worst; either copy is right
        return frame

    @property
    def kept(self) -> int:
        """Frames converted and kept."""
        return len(self._kept)


# id(frame store) → (a weak reference to it, its StreamFrames by stream height): shared by every session
# that shows the avatar, and dropped with the store (an avatar prepared again gets a new store, so frames
# are never stale). Keyed by id, not by the store: a store may be a numpy array, which cannot be hashed.
_stream_frames: dict[int, tuple[weakref.ref[Any], dict[int, StreamFrames]]] = {}
_stream_frames_lock = threading.Lock()


def _forgetter(key: int) -> Callable[[weakref.ref[Any]], None]:
    """The weak reference's callback: it runs as the store is freed, before its id can be reused (a
    dict.pop needs no lock, and the lock may be held by the thread that frees the store)."""

    def forget(_: weakref.ref[Any]) -> None:
        _stream_frames.pop(key, None)

    return forget


def stream_frames(frames: FrameStore, max_height: int, budget_bytes: int) -> StreamFrames:
    """The shared StreamFrames of an avatar's frames at this stream height (made on first use)."""
    key = id(frames)
    with _stream_frames_lock:
        entry = _stream_frames.get(key)
        if entry is None or entry[0]() is not frames:
            entry = (weakref.ref(frames, _forgetter(key)), {})
            _stream_frames[key] = entry
        by_height = entry[1]
        shared = by_height.get(max_height)
        if shared is None or shared.budget_bytes != budget_bytes:
            shared = by_height[max_height] = StreamFrames(frames, max_height, budget_bytes)
        return shared


class LiveUtterance:
    """One utterance on its way to the stream; the render thread produces, the stream's clock consumes.

    `tap` is the engine's frame tap (Engine.render): it pushes every frame to the stream at once and hands
    it on to the encoder only once the clock has put it on air, keeping at most `buffer_frames` frames
    ahead of the stream (back-pressure on the engine). Unpaced (nobody watching), frames go straight on.
    """

    def __init__(
        self,
        utterance_id: int,
        fps: int,
        buffer_frames: int,
        loop: asyncio.AbstractEventLoop,
        start_frames: int = 1,
        max_height: int = 0,
    ) -> None:
        self.id = utterance_id
        self.max_height = max_height  # stream frames taller than this are scaled down (the record is not)
        self.fps = fps
        self.buffer_frames = buffer_frames
        self.start_frames = start_frames  # frames rendered before it goes on air (an early stall is worse)
        self.samples_per_frame = AUDIO_RATE_HZ // fps
        self.cursor = 0  # avatar cycle position of the first frame (known once the render started)
        self.n_frames: int | None = None
        self.played = 0  # frames put on air
        self.t_on_air: float | None = None  # time.perf_counter() when its first frame went on air
        self._frames: collections.deque[NDArray[np.uint8]] = collections.deque()
        self._pcm: NDArray[np.int16] = np.zeros(0, np.int16)
        self._cond = threading.Condition()
        self._paced = False
        self._cut = False
        self._ended = False  # no more frames will come (rendered, failed or cut)
        self._loop = loop
        # Set when all frames have been generated (or none ever will): the session's next utterance may
        # start rendering then, so that it is ready when this one ends on air.
        self.generated: asyncio.Future[None] = loop.create_future()
        # Seconds of the session's speech queued before this utterance that have yet to play (set by the
        # session): its frames are not needed before then.
        self.speech_ahead_s: Callable[[], float] = lambda: 0.0

    # render thread

    def tap(self, stream: FrameStream) -> Iterator[NDArray[np.uint8]]:
        """Engine.render's frame tap: each frame goes on the stream, then (once shown) to the encoder."""
        if self._paced:  # the stream's audio (an unpaced utterance is only here so that it can be cut)
            pcm = (fit_audio(stream.audio, stream.n_frames, self.fps, AUDIO_RATE_HZ) * 32767).astype(np.int16)
        with self._cond:
            if self._paced:
                self._pcm = pcm
            self.n_frames = stream.n_frames
            self.cursor = stream.plan.cursor
        plays_in = getattr(stream, "plays_in", None)  # the built-in engine's streams; others render as they do
        if self._paced and plays_in is not None:
            # Queued behind other speech: the scheduler serves frames needed sooner first; a margin so that this
            # one's first frames are ready a little before the speech ahead of it ends.
            plays_in(max(0.0, self.speech_ahead_s() - QUEUED_SPEECH_MARGIN_S))
        needed_whole = getattr(stream, "needed_whole", None)
        if not self._paced and needed_whole is not None:
            needed_whole()  # no viewer: only the finished clip is seen
        emitted = 0
        pending: collections.deque[NDArray[np.uint8]] = collections.deque()
        try:
            for frame in stream:
                # Scaled here, in the render thread, not on the event loop (paced only goes from on to off).
                on_air = scale_i420(frame, self.max_height) if self._paced else frame
                with self._cond:
                    if self._cut:
                        break
                    if self._paced:
                        self._frames.append(on_air)
                        self._cond.notify_all()
                pending.append(frame)
                while pending and self._shown(emitted, block=True):
                    yield pending.popleft()
                    emitted += 1
        finally:
            with self._cond:
                self._ended = True
                self._cond.notify_all()
            self._loop.call_soon_threadsafe(_resolve, self.generated)
        while pending and self._shown(emitted, block=False):
            yield pending.popleft()
            emitted += 1
        if emitted == 0:
            raise Interrupted("the utterance was interrupted before its first frame was shown")

    def _shown(self, index: int, block: bool) -> bool:
        """Whether frame `index` may go to the encoder; waits for the clock while that makes sense.

        block=True (still producing): wait only while the stream's buffer is full; block=False (all frames
        produced): wait until the frame is on air. After a cut only frames that were shown go on.
        """
        with self._cond:
            while self._paced and not self._cut and self.played <= index:
                if block and len(self._frames) < self.buffer_frames:
                    return False
                self._cond.wait(timeout=1.0)
            return not self._paced or self.played > index

    # stream clock (event loop)

    def set_paced(self, paced: bool) -> None:
        """Paced: frames reach the encoder as the stream shows them; else as they come (nobody watching)."""
        with self._cond:
            self._paced = paced
            if not paced:
                self._frames.clear()
            self._cond.notify_all()

    def take(self) -> tuple[NDArray[np.uint8], NDArray[np.int16]] | None:
        """The next frame and its audio, or None if it is not rendered yet."""
        with self._cond:
            if not self._frames:
                return None
            if self.played == 0 and not self._ended and len(self._frames) < min(self.start_frames, self.n_frames or 1):
                return None
            frame = self._frames.popleft()
            i = self.played
            if i == 0:
                self.t_on_air = time.perf_counter()
            self.played += 1
            self._cond.notify_all()
        spf = self.samples_per_frame
        return frame, self._pcm[i * spf : (i + 1) * spf]

    @property
    def done(self) -> bool:
        """Cut, or every frame it will ever have has been shown."""
        with self._cond:
            return self._cut or (self._ended and not self._frames) or self.played == self.n_frames

    @property
    def end_cursor(self) -> int:
        """Cycle position after its last frame (its start until the render has planned it)."""
        return self.cursor + (self.n_frames or 0)

    @property
    def was_cut(self) -> bool:
        """Whether an interrupt stopped it."""
        return self._cut

    def cut(self) -> None:
        """Stop here: nothing more goes on air; the record keeps the frames already shown."""
        with self._cond:
            self._cut = True
            self._frames.clear()
            self._cond.notify_all()


@dataclass(frozen=True)
class _IdleFrame:
    """An idle frame being made ahead of its tick: of which avatar frames, at which cycle position."""

    frames: FrameStore
    position: int
    future: asyncio.Future[NDArray[np.uint8]]


_IDLE_THREADS = 4  # idle frames (a resize and a colour conversion, a few ms each) of every stream in the process
_idle_executor: ThreadPoolExecutor | None = None


def _idle_pool() -> ThreadPoolExecutor:
    """The stream clocks' own threads: idle frames never queue behind the server's other thread-pool work
    (session appends, audio decoding, aiortc's video encoding)."""
    global _idle_executor
    if _idle_executor is None:
        _idle_executor = ThreadPoolExecutor(_IDLE_THREADS, thread_name_prefix="live-idle")
    return _idle_executor


def _consume_error(future: asyncio.Future[NDArray[np.uint8]]) -> None:
    if not future.cancelled():
        future.exception()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Viewer:
    """One viewer's queues of ticks (video and audio are pulled separately by their tracks).

    Its video track sends the newest tick queued and drops older ones: a sender that fell behind (a busy
    host) is back to the present at its next frame instead of sending every later frame late (video
    timestamps come from the tick numbers, so the receiver still places every frame right). The audio queue
    is longer (AUDIO_BACKLOG_TICKS, for a viewer that stopped reading): the audio track itself skips what is
    too late to send, stamping each packet with its tick's place on the timeline (musetalk/server/webrtc.py).
    """

    def __init__(self) -> None:
        self.video: asyncio.Queue[Tick] = asyncio.Queue(SUBSCRIBER_TICKS)
        self.audio: asyncio.Queue[Tick] = asyncio.Queue(AUDIO_BACKLOG_TICKS)
        # Noted by the tracks that send it: ms from a tick going on air to its video frame being taken for
        # encoding, and ms its audio packets were sent after their time (a sender that cannot keep up).
        self.video_age_ms = RecentValues(STATS_WINDOW_S)
        self.audio_late_ms = RecentValues(STATS_WINDOW_S)
        self.video_dropped = 0  # ticks its video track skipped to catch up (newest_video)

    async def newest_video(self) -> Tick:
        """The newest video tick queued (waits for one); the older queued ones are dropped and counted."""
        tick = await self.video.get()
        while not self.video.empty():
            tick = self.video.get_nowait()
            self.video_dropped += 1
        return tick

    def drop_speech(self) -> None:
        """An interrupt: queued speech that is not in the record stops at once for this viewer.

        Ticks still queued for the video track were taken by the clock, so they are in the session's record:
        they keep their frame and audio (at most SUBSCRIBER_TICKS, 160 ms at 25 fps), so the viewer sees
        exactly what the record holds. Queued audio of older ticks (a viewer whose audio lags behind its
        video) becomes silence, kept so that the audio timeline stays whole."""
        video: list[Tick] = []
        while not self.video.empty():
            video.append(self.video.get_nowait())
        for tick in video:
            self.video.put_nowait(tick)
        shown = {tick.index for tick in video}
        audio: list[Tick] = []
        while not self.audio.empty():
            tick = self.audio.get_nowait()
            silent = tick.utterance is not None and tick.index not in shown
            audio.append(replace(tick, pcm=np.zeros_like(tick.pcm), utterance=None) if silent else tick)
        for tick in audio:
            self.audio.put_nowait(tick)

    def put(self, tick: Tick) -> None:
        """Queue a tick; a viewer that lags drops its oldest ticks instead of holding up the others."""
        for q in (self.video, self.audio):
            if q.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    q.get_nowait()
            q.put_nowait(tick)


class LiveSession:
    """The live stream of one session: its viewers, the clock, the idle cursor and the utterance queue."""

    def __init__(
        self,
        session_id: str,
        fps: int,
        avatar_frames: Callable[[str], FrameStore],
        avatar_id: str,
        cursor: int,
        buffer_frames: int,
        lead_frames: int,
        start_frames: int = 1,
        max_height: int = 0,
        idle_cache_bytes: int = 0,
    ) -> None:
        self.session_id = session_id
        self.idle_cache_bytes = idle_cache_bytes  # idle frames kept ready per avatar (StreamFrames)
        self.max_height = max_height  # frames on the stream are at most this tall (0 = the avatar's size)
        self.fps = fps
        self.avatar_id = avatar_id
        self.buffer_frames = buffer_frames
        self.start_frames = start_frames
        self.lead_frames = lead_frames
        self._avatar_frames = avatar_frames
        self._frames = avatar_frames(avatar_id)
        self.idle_cursor = cursor
        self.viewers: set[Viewer] = set()
        self._queue: collections.deque[LiveUtterance] = collections.deque()
        self._last_frame: NDArray[np.uint8] | None = None
        self._clock: asyncio.Task[None] | None = None
        self.ticks = 0
        self.late_ms = RecentValues(STATS_WINDOW_S)  # how late each tick went on air (a busy event loop)
        # Ticks that showed an utterance's last frame again because its next one was not rendered yet (the
        # render fell behind the stream: the viewer sees the mouth stop), since the stream started.
        self.held_frames = 0

    @property
    def n_source_frames(self) -> int:
        """Frames of the avatar now shown (its ping-pong cycle has twice as many)."""
        return len(self._frames)

    @property
    def busy(self) -> bool:
        """An utterance is on air or queued."""
        return bool(self._queue)

    def add_viewer(self) -> Viewer:
        """A new viewer; the first one starts the clock."""
        viewer = Viewer()
        self.viewers.add(viewer)
        if self._clock is None or self._clock.done():
            self._clock = asyncio.get_running_loop().create_task(self._run(), name=f"live-{self.session_id}")
        return viewer

    def remove_viewer(self, viewer: Viewer) -> bool:
        """Drop a viewer; True when it was the last (the clock stops, utterances go on unpaced)."""
        self.viewers.discard(viewer)
        if self.viewers:
            return False
        self.close()
        return True

    def close(self) -> None:
        """Stop the clock; utterances still rendering pass their frames straight to the record."""
        if self._clock is not None:
            self._clock.cancel()
            self._clock = None
        for utterance in self._queue:
            utterance.set_paced(False)
        self._queue.clear()

    def new_utterance(self, utterance_id: int, avatar_id: str) -> LiveUtterance:
        """Queue an utterance behind the ones already queued; its render should start at `start_cursor()`."""
        utterance = LiveUtterance(
            utterance_id, self.fps, self.buffer_frames, asyncio.get_running_loop(), self.start_frames, self.max_height
        )
        utterance.set_paced(True)
        utterance.cursor = self.start_cursor()
        utterance.speech_ahead_s = lambda: self.speech_ahead_s(utterance)
        if avatar_id != self.avatar_id:
            self.avatar_id, self._frames = avatar_id, self._avatar_frames(avatar_id)
        self._queue.append(utterance)
        return utterance

    def speech_ahead_s(self, utterance: LiveUtterance) -> float:
        """Seconds of speech queued before `utterance` still to play; an utterance whose length is not known
        yet counts as none (callable from any thread: it reads a copy of the queue)."""
        frames = 0
        for other in list(self._queue):  # one C call: safe against the loop changing the deque meanwhile
            if other is utterance:
                break
            if not other.was_cut and other.n_frames is not None:
                frames += max(0, other.n_frames - other.played)
        return frames / self.fps

    def start_cursor(self) -> int:
        """Where the next utterance should start on the avatar cycle: after the queued ones, or just ahead of
        the idle avatar (by the frames it takes to render its first frame), so the head does not jump."""
        cycle = 2 * self.n_source_frames
        if self._queue:
            return self._queue[-1].end_cursor % cycle
        return (self.idle_cursor + self.lead_frames) % cycle

    def interrupt(self) -> int:
        """Cut the utterance on air and drop the queued ones; returns how many were cut or dropped."""
        n = len(self._queue)
        for utterance in self._queue:
            utterance.cut()
        self._queue.clear()
        for viewer in self.viewers:
            viewer.drop_speech()
        return n

    def _next(self) -> tuple[NDArray[np.uint8] | None, NDArray[np.int16] | None, int | None]:
        """The current utterance's next frame (or its last one again while the next renders), else idle."""
        while self._queue:
            current = self._queue[0]
            taken = current.take()
            if taken is not None:
                self._last_frame = taken[0]
                return taken[0], taken[1], current.id
            if current.done:
                self._queue.popleft()
                if current.played:
                    self.idle_cursor = (current.cursor + current.played) % (2 * self.n_source_frames)
                self._last_frame = None
                continue
            if current.played > 0 and self._last_frame is not None:
                self.held_frames += 1
                return self._last_frame, None, current.id  # render fell behind: hold the frame, no audio
            break
        return None, None, None

    def _idle_frame(self, frames: FrameStore, position: int) -> NDArray[np.uint8]:
        shown = stream_frames(frames, self.max_height, self.idle_cache_bytes)
        return shown[cycle_index(position, len(frames))]

    def _start_idle_frame(self, position: int) -> _IdleFrame:
        """Start making the idle frame at `position` on the stream clocks' own threads."""
        future = asyncio.get_running_loop().run_in_executor(_idle_pool(), self._idle_frame, self._frames, position)
        future.add_done_callback(_consume_error)  # a frame made ahead and then not needed must not warn
        return _IdleFrame(self._frames, position, future)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        spf = AUDIO_RATE_HZ // self.fps
        silence = np.zeros(spf, np.int16)
        t0, k = loop.time(), 0
        # The idle frame of the next tick is made while this one is on air (one tick ahead), so the clock
        # never waits for a thread to convert it.
        ahead: _IdleFrame | None = None
        try:
            while self.viewers:
                due = t0 + k / self.fps
                now = loop.time()
                if now < due:
                    await asyncio.sleep(due - now)
                elif now - due > LATE_RESYNC_S:
                    t0 = now - k / self.fps
                self.late_ms.add(max(0.0, loop.time() - due) * 1000)
                frame, pcm, utterance_id = self._next()
                if frame is None:
                    if ahead is None or ahead.frames is not self._frames or ahead.position != self.idle_cursor:
                        ahead = self._start_idle_frame(self.idle_cursor)  # an utterance ended, or the avatar changed
                    frame = await ahead.future
                    self.idle_cursor = (self.idle_cursor + 1) % (2 * self.n_source_frames)
                    ahead = self._start_idle_frame(self.idle_cursor)
                tick = Tick(k, frame, silence if pcm is None else pcm, loop.time(), utterance_id)
                for viewer in list(self.viewers):
                    viewer.put(tick)
                k += 1
                self.ticks = k
        except asyncio.CancelledError:
            raise
        except Exception:  # a broken avatar frame store must not take the server down; the stream ends
            log.exception("live stream of session %s stopped", self.session_id)
            for utterance in self._queue:
                utterance.set_paced(False)  # their renders must not wait for a clock that is gone
            self._queue.clear()
