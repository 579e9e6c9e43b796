"""The real composition root: `python server_fast.py` under uvicorn in a subprocess, over HTTP.

Also the crash test: the server is SIGKILLed after writing an append's bytes and before committing
them (a test-only fault hook in the stitcher); the session must open with exactly the acknowledged
clips, and a restarted server continues it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import av
import httpx
import pytest

from musetalk.config import PROJECT_ROOT
from musetalk.session.stitcher import FAULT_ENV, SessionPaths, read_state
from musetalk.utils.ffmpeg import probe

TESTS_DIR = Path(__file__).resolve().parent
START_TIMEOUT_S = 60.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _server_cmd(tmp_path: Path, port: int, *overrides: str) -> list[str]:
    sets = [
        f"server.results_dir={tmp_path / 'results'}",
        f"server.log_dir={tmp_path / 'logs'}",
        "server.renderer=doubles:make_test_renderer",
        "tts.engine=tone",
        "encode.preset=ultrafast",
        *overrides,
    ]
    cmd = [sys.executable, str(PROJECT_ROOT / "server_fast.py"), "--port", str(port)]
    for item in sets:
        cmd += ["--set", item]
    return cmd


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


@contextmanager
def _server(
    tmp_path: Path, name: str, overrides: tuple[str, ...] = (), env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """Start server_fast.py, wait until /health is ready; always stop it again."""
    port = _free_port()
    out_path = tmp_path / f"{name}.out"
    with out_path.open("wb") as out:
        proc = subprocess.Popen(
            _server_cmd(tmp_path, port, *overrides), cwd=tmp_path, env=_env(**(env or {})), stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{out_path.read_text()}")
            try:
                if httpx.get(f"{base}/health", timeout=1).json().get("ready"):
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready after {START_TIMEOUT_S} s:\n{out_path.read_text()}")
            time.sleep(0.1)
        yield proc, base, out_path
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def _decoded_frames(path: Path) -> tuple[int, int]:
    """(video frames, audio samples) actually decodable from a file."""
    with av.open(str(path)) as c:
        n_video = sum(1 for _ in c.decode(video=0))
    with av.open(str(path)) as c:
        n_audio = sum(f.samples for f in c.decode(audio=0))
    return n_video, n_audio


@pytest.mark.slow
def test_killed_between_write_and_commit(tmp_path: Path) -> None:
    video = tmp_path / "results" / "full_session.mp4"
    paths = SessionPaths(video=video, workdir=tmp_path / "results" / "sessions" / "default")
    with _server(tmp_path, "first", env={FAULT_ENV: "before_commit:3"}) as (proc, base, _):
        replies = [httpx.post(f"{base}/speak", json={"text": t}, timeout=30) for t in ("one two", "three four five")]
        assert [r.status_code for r in replies] == [200, 200]
        committed = httpx.get(f"{base}/sessions/default/video", timeout=30).content
        with pytest.raises(httpx.HTTPError):
            httpx.post(f"{base}/speak", json={"text": "this append dies"}, timeout=30)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    # It died after the third clip's bytes were written and fsynced, before the commit.
    assert len(video.read_bytes()) > len(committed) and video.read_bytes().startswith(committed)
    state = read_state(paths)
    assert state is not None and len(state.clips) == 2
    assert state.layout is not None and state.layout.committed_bytes == len(committed)

    with _server(tmp_path, "second") as (proc, base, out_path):
        r = httpx.post(f"{base}/speak", json={"text": "after the crash"}, timeout=30)
        assert r.status_code == 200 and r.json()["clip_index"] == 2
        got = httpx.get(f"{base}/sessions/default/video", headers={"Range": "bytes=0-9"}, timeout=30)
        assert got.status_code == 206 and got.content == committed[:10]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    assert "stopped" in out_path.read_text() and "Traceback" not in out_path.read_text()
    final = read_state(paths)
    assert final is not None and len(final.clips) == 3
    n_video, n_audio = _decoded_frames(video)
    assert n_video == final.total_frames == probe(video).n_video_frames
    assert abs(n_audio - final.total_samples) < 2048
    log_text = (tmp_path / "logs" / "server.log").read_text()
    assert "path=/speak" in log_text and "render_ms=" in log_text and "cutting" in log_text


@pytest.mark.slow
def test_refuses_to_start_without_weights(tmp_path: Path) -> None:
    cmd = _server_cmd(
        tmp_path, _free_port(), "server.renderer=musetalk", f"models.dir={tmp_path / 'no-models'}", "tts.engine=espeak"
    )
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "cannot start" in proc.stderr and "model file(s) missing" in proc.stderr and "make weights" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_config_is_one_line(tmp_path: Path) -> None:
    cmd = _server_cmd(tmp_path, _free_port(), "server.queue_size=0")
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "server.queue_size" in proc.stderr and "Traceback" not in proc.stderr


CHROMIUM = Path("/usr/bin/chromium")

_PLAY_JS = """async () => {
  const v = document.getElementById('v');
  await new Promise((ok, fail) => {
    if (v.readyState >= 1) ok();
    v.onloadedmetadata = ok;
    v.onerror = () => fail('media error ' + (v.error && v.error.code));
    setTimeout(() => fail('no metadata'), 10000);
  });
  const duration = v.duration;
  v.currentTime = duration - 0.5;
  await new Promise(ok => { v.onseeked = ok; setTimeout(ok, 5000); });
  const seekedTo = v.currentTime;
  await v.play();
  await new Promise(ok => { v.onended = ok; setTimeout(ok, 5000); });
  return {duration, seekedTo, ended: v.ended, width: v.videoWidth, error: v.error && v.error.code};
}"""


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.is_file(), reason="needs Debian chromium (apt-get install chromium)")
def test_browser_plays_and_seeks_the_session_video_at_every_committed_length(tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    served: list[tuple[dict[str, Any], bytes]] = []
    with _server(tmp_path, "browser") as (_, base, _), sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--no-sandbox", "--disable-gpu", "--autoplay-policy=no-user-gesture-required"],
        )
        try:
            page = browser.new_page()
            results = []
            for text in ("First sentence of the test.", "Second one.", "And the third sentence, a bit longer."):
                reply = httpx.post(f"{base}/speak", json={"text": text}, timeout=30).json()
                served.append((reply, httpx.get(f"{base}{reply['video_url']}", timeout=30).content))
                page.set_content(f'<video id="v" muted preload="auto" src="{base}{reply["video_url"]}"></video>')
                results.append(page.evaluate(_PLAY_JS))
            # A player opening the file on disk (committed bytes + the provisional audio tail).
            page_file = tmp_path / "results" / "page.html"  # beside results/full_session.mp4
            page_file.write_text('<video id="v" muted preload="auto" src="full_session.mp4"></video>')
            page.goto(page_file.as_uri())
            on_disk = page.evaluate(_PLAY_JS)
        finally:
            browser.close()
    for (reply, _data), result in zip(served, results, strict=True):
        assert result["error"] is None and result["width"] == 64
        # The browser's duration is the session's (plus at most the 21 ms AAC priming some demuxers count).
        assert reply["session_duration_s"] - 0.01 <= result["duration"] <= reply["session_duration_s"] + 0.03
        assert result["seekedTo"] == pytest.approx(result["duration"] - 0.5, abs=0.05)
        assert result["ended"] is True
    assert served[1][1].startswith(served[0][1]) and served[2][1].startswith(served[1][1])  # never rewritten
    assert on_disk["error"] is None and on_disk["ended"] is True
    assert on_disk["duration"] == pytest.approx(served[-1][0]["session_duration_s"], abs=0.03)
