"""`create_app(cfg, ...)`: the FastAPI app. Its lifespan builds everything once, warms up, then serves.

Components can be injected (renderer factory, voice engine) so tests and other front ends run the
same app with tiny or fake parts; by default they come from the config.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI
from fastapi.middleware.cors import CORSMiddleware

from musetalk.avatar.store import source_mismatch
from musetalk.config import AppConfig, project_path
from musetalk.errors import MuseTalkError
from musetalk.server.deps import Services
from musetalk.server.docs import install_offline_docs
from musetalk.server.errors import install_error_handlers
from musetalk.server.middleware import (
    AccessLog,
    BearerAuth,
    BodyDeadline,
    BodySizeLimit,
    SiteGuard,
    default_allowed_hosts,
)
from musetalk.server.renderer import LiveRenderer, RendererFactory, renderer_factory
from musetalk.server.routes import router
from musetalk.server.service import SpeakService
from musetalk.server.uploads import UploadGate
from musetalk.server.webrtc import LiveHub
from musetalk.server.worker import RenderPool
from musetalk.session.store import SessionStore
from musetalk.tts.base import VoiceEngine, create_voice_engine
from musetalk.types import Renderer
from musetalk.utils import gc_pauses
from musetalk.utils.gil_probe import GilProbe
from musetalk.utils.logs import kv, process_age_s

log = logging.getLogger(__name__)

MULTIPART_OVERHEAD_BYTES = 65_536  # form fields and boundaries around an uploaded file


def configured_avatars(cfg: AppConfig) -> list[str]:
    """cfg.avatar_id first, then server.avatars, without repeats."""
    return list(dict.fromkeys([cfg.avatar_id, *cfg.server.avatars]))


async def start_services(
    cfg: AppConfig, factory: RendererFactory | None = None, voice: VoiceEngine | None = None
) -> Services:
    """Build the voice engine and the renderer, check the avatars, warm up, start the render threads."""
    # serial = one clip at a time, start to encoded clip (the behaviour before the frame scheduler).
    started_s = process_age_s()  # interpreter start, imports and uvicorn's own start-up, before any of ours
    gc_pauses.install()
    threads = 1 if cfg.engine.scheduler == "serial" else cfg.server.queue_size
    worker = RenderPool(max_pending=cfg.server.queue_size, retry_after_s=cfg.server.retry_after_s, threads=threads)
    worker.start()
    renderer: Renderer | None = None
    try:
        voice = voice or create_voice_engine(cfg.tts)
        build = factory or renderer_factory(cfg)
        t0 = time.perf_counter()
        renderer = await asyncio.to_thread(build, cfg)
        load_ms = (time.perf_counter() - t0) * 1000
        for avatar_id in configured_avatars(cfg):
            renderer.check_avatar(avatar_id)
        if mismatch := source_mismatch(cfg):
            log.warning("%s", mismatch)
        t0 = time.perf_counter()
        await asyncio.to_thread(renderer.warm_up)
        warm_ms = (time.perf_counter() - t0) * 1000
        results_dir = project_path(cfg.server.results_dir)
        store = SessionStore(results_dir, cfg.server.default_session, cfg.fps, cfg.encode)
        hub = LiveHub(
            cfg, renderer.avatar_frames if isinstance(renderer, LiveRenderer) else None, _session_start(cfg, store)
        )
        speaker = SpeakService(cfg, renderer, voice, store, worker, hub)
    except BaseException:
        worker.stop()
        if renderer is not None:
            _close_renderer(renderer)
        gc_pauses.uninstall()
        raise
    if cfg.server.gc_freeze:
        gc_pauses.freeze("ready")
    info = renderer.describe()
    log.info(
        "ready %s",
        kv(
            renderer=info.get("name"),
            device=info.get("device"),
            dtype=info.get("dtype"),
            avatars=",".join(configured_avatars(cfg)),
            tts=voice.name,
            imports_s=round(started_s or 0.0, 2),
            load_ms=round(load_ms, 1),
            warmup_ms=round(warm_ms, 1),
            since_start_s=round(process_age_s() or 0.0, 2),
            capacity=speaker.max_live_sessions(),
            results=results_dir,
        ),
    )
    return Services(
        cfg=cfg, renderer=renderer, voice=voice, store=store, worker=worker, speaker=speaker, hub=hub,
        gil=GilProbe().start(), ready=True,
    )  # fmt: skip


def _session_start(cfg: AppConfig, store: SessionStore) -> Callable[[str], tuple[str, int]]:
    """Where a session's live stream starts: its avatar (the configured one if it has no clips) and cursor."""

    def start(session_id: str) -> tuple[str, int]:
        state = store.state(session_id)
        return state.avatar_id or cfg.avatar_id, state.cursor

    return start


def _close_renderer(renderer: Renderer) -> None:
    """Stop a renderer's threads if it has any (the built-in one has a scheduler and blend pool)."""
    close = getattr(renderer, "close", None)
    if callable(close):
        close()


def create_app(
    cfg: AppConfig,
    *,
    renderer: RendererFactory | None = None,
    voice: VoiceEngine | None = None,
    routers: Sequence[APIRouter] = (),
) -> FastAPI:
    """The server app. `renderer` (a factory taking the config) and `voice` override the configured ones;
    `routers` are mounted beside the API (the web app's pages and chat routes)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.startup_error = None
        app.state.loop = asyncio.get_running_loop()  # for blocking callers on other threads (web app jobs)
        try:
            services = await start_services(cfg, renderer, voice)
        except MuseTalkError as exc:
            app.state.startup_error = exc
            log.error("cannot start: %s", exc)
            raise
        app.state.services = services
        switch_s = sys.getswitchinterval()
        if cfg.server.gil_switch_interval_ms:
            # Process-wide on purpose: the event loop and every thread of the server take turns at the GIL.
            sys.setswitchinterval(cfg.server.gil_switch_interval_ms / 1000)
        try:
            yield
        finally:
            sys.setswitchinterval(switch_s)
            services.ready = False
            services.gil.stop()
            await services.hub.close()
            services.worker.stop()
            _close_renderer(services.renderer)
            services.store.close()
            gc_pauses.uninstall()
            if cfg.server.gc_freeze:
                # What a full garbage collection walks once the server has run (the longest pauses came from such
                # walks, not from freeing garbage), counted at stop where its time harms nobody; with the heap
                # frozen that is only what was made since.
                heap = gc_pauses.census()
                log.info(
                    "heap at stop %s",
                    kv(
                        walked_objects=heap.objects,
                        frozen=gc_pauses.stats()["frozen_objects"],
                        top_types=",".join(f"{t}:{n}" for t, n in heap.types),
                        largest=",".join(f"{t}:{n}" for t, n in heap.largest),
                    ),
                )
                gc_pauses.thaw()
            log.info("stopped")

    app = FastAPI(title="MuseTalk warm server", lifespan=lifespan, docs_url=None, redoc_url=None)
    install_offline_docs(app)  # /docs and /redoc work with no internet
    app.state.services = None
    app.state.startup_error = None
    install_error_handlers(app)
    app.include_router(router)
    for extra in routers:
        app.include_router(extra)
    install_middleware(app, cfg)
    return app


def install_middleware(app: FastAPI, cfg: AppConfig) -> None:
    """The server's middleware stack (body limits, auth, CORS, cross-site guard, access log), as `server.*` sets
    it; the cluster's gateway installs the same one."""
    # Each add wraps the previous ones, so the order below is inside → out: body limits, auth, CORS (so
    # preflights and 401s carry CORS headers), the cross-site guard (refuses before anything else runs),
    # and outermost the access log, which sees every response.
    app.add_middleware(
        BodySizeLimit,
        default_limit=cfg.server.max_body_bytes,
        path_limits={"/speak_audio": cfg.server.max_upload_bytes + MULTIPART_OVERHEAD_BYTES},
    )
    app.add_middleware(BodyDeadline, read_timeout_s=cfg.server.read_timeout_s, deadline_s=cfg.server.body_deadline_s)
    app.add_middleware(
        UploadGate,
        paths=frozenset({"/speak_audio"}),
        max_uploads=cfg.server.max_concurrent_uploads,
        retry_after_s=cfg.server.retry_after_s,
        wait_s=cfg.server.upload_wait_s,
    )
    token = os.environ.get(cfg.server.auth_token_env, "")
    if token:
        app.add_middleware(BearerAuth, token=token)
    if cfg.server.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cfg.server.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "Range"],
            expose_headers=["Content-Range", "Accept-Ranges", "Retry-After", "X-Request-ID"],
        )
    app.add_middleware(
        SiteGuard,
        allowed_hosts=frozenset(cfg.server.allowed_hosts) or default_allowed_hosts(cfg.server.host),
        allowed_origins=frozenset(cfg.server.cors_origins),
    )
    app.add_middleware(AccessLog)
