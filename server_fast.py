"""server_fast: the warm MuseTalk server (composition root). One process: load once, then serve.

    python server_fast.py [--config FILE] [--set key=value ...] [--host H] [--port P]

Loads the config, sets up logging (stderr + rotating logs/server.log), builds the app and runs uvicorn.
The app's lifespan loads the renderer, the avatars and the voice, warms up, and only then serves; if
something is missing the process exits with status 2 and one message naming it and the fix.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from musetalk.cli import add_config_args, config_from_args
from musetalk.config import project_path, with_overrides
from musetalk.errors import ConfigError

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

    from musetalk.server.app import create_app
    from musetalk.utils.logs import configure_logging

    log_file = configure_logging(cfg.server.log_level, project_path(cfg.server.log_dir))
    log = logging.getLogger("server_fast")
    log.info("starting on http://%s:%d (log file %s)", cfg.server.host, cfg.server.port, log_file)
    app = create_app(cfg)
    logging.getLogger("uvicorn.error").addFilter(_DropStartupTraceback(app))
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=cfg.server.host,
            port=cfg.server.port,
            lifespan="on",
            log_config=None,  # uvicorn's loggers go through ours (stderr + logs/server.log)
            access_log=False,  # our AccessLog middleware logs each request with its id and duration
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


def _stop_quietly(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
