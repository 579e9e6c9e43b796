"""Speak on a session: TTS → render (GPU worker) → append. Used by /speak, /speak_audio and the web app.

Ordering: each request takes a ticket from its session's turnstile when it arrives. TTS runs at once
(so sentence 2 is synthesised while sentence 1 renders), but render + append wait for the ticket's turn,
so clips land in arrival order and each render starts at the cursor the previous clip left. Different
sessions never wait for each other except for the GPU worker's queue.

Live: when the session has a viewer (musetalk/server/webrtc.py), each utterance's frames go on the
session's stream as they are blended, and reach the record's encoder once shown. The next utterance's
turn then comes as soon as this one's frames are all generated (not appended), so it renders while this
one plays and follows it on the stream with no gap; appends still happen in arrival order.
Interrupt: cuts the utterance being rendered (the record keeps what was shown) and drops every request
of the session that arrived before the interrupt.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from musetalk.config import AppConfig, is_valid_id
from musetalk.errors import Busy, InputError, Interrupted, MuseTalkError, SessionConflict, TTSFailed
from musetalk.server.renderer import LiveRenderer
from musetalk.server.worker import RenderPool
from musetalk.session.live import LiveUtterance
from musetalk.session.stitcher import AppendResult, SessionAudio
from musetalk.session.store import SessionStore
from musetalk.tts.base import VoiceEngine
from musetalk.types import Audio, Clip, Renderer
from musetalk.utils.logs import kv

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

    from musetalk.server.webrtc import LiveHub

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpeakResult:
    """What one speak did: where the session video is, where the new clip starts, and stage timings."""

    session_id: str
    avatar_id: str
    clip_index: int  # position of the new clip in the session (0-based)
    clip_start_s: float  # where it starts within the session video
    clip_duration_s: float
    session_duration_s: float
    n_clips: int
    video_path: Path
    video_url: str  # changes with every append (?v=n_clips) so players reload
    timings_ms: dict[str, float] = field(default_factory=dict)
    utterance: int = 0  # this server's id of the utterance (the live stream's events name it)
    interrupted: bool = False  # cut by an interrupt: the clip holds the frames shown until then


@dataclass(frozen=True)
class Accepted:
    """A speak request taken on without waiting ("wait": false): where its clip will land."""

    session_id: str
    clip_index: int  # where the clip lands in the session, unless a request queued before it fails
    utterance: int  # the live stream's events name it ({"type": "speaking", "utterance": ...})


@dataclass
class SpeakTicket:
    """One admitted speak request of a session, from arrival to append (admit_*, then finish_*)."""

    sid: str
    aid: str
    turnstile: Turnstile
    ticket: int
    epoch: int  # the session's interrupt count when it arrived; a later interrupt drops it
    utterance: int
    clip_index: int  # where its clip lands, unless a request queued before it fails
    t0: float
    timings: dict[str, float] = field(default_factory=dict)
    waiting: bool = True  # not yet rendering (an interrupt drops it)


class Turnstile:
    """Tickets in arrival order; `wait(t)` returns when every earlier ticket has been released."""

    def __init__(self) -> None:
        self._next = 0
        self._serving = 0
        self._released: set[int] = set()
        self._waiters: dict[int, asyncio.Future[None]] = {}

    @property
    def idle(self) -> bool:
        """No ticket outstanding."""
        return self._serving == self._next

    def take(self) -> int:
        """A new ticket, after all tickets taken so far."""
        ticket = self._next
        self._next += 1
        return ticket

    async def wait(self, ticket: int) -> None:
        """Return once it is `ticket`'s turn."""
        if ticket == self._serving:
            return
        future = asyncio.get_running_loop().create_future()
        self._waiters[ticket] = future
        try:
            await future
        finally:
            self._waiters.pop(ticket, None)

    def release(self, ticket: int) -> None:
        """Mark `ticket` done (whether or not its turn came) and wake the next one whose turn it now is;
        releasing a ticket again does nothing."""
        if ticket < self._serving:
            return
        self._released.add(ticket)
        while self._serving in self._released:
            self._released.discard(self._serving)
            self._serving += 1
        waiter = self._waiters.get(self._serving)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class SpeakService:
    """The one code path from text or audio to an appended clip; safe to call concurrently."""

    def __init__(
        self,
        cfg: AppConfig,
        renderer: Renderer,
        voice: VoiceEngine,
        store: SessionStore,
        worker: RenderPool,
        hub: LiveHub | None = None,
    ) -> None:
        self.cfg = cfg
        self.renderer = renderer
        self.voice = voice
        self.store = store
        self.worker = worker
        self.hub = hub
        self._turnstiles: dict[str, Turnstile] = {}
        self._in_flight = 0
        self._utterance_ids = itertools.count(1)
        self._epoch: dict[str, int] = {}  # interrupts per session
        self._waiting: dict[str, int] = {}  # admitted requests per session, not yet rendering
        self._rendering: dict[str, set[LiveUtterance]] = {}  # utterances rendering now (cut by an interrupt)
        self._last_append: dict[str, asyncio.Future[None]] = {}  # the newest request's append, per session
        # Per session while it has requests: its clips when it became busy, and requests admitted since (that
        # will append): a request's clip index is their sum when it arrives.
        self._base_clips: dict[str, int] = {}
        self._seq: dict[str, int] = {}
        self._background: set[asyncio.Task[SpeakResult]] = set()  # "wait": false requests
        # Per session: the end of the last sentence's audio, heard first by the next one (audio.context_ms).
        # In memory only: after a restart a session's next sentence starts without it.
        self._context: dict[str, Audio] = {}

    @property
    def in_flight(self) -> int:
        """Speak requests admitted and not finished (waiting for TTS, their turn, the GPU, or appending)."""
        return self._in_flight

    def _session_id(self, session_id: str | None) -> str:
        sid = session_id or self.cfg.server.default_session
        if not is_valid_id(sid):
            raise InputError("session_id must match ^[A-Za-z0-9_-]{1,64}$")
        return sid

    def _avatar_id(self, avatar_id: str | None) -> str:
        aid = avatar_id or self.cfg.avatar_id
        if not is_valid_id(aid):
            raise InputError("avatar_id must match ^[A-Za-z0-9_-]{1,64}$")
        self.renderer.check_avatar(aid)  # 404 unknown / 409 not prepared, before any work
        return aid

    @property
    def live_sessions(self) -> int:
        """Sessions with a request in progress (a session's requests render one after another)."""
        return len(self._turnstiles)

    def live_session_ids(self) -> list[str]:
        """Ids of the sessions with a request in progress."""
        return list(self._turnstiles)

    def max_live_sessions(self) -> int | None:
        """server.max_live_sessions, or (0 = auto) what the renderer measured it can keep real-time."""
        capacity = getattr(self.renderer, "capacity", None)
        if callable(capacity):
            sessions = capacity().get("max_live_sessions")
            return int(sessions) if sessions else None
        return self.cfg.server.max_live_sessions or None

    def _admit(self, session_id: str) -> None:
        if self._in_flight >= self.cfg.server.queue_size:
            raise Busy(
                f"{self._in_flight} speak requests in progress (server.queue_size); retry later",
                self.cfg.server.retry_after_s,
            )
        limit = self.max_live_sessions()
        if limit is not None and session_id not in self._turnstiles and self.live_sessions >= limit:
            # A new session beyond capacity is refused instead of making every session fall behind.
            raise Busy(
                f"{self.live_sessions} sessions are speaking, the capacity is {limit} "
                "(server.max_live_sessions); retry shortly",
                self.cfg.server.retry_after_s,
            )
        self._in_flight += 1

    def _turnstile(self, session_id: str) -> Turnstile:
        return self._turnstiles.setdefault(session_id, Turnstile())

    def _done(self, session_id: str, turnstile: Turnstile, ticket: int) -> None:
        turnstile.release(ticket)
        if turnstile.idle and self._turnstiles.get(session_id) is turnstile:
            del self._turnstiles[session_id]  # keep the table as small as the set of busy sessions

    def _remember_context(self, session_id: str, audio: Audio) -> None:
        keep = int(self.cfg.audio.context_ms / 1000 * audio.sample_rate)
        if keep > 0:
            self._context[session_id] = Audio(audio.samples[-keep:].copy(), audio.sample_rate)

    def video_url(self, session_id: str, n_clips: int) -> str:
        """URL of the session video, versioned by clip count so a player notices the change."""
        return f"/sessions/{session_id}/video?v={n_clips}"

    async def speak_text(
        self,
        text: str,
        session_id: str | None = None,
        avatar_id: str | None = None,
        voice: str | None = None,
        rate: float | None = None,
        *,
        interrupt: bool = False,
    ) -> SpeakResult:
        """TTS `text` and append the rendered clip to the session (the /speak and chat path)."""
        request = await self.admit_text(text, session_id, avatar_id, interrupt=interrupt)
        return await self.finish_text(request, text, voice, rate)

    async def admit_audio(
        self,
        audio: Audio,
        session_id: str | None = None,
        avatar_id: str | None = None,
        *,
        interrupt: bool = False,
        arrived: float | None = None,
    ) -> SpeakTicket:
        """Check the audio, admit the request and take its place in the session's order. `arrived`: when the
        HTTP request came in (time.perf_counter()), for the `upload` timing (its wait, body and decoding)."""
        self._check_audio(audio)
        request = await self._admit_request(session_id, avatar_id, interrupt)
        if arrived is not None:
            request.timings["upload"] = (request.t0 - arrived) * 1000
        return request

    async def admit_text(
        self, text: str, session_id: str | None = None, avatar_id: str | None = None, *, interrupt: bool = False
    ) -> SpeakTicket:
        """Check the text, admit the request and take its place in the session's order."""
        text = text.strip()
        if not text:
            raise InputError("text is empty")
        if len(text) > self.cfg.server.max_text_chars:
            raise InputError(f"text has {len(text)} characters; the limit is {self.cfg.server.max_text_chars}")
        return await self._admit_request(session_id, avatar_id, interrupt)

    async def finish_text(self, request: SpeakTicket, text: str, voice: str | None, rate: float | None) -> SpeakResult:
        """TTS, then render + append in turn (an admitted request always ends here, or in finish_audio)."""
        try:
            audio = await self._synthesize(text.strip(), voice, rate)
            request.timings["tts"] = (time.perf_counter() - request.t0) * 1000
            return await self._in_turn(request, audio)
        finally:
            self._finished(request)

    async def finish_audio(self, request: SpeakTicket, audio: Audio) -> SpeakResult:
        """Render + append the caller's audio in turn."""
        try:
            return await self._in_turn(request, audio)
        finally:
            self._finished(request)

    def in_background(self, work: Coroutine[Any, Any, SpeakResult]) -> None:
        """Keep a "wait": false request running after its 202; its outcome goes to the log."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)

        def done(t: asyncio.Task[SpeakResult]) -> None:
            self._background.discard(t)
            if not t.cancelled() and (exc := t.exception()) is not None:
                level = logging.INFO if isinstance(exc, Interrupted) else logging.ERROR
                log.log(level, "speak (no wait) failed: %s: %s", type(exc).__name__, exc)

        task.add_done_callback(done)

    def accepted(self, request: SpeakTicket) -> Accepted:
        """The 202 answer of a request taken on without waiting."""
        return Accepted(request.sid, request.clip_index, request.utterance)

    async def _admit_request(self, session_id: str | None, avatar_id: str | None, interrupt: bool) -> SpeakTicket:
        t0 = time.perf_counter()
        sid, aid = self._session_id(session_id), self._avatar_id(avatar_id)
        if interrupt:
            self.interrupt(sid)
        self._admit(sid)
        # The ticket (the session's order) is taken before anything awaits, so requests keep their arrival order.
        turnstile = self._turnstile(sid)
        seq = self._seq.get(sid, 0)
        self._seq[sid] = seq + 1
        request = SpeakTicket(
            sid, aid, turnstile, turnstile.take(), self._epoch.get(sid, 0), next(self._utterance_ids), -1, t0
        )
        self._waiting[sid] = self._waiting.get(sid, 0) + 1
        try:
            if sid not in self._base_clips:  # the session was quiet: count its clips once
                clips = len((await asyncio.to_thread(self.store.state, sid)).clips)
                self._base_clips.setdefault(sid, clips)
            request.clip_index = self._base_clips[sid] + seq
        except BaseException:
            self._finished(request)
            raise
        return request

    def _stop_waiting(self, request: SpeakTicket) -> None:
        if request.waiting:
            request.waiting = False
            self._waiting[request.sid] -= 1
            if not self._waiting[request.sid]:
                del self._waiting[request.sid]

    def _finished(self, request: SpeakTicket) -> None:
        self._stop_waiting(request)
        self._in_flight -= 1
        self._done(request.sid, request.turnstile, request.ticket)
        if not self._turnstiles.get(request.sid) and request.sid not in self._last_append:
            # quiet: the next request counts the session's clips again
            self._seq.pop(request.sid, None)
            self._base_clips.pop(request.sid, None)

    def interrupt(self, session_id: str | None = None) -> dict[str, int | str]:
        """Stop the session's current utterance and drop the requests that arrived before this call."""
        sid = self._session_id(session_id)
        self._epoch[sid] = self._epoch.get(sid, 0) + 1
        cut = 0
        for utterance in self._rendering.get(sid, set()):
            utterance.cut()
            cut += 1
        live = self.hub.live(sid) if self.hub is not None else None
        if live is not None:
            live.interrupt()
        dropped = self._waiting.get(sid, 0)
        if sid in self._seq:
            self._seq[sid] -= dropped  # they will not append: later requests take their places
        log.info("interrupt %s", kv(session=sid, cut=cut, dropped=dropped))
        return {"session_id": sid, "cut": cut, "dropped": dropped}

    async def reset(self, session_id: str | None = None) -> bool:
        """Delete the session's video, clips and list, after the requests that arrived before it."""
        sid = self._session_id(session_id)
        turnstile = self._turnstile(sid)
        ticket = turnstile.take()
        try:
            await turnstile.wait(ticket)
            removed = await asyncio.to_thread(self.store.reset, sid)
            self._context.pop(sid, None)
            self._base_clips.pop(sid, None)  # later requests count the (now empty) session again
            self._seq.pop(sid, None)
        finally:
            self._done(sid, turnstile, ticket)
        log.info("reset %s", kv(session=sid, removed=removed))
        return removed

    def _check_audio(self, audio: Audio) -> None:
        if audio.duration_s > self.cfg.server.max_audio_s:
            raise InputError(f"audio is {audio.duration_s:.1f} s; the limit is {self.cfg.server.max_audio_s:g} s")
        if len(audio.samples) == 0:
            raise InputError("audio is empty")

    async def _synthesize(self, text: str, voice: str | None, rate: float | None) -> Audio:
        try:
            audio = await asyncio.to_thread(self.voice.synthesize, text, voice, rate)
        except MuseTalkError:
            raise
        except Exception as exc:  # an engine bug or library error is still a TTS failure for the caller
            raise TTSFailed(f"{self.voice.name} failed: {type(exc).__name__}: {exc}") from exc
        self._check_audio(audio)
        return audio

    async def _in_turn(self, request: SpeakTicket, audio: Audio) -> SpeakResult:
        """Wait for the ticket's turn, then render + append; a cancelled caller still lets the step finish,
        so the next request of the session never overlaps it."""
        t_wait = time.perf_counter()
        await request.turnstile.wait(request.ticket)
        request.timings["wait_turn"] = (time.perf_counter() - t_wait) * 1000
        self._stop_waiting(request)
        if request.epoch != self._epoch.get(request.sid, 0):
            raise Interrupted(f"dropped by an interrupt of session {request.sid!r} before it was rendered")
        step = asyncio.ensure_future(self._render_and_append(request, audio))
        try:
            return await asyncio.shield(step)
        except asyncio.CancelledError:
            await asyncio.wait({step})
            raise

    async def _render_and_append(self, request: SpeakTicket, audio: Audio) -> SpeakResult:
        sid, aid = request.sid, request.aid
        loop = asyncio.get_running_loop()
        previous = self._last_append.get(sid)
        appended_here: asyncio.Future[None] = loop.create_future()
        self._last_append[sid] = appended_here
        live = self.hub.live(sid) if self.hub is not None and isinstance(self.renderer, LiveRenderer) else None
        utterance: LiveUtterance | None = None
        try:
            if live is not None:
                if live.busy and live.avatar_id != aid:
                    raise SessionConflict(f"session {sid!r} is speaking with avatar {live.avatar_id!r}, not {aid!r}")
                utterance = live.new_utterance(request.utterance, aid)
                cursor, context = utterance.cursor, self._context.get(sid)
            else:
                if previous is not None:
                    await previous
                state = await asyncio.to_thread(self.store.state, sid)
                if state.clips and state.avatar_id != aid:
                    raise SessionConflict(
                        f"session {sid!r} uses avatar {state.avatar_id!r}, not {aid!r}; "
                        "reset it or use another session_id"
                    )
                cursor, context = state.cursor, self._context.get(sid) if state.clips else None
                if isinstance(self.renderer, LiveRenderer):  # unpaced: only so that an interrupt can cut it
                    utterance = LiveUtterance(request.utterance, self.cfg.fps, 1, loop)
            out_path = await asyncio.to_thread(self.store.new_clip_path, sid)
            render = functools.partial(self.renderer.render, audio, out_path, aid, cursor, context)
            audio_ahead: _AudioAhead | None = None
            if isinstance(self.renderer, LiveRenderer):  # (the engine's renderer: it hands over the clip's audio)
                audio_ahead = _AudioAhead(self.store, sid, previous, loop)
                render = functools.partial(render, on_audio=audio_ahead.start)
            if utterance is not None:
                render = functools.partial(render, frame_tap=utterance.tap)
                self._rendering.setdefault(sid, set()).add(utterance)
            job = asyncio.ensure_future(self.worker.run(render))
            if live is not None and utterance is not None:
                # The next request's turn comes once this one's frames exist: it renders while this one plays.
                either: set[asyncio.Future[Any]] = {job, utterance.generated}
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
                self._remember_context(sid, audio)
                request.turnstile.release(request.ticket)
            try:
                (clip, cursor), queued_ms, render_ms = await job
            finally:
                if utterance is not None:
                    self._rendering[sid].discard(utterance)
                    if not self._rendering[sid]:
                        del self._rendering[sid]
            if previous is not None:
                await previous
            ahead = await audio_ahead.result() if audio_ahead is not None else None
            try:
                appended = await asyncio.to_thread(self.store.append, sid, clip, cursor, aid, ahead)
            except Exception:  # the session did not take the clip: its files are orphans
                _remove_clip_files(clip)
                raise
        finally:
            if not appended_here.done():
                appended_here.set_result(None)
            if self._last_append.get(sid) is appended_here:
                del self._last_append[sid]
        if live is None:
            self._remember_context(sid, audio)
        return self._result(request, clip, appended, queued_ms, render_ms, utterance)

    def _result(
        self,
        request: SpeakTicket,
        clip: Clip,
        appended: AppendResult,
        queued_ms: float,
        render_ms: float,
        utterance: LiveUtterance | None,
    ) -> SpeakResult:
        sid, timings = request.sid, request.timings
        t_end = time.perf_counter()
        new = appended.state
        timings.update(_stage_timings(clip.timings_ms, queued_ms))
        timings.update(
            render=render_ms,
            append=appended.timings_ms["append_total"],
            total=(t_end - request.t0) * 1000,
        )
        # Where the append's time went: read the clip, encode the session audio (~0 when it was encoded while the
        # clip rendered), write + fsync, commit.
        timings.update({k: v for k, v in appended.timings_ms.items() if k != "append_total"})
        if utterance is not None and utterance.t_on_air is not None:  # played on a live stream
            timings["on_air"] = (utterance.t_on_air - request.t0) * 1000
        result = SpeakResult(
            session_id=sid,
            avatar_id=request.aid,
            clip_index=appended.clip_index,
            clip_start_s=appended.clip_start_s,
            clip_duration_s=clip.duration_s,
            session_duration_s=new.duration_s,
            n_clips=len(new.clips),
            video_path=self.store.paths(sid).video,
            video_url=self.video_url(sid, len(new.clips)),
            timings_ms=timings,
            utterance=request.utterance,
            interrupted=utterance is not None and utterance.was_cut,
        )
        log.info(
            "speak %s",
            kv(
                session=sid,
                avatar=request.aid,
                clip=result.clip_index,
                clip_s=round(result.clip_duration_s, 3),
                session_s=round(result.session_duration_s, 3),
                interrupted=result.interrupted,
                audio_ahead=appended.audio_ahead,
                **{f"{k}_ms": round(v, 1) for k, v in timings.items()},
            ),
        )
        return result


class _AudioAhead:
    """A clip's session audio, encoded while the clip renders (SessionStore.encode_audio_ahead).

    `start` is the renderer's `on_audio`, called on the render thread with the clip's audio once its first frame
    is here; the encode waits for the session's previous append (the state it continues) and runs on a worker
    thread.
    It is only a head start: if it fails, or the session or the clip's audio changed meanwhile (a cut), the
    append encodes the audio itself, as it always did."""

    def __init__(
        self, store: SessionStore, sid: str, previous: asyncio.Future[None] | None, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._store, self._sid, self._previous, self._loop = store, sid, previous, loop
        self._task: asyncio.Task[SessionAudio | None] | None = None

    def start(self, pcm: NDArray[np.float32]) -> None:
        """The clip's audio (n,) float32 as its WAV will hold it (any thread)."""
        self._loop.call_soon_threadsafe(self._begin, pcm)

    def _begin(self, pcm: NDArray[np.float32]) -> None:
        self._task = asyncio.ensure_future(self._encode(pcm))

    async def _encode(self, pcm: NDArray[np.float32]) -> SessionAudio | None:
        try:
            if self._previous is not None:
                await asyncio.shield(self._previous)
            return await asyncio.to_thread(self._store.encode_audio_ahead, self._sid, pcm)
        except Exception as exc:  # the append will encode it
            log.info("session %s: audio not encoded ahead: %s: %s", self._sid, type(exc).__name__, exc)
            return None

    async def result(self) -> SessionAudio | None:
        """The encoded audio (waits for it if it is still being encoded), or None."""
        return None if self._task is None else await self._task


def _stage_timings(clip_ms: dict[str, float], render_queue_ms: float) -> dict[str, float]:
    """Per-utterance stage times for the response and the log: queued (for a render thread and for the GPU),
    first_frame (audio in → first blended frame), generate, blend, encode — the keys a client can rely on —
    and, where they exist, the parts of queued: render_wait (for a render thread) and prepare (its audio
    features, on the GPU thread, before its first batch)."""
    keys = {"first_frame": "first_frame_ms", "generate": "generate_ms", "blend": "blend_ms", "encode": "encode_ms",
            "prepare": "prepare_ms"}  # fmt: skip
    out = {"queued": render_queue_ms + clip_ms.get("queued_ms", 0.0), "render_wait": render_queue_ms}
    out.update({name: clip_ms[key] for name, key in keys.items() if key in clip_ms})
    return out


def _remove_clip_files(clip: Clip) -> None:
    clip.path.unlink(missing_ok=True)
    if clip.audio_path is not None:
        clip.audio_path.unlink(missing_ok=True)
