"""`make demo`: start the server, speak two sentences through the HTTP API, print the session video, stop.

    python -m scripts.demo [--config FILE] [--set key=value ...] [--port 8765] [--session-id demo]

Everything stays on 127.0.0.1. The first run prepares the demo avatar (the server does it at start-up).
The demo speaks into its own session (`demo`: results/sessions/demo/full_session.mp4), which it resets
first; the user's default session (results/full_session.mp4) is never touched, so the demo can run
while `make serve` serves it. If another process holds the demo's session, the demo says so and stops.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from musetalk.cli import add_config_args, config_from_args
from musetalk.config import PROJECT_ROOT, is_valid_id
from musetalk.errors import ConfigError
from musetalk.utils.ffmpeg import probe

SENTENCES = (
    "Hello! I am the demo avatar of the MuseTalk warm server.",
    "Every sentence you send is appended to one continuous video of our conversation.",
)
START_TIMEOUT_S = 900.0  # first run: avatar preparation (and, with weights, model warm-up)
DEMO_SESSION = "demo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--session-id", default=DEMO_SESSION, help="the session the demo speaks into (reset first)")
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    if not is_valid_id(args.session_id) or args.session_id == cfg.server.default_session:
        print("demo: --session-id must match ^[A-Za-z0-9_-]{1,64}$ and not be the default session", file=sys.stderr)
        return 2
    port = args.port or _free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, str(PROJECT_ROOT / "server_fast.py"), "--config", args.config, "--host", "127.0.0.1",
           "--port", str(port)]
    for item in args.overrides:
        cmd += ["--set", item]
    print(f"demo: starting the server on {base} …", flush=True)
    server = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        with httpx.Client(base_url=base, timeout=600.0) as client:
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                if server.poll() is not None:
                    print(f"demo: the server exited with status {server.returncode} (see above)", file=sys.stderr)
                    return 1
                try:
                    health = client.get("/health", timeout=2.0).json()
                    if health.get("ready"):
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    print("demo: the server did not become ready in time", file=sys.stderr)
                    return 1
                time.sleep(0.5)
            renderer = health.get("renderer", {})
            print(f"demo: ready — renderer {renderer.get('name')} on {health.get('device')}", flush=True)
            if renderer.get("note"):
                print(f"demo: {renderer['note']}")
            sid = args.session_id
            reset = client.get("/reset", params={"session_id": sid})
            if reset.status_code != 200:
                print(f"demo: cannot reset session {sid!r}: {reset.json().get('detail', reset.text)}", file=sys.stderr)
                return 1
            speech_s = 0.0
            for text in SENTENCES:
                r = client.post("/speak", json={"text": text, "session_id": sid})
                if r.status_code != 200:
                    print(f"demo: /speak failed with {r.status_code}: {r.text}", file=sys.stderr)
                    return 1
                body = r.json()
                speech_s += float(body["clip_duration_s"])
                print(f"demo: spoke {body['clip_duration_s']:.2f} s: {text!r}", flush=True)
        video = Path(body["video_path"])
        info = probe(video)
        print(f"\nsession video (session {sid!r}): {video}")
        print(f"duration: {info.video_duration_s or info.duration_s:.2f} s (speech: {speech_s:.2f} s)")
        return 0
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    sys.exit(main())
