"""HTTP routes: /speak, /speak_audio, /reset, /sessions/{id}/video, /health."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated

from fastapi import APIRouter, File, Form, Header, Path, Query, Request, Response, UploadFile
from fastapi.responses import JSONResponse

from musetalk.config import ID_PATTERN
from musetalk.errors import PayloadTooLarge
from musetalk.server.deps import Services, ServicesDep, SpeakServiceDep
from musetalk.server.schemas import HealthResponse, ResetResponse, SpeakRequest, SpeakResponse
from musetalk.server.service import SpeakResult
from musetalk.server.uploads import SLOT_STATE_KEY, UploadSlot
from musetalk.server.video import CommittedFileResponse, byte_range
from musetalk.utils.audio_io import decode_audio_file

log = logging.getLogger(__name__)

router = APIRouter()

SessionIdQuery = Annotated[str | None, Query(pattern=ID_PATTERN)]


def _response(result: SpeakResult) -> SpeakResponse:
    return SpeakResponse(
        session_id=result.session_id,
        avatar_id=result.avatar_id,
        clip_index=result.clip_index,
        clip_start_s=result.clip_start_s,
        clip_duration_s=result.clip_duration_s,
        session_duration_s=result.session_duration_s,
        n_clips=result.n_clips,
        video_path=str(result.video_path),
        video_url=result.video_url,
        timings_ms={k: round(v, 1) for k, v in result.timings_ms.items()},
    )


@router.post("/speak", response_model=SpeakResponse)
async def speak(body: SpeakRequest, speaker: SpeakServiceDep) -> SpeakResponse:
    """TTS the text, render it on the avatar and append the clip to the session video."""
    result = await speaker.speak_text(body.text, body.session_id, body.avatar_id, body.voice, body.rate)
    return _response(result)


@router.post("/speak_audio", response_model=SpeakResponse)
async def speak_audio(
    request: Request,
    services: ServicesDep,
    file: Annotated[UploadFile, File(description="wav, mp3, ogg, flac or webm")],
    session_id: Annotated[str | None, Form(pattern=ID_PATTERN)] = None,
    avatar_id: Annotated[str | None, Form(pattern=ID_PATTERN)] = None,
) -> SpeakResponse:
    """Same as /speak with the caller's own audio instead of TTS."""
    limit = services.cfg.server.max_upload_bytes
    if file.size is None or file.size > limit:
        raise PayloadTooLarge(f"audio file larger than {limit} bytes (server.max_upload_bytes)")
    # The upload is spooled to a temp file by the form parser; decode it from there, frame by frame.
    slot: UploadSlot | None = getattr(request.state, SLOT_STATE_KEY, None)
    try:
        audio = await asyncio.to_thread(decode_audio_file, file.file, services.cfg.server.max_audio_s)
    finally:
        if slot is not None:
            slot.release()
    result = await services.speaker.speak_audio(audio, session_id, avatar_id)
    return _response(result)


@router.api_route("/reset", methods=["GET", "POST"], response_model=ResetResponse)
async def reset(speaker: SpeakServiceDep, session_id: SessionIdQuery = None) -> ResetResponse:
    """Delete the session's video, clips and concat list; the next /speak starts a fresh video."""
    sid = session_id or speaker.cfg.server.default_session
    removed = await speaker.reset(sid)
    return ResetResponse(session_id=sid, removed=removed)


@router.get("/sessions/{session_id}/video")
async def session_video(
    services: ServicesDep,
    session_id: Annotated[str, Path(pattern=ID_PATTERN)],
    range_header: Annotated[str | None, Header(alias="range")] = None,
) -> Response:
    """The session video's committed bytes (HTTP Range supported, for seeking in a browser)."""
    file, size = await asyncio.to_thread(services.store.open_video, session_id)
    try:
        span = byte_range(range_header, size)
    except BaseException:
        file.close()
        raise
    return CommittedFileResponse(file, size, span, media_type="video/mp4")


@router.get("/health", response_model=HealthResponse)
async def health(request: Request) -> JSONResponse | HealthResponse:
    """Ready, renderer, device, dtype, avatars loaded, TTS engine, load."""
    services: Services | None = getattr(request.app.state, "services", None)
    if services is None or not services.ready:
        return JSONResponse(HealthResponse(ready=False).model_dump(), status_code=503)
    info = services.renderer.describe()
    capacity = getattr(services.renderer, "capacity", None)
    stats = getattr(services.renderer, "stats", None)
    return HealthResponse(
        ready=services.renderer.ready,
        renderer=info,
        device=str(info.get("device")) if info.get("device") is not None else None,
        dtype=str(info.get("dtype")) if info.get("dtype") is not None else None,
        avatars=[str(a) for a in info.get("avatars", [])],
        tts=services.voice.name,
        in_flight=services.speaker.in_flight,
        queue_size=services.cfg.server.queue_size,
        live_sessions=services.speaker.live_sessions,
        capacity=capacity() if callable(capacity) else {"max_live_sessions": services.speaker.max_live_sessions()},
        scheduler=stats() if callable(stats) else {},
    )
