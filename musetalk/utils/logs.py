"""Logging setup for entry points: one line per event, `key=value` fields, to stderr and a rotating file."""

from __future__ import annotations

import logging
import logging.handlers
import os
from pathlib import Path

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
LOG_FILE_NAME = "server.log"
LOG_FILE_BYTES = 10_000_000
LOG_FILE_COUNT = 5


def kv(**fields: object) -> str:
    """Format fields as `key=value` pairs (values with spaces are quoted) for greppable log lines."""
    parts = []
    for key, value in fields.items():
        text = f"{value:g}" if isinstance(value, float) else str(value)
        if not text or any(c.isspace() or c in "\"=" for c in text):
            text = '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
        parts.append(f"{key}={text}")
    return " ".join(parts)


def configure_logging(level: str = "INFO", log_dir: Path | None = None) -> Path | None:
    """Send the root logger to stderr and, if `log_dir` is given, to <log_dir>/server.log (rotating).

    Called by entry points only; returns the log file path.
    """
    root = logging.getLogger()
    root.setLevel(level)
    formatter = logging.Formatter(LOG_FORMAT)
    for handler in list(root.handlers):
        if getattr(handler, "_musetalk", False):
            root.removeHandler(handler)
            handler.close()
    stderr = logging.StreamHandler()
    stderr.setFormatter(formatter)
    stderr._musetalk = True  # type: ignore[attr-defined]
    root.addHandler(stderr)
    if log_dir is None:
        return None
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / LOG_FILE_NAME
    rotating = logging.handlers.RotatingFileHandler(
        path, maxBytes=LOG_FILE_BYTES, backupCount=LOG_FILE_COUNT, encoding="utf-8"
    )
    rotating.setFormatter(formatter)
    rotating._musetalk = True  # type: ignore[attr-defined]
    root.addHandler(rotating)
    return path


def process_age_s() -> float | None:
    """Seconds since this process started (Linux /proc), None where that cannot be read."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime_s = float(Path("/proc/uptime").read_text().split()[0])
        return uptime_s - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
