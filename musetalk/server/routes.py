"""HTTP routes: /speak, /speak_audio, /reset, /sessions/{id}/video, /sessions/{id}/offer, /sessions/{id}/interrupt,
/health."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Header, Path, Query, Request, Response, UploadFile
from fastapi.responses import JSONResponse

from musetalk.config import ID_PATTERN
from musetalk.errors import BadOffer, PayloadTooLarge
from musetalk.server.deps import Services, ServicesDep, SpeakServiceDep
from musetalk.server.middleware import ARRIVED_STATE_KEY
from musetalk.server.schemas import (
    AcceptedResponse,
    HealthResponse,
    InterruptResponse,
    OfferRequest,
    OfferResponse,
    ResetResponse,
    SpeakRequest,
    SpeakResponse,
)
from musetalk.server.service import Accepted, SpeakResult
from musetalk.server.uploads import SLOT_STATE_KEY, UploadSlot
from musetalk.server.video import CommittedFileResponse, byte_range
from musetalk.utils import gc_pauses
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
        utterance=result.utterance,
        interrupted=result.interrupted,
    )


def _accepted(accepted: Accepted) -> JSONResponse:
    body = AcceptedResponse(session_id=accepted.session_id, clip_index=accepted.clip_index,
                            utterance=accepted.utterance)
    return JSONResponse(body.model_dump(), status_code=202)


SPEAK_RESPONSES: dict[int | str, dict[str, Any]] = {202: {"model": AcceptedResponse, "description": '"wait": false'}}


@router.post("/speak", response_model=SpeakResponse, responses=SPEAK_RESPONSES)
async def speak(body: SpeakRequest, speaker: SpeakServiceDep) -> SpeakResponse | JSONResponse:
    """TTS the text, render it on the avatar (and the session's live stream) and append the clip to the
    session video; with "wait": false answer 202 at once."""
    request = await speaker.admit_text(body.text, body.session_id, body.avatar_id, interrupt=body.interrupt)
    work = speaker.finish_text(request, body.text, body.voice, body.rate)
    if not body.wait:
        speaker.in_background(work)
        return _accepted(speaker.accepted(request))
    return _response(await work)


@router.post("/speak_audio", response_model=SpeakResponse)
async def speak_audio(
    request: Request,
    services: ServicesDep,
    file: Annotated[UploadFile, File(description="wav, mp3, ogg, flac or webm")],
    session_id: Annotated[str | None, Form(pattern=ID_PATTERN)] = None,
    avatar_id: Annotated[str | None, Form(pattern=ID_PATTERN)] = None,
    wait: Annotated[bool, Form()] = True,
    interrupt: Annotated[bool, Form()] = False,
) -> SpeakResponse | JSONResponse:
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
    arrived: float | None = getattr(request.state, ARRIVED_STATE_KEY, None)
    ticket = await services.speaker.admit_audio(audio, session_id, avatar_id, interrupt=interrupt, arrived=arrived)
    work = services.speaker.finish_audio(ticket, audio)
    if not wait:
        services.speaker.in_background(work)
        return _accepted(services.speaker.accepted(ticket))
    return _response(await work)


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


@router.post("/sessions/{session_id}/offer", response_model=OfferResponse)
async def offer(
    body: OfferRequest, services: ServicesDep, session_id: Annotated[str, Path(pattern=ID_PATTERN)]
) -> OfferResponse:
    """WebRTC: answer a viewer's SDP offer with the session's live video (the avatar, idle when silent) and
    audio (Opus 48 kHz)."""
    if body.type != "offer":
        raise BadOffer(f'type must be "offer", not {body.type!r}')
    answer = await services.hub.offer(session_id, body.sdp, body.type)
    return OfferResponse(sdp=answer.sdp, type=answer.type)


@router.post("/sessions/{session_id}/interrupt", response_model=InterruptResponse)
async def interrupt(
    speaker: SpeakServiceDep, session_id: Annotated[str, Path(pattern=ID_PATTERN)]
) -> InterruptResponse:
    """Stop what the session is saying (the stream returns to idle; the record keeps the utterance cut where it
    stopped) and drop its queued requests."""
    done = speaker.interrupt(session_id)
    return InterruptResponse(session_id=session_id, cut=int(done["cut"]), dropped=int(done["dropped"]))


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
        live=services.hub.stats(),
        gc=gc_pauses.stats(),
        gil=services.gil.stats(),
    )
