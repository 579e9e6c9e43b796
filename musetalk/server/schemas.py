"""Request and response bodies of the HTTP API . Unknown fields and wrong types are 422."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator

from musetalk.config import ID_PATTERN, VOICE_PATTERN
from musetalk.utils.text import speech_text_problem

# Hard ceiling on text before the configured server.max_text_chars check (which gives the precise message).
TEXT_HARD_LIMIT = 100_000


class SpeakRequest(BaseModel):
    """POST /speak body."""

    model_config = ConfigDict(extra="forbid")

    text: StrictStr = Field(max_length=TEXT_HARD_LIMIT)
    session_id: StrictStr | None = Field(default=None, pattern=ID_PATTERN)
    avatar_id: StrictStr | None = Field(default=None, pattern=ID_PATTERN)
    voice: StrictStr | None = Field(default=None, pattern=VOICE_PATTERN)
    rate: StrictFloat | StrictInt | None = Field(default=None, ge=0.25, le=4.0)
    wait: StrictBool = True  # false: 202 at once with the clip index (live use); the clip is appended later
    interrupt: StrictBool = False  # first stop what the session is saying and drop its queued requests

    @field_validator("text")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("text is empty or only whitespace")
        problem = speech_text_problem(v)
        if problem:
            raise ValueError(problem)
        return v


class SpeakResponse(BaseModel):
    """What /speak and /speak_audio return."""

    session_id: str
    avatar_id: str
    clip_index: int
    clip_start_s: float
    clip_duration_s: float
    session_duration_s: float
    n_clips: int
    video_path: str
    video_url: str
    timings_ms: dict[str, float]
    utterance: int  # the live stream's events name the utterance by this id
    interrupted: bool  # cut by an interrupt: the clip holds what was shown until then


class AcceptedResponse(BaseModel):
    """What /speak and /speak_audio return (202) with "wait": false."""

    session_id: str
    clip_index: int  # where the clip lands in the session, unless a request queued before it fails
    utterance: int


class OfferRequest(BaseModel):
    """POST /sessions/{id}/offer body: the viewer's SDP offer (RTCSessionDescription)."""

    model_config = ConfigDict(extra="forbid")

    sdp: StrictStr = Field(max_length=60_000)
    type: StrictStr


class OfferResponse(BaseModel):
    """The server's SDP answer (all its ICE candidates inside; no trickle)."""

    sdp: str
    type: str


class InterruptResponse(BaseModel):
    """What POST /sessions/{id}/interrupt did."""

    session_id: str
    cut: int  # utterances stopped while rendering or playing (the record keeps what was shown)
    dropped: int  # queued requests dropped before they rendered (they answer 409 Interrupted)


class ResetResponse(BaseModel):
    """What /reset returns."""

    session_id: str
    removed: bool


class HealthResponse(BaseModel):
    """What /health returns."""

    ready: bool
    renderer: dict[str, Any] = Field(default_factory=dict)
    device: str | None = None
    dtype: str | None = None
    avatars: list[str] = Field(default_factory=list)
    tts: str | None = None
    in_flight: int = 0
    queue_size: int = 0
    live_sessions: int = 0  # sessions with a request in progress
    # max_live_sessions (new sessions beyond it get 503), where it comes from, the frames/s it rests on
    capacity: dict[str, Any] = Field(default_factory=dict)
    # live_utterances, frames_per_s and lateness_p95_ms over the last 10 s, and how each batch shape runs
    # ("eager", "graphs", "compiled+graphs", ...)
    scheduler: dict[str, Any] = Field(default_factory=dict)
    # sessions with a live stream, their viewers, and the streams' p95 lateness figures (ms, last 10 s)
    live: dict[str, int | float] = Field(default_factory=dict)
    # Python's garbage collections over the last 10 s: how many, p95 and longest pause (ms; every thread
    # waits), the longest full one, and how many objects are frozen (never walked)
    gc: dict[str, int | float] = Field(default_factory=dict)
    # How long a thread waited for Python's GIL over the last 10 s (a probe sleeping 1 ms at a time): probes,
    # p95 and longest wait in ms. High while cores are free: this process, not the machine, is the limit.
    gil: dict[str, int | float] = Field(default_factory=dict)


class ErrorResponse(BaseModel):
    """Every error body: a short machine-readable name and a human message."""

    error: str
    detail: str
