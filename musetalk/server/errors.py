"""The one place where library errors become HTTP status codes. Bodies are {"error": name, "detail": message}."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from musetalk.config import PROJECT_ROOT
from musetalk.errors import (
    AvatarNotFound,
    AvatarNotPrepared,
    BadOffer,
    Busy,
    ConfigError,
    FfmpegFailed,
    InputError,
    Interrupted,
    LiveUnavailable,
    MuseTalkError,
    PayloadTooLarge,
    RangeNotSatisfiable,
    SessionConflict,
    SessionLocked,
    SessionNotFound,
    TTSFailed,
    WeightsMissing,
)
from musetalk.utils.logs import kv
from musetalk.utils.text import redact_paths

log = logging.getLogger(__name__)

# Most specific first: the first matching class decides.
STATUS_BY_ERROR: tuple[tuple[type[MuseTalkError], int], ...] = (
    (PayloadTooLarge, 413),
    (BadOffer, 400),
    (LiveUnavailable, 501),
    (RangeNotSatisfiable, 416),
    (InputError, 422),
    (AvatarNotFound, 404),
    (SessionNotFound, 404),
    (AvatarNotPrepared, 409),
    (SessionLocked, 409),
    (SessionConflict, 409),
    (Interrupted, 409),
    (TTSFailed, 502),
    (Busy, 503),
    (WeightsMissing, 503),
    (ConfigError, 500),
    (FfmpegFailed, 500),
)


def status_for(exc: MuseTalkError) -> int:
    """HTTP status for a library error (500 for anything not listed)."""
    for cls, status in STATUS_BY_ERROR:
        if isinstance(exc, cls):
            return status
    return 500


def _body(error: str, detail: str) -> dict[str, str]:
    return {"error": error, "detail": detail}


async def _musetalk_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, MuseTalkError)
    status = status_for(exc)
    headers = {}
    if isinstance(exc, Busy):
        headers["Retry-After"] = str(exc.retry_after_s)
    if isinstance(exc, RangeNotSatisfiable):
        headers["Content-Range"] = f"bytes */{exc.size_bytes}"
    if isinstance(exc, FfmpegFailed):
        log.error("ffmpeg failed %s\n%s", kv(path=request.url.path), exc.stderr_tail)
        detail = str(exc).split("\n", 1)[0]  # the tail goes to the log, not to the caller
    else:
        detail = str(exc)
        level = logging.ERROR if status >= 500 else logging.INFO
        log.log(level, "request failed %s: %s", kv(path=request.url.path, status=status, error=type(exc).__name__),
                detail)
    # The log keeps the full message; the caller sees file names and ids, never the server's folders.
    return JSONResponse(_body(type(exc).__name__, redact_paths(detail, PROJECT_ROOT)), status_code=status,
                        headers=headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        if err.get("type") == "json_invalid":
            loc, msg = "body", "not valid JSON"
        elif err.get("type") == "extra_forbidden":
            msg = "unknown field"
        else:
            msg = err.get("msg", "invalid")
        parts.append(f"{loc}: {msg}")
    return JSONResponse(_body("InvalidRequest", "; ".join(parts) or "invalid request"), status_code=422)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    name = {401: "Unauthorized", 404: "NotFound", 405: "MethodNotAllowed", 413: "PayloadTooLarge"}
    return JSONResponse(
        _body(name.get(exc.status_code, "HTTPError"), str(exc.detail)),
        status_code=exc.status_code,
        headers=dict(exc.headers or {}),
    )


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error %s", kv(path=request.url.path, error=type(exc).__name__))
    return JSONResponse(_body("InternalError", "internal server error; see the server log"), status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers on `app`."""
    app.add_exception_handler(MuseTalkError, _musetalk_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
