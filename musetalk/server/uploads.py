"""Admission of audio uploads before their body is read: a bounded number decode at once.

FastAPI parses a multipart body before the route runs, so the gate sits in front of it as ASGI
middleware: past the limit a request waits up to `wait_s` for a slot (its body still unread, so memory
stays bounded), and is then answered 503; while the speak queue is full it is answered 503 at once. The
route hands its slot back as soon as the audio is decoded.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque

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
            self._gate._wake_one()


class UploadGate:
    """ASGI middleware: at most `max_uploads` requests to `paths` between admission and decode."""

    def __init__(
        self, app: ASGIApp, paths: frozenset[str], max_uploads: int, retry_after_s: int, wait_s: float = 0.0
    ) -> None:
        self.app = app
        self._paths = paths
        self._max = max_uploads
        self._retry_after_s = retry_after_s
        self._wait_s = wait_s
        self._in_use = 0  # touched on the event loop only
        self._waiters: deque[asyncio.Future[None]] = deque()  # uploads waiting for a slot, oldest first

    @property
    def in_use(self) -> int:
        """Uploads admitted and not yet decoded."""
        return self._in_use

    def _queue_full(self, scope: Scope) -> str | None:
        services = getattr(getattr(scope.get("app"), "state", None), "services", None)
        if services is not None and services.speaker.in_flight >= services.cfg.server.queue_size:
            return f"{services.speaker.in_flight} speak requests in progress (server.queue_size); retry later"
        return None

    async def _wait_for_slot(self) -> bool:
        """Whether a slot is free now or comes free within wait_s (a release wakes the oldest waiter)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._wait_s
        while self._in_use >= self._max:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(asyncio.shield(waiter), remaining)
            except TimeoutError:
                return self._in_use < self._max  # a slot that came free just as the wait ran out is taken
            except asyncio.CancelledError:  # the client went away while waiting
                if waiter.done() and self._in_use < self._max:
                    self._wake_one()  # it had been woken for a free slot: pass that on
                raise
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        return True

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry."""
        if scope["type"] != "http" or scope.get("path") not in self._paths or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        refusal = self._queue_full(scope)
        if refusal is None and not await self._wait_for_slot():
            refusal = f"{self._in_use} audio uploads are being read (server.max_concurrent_uploads); retry later"
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
