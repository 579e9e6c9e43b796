"""server_fast: the warm MuseTalk server (composition root). One process: load once, then serve.

    python server_fast.py [--config FILE] [--set key=value ...] [--host H] [--port P]

Loads the config, sets up logging (stderr + rotating logs/server.log), builds the app and runs uvicorn.
The app's lifespan loads the renderer, the avatars and the voice, warms up, and only then serves; if
something is missing the process exits with status 2 and one message naming it and the fix.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from musetalk.cli import add_config_args, config_from_args
from musetalk.config import AppConfig, project_path, with_overrides
from musetalk.errors import Busy, ConfigError

if TYPE_CHECKING:
    from fastapi import FastAPI

EXIT_CANNOT_START = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description="MuseTalk warm server: POST /speak, GET /reset, GET /health")
    add_config_args(parser)
    parser.add_argument("--host", default=None, help="bind address (default: server.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default: server.port, 8000)")
    return parser.parse_args(argv)


class _DropStartupTraceback(logging.Filter):
    """uvicorn logs the lifespan's traceback when start-up fails; our lifespan already logged one clear line."""

    def __init__(self, app: object) -> None:
        super().__init__()
        self._app = app

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep everything except the traceback of a start-up error we reported ourselves."""
        reported = getattr(getattr(self._app, "state", None), "startup_error", None) is not None
        return not (reported and str(record.msg).startswith("Traceback"))


def main(argv: list[str] | None = None) -> int:
    """Run the server until interrupted; returns the process exit status."""
    args = parse_args(argv)
    try:
        cfg = config_from_args(args)
        overrides = []
        if args.host is not None:
            overrides.append(f"server.host={args.host}")
        if args.port is not None:
            overrides.append(f"server.port={args.port}")
        cfg = with_overrides(cfg, overrides) if overrides else cfg
    except ConfigError as exc:
        print(f"server_fast: {exc}", file=sys.stderr)
        return EXIT_CANNOT_START

    import uvicorn

    from musetalk.server.http import header_deadline_protocol
    from musetalk.utils.logs import configure_logging

    log_file = configure_logging(cfg.server.log_level, project_path(cfg.server.log_dir))
    log = logging.getLogger("server_fast")
    log.info("starting on http://%s:%d (log file %s)", cfg.server.host, cfg.server.port, log_file)
    app = build_app(cfg)
    logging.getLogger("uvicorn.error").addFilter(_DropStartupTraceback(app))
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=cfg.server.host,
            port=cfg.server.port,
            lifespan="on",
            log_config=None,  # uvicorn's loggers go through ours (stderr + logs/server.log)
            access_log=False,  # our AccessLog middleware logs each request with its id and duration
            timeout_keep_alive=cfg.server.keep_alive_s,  # request bodies are timed by the BodyDeadline middleware
            http=header_deadline_protocol(cfg.server.header_timeout_s),  # and request heads by this
        )
    )
    # uvicorn shuts down gracefully on SIGINT/SIGTERM and then re-raises the signal with the handler that
    # was installed before it started; make that handler end the process quietly with status 0.
    signal.signal(signal.SIGTERM, _stop_quietly)
    try:
        server.run()
    except KeyboardInterrupt:
        return 0
    except SystemExit as exc:  # uvicorn exits with its own status when the lifespan fails
        if app.state.startup_error is None:
            raise
        return EXIT_CANNOT_START if exc.code else 0
    return EXIT_CANNOT_START if app.state.startup_error is not None else 0


def build_app(cfg: AppConfig, env: Mapping[str, str] | None = None, **create_kwargs: Any) -> FastAPI:
    """The server app with the web app's chat routes mounted (one process, one GPU worker)."""
    from musetalk.server.app import create_app
    from webapp.backend.routes import chat_router_from_config
    from webapp.backend.service import LiveSpeech, SpeakOutcome

    def speak(text: str, session_id: str) -> SpeakOutcome:
        """Blocking bridge for chat jobs: the same TTS → render → append path as POST /speak."""
        services, loop = app.state.services, getattr(app.state, "loop", None)
        if services is None or loop is None or not services.ready:
            raise Busy("the server is still starting")
        done = asyncio.run_coroutine_threadsafe(services.speaker.speak_text(text, session_id), loop).result()
        return SpeakOutcome(done.video_url, done.clip_start_s, done.clip_duration_s, done.session_duration_s)

    def running() -> tuple[Any, asyncio.AbstractEventLoop]:
        services, loop = app.state.services, getattr(app.state, "loop", None)
        if services is None or loop is None or not services.ready:
            raise Busy("the server is still starting")
        return services, loop

    def speak_live(text: str, session_id: str) -> LiveSpeech:
        """Queue a sentence on the session (its place taken now) and return at once; it plays when rendered."""
        services, loop = running()
        ticket = asyncio.run_coroutine_threadsafe(services.speaker.admit_text(text, session_id), loop).result()
        done = asyncio.run_coroutine_threadsafe(services.speaker.finish_text(ticket, text, None, None), loop)

        def wait() -> SpeakOutcome:
            r = done.result()
            return SpeakOutcome(r.video_url, r.clip_start_s, r.clip_duration_s, r.session_duration_s)

        return LiveSpeech(ticket.utterance, wait)

    def interrupt(session_id: str) -> None:
        """Stop what the session is saying (on the event loop, where the session's state lives)."""
        services, loop = running()

        async def stop() -> None:
            services.speaker.interrupt(session_id)

        asyncio.run_coroutine_threadsafe(stop(), loop).result()

    router = chat_router_from_config(cfg, speak, os.environ if env is None else env, speak_live, interrupt)
    app = create_app(cfg, routers=[router], **create_kwargs)
    return app


def _stop_quietly(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
