"""The frame scheduler: one GPU thread generates the faces of every utterance in flight, batched across sessions.

Each utterance (one clip being rendered, of any session and avatar) hands the scheduler the frames that
need a generated face (silent frames never do) and gets its faces back, in frame order, through its own
`Utterance` handle. The scheduler's single thread owns the face source (and so CUDA):

    request threads ──submit──▶ inbox ──▶ GPU thread: prepare (audio tokens) ─▶ batches ─▶ faces ──▶ Utterance
                                                 ▲ earliest deadline first, fixed shapes          (per utterance,
                                                 └── only utterances whose consumer keeps up       in order)

Batches are formed earliest-deadline-first: frame i of an utterance that started at t0 is due at
t0 + start_budget + i / fps, so every session plays in real time and frames of different sessions share
batches. A clip that nobody watches while it renders (`needed_whole`: it is only encoded, and only the
finished clip is seen) is needed when its last frame is due, so all its frames rank by that one deadline:
utterances of that kind that arrive together are then completed one after the other, in arrival order,
instead of all finishing together at the end. An utterance that has not had a face yet goes first with a
small batch (its first frame is what a listener waits for); with several new utterances at once each gets
a share of one batch. An utterance whose consumer has `queue_frames` faces it has not taken yet is skipped
until it catches up, so a slow or stalled consumer never holds up anyone else. Cancelling drops an
utterance's remaining frames; an error in a batch (e.g. GPU out of memory) fails only the utterances that
had frames in it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray

from musetalk.avatar.cache import AvatarCache
from musetalk.errors import GpuOutOfMemory
from musetalk.pipeline.generate import BatchPreparer, FaceRequest, FaceSource, PendingFaces, Phonemes, PrepareItem
from musetalk.utils.gpu import is_out_of_memory, release_cached_memory
from musetalk.utils.recent import RecentValues

log = logging.getLogger(__name__)
T = TypeVar("T")

STATS_WINDOW_S = 10.0  # frames/s and lateness in /health cover this much recent time
_MAX_IN_FLIGHT = 2  # the GPU works on batch k+1 while the host collects batch k
# A second batch is queued behind one in flight only for frames due within this long: work further ahead
# waits, so that a new utterance's first batch queues behind at most one batch on the GPU.
_URGENT_S = 0.3
_PREPARE_ROUNDS = 3  # passes over late arrivals before a first batch goes out (each pass takes ~10 ms on a GPU)


class UtteranceCancelled(Exception):
    """The utterance was cancelled before all its faces were generated."""


class Utterance:
    """The faces of one clip, handed from the scheduler's thread to one consumer thread, in frame order."""

    def __init__(
        self,
        uid: int,
        cache: AvatarCache,
        samples_16k: NDArray[np.float32],
        n_frames: int,
        phonemes: Phonemes,
        frame_ids: NDArray[np.int64],
        source_ids: NDArray[np.int64],
        due_s: NDArray[np.float64],
        cv: threading.Condition,
        blend_weights: NDArray[np.float32] | None = None,
        timed: bool = True,
        plays_at_s: float = 0.0,
    ) -> None:
        self.uid = uid
        self.timed = timed  # its lateness counts in stats() (not for the server's own warm-up clip)
        self.plays_at_s = plays_at_s  # monotonic time its first shown frame is due (due_s counts from it)
        self.cache, self.samples_16k, self.n_frames, self.phonemes = cache, samples_16k, n_frames, phonemes
        self.frame_ids = frame_ids  # (F,) clip frames that need a face, ascending
        self.source_ids = source_ids  # (F,) avatar source frame of each
        self.due_s = due_s  # (F,) monotonic time each is shown, were the clip played as it renders
        self.need_s = due_s  # (F,) when each is needed (the batches' order): due_s, or the clip's end if whole
        self.blend_weights = blend_weights  # (F,) when the source composites: each frame's face weight
        self.cond: Any = None  # the face source's conditioning, set on the GPU thread
        self.scheduled = 0  # frames handed to batches (they are scheduled in order)
        self.delivered = 0  # faces generated
        self.taken = 0  # faces the consumer took
        self.error: BaseException | None = None
        self.cancelled = False
        self.t_submit = time.perf_counter()
        self.t_prepared: float | None = None
        self.t_first_batch: float | None = None
        self.t_last_face: float | None = None
        self._faces: deque[NDArray[np.uint8]] = deque()
        self._cv = cv  # the scheduler's condition: one lock for all shared state

    @property
    def n_needed(self) -> int:
        """Frames that need a generated face."""
        return len(self.frame_ids)

    @property
    def finished(self) -> bool:
        """Nothing more will be generated (all delivered, failed or cancelled)."""
        return self.cancelled or self.error is not None or self.delivered >= self.n_needed

    def next_face(self, timeout_s: float | None = None) -> NDArray[np.uint8]:
        """The next face in frame order (256, 256, 3) BGR uint8; blocks; raises the utterance's error.

        TimeoutError if none arrived within `timeout_s` (the caller may check its own stop flag and retry).
        """
        with self._cv:
            deadline = None if timeout_s is None else time.monotonic() + timeout_s
            while not self._faces:
                if self.error is not None:
                    raise self.error
                if self.cancelled:
                    raise UtteranceCancelled(f"utterance {self.uid} was cancelled")
                if self.taken >= self.n_needed:
                    raise IndexError("all faces of this utterance were taken")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError
                self._cv.wait(remaining)
            face = self._faces.popleft()
            self.taken += 1
            self._cv.notify_all()  # the scheduler may be waiting for this consumer to catch up
            return face

    def timings_ms(self) -> dict[str, float]:
        """Queueing and generation times of this utterance, plus the face source's own stage times."""
        out: dict[str, float] = {}
        timings = getattr(self.cond, "timings_ms", None)
        if callable(timings):
            out.update(timings())
        if self.t_prepared is not None:
            out["prepare_ms"] = (self.t_prepared - self.t_submit) * 1000
        if self.t_first_batch is not None:
            out["queued_ms"] = (self.t_first_batch - self.t_submit) * 1000
            if self.t_last_face is not None:
                out["generate_ms"] = (self.t_last_face - self.t_first_batch) * 1000
        return out


class _Batch:
    def __init__(self, items: list[tuple[Utterance, int]], pending: PendingFaces, first: bool) -> None:
        self.items, self.pending, self.first = items, pending, first


class FrameScheduler:
    """Owns the face source on one thread; batches the due frames of every utterance in flight."""

    def __init__(
        self,
        source: FaceSource,
        fps: int,
        queue_frames: int,
        start_budget_s: float,
        thread_name: str = "musetalk-gpu",
    ) -> None:
        self.source = source
        self.fps = fps
        self.queue_frames = queue_frames
        self.start_budget_s = start_budget_s
        self._cv = threading.Condition()
        self._inbox: deque[Utterance] = deque()
        self._active: list[Utterance] = []
        self._calls: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._stopping = False
        self._next_uid = 0
        self._delivered = RecentValues(STATS_WINDOW_S)  # frames of each recent batch
        self._lateness = RecentValues(STATS_WINDOW_S)  # ms behind deadline of each recent face
        # Where the GPU thread's time went since start (s): tells a host-bound server from a GPU-bound one.
        self._thread_s = dict.fromkeys(("idle", "calls", "prepare", "launch", "collect"), 0.0)
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)
        self._thread.start()

    # ---- request side -------------------------------------------------------------------------------

    def submit(
        self,
        cache: AvatarCache,
        samples_16k: NDArray[np.float32],
        n_frames: int,
        frame_ids: NDArray[np.int64],
        source_ids: NDArray[np.int64],
        phonemes: Phonemes = (),
        first_frame: int = 0,
        blend_weights: NDArray[np.float32] | None = None,
        timed: bool = True,
    ) -> Utterance:
        """Queue the faces of frames `frame_ids` (ascending) shown on avatar frames `source_ids`.

        `first_frame`: the frame id that is played first (frames before it are audio context, never shown).
        `blend_weights` (F,): for a source that composites — the utterance then gets finished I420 frames.
        `timed=False`: nobody waits for it (a warm-up): it is scheduled by its deadlines as any other, but its
        lateness is left out of stats().
        """
        t0 = time.monotonic()
        plays_at = t0 + self.start_budget_s  # when its first shown frame is due
        due = plays_at + (frame_ids - first_frame).astype(np.float64) / self.fps  # (F,)
        with self._cv:
            if self._stopping:
                raise RuntimeError("the frame scheduler is stopped")
            utt = Utterance(
                self._next_uid,
                cache,
                samples_16k,
                n_frames,
                phonemes,
                frame_ids,
                source_ids,
                due,
                self._cv,
                blend_weights,
                timed,
                plays_at,
            )
            self._next_uid += 1
            self._inbox.append(utt)
            self._cv.notify_all()
        return utt

    def plays_in(self, utt: Utterance, seconds: float) -> None:
        """`utt`'s first frame plays `seconds` from now (a live session's next sentence, rendered while the one
        before it plays): its deadlines move that much later than planned, never earlier."""
        with self._cv:
            shift = time.monotonic() + seconds - utt.plays_at_s
            if shift > 0:
                utt.due_s = utt.due_s + shift
                utt.need_s = utt.need_s + shift
                utt.plays_at_s += shift

    def needed_whole(self, utt: Utterance) -> None:
        """Nobody watches `utt` while it renders (a clip only encoded): every frame is needed when its last
        one is due, so it ranks behind frames that are shown sooner and ahead of clips that started later."""
        with self._cv:
            if len(utt.need_s):
                utt.need_s = np.full_like(utt.need_s, utt.need_s[-1])

    def cancel(self, utt: Utterance) -> None:
        """Stop generating for `utt` (idempotent); its consumer gets UtteranceCancelled."""
        with self._cv:
            if not utt.finished:
                utt.cancelled = True
            self._cv.notify_all()

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the scheduler's thread, between batches, and wait for it (warm-up, CUDA set-up)."""
        if threading.current_thread() is self._thread:
            return fn()
        future: Future[T] = Future()
        with self._cv:
            if self._stopping:
                raise RuntimeError("the frame scheduler is stopped")
            self._calls.append((fn, future))
            self._cv.notify_all()
        return future.result()

    def close(self) -> None:
        """Fail what is still queued and stop the thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join()

    def stats(self) -> dict[str, Any]:
        """Live utterances, frames/s and p95 lateness over the last STATS_WINDOW_S, full-batch capacity."""
        now = time.perf_counter()
        with self._cv:
            frames = sum(self._delivered.values(now))
            oldest = self._delivered.oldest_s
            p95 = self._lateness.quantile(0.95, now)
            live = sum(1 for u in self._active if not u.finished) + len(self._inbox)
        window = min(STATS_WINDOW_S, max(now - oldest, 1e-3)) if oldest is not None else STATS_WINDOW_S
        return {
            "live_utterances": live,
            "frames_per_s": frames / window if frames else 0.0,
            "lateness_p95_ms": max(p95, 0.0),
            "thread_s": {k: round(v, 3) for k, v in self._thread_s.items()},
        }

    # ---- the GPU thread -----------------------------------------------------------------------------

    def _has_work(self) -> bool:
        return bool(self._calls or self._inbox) or any(self._schedulable(u) for u in self._active)

    def _schedulable(self, u: Utterance) -> bool:
        # Faces handed out but not taken, plus frames in flight, stay within queue_frames.
        return (
            u.cond is not None
            and not u.finished
            and u.scheduled < u.n_needed
            and u.scheduled - u.taken < self.queue_frames
        )

    def _run(self) -> None:
        in_flight: deque[_Batch] = deque()
        spent = self._thread_s
        t = time.perf_counter()

        def mark(phase: str) -> None:
            nonlocal t
            now = time.perf_counter()
            spent[phase] += now - t
            t = now

        while True:
            with self._cv:
                while not (self._stopping or self._has_work() or in_flight):
                    self._cv.wait()
                if self._stopping:
                    break
                calls = list(self._calls)
                self._calls.clear()
                new = list(self._inbox)
                self._inbox.clear()
            mark("idle")
            for fn, future in calls:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as exc:
                        future.set_exception(exc)
            mark("calls")
            for _ in range(_PREPARE_ROUNDS):
                if not new:
                    break
                if len(new) > 1 and isinstance(self.source, BatchPreparer):
                    self._prepare_many(new)
                else:
                    for utt in new:
                        self._prepare(utt)
                # Utterances that arrived while these were prepared join the same first batch instead of
                # waiting for it to finish (sessions that speak at the same moment).
                with self._cv:
                    new = list(self._inbox)
                    self._inbox.clear()
            with self._cv:
                self._inbox.extendleft(reversed(new))  # still unprepared after the last round: next pass
            mark("prepare")
            batch = None
            # A batch of first frames goes out alone: its faces are what new listeners are waiting for.
            if not (in_flight and in_flight[-1].first) and len(in_flight) < _MAX_IN_FLIGHT:
                with self._cv:
                    items, first = self._form_batch(urgent_only=bool(in_flight))
                if items:
                    batch = self._launch(items, first)
                    if batch is not None:
                        in_flight.append(batch)
            mark("launch")
            if in_flight and (batch is None or len(in_flight) >= _MAX_IN_FLIGHT or in_flight[0].first):
                self._collect(in_flight.popleft())
            mark("collect")
        for pending in in_flight:
            self._collect(pending)
        with self._cv:
            for utt in [*self._inbox, *self._active]:
                if not utt.finished:
                    utt.error = RuntimeError("the frame scheduler stopped")
            self._cv.notify_all()
            for _, future in self._calls:
                future.cancel()

    def _prepare_many(self, utts: list[Utterance]) -> None:
        """Prepare utterances that arrived together in one batched call; on an error, one by one."""
        assert isinstance(self.source, BatchPreparer)
        try:
            items = [PrepareItem(u.cache, u.samples_16k, u.n_frames, u.phonemes) for u in utts]
            conds = self.source.prepare_many(items)
        except BaseException:
            for utt in utts:  # find out which one fails; the others still play
                self._prepare(utt)
            return
        for utt, cond in zip(utts, conds, strict=True):
            self._prepared(utt, cond)

    def _prepare(self, utt: Utterance) -> None:
        try:
            cond = self.source.prepare(utt.cache, utt.samples_16k, utt.n_frames, utt.phonemes)
        except BaseException as exc:
            with self._cv:
                utt.error = _as_gpu_error(exc)
                self._cv.notify_all()
            return
        self._prepared(utt, cond)

    def _prepared(self, utt: Utterance, cond: Any) -> None:
        with self._cv:
            utt.cond = cond
            utt.t_prepared = time.perf_counter()
            if utt.cancelled:
                return
            self._active.append(utt)

    def _form_batch(self, urgent_only: bool = False) -> tuple[list[tuple[Utterance, int]], bool]:
        """(utterance, index into its frame_ids) pairs for the next batch, and whether it is a first batch.

        urgent_only: no batch (empty) unless first frames are waiting or a frame is due within _URGENT_S."""
        self._active = [u for u in self._active if not u.finished]
        ready = [u for u in self._active if self._schedulable(u)]
        if not ready:
            return [], False
        size = self.source.batch_size
        # New utterances' first frames go first — unless an utterance plays later (queued behind other speech,
        # `plays_in`): its frames then wait for their deadlines like any others.
        soon = time.monotonic() + _URGENT_S
        new = sorted((u for u in ready if u.scheduled == 0 and u.plays_at_s <= soon), key=lambda u: u.need_s[0])
        items: list[tuple[Utterance, int]] = []
        if new:
            share = max(1, min(self.source.first_batch_size, size // len(new)))
            for u in new:
                take = min(share, u.n_needed, size - len(items))
                items.extend((u, k) for k in range(take))
                if len(items) >= size:
                    break
            first = True
        else:
            candidates: list[tuple[float, int, int, Utterance]] = []
            for u in ready:
                room = min(size, u.n_needed - u.scheduled, self.queue_frames - (u.scheduled - u.taken))
                candidates.extend((float(u.need_s[k]), u.uid, k, u) for k in range(u.scheduled, u.scheduled + room))
            candidates.sort(key=lambda c: (c[0], c[1], c[2]))
            # Urgent: a frame would be shown within _URGENT_S if its clip played as it renders (also for a clip
            # needed whole: one that falls behind that pace gets the GPU's second batch slot too).
            if urgent_only and min((float(u.due_s[k]) for _, _, k, u in candidates), default=soon) > soon:
                return [], False
            items = [(u, k) for _, _, k, u in candidates[:size]]
            first = False
        for u, k in items:
            u.scheduled = max(u.scheduled, k + 1)
        return items, first

    def _launch(self, items: list[tuple[Utterance, int]], first: bool) -> _Batch | None:
        requests = [
            FaceRequest(
                u.cond,
                int(u.frame_ids[k]),
                int(u.source_ids[k]),
                None if u.blend_weights is None else float(u.blend_weights[k]),
            )
            for u, k in items
        ]
        now = time.perf_counter()
        for u, _ in items:
            if u.t_first_batch is None:
                u.t_first_batch = now
        try:
            pending = self.source.submit(requests)
        except BaseException as exc:
            self._fail(items, exc)
            return None
        return _Batch(items, pending, first)

    def _collect(self, batch: _Batch) -> None:
        try:
            faces = batch.pending.wait()  # one face (or composed frame) per item
        except BaseException as exc:
            self._fail(batch.items, exc)
            return
        now = time.perf_counter()
        mono = time.monotonic()
        with self._cv:
            for (u, k), face in zip(batch.items, faces, strict=True):
                if u.finished:
                    continue  # cancelled or failed meanwhile: drop its faces
                u._faces.append(face)
                u.delivered += 1
                u.t_last_face = now
                if u.timed:
                    self._lateness.add((mono - float(u.need_s[k])) * 1000, now)
            self._delivered.add(len(batch.items), now)
            self._cv.notify_all()

    def _fail(self, items: Sequence[tuple[Utterance, int]], exc: BaseException) -> None:
        """An error in one batch fails the utterances that had frames in it, nobody else."""
        error = _as_gpu_error(exc)
        if isinstance(error, GpuOutOfMemory):
            release_cached_memory()
        log.error("batch of %d frames failed: %s: %s", len(items), type(exc).__name__, exc)
        with self._cv:
            for u, _ in items:
                if not u.finished:
                    u.error = error
            self._cv.notify_all()


def _as_gpu_error(exc: BaseException) -> BaseException:
    """CUDA out-of-memory (raised as torch's error or a RuntimeError) becomes GpuOutOfMemory (HTTP 503)."""
    if isinstance(exc, GpuOutOfMemory) or not is_out_of_memory(exc):
        return exc
    error = GpuOutOfMemory("the GPU ran out of memory for this request; retry shortly")
    error.__cause__ = exc
    return error
