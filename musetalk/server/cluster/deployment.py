"""The Ray Serve application: a gateway deployment (the HTTP ingress) and the replica deployment.

Each replica runs the very app `server_fast.py` serves (built by the same factory, lifespan and all) on
its own GPU. The gateway is what Ray Serve's HTTP proxy calls: it applies the server's middleware (body
limits, auth, CORS, cross-site guard), reads the request body, finds the request's session
(`routing.session_from_head` / `session_from_body`, multipart forms here) and passes the request to the
replica deployment through a `DeploymentHandle` with that session id; the replica deployment's request
router (`router.SessionAffinityRouter`) sends it to the session's owner, whose app answers, and the
response streams back unchanged (plus `X-Served-By: <replica id>`). `GET /health` is the owner's answer
with the cluster's replicas and totals added.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any, cast

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.types import Message, Receive, Scope, Send

from musetalk.config import PROJECT_ROOT, AppConfig
from musetalk.errors import Busy
from musetalk.server.app import install_middleware
from musetalk.server.cluster.router import SessionAffinityRouter
from musetalk.server.cluster.routing import REPORTS, SESSION_FIELD, session_from_body, session_from_head, valid_session
from musetalk.server.errors import install_error_handlers
from musetalk.server.uploads import SLOT_STATE_KEY, UploadSlot
from musetalk.utils.logs import configure_logging, kv

log = logging.getLogger(__name__)

AppFactory = Callable[[AppConfig], FastAPI]

APP_NAME = "musetalk"
REPLICA_DEPLOYMENT = "MuseTalkReplica"
GATEWAY_DEPLOYMENT = "Gateway"
SERVED_BY_HEADER = b"x-served-by"
REQUEST_ID_HEADER = b"x-request-id"
# What the replica's app sees of the request: the ASGI scope without the gateway's own objects.
FORWARDED_SCOPE_KEYS = (
    "type", "asgi", "http_version", "method", "scheme", "path", "raw_path", "query_string", "headers",
    "client", "server",
)
FORWARDED_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
# A replica's own admission control (server.queue_size, max_live_sessions) answers 503 long before this;
# it only bounds what Ray Serve lets through to one replica (video downloads and status polls included).
REPLICA_MAX_ONGOING = 1000
GATEWAY_MAX_ONGOING = 4000
RESPONSE_QUEUE_MESSAGES = 8  # response messages a replica runs ahead of its caller
REPORT_PERIOD_S = 1.0  # how often replicas report owned/live sessions to the routers
# Errors of a replica that died or is being replaced: the request never got an answer, the client retries.
REPLICA_GONE = (RayActorError, ActorUnavailableError, BackPressureError, DeploymentUnavailableError)


class ReplicaServer:
    """One replica: the server's FastAPI app with its lifespan (renderer, avatars, sessions) in this process."""

    async def __init__(self, cfg: AppConfig, app_factory: AppFactory) -> None:  # type: ignore[misc]  # Ray awaits it
        configure_logging(cfg.server.log_level)  # stderr, which Ray keeps in the replica's log file
        self._app = app_factory(cfg)
        self._lifespan: AbstractAsyncContextManager[Any] | None = self._app.router.lifespan_context(self._app)
        await self._lifespan.__aenter__()  # loads, checks avatars, warms up; raises if the server cannot start
        self._id = serve.get_replica_context().replica_id.unique_id
        self._served_by = self._id.encode()
        self._node = socket.gethostname()
        log.info("replica ready %s", kv(replica=self._id, pid=os.getpid(), node=self._node))

    async def handle_request(self, scope: dict[str, Any], body: bytes) -> AsyncIterator[Message]:
        """Run one HTTP request through the app; yields its ASGI response messages."""
        # Bounded: a long session video is read from disk only as fast as the caller takes it.
        queue: asyncio.Queue[Message | None] = asyncio.Queue(maxsize=RESPONSE_QUEUE_MESSAGES)
        finished = asyncio.Event()
        body_sent = False

        async def receive() -> Message:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await finished.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            if message["type"] == "http.response.start":  # the gateway's request id replaces the app's
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != REQUEST_ID_HEADER]
                message = {**message, "headers": [*headers, (SERVED_BY_HEADER, self._served_by)]}
            await queue.put(message)

        async def run() -> None:
            try:
                await self._app(dict(scope), receive, send)
            except Exception:  # the app has answered 500 already (its error middleware); keep the replica up
                log.exception("request failed %s", kv(path=scope.get("path")))
            finally:
                await queue.put(None)

        task = asyncio.ensure_future(run())
        try:
            while (message := await queue.get()) is not None:
                yield message
        finally:
            finished.set()  # a caller that went away reads as a client disconnect
            while not task.done():  # let the app finish (a /speak always does), dropping what it still sends
                while not queue.empty():
                    queue.get_nowait()
                await asyncio.wait({task}, timeout=0.05)

    async def record_routing_stats(self) -> dict[str, Any]:
        """This replica's report to the routers: identity, owned and live sessions, current utterances."""
        services = getattr(self._app.state, "services", None)
        if services is None:
            return {"pid": os.getpid(), "node": self._node, "ready": False}
        stats = getattr(services.renderer, "stats", None)
        scheduler = stats() if callable(stats) else {}
        owned = services.store.owned_sessions()
        return {
            "pid": os.getpid(),
            "node": self._node,
            "device": str(services.renderer.describe().get("device")),
            "ready": bool(services.ready),
            "owned": owned,
            "live": services.speaker.live_session_ids(),
            "sessions": len(owned),
            # frames being generated for these many utterances (the scheduler's count), else speaks in progress
            "live_utterances": int(scheduler.get("live_utterances", services.speaker.in_flight)),
            "accelerated": scheduler.get("accelerated", {}),  # how each batch shape runs (eager, graphs, ...)
            "streams": services.hub.stats(),  # its live streams' lateness figures (/health's "live")
            "gil": services.gil.stats(),  # how long its threads wait for its GIL
        }

    async def __del__(self) -> None:
        """Ray Serve stops the replica: stop the app like server_fast.py does on exit."""
        lifespan = getattr(self, "_lifespan", None)
        if lifespan is not None:
            self._lifespan = None
            await lifespan.__aexit__(None, None, None)


class ForwardedResponse(Response):
    """The replica's response messages, passed on as they come."""

    def __init__(self, first: Message, rest: DeploymentResponseGenerator) -> None:
        super().__init__()
        self._first = first
        self._rest = rest

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Send the first message, then the rest; a replica lost mid-stream ends the connection."""
        await send(self._first)
        try:
            async for message in self._rest:
                await send(message)
        except REPLICA_GONE as exc:
            log.warning("replica lost while answering %s", kv(path=scope.get("path"), error=type(exc).__name__))
            raise


def gateway_app(cfg: AppConfig, replicas: DeploymentHandle) -> FastAPI:
    """The gateway's ASGI app: the server's middleware, `/health` of the cluster, everything else forwarded."""
    app = FastAPI(title="MuseTalk cluster gateway", docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)
    default_session = cfg.server.default_session
    retry_after_s = cfg.server.retry_after_s

    async def forward(request: Request, session: str | None = None) -> tuple[Message, DeploymentResponseGenerator]:
        """Send the request to its session's replica (`session` "": any); the response's first message and
        the rest."""
        body = await request.body()
        if session is None:
            session = await _request_session(request, body) or default_session
        scope = {k: request.scope[k] for k in FORWARDED_SCOPE_KEYS if k in request.scope}
        stream = cast(
            DeploymentResponseGenerator,
            replicas.options(stream=True, session_id=session).handle_request.remote(scope, body),
        )
        slot: UploadSlot | None = getattr(request.state, SLOT_STATE_KEY, None)
        if slot is not None:  # the upload has been read and handed on (its replica admits and decodes it)
            slot.release()
        try:
            first = await stream.__anext__()
        except REPLICA_GONE as exc:
            log.warning("replica unavailable %s", kv(session=session, error=type(exc).__name__))
            raise Busy(
                f"the replica serving session {session!r} is not available (restarting); retry shortly",
                retry_after_s,
            ) from None
        except StopAsyncIteration:
            raise Busy("the replica closed the request without an answer; retry", retry_after_s) from None
        return first, stream

    @app.get("/health", include_in_schema=False)
    async def health(request: Request) -> Response:
        """The least loaded replica answers; the replicas and totals of the whole cluster are added."""
        reports = REPORTS.snapshot()
        try:
            first, stream = await forward(request, "")
            chunks = [m.get("body", b"") async for m in stream if m["type"] == "http.response.body"]
            status = int(first["status"])
            body = json.loads(b"".join(chunks) or b"{}")
        except Busy:
            status, body = 503, {"ready": False}
        reports = REPORTS.snapshot() or reports
        rows = [
            {
                "id": rid,
                "pid": r.get("pid"),
                "node": r.get("node"),
                "device": r.get("device"),
                "sessions": r.get("sessions", 0),
                "live_utterances": r.get("live_utterances", 0),
                "accelerated": r.get("accelerated", {}),
                "streams": r.get("streams", {}),
                "gil": r.get("gil", {}),
            }
            for rid, r in sorted(reports.items())
        ]
        body["replicas"] = rows
        body["totals"] = {
            "replicas": len(rows),
            "ready_replicas": sum(1 for r in reports.values() if r.get("ready")),
            "sessions": sum(int(r["sessions"] or 0) for r in rows),
            "live_utterances": sum(int(r["live_utterances"] or 0) for r in rows),
        }
        return JSONResponse(body, status_code=status)

    @app.api_route("/{path:path}", methods=FORWARDED_METHODS, include_in_schema=False)
    async def forwarded(request: Request) -> Response:
        """Every other route: answered by the replica that owns the request's session."""
        first, stream = await forward(request)
        return ForwardedResponse(first, stream)

    install_middleware(app, cfg)
    return app


async def _request_session(request: Request, body: bytes) -> str | None:
    """The session the request names: header, query, path, then a JSON or form body field."""
    scope = request.scope
    found = session_from_head(scope.get("path", ""), scope.get("query_string", b""), scope.get("headers", []))
    if found is not None or not body:
        return found
    content_type = request.headers.get("content-type", "")
    if content_type.split(";", 1)[0].strip().lower() != "multipart/form-data":
        return session_from_body(content_type, body)
    try:
        form = await request.form()
    except Exception:  # a malformed form: the replica answers it exactly as server_fast.py would
        return None
    try:
        value = form.get(SESSION_FIELD)
        return valid_session(value) if isinstance(value, str) else None
    finally:
        await form.close()


class Gateway:
    """The HTTP ingress deployment; its app is built on the replica (`__serve_build_asgi_app__`)."""

    def __init__(self, cfg: AppConfig, replicas: DeploymentHandle) -> None:
        configure_logging(cfg.server.log_level)
        self._cfg = cfg
        self._replicas = replicas

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Ray Serve's hook for an app built on the replica."""
        return gateway_app(self._cfg, self._replicas)


def replica_python_path(inherited: str) -> str:
    """The replicas' PYTHONPATH: the project root, then the driver's own entries (duplicates dropped).

    A runtime_env variable replaces the inherited value, so packages the driver finds through PYTHONPATH
    (Ray's own, when it is installed that way) would vanish from the replicas without them."""
    entries = (str(PROJECT_ROOT), *inherited.split(os.pathsep))
    return os.pathsep.join(dict.fromkeys(p for p in entries if p))


def build_application(
    cfg: AppConfig,
    app_factory: AppFactory,
    replicas: int,
    gpus_per_replica: float,
    cpus_per_replica: int,
    gateways: int = 1,
    env: Mapping[str, str] | None = None,
) -> serve.Application:
    """The Ray Serve application: `replicas` copies of the server, each with `gpus_per_replica` GPUs (0: none)
    and `cpus_per_replica` cores, behind `gateways` gateway replicas."""
    runtime_env = {"env_vars": {"PYTHONPATH": replica_python_path(os.environ.get("PYTHONPATH", "")), **(env or {})}}
    # The cores matter beyond scheduling: Ray sets a worker's OMP_NUM_THREADS to its CPU count (1 when none
    # is asked for), which would leave a GPU replica's host-side work one thread where server_fast.py has all.
    actor_options: dict[str, Any] = {"runtime_env": runtime_env, "num_cpus": cpus_per_replica}
    if gpus_per_replica > 0:
        actor_options["num_gpus"] = gpus_per_replica
    replica = serve.deployment(
        name=REPLICA_DEPLOYMENT,
        num_replicas=replicas,
        max_ongoing_requests=REPLICA_MAX_ONGOING,
        ray_actor_options=actor_options,
        request_router_config={
            "request_router_class": f"{SessionAffinityRouter.__module__}.{SessionAffinityRouter.__qualname__}",
            "request_routing_stats_period_s": REPORT_PERIOD_S,
            "request_routing_stats_timeout_s": 10 * REPORT_PERIOD_S,
        },
        health_check_period_s=2.0,
        health_check_timeout_s=30.0,
        # A replica that cannot start (missing weights, unprepared avatar) fails the deployment with its
        # message after one retry, instead of being restarted for minutes.
        max_constructor_retry_count=1,
    )(ReplicaServer)
    gateway = serve.deployment(
        name=GATEWAY_DEPLOYMENT,
        num_replicas=gateways,
        max_ongoing_requests=GATEWAY_MAX_ONGOING,
        ray_actor_options={"num_cpus": 0, "runtime_env": runtime_env},
    )(serve.ingress()(Gateway))
    return gateway.bind(cfg, replica.bind(cfg, app_factory))
