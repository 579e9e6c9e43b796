"""The chat job runner: LLM → sentences → speak (TTS → render → append), one job per session at a time.

Each session gets its own thread while it has jobs, so replies of one session are spoken in order and
never interleave in its video, while different sessions (up to `workers`) run side by side. The LLM is
read on a helper thread and split into sentences as it streams; each finished sentence is spoken at once,
so the first one is playable while the LLM and the renderer are still busy with the rest.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Protocol

from musetalk.config import PROJECT_ROOT, WebappConfig
from musetalk.errors import Interrupted, MuseTalkError
from musetalk.utils.text import redact_paths
from webapp.backend.jobs import Job, JobNotFound, JobStore, SentenceResult
from webapp.backend.llm import LLM, ChatMessage, LLMError
from webapp.backend.sentences import SentenceSplitter

log = logging.getLogger(__name__)

# Extra wait beyond the LLM's own timeout before the runner gives up on an engine that never returns.
LLM_GRACE_S = 5.0


@dataclass(frozen=True)
class SpeakOutcome:
    """What one speak call appended: the session video (URL) and where the new clip sits in it."""

    session_video_url: str
    clip_start_s: float  # seconds from the start of the session video
    clip_duration_s: float
    session_duration_s: float  # the session video's length after the append


class SpeakFn(Protocol):
    """Blocking TTS → render → append of one sentence to a session's video (the server provides it)."""

    def __call__(self, text: str, session_id: str) -> SpeakOutcome:
        """Speak `text` into session `session_id`; raise a MuseTalkError on failure."""
        ...


@dataclass(frozen=True)
class LiveSpeech:
    """A sentence handed to the session's live stream: it plays as soon as it renders, after the ones before."""

    utterance: int  # the id the stream's events use
    wait: Callable[[], SpeakOutcome]  # blocks until it has played and is appended; raises its error


class LiveSpeakFn(Protocol):
    """Start speaking one sentence on a session without waiting for it (the server provides it)."""

    def __call__(self, text: str, session_id: str) -> LiveSpeech:
        """Queue `text` on session `session_id` (in call order); raise a MuseTalkError if it is refused."""
        ...


InterruptFn = Callable[[str], None]  # stop what a session is saying and drop its queued sentences


class LiveUnsupported(MuseTalkError):
    """A live chat request on a server that has no live stream for the chat."""


class _SentenceFeed:
    """Reads the LLM stream on a helper thread and hands out complete sentences in order."""

    _END = object()

    def __init__(
        self, llm: LLM, messages: Sequence[ChatMessage], max_chars: int, max_sentences: int, on_text: _TextSink
    ) -> None:
        self._llm = llm
        self._messages = list(messages)
        self._max_chars = max_chars
        self._max_sentences = max_sentences
        self._on_text = on_text
        self._items: queue.Queue[object] = queue.Queue()
        self._stop = threading.Event()
        self.sentences: list[str] = []
        self.complete = False  # the LLM has finished (or was cut at max_sentences)
        self.truncated = False
        self._thread = threading.Thread(target=self._pump, name="chat-llm", daemon=True)
        self._thread.start()

    def _put(self, sentence: str) -> bool:
        """Queue a sentence; False once max_sentences is reached (the rest of the reply is dropped)."""
        if len(self.sentences) >= self._max_sentences:
            self.truncated = True
            return False
        self.sentences.append(sentence)
        self._on_text(" ".join(self.sentences), None)
        self._items.put(sentence)
        return True

    def _pump(self) -> None:
        stream: Iterator[str] | None = None
        try:
            stream = iter(self._llm.stream(self._messages))
            splitter = SentenceSplitter(self._max_chars)
            for chunk in stream:
                if self._stop.is_set():
                    return
                if not all(self._put(s) for s in splitter.feed(chunk)):
                    break
            else:
                for s in splitter.flush():
                    self._put(s)
            if not self.sentences:
                raise LLMError("the reply has nothing to say aloud")
            self.complete = True
            self._on_text(" ".join(self.sentences), len(self.sentences))
            self._items.put(self._END)
        except BaseException as exc:  # handed to the job thread, which reports it as the job's error
            self._items.put(exc)
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                with suppress(Exception):
                    close()

    def stop(self) -> None:
        """Ask the reader to stop at its next chunk (the job failed or was cut short)."""
        self._stop.set()

    def iter_sentences(self, wait_s: float) -> Iterator[str]:
        """Yield sentences as they complete; raise the LLM's error; give up after `wait_s` of silence."""
        while True:
            try:
                item = self._items.get(timeout=wait_s)
            except queue.Empty:
                raise LLMError(f"the LLM produced nothing for {wait_s:g} s") from None
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, str)
            yield item


class _TextSink(Protocol):
    def __call__(self, reply_so_far: str, sentences_total: int | None) -> None: ...


class ChatService:
    """Runs chat jobs on worker threads: at most `workers` sessions at once, one job per session."""

    def __init__(
        self,
        speak: SpeakFn,
        llm: LLM,
        jobs: JobStore,
        settings: WebappConfig | None = None,
        default_session_id: str = "default",
        speak_live: LiveSpeakFn | None = None,
        interrupt: InterruptFn | None = None,
    ) -> None:
        """`speak` renders one sentence into a session; `llm` writes the replies; `jobs` holds their state;
        `speak_live` and `interrupt` (optional) serve pages watching the session's live stream."""
        self.speak = speak
        self.speak_live = speak_live
        self.interrupt_session = interrupt
        self.llm = llm
        self.jobs = jobs
        self.settings = settings or WebappConfig()
        self.default_session_id = default_session_id
        self._lock = threading.Lock()
        self._queues: dict[str, deque[tuple[str, list[ChatMessage], bool]]] = {}
        self._running: dict[str, str] = {}  # session → its job being run
        self._cancelled: set[str] = set()  # jobs to stop at their next sentence (interrupted)
        self._slots = threading.BoundedSemaphore(self.settings.workers)

    @property
    def live(self) -> bool:
        """Whether replies can be spoken on the live stream (the server provides it)."""
        return self.speak_live is not None and self.interrupt_session is not None

    def submit(
        self,
        message: str,
        session_id: str | None = None,
        history: Sequence[ChatMessage] = (),
        *,
        live: bool = False,
        interrupt: bool = False,
    ) -> Job:
        """Queue a reply to `message` in `session_id` (after that session's earlier jobs); return the job.

        live: speak each sentence on the session's live stream as soon as the LLM completes it (without
        waiting for the one before to be appended); interrupt: first stop the session's reply in progress
        (its remaining sentences are dropped, what the avatar is saying stops) and its queued jobs.
        """
        if (live or interrupt) and not self.live:
            raise LiveUnsupported("this server has no live stream for the chat")
        sid = session_id or self.default_session_id
        if interrupt:
            self._interrupt(sid)
        job = self.jobs.create(sid, message)
        messages = self._conversation(message, history)
        with self._lock:
            pending = self._queues.get(sid)
            if pending is None:
                pending = self._queues[sid] = deque()
                threading.Thread(target=self._drain, args=(sid,), name=f"chat-{sid}", daemon=True).start()
            pending.append((job.job_id, messages, live))
        return job

    def _interrupt(self, session_id: str) -> None:
        with self._lock:
            dropped = list(self._queues.get(session_id, ()))
            if session_id in self._queues:
                self._queues[session_id].clear()
            running = self._running.get(session_id)
            if running is not None:
                self._cancelled.add(running)
        for job_id, _, _ in dropped:
            with suppress(JobNotFound, ValueError):
                self.jobs.finish(job_id, "", "Interrupted")
        assert self.interrupt_session is not None
        self.interrupt_session(session_id)

    def _conversation(self, message: str, history: Sequence[ChatMessage]) -> list[ChatMessage]:
        cfg = self.settings.llm
        earlier = [m for m in history if m.role in ("user", "assistant")]
        earlier = earlier[-cfg.history_turns :] if cfg.history_turns else []
        return [ChatMessage("system", cfg.system_prompt), *earlier, ChatMessage("user", message)]

    def _drain(self, session_id: str) -> None:
        """Run a session's jobs in order until its queue is empty, then let the thread end."""
        while True:
            with self._lock:
                pending = self._queues[session_id]
                if not pending:
                    del self._queues[session_id]
                    return
                job_id, messages, live = pending.popleft()
                self._running[session_id] = job_id
            with self._slots:
                try:
                    if live:
                        self._run_live(job_id, session_id, messages)
                    else:
                        self._run(job_id, session_id, messages)
                except BaseException:  # _run reports its own failures; this keeps the session's queue alive
                    log.exception("chat job %s: runner crashed", job_id)
                    self._fail(job_id, "Internal error: the job runner crashed")
                finally:
                    with self._lock:
                        self._running.pop(session_id, None)
                        self._cancelled.discard(job_id)

    def _run(self, job_id: str, session_id: str, messages: list[ChatMessage]) -> None:
        """One job: never raises (every failure becomes the job's error)."""
        jobs = self.jobs
        feed = self._begin(job_id, messages)
        if feed is None:
            return
        sentence_no = 0
        try:
            spoken: list[str] = []
            for sentence in feed.iter_sentences(self.settings.llm.timeout_s + LLM_GRACE_S):
                sentence_no += 1
                total = len(feed.sentences) if feed.complete else None
                estimate = total or len(feed.sentences) + 1
                jobs.progress(
                    job_id,
                    stage="speaking",
                    detail=f"Speaking sentence {sentence_no} of {total or '…'}",
                    progress=0.1 + 0.9 * (sentence_no - 1) / max(estimate, sentence_no),
                )
                outcome = self.speak(sentence, session_id)
                jobs.add_sentence(
                    job_id,
                    SentenceResult(
                        index=sentence_no,
                        text=sentence,
                        clip_start_s=outcome.clip_start_s,
                        clip_duration_s=outcome.clip_duration_s,
                        session_video_url=outcome.session_video_url,
                        session_duration_s=outcome.session_duration_s,
                    ),
                )
                spoken.append(sentence)
            jobs.finish(job_id, " ".join(spoken))
        except Exception as exc:
            self._fail_at(job_id, sentence_no, exc)
        finally:
            feed.stop()

    def _run_live(self, job_id: str, session_id: str, messages: list[ChatMessage]) -> None:
        """One job on the live stream: each sentence is queued as soon as it is complete; the job is done once
        all have played and been appended. Never raises."""
        assert self.speak_live is not None
        jobs = self.jobs
        feed = self._begin(job_id, messages)
        if feed is None:
            return
        started: list[tuple[str, LiveSpeech]] = []
        spoken: list[str] = []
        try:
            for sentence in feed.iter_sentences(self.settings.llm.timeout_s + LLM_GRACE_S):
                with self._lock:  # an interrupt either stops this job first or drops this sentence after
                    if job_id in self._cancelled:
                        break
                    speech = self.speak_live(sentence, session_id)
                started.append((sentence, speech))
                total = len(feed.sentences) if feed.complete else None
                jobs.add_sentence(
                    job_id, SentenceResult(len(started), sentence, None, None, "", None, utterance=speech.utterance)
                )
                jobs.progress(job_id, stage="speaking", detail=f"Sentence {len(started)} of {total or '…'} queued",
                              progress=0.1 + 0.4 * len(started) / max(len(feed.sentences), len(started)))  # fmt: skip
            for sentence, speech in started:
                speech.wait()
                spoken.append(sentence)
            jobs.finish(job_id, " ".join(spoken), "Interrupted" if job_id in self._cancelled else "Done")
        except Interrupted:
            with suppress(JobNotFound, ValueError):
                jobs.finish(job_id, " ".join(spoken), "Interrupted")
        except Exception as exc:
            self._fail_at(job_id, len(spoken) + 1, exc)
        finally:
            feed.stop()

    def _begin(self, job_id: str, messages: list[ChatMessage]) -> _SentenceFeed | None:
        """Mark the job started and open its reply's sentence feed; None if the job was evicted while queued."""
        try:
            self.jobs.start(job_id, "thinking", "Thinking…", progress=0.05)
        except JobNotFound:
            return None
        return _SentenceFeed(
            self.llm,
            messages,
            self.settings.max_sentence_chars,
            self.settings.max_reply_sentences,
            lambda text, total: self._note(job_id, text, total),
        )

    def _fail_at(self, job_id: str, sentence_no: int, exc: Exception) -> None:
        """Fail the job on `exc`, raised at sentence `sentence_no`, with a message the page can show."""
        if isinstance(exc, LLMError):
            self._fail(job_id, f"The language model failed: {exc}")
        elif isinstance(exc, MuseTalkError):
            log.info("chat job %s: sentence %d: %s", job_id, sentence_no, exc)
            self._fail(job_id, f"Speaking sentence {sentence_no} failed: {redact_paths(str(exc), PROJECT_ROOT)}")
        else:
            log.error("chat job %s failed", job_id, exc_info=exc)  # the details stay in the server log
            self._fail(job_id, f"Internal error at sentence {sentence_no}; see the server log")

    def _note(self, job_id: str, text: str, total: int | None) -> None:
        with suppress(JobNotFound):
            self.jobs.note_reply(job_id, text, total)

    def _fail(self, job_id: str, message: str) -> None:
        log.warning("chat job %s: %s", job_id, message)
        with suppress(JobNotFound):
            self.jobs.fail(job_id, message)
