"""Admission of audio uploads before their body is read: a bounded number decode at once.

FastAPI parses a multipart body before the route runs, so the gate sits in front of it as ASGI
middleware: past the limit (or while the speak queue is full) a request is answered 503 at once, before
a byte of its body is read. The route hands its slot back as soon as the audio is decoded.
"""

from __future__ import annotations

import json
import logging

from starlette.types import ASGIApp, Receive, Scope, Send

from musetalk.utils.logs import kv

log = logging.getLogger(__name__)

SLOT_STATE_KEY = "upload_slot"  # request.state.upload_slot: the UploadSlot of this request


class UploadSlot:
    """One admitted upload; `release()` (idempotent) hands the slot back."""

    def __init__(self, gate: UploadGate) -> None:
        self._gate = gate
        self._held = True

    def release(self) -> None:
        """Give the slot back (after decoding, or when the request ends)."""
        if self._held:
            self._held = False
            self._gate._in_use -= 1


class UploadGate:
    """ASGI middleware: at most `max_uploads` requests to `paths` between admission and decode."""

    def __init__(self, app: ASGIApp, paths: frozenset[str], max_uploads: int, retry_after_s: int) -> None:
        self.app = app
        self._paths = paths
        self._max = max_uploads
        self._retry_after_s = retry_after_s
        self._in_use = 0  # touched on the event loop only

    @property
    def in_use(self) -> int:
        """Uploads admitted and not yet decoded."""
        return self._in_use

    def _refusal(self, scope: Scope) -> str | None:
        if self._in_use >= self._max:
            return f"{self._in_use} audio uploads are being read (server.max_concurrent_uploads); retry later"
        services = getattr(getattr(scope.get("app"), "state", None), "services", None)
        if services is not None and services.speaker.in_flight >= services.cfg.server.queue_size:
            return f"{services.speaker.in_flight} speak requests in progress (server.queue_size); retry later"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry."""
        if scope["type"] != "http" or scope.get("path") not in self._paths or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            log.info("upload refused %s", kv(path=scope.get("path"), in_use=self._in_use))
            body = json.dumps({"error": "Busy", "detail": refusal}).encode()
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(self._retry_after_s).encode()),
                (b"connection", b"close"),  # the unread body is not drained
            ]
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        self._in_use += 1
        slot = UploadSlot(self)
        scope.setdefault("state", {})[SLOT_STATE_KEY] = slot
        try:
            await self.app(scope, receive, send)
        finally:
            slot.release()
