"""HTTP routes of the chat web app: POST /chat, GET /status/{job_id}, GET /chat/info, and the page at /."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from musetalk.config import ID_PATTERN, AppConfig, WebappConfig
from musetalk.errors import Busy
from musetalk.utils.text import speech_text_problem
from webapp.backend.jobs import JobNotFound, JobStore
from webapp.backend.llm import LLM, ChatMessage, build_llm
from webapp.backend.service import ChatService, InterruptFn, LiveSpeakFn, LiveUnsupported, SpeakFn

FRONTEND_DIR = Path(__file__).resolve().parent.parent / "frontend"
# The page's files, with explicit types: the OS mime table may lack or mislabel them.
ASSETS: dict[str, str] = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
NO_CACHE = {"Cache-Control": "no-cache"}  # revalidate (ETag) so an updated page is picked up at once


def _speakable(value: str) -> str:
    """The same text rules as POST /speak: no control characters but newlines/tabs, no lone surrogates."""
    problem = speech_text_problem(value)
    if problem:
        raise ValueError(problem)
    return value


class AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: always encodable, whatever text a job picked up along the way."""

    def render(self, content: object) -> bytes:
        """Serialise `content` as ASCII-only JSON."""
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


class ChatTurn(BaseModel):
    """An earlier message of the conversation, sent back by the page for context."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["user", "assistant"]
    content: str = Field(max_length=20000)

    _content = field_validator("content")(_speakable)


class ChatRequest(BaseModel):
    """POST /chat body."""

    model_config = ConfigDict(extra="forbid")
    message: str
    session_id: str | None = Field(default=None, pattern=ID_PATTERN)
    history: list[ChatTurn] = Field(default_factory=list, max_length=100)
    live: bool = False  # speak each sentence on the session's live stream as soon as it is complete
    interrupt: bool = False  # first stop the session's reply in progress (barge-in)

    _message = field_validator("message")(_speakable)


class ChatAccepted(BaseModel):
    """POST /chat answer: poll `status_url` (it names the session too) until the job is done or failed."""

    job_id: str
    session_id: str
    status_url: str


def create_chat_router(
    speak: SpeakFn,
    llm: LLM,
    jobs: JobStore,
    *,
    settings: WebappConfig | None = None,
    default_session_id: str = "default",
    frontend_dir: Path = FRONTEND_DIR,
    speak_live: LiveSpeakFn | None = None,
    interrupt: InterruptFn | None = None,
) -> APIRouter:
    """Routes of the chat page; jobs run LLM → `speak` per sentence on worker threads started on demand
    (with `speak_live` and `interrupt`, pages on the live stream get each sentence as soon as it is complete)."""
    cfg = settings or WebappConfig()
    service = ChatService(speak, llm, jobs, cfg, default_session_id, speak_live, interrupt)
    router = APIRouter(tags=["webapp"])

    @router.post("/chat", status_code=202, response_model=ChatAccepted)
    def chat(req: ChatRequest) -> ChatAccepted:
        """Start a reply job; returns at once with its id."""
        message = req.message.strip()
        if not message:
            raise HTTPException(422, "message is empty")
        if len(message) > cfg.max_message_chars:
            raise HTTPException(422, f"message is longer than {cfg.max_message_chars} characters")
        history = [ChatMessage(t.role, t.content) for t in req.history]
        try:
            job = service.submit(message, req.session_id, history, live=req.live, interrupt=req.interrupt)
        except Busy as exc:
            raise HTTPException(503, str(exc), headers={"Retry-After": str(exc.retry_after_s)}) from exc
        except LiveUnsupported as exc:
            raise HTTPException(409, str(exc)) from exc
        # The session id in the status URL lets a cluster route the polls to the replica that runs the job.
        status_url = f"/status/{job.job_id}?session_id={job.session_id}"
        return ChatAccepted(job_id=job.job_id, session_id=job.session_id, status_url=status_url)

    @router.get("/status/{job_id}", response_class=AsciiJSONResponse)
    def status(job_id: str) -> AsciiJSONResponse:
        """queued | running (stage, progress, sentences so far) | done (reply, video, clip start) | error."""
        try:
            return AsciiJSONResponse(jobs.get(job_id).to_json())
        except JobNotFound as exc:
            raise HTTPException(404, str(exc)) from exc

    @router.get("/chat/info")
    def info() -> dict[str, object]:
        """Which LLM answers (the page labels the built-in responder) and how often to poll."""
        return {
            "llm": {"engine": llm.name, "label": llm.label, "builtin": llm.name == "builtin"},
            "poll_interval_ms": cfg.poll_interval_ms,
            "max_message_chars": cfg.max_message_chars,
            "default_session_id": default_session_id,
            "live": service.live,
        }

    @router.get("/", include_in_schema=False)
    def index() -> FileResponse:
        """The chat page."""
        return FileResponse(frontend_dir / "index.html", media_type="text/html; charset=utf-8", headers=NO_CACHE)

    @router.get("/web/{name}", include_in_schema=False)
    def asset(name: str) -> FileResponse:
        """The page's script, style sheet and icon (a fixed list: no paths from the URL reach the disk)."""
        media_type = ASSETS.get(name)
        if media_type is None:
            raise HTTPException(404, f"no such file: {name}")
        return FileResponse(frontend_dir / name, media_type=media_type, headers=NO_CACHE)

    return router


def chat_router_from_config(
    cfg: AppConfig,
    speak: SpeakFn,
    env: Mapping[str, str],
    speak_live: LiveSpeakFn | None = None,
    interrupt: InterruptFn | None = None,
) -> APIRouter:
    """The chat routes as configured (`webapp.*`), with the LLM chosen by `webapp.llm.engine` and `env`."""
    web = cfg.webapp
    return create_chat_router(
        speak, build_llm(web.llm, env), JobStore(web.max_jobs, web.job_ttl_s), settings=web,
        speak_live=speak_live, interrupt=interrupt,
    )  # fmt: skip
