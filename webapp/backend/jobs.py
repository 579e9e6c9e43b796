"""Chat jobs: a bounded, thread-safe store with expiry, and the snapshots that GET /status returns.

A job is queued, then running (stage `thinking` while the LLM answers, then `speaking` sentence k of n),
then done or error. Finished jobs are kept `ttl_s` seconds so the page can read the result, then
forgotten; when the store is full the oldest finished job is evicted first, and if every slot holds a
job still in progress, new jobs are refused with `Busy` (HTTP 503 + Retry-After).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from enum import Enum

from musetalk.errors import Busy, MuseTalkError


class JobState(str, Enum):
    """Where a job is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    ERROR = "error"


class JobNotFound(MuseTalkError):
    """No job with this id: never created, or finished longer ago than the store's ttl."""


@dataclass(frozen=True)
class SentenceResult:
    """One spoken sentence: its clip's place in the session video (seconds from the session start)."""

    index: int  # 1-based, in reply order
    text: str
    clip_start_s: float | None  # None: sent to the live stream, not appended yet
    clip_duration_s: float | None
    session_video_url: str
    session_duration_s: float | None
    utterance: int | None = None  # live: the id the stream's events use for this sentence


@dataclass(frozen=True)
class Job:
    """An immutable snapshot of one chat job (the store keeps the live record)."""

    job_id: str
    session_id: str
    message: str
    state: JobState = JobState.QUEUED
    stage: str = "queued"  # queued | thinking | speaking | done | error
    detail: str = "Waiting for the previous reply to finish"
    progress: float = 0.0  # 0..1
    reply_so_far: str = ""  # sentences the LLM has produced so far
    sentences_total: int | None = None  # known once the LLM has finished
    sentences: tuple[SentenceResult, ...] = ()  # spoken so far, in order
    reply: str | None = None  # the whole spoken reply, once done
    error: str | None = None
    created_s: float = 0.0
    updated_s: float = 0.0
    finished_s: float | None = None

    @property
    def finished(self) -> bool:
        """True once done or failed."""
        return self.state in (JobState.DONE, JobState.ERROR)

    def to_json(self) -> dict[str, object]:
        """The GET /status/{job_id} body."""
        first = self.sentences[0] if self.sentences else None
        last = self.sentences[-1] if self.sentences else None
        return {
            "job_id": self.job_id,
            "session_id": self.session_id,
            "status": self.state.value,
            "stage": self.stage,
            "detail": self.detail,
            "progress": round(self.progress, 4),
            "reply_so_far": self.reply_so_far,
            "sentences_total": self.sentences_total,
            "sentences": [
                {
                    "index": s.index,
                    "text": s.text,
                    "clip_start_s": s.clip_start_s,
                    "clip_duration_s": s.clip_duration_s,
                    "video_url": s.session_video_url,
                    "session_duration_s": s.session_duration_s,
                    "utterance": s.utterance,
                }
                for s in self.sentences
            ],
            "reply": self.reply,
            # Where the page plays from: the session video after the latest clip, from the first new clip.
            "video_url": last.session_video_url if last else None,
            "clip_start_s": first.clip_start_s if first else None,
            "clip_duration_s": sum(s.clip_duration_s or 0.0 for s in self.sentences) if self.sentences else None,
            "session_duration_s": last.session_duration_s if last else None,
            "error": self.error,
        }


class JobStore:
    """Bounded, thread-safe map of job id → Job; finished jobs expire `ttl_s` after they end."""

    def __init__(self, max_jobs: int = 256, ttl_s: float = 900.0, clock: Callable[[], float] = time.monotonic) -> None:
        """`clock` returns seconds (monotonic); tests pass a fake one to expire jobs without sleeping."""
        if max_jobs < 1 or ttl_s <= 0:
            raise ValueError("max_jobs must be >= 1 and ttl_s > 0")
        self.max_jobs = max_jobs
        self.ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._jobs: OrderedDict[str, Job] = OrderedDict()  # insertion order = creation order

    def __len__(self) -> int:
        """Jobs held now (expired ones are dropped first)."""
        with self._lock:
            self._expire()
            return len(self._jobs)

    def create(self, session_id: str, message: str) -> Job:
        """Add a queued job; raise Busy when every slot holds a job still in progress."""
        with self._lock:
            self._expire()
            if len(self._jobs) >= self.max_jobs:
                oldest_done = next((k for k, j in self._jobs.items() if j.finished), None)
                if oldest_done is None:
                    raise Busy(f"{len(self._jobs)} chat jobs are in progress; try again shortly", retry_after_s=2)
                del self._jobs[oldest_done]
            now = self._clock()
            job_id = secrets.token_urlsafe(12)
            job = Job(job_id=job_id, session_id=session_id, message=message, created_s=now, updated_s=now)
            self._jobs[job_id] = job
            return job

    def get(self, job_id: str) -> Job:
        """The current snapshot of a job; raise JobNotFound if unknown or expired."""
        with self._lock:
            self._expire()
            job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFound(f"unknown or expired job {job_id!r}")
        return job

    def start(self, job_id: str, stage: str, detail: str, progress: float = 0.0) -> Job:
        """Mark a job running at `stage`."""
        return self._update(job_id, {"state": JobState.RUNNING, "stage": stage, "detail": detail, "progress": progress})

    def progress(
        self,
        job_id: str,
        *,
        stage: str,
        detail: str,
        progress: float,
        reply_so_far: str | None = None,
        sentences_total: int | None = None,
    ) -> Job:
        """Report progress of a running job (stage text, 0..1 fraction, reply text so far)."""
        changes: dict[str, object] = {"stage": stage, "detail": detail, "progress": min(max(progress, 0.0), 1.0)}
        if reply_so_far is not None:
            changes["reply_so_far"] = reply_so_far
        if sentences_total is not None:
            changes["sentences_total"] = sentences_total
        return self._update(job_id, changes)

    def note_reply(self, job_id: str, reply_so_far: str, sentences_total: int | None = None) -> Job:
        """Record the reply text the LLM has produced so far (and the sentence count once it is complete)."""
        with self._lock:
            job = self._require(job_id)
            if job.finished:
                return job
            total = job.sentences_total if sentences_total is None else sentences_total
            return self._put(replace(job, reply_so_far=reply_so_far, sentences_total=total, updated_s=self._clock()))

    def add_sentence(self, job_id: str, result: SentenceResult) -> Job:
        """Record a sentence that is now playable in the session video."""
        with self._lock:
            job = self._require(job_id)
            return self._put(replace(job, sentences=(*job.sentences, result), updated_s=self._clock()))

    def finish(self, job_id: str, reply: str, detail: str = "Done") -> Job:
        """Mark a job done with the whole spoken reply (or what was said of it before an interrupt)."""
        changes = {"state": JobState.DONE, "stage": "done", "detail": detail, "progress": 1.0, "reply": reply}
        return self._update(job_id, changes, finished=True)

    def fail(self, job_id: str, message: str) -> Job:
        """Mark a job failed; `message` is shown to the user."""
        changes = {"state": JobState.ERROR, "stage": "error", "detail": message, "error": message}
        return self._update(job_id, changes, finished=True)

    def _update(self, job_id: str, changes: Mapping[str, object], finished: bool = False) -> Job:
        with self._lock:
            job = self._require(job_id)
            if job.finished:
                raise ValueError(f"job {job_id} has already finished")
            now = self._clock()
            extra: dict[str, object] = {"finished_s": now} if finished else {}
            return self._put(replace(job, updated_s=now, **changes, **extra))  # type: ignore[arg-type]

    def _require(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFound(f"unknown or expired job {job_id!r}")
        return job

    def _put(self, job: Job) -> Job:
        self._jobs[job.job_id] = job
        return job

    def _expire(self) -> None:
        """Drop finished jobs older than the ttl (caller holds the lock)."""
        now = self._clock()
        expired = [k for k, j in self._jobs.items() if j.finished_s is not None and now - j.finished_s > self.ttl_s]
        for job_id in expired:
            del self._jobs[job_id]

