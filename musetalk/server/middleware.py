"""Pure-ASGI middleware: access log with timings, bearer-token auth, request body size limits."""

from __future__ import annotations

import json
import logging
import secrets
import time
import uuid
from collections.abc import Mapping

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from musetalk.utils.logs import kv

access_log = logging.getLogger("musetalk.server.access")


async def _send_json(send: Send, status: int, body: dict[str, str], headers: Mapping[str, str] = {}) -> None:
    payload = json.dumps(body).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": payload})


class AccessLog:
    """One log line per request (method, path, status, duration) and an X-Request-ID response header."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex[:12]
        t0 = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            # The query string is not logged: it may carry an access token.
            access_log.info(
                "request %s",
                kv(
                    id=request_id,
                    method=scope.get("method", ""),
                    path=scope.get("path", ""),
                    status=status,
                    ms=round((time.perf_counter() - t0) * 1000, 1),
                ),
            )


class BearerAuth:
    """When a token is configured, every path except the open ones needs `Authorization: Bearer <token>`.

    `?token=<token>` is accepted too, because a browser's <video src> cannot send headers.
    """

    def __init__(self, app: ASGIApp, token: str, open_paths: frozenset[str] = frozenset({"/health"})) -> None:
        self.app = app
        self._token = token.encode()
        self._open = open_paths

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                return secrets.compare_digest(value[7:].strip(), self._token)
        query = scope.get("query_string", b"").decode("latin-1")
        for pair in query.split("&"):
            key, _, value = pair.partition("=")
            if key == "token":
                return secrets.compare_digest(value.encode(), self._token)
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry."""
        if scope["type"] != "http" or scope.get("path") in self._open:
            await self.app(scope, receive, send)
            return
        if not self._authorized(scope):
            await _send_json(
                send,
                401,
                {"error": "Unauthorized", "detail": "missing or wrong bearer token"},
                {"www-authenticate": "Bearer"},
            )
            return
        await self.app(scope, receive, send)


class BodyTooLarge(HTTPException):
    """Raised from inside `receive` so FastAPI's body parsing passes it on as a 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than {limit} bytes")


class BodySizeLimit:
    """Reject bodies over a per-path limit: from Content-Length at once, or while streaming."""

    def __init__(self, app: ASGIApp, default_limit: int, path_limits: Mapping[str, int] = {}) -> None:
        self.app = app
        self._default = default_limit
        self._paths = dict(path_limits)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self._paths.get(scope.get("path", ""), self._default)
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                detail = f"request body larger than {limit} bytes"
                await _send_json(send, 413, {"error": "PayloadTooLarge", "detail": detail})
                return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, limited_receive, send)
