"""Pure-ASGI middleware: access log, bearer-token auth, cross-site guard, request body size and time limits."""

from __future__ import annotations

import asyncio
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


ARRIVED_STATE_KEY = "t_arrived"  # time.perf_counter() when the request reached the app


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
        scope.setdefault("state", {})[ARRIVED_STATE_KEY] = t0  # request.state.t_arrived: for per-request timings
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


class BodyTimeout(HTTPException):
    """Raised from inside `receive` when the client sends its body too slowly; the connection is closed."""

    def __init__(self, detail: str) -> None:
        super().__init__(408, detail, headers={"connection": "close"})


class BodyDeadline:
    """Disconnect slow clients: 408 when no body bytes arrive for `read_timeout_s`, or the whole body
    takes longer than `deadline_s`. (uvicorn itself never times out a request body.)"""

    def __init__(self, app: ASGIApp, read_timeout_s: float, deadline_s: float) -> None:
        self.app = app
        self._read_timeout_s = read_timeout_s
        self._deadline_s = deadline_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline = time.monotonic() + self._deadline_s
        body_done = False

        async def timed_receive() -> Message:
            nonlocal body_done
            if body_done:  # later receives wait for a disconnect, which may legitimately take long
                return await receive()
            left_s = deadline - time.monotonic()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, min(self._read_timeout_s, left_s)))
            except TimeoutError:
                if left_s <= self._read_timeout_s:
                    raise BodyTimeout(f"request body not complete within {self._deadline_s:g} s") from None
                raise BodyTimeout(f"no request body data for {self._read_timeout_s:g} s") from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        await self.app(scope, timed_receive, send)


def _host_part(value: str) -> str:
    """'example.com:8000' → 'example.com'; '[::1]:8000' → '[::1]' (lower case)."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[: value.find("]") + 1] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _origin_host(origin: str) -> str | None:
    """'http://host:port' → 'host:port' (lower case); None for 'null' or anything that is not a URL."""
    scheme, sep, rest = origin.strip().lower().partition("://")
    if not sep or scheme not in {"http", "https"} or not rest or "/" in rest:
        return None
    return rest


def default_allowed_hosts(bind_host: str) -> frozenset[str]:
    """The bind address and the loopback names: what a local browser or curl sends as Host."""
    names = {"localhost", "127.0.0.1", "[::1]"}
    bind = bind_host.strip().lower()
    if bind and bind not in {"0.0.0.0", "::"}:
        names.add(f"[{bind}]" if ":" in bind and not bind.startswith("[") else bind)
    return frozenset(names)


class SiteGuard:
    """Refuse requests a browser sends on behalf of another site (403 JSON).

    - `Host` must be an allowed host name (any port): a DNS-rebinding page reaches us under its own name.
    - A state-changing request (any method but GET/HEAD/OPTIONS, and GET on `state_changing_gets` such as
      /reset) with an `Origin` other than our own or a listed one, or with `Sec-Fetch-Site: cross-site`,
      is refused. Requests without those headers (curl, scripts) pass: they are not a browser acting for
      another site.
    """

    def __init__(
        self,
        app: ASGIApp,
        allowed_hosts: frozenset[str],
        allowed_origins: frozenset[str],
        state_changing_gets: frozenset[str] = frozenset({"/reset"}),
    ) -> None:
        self.app = app
        self._any_host = "*" in allowed_hosts
        self._hosts = frozenset(_host_part(h) for h in allowed_hosts)
        self._origins = frozenset(o.strip().lower().rstrip("/") for o in allowed_origins)
        self._gets = state_changing_gets

    def _refusal(self, scope: Scope) -> str | None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host")
        if host is not None and not self._any_host and _host_part(host) not in self._hosts:
            return f"host {_host_part(host)!r} is not served here (server.allowed_hosts)"
        method = scope.get("method", "GET")
        if method in {"GET", "HEAD", "OPTIONS"} and scope.get("path") not in self._gets:
            return None
        origin = headers.get("origin")
        if origin is not None:
            if origin.strip().lower().rstrip("/") in self._origins:
                return None
            if host is not None and _origin_host(origin) == host.strip().lower():
                return None  # same origin
            return f"cross-site request from origin {origin[:100]!r} refused (server.cors_origins)"
        if headers.get("sec-fetch-site", "").lower() == "cross-site":
            return "cross-site request refused (Sec-Fetch-Site: cross-site)"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            access_log.info("refused %s", kv(method=scope.get("method", ""), path=scope.get("path", ""), why=refusal))
            await _send_json(send, 403, {"error": "Forbidden", "detail": refusal})
            return
        await self.app(scope, receive, send)
