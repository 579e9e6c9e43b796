"""The server on a real local Ray Serve cluster of 2 replicas (`python -m scripts.serve_cluster`), over HTTP.

Preview renderer, tone voice, everything on 127.0.0.1. One cluster serves the whole module (it takes
~30 s to start on 2 cores); the tests run in file order: sessions, then the same API, then a replica is
killed. The cluster is stopped with SIGINT, as Ctrl-C does, and every process it started must be gone.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from musetalk.avatar import PrepResult
from musetalk.config import PROJECT_ROOT, AppConfig, with_overrides
from musetalk.server.app import create_app
from musetalk.server.viewer import LiveViewer

pytestmark = pytest.mark.slow

START_TIMEOUT_S = 240.0
MOVE_DEADLINE_S = 90.0
N_SESSIONS = 8
SPEAKS_PER_SESSION = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _descendants(pid: int) -> set[int]:
    """Every live process below `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@dataclass
class Cluster:
    url: str
    cfg: AppConfig
    results: Path
    proc: subprocess.Popen[bytes]
    log: Path
    acknowledged: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # session → /speak answers
    texts: dict[str, list[str]] = field(default_factory=dict)  # session → texts in clip order
    frames: dict[str, list[np.ndarray]] = field(default_factory=dict)  # session → decoded video

    def health(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.url}/health", timeout=30).json())


@pytest.fixture(scope="module")
def cluster(
    prepared_avatar: tuple[AppConfig, PrepResult], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    base, _ = prepared_avatar
    work = tmp_path_factory.mktemp("cluster")
    sets = [
        f"models.dir={work / 'no-models'}",  # preview renderer
        f"prep.cache_dir={base.prep.cache_dir}",
        "prep.parser=landmarks",
        f"avatar_id={base.avatar_id}",
        "preparation=false",
        "runtime.device=cpu",
        "tts.engine=tone",
        "encode.preset=ultrafast",
        "encode.threads=1",  # the automatic count follows the load, and slices change the bytes: compared below
        f"server.results_dir={work / 'results'}",
        f"server.log_dir={work / 'logs'}",
        "server.max_live_sessions=16",
    ]
    cfg = with_overrides(base, sets)
    port = _free_port()
    cmd = [sys.executable, "-m", "scripts.serve_cluster", "--replicas", "2", "--host", "127.0.0.1",
           "--port", str(port), "--num-cpus", "2", "--object-store-mb", "100"]
    for item in sets:
        cmd += ["--set", item]
    log = work / "cluster.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    c = Cluster(f"http://127.0.0.1:{port}", cfg, work / "results", proc, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"cluster exited with {proc.returncode}:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"cluster not ready:\n{log.read_text()[-4000:]}"
            try:
                health = c.health()
                if health.get("ready") and sum(1 for r in health["replicas"] if r["pid"]) == 2:
                    break
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(1.0)
        yield c
    finally:
        started = _descendants(proc.pid)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C does
        try:
            code = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        deadline = time.monotonic() + 30
        while (left := {p for p in started if _alive(p)}) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert code == 0, log.read_text()[-4000:]
        assert not left, f"processes the cluster started are still running: {sorted(left)}"


def _decoded(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def _video(c: Cluster, session: str) -> Path:
    return c.results / "sessions" / session / "full_session.mp4"


def _speak(c: Cluster, session: str, text: str) -> httpx.Response:
    return httpx.post(f"{c.url}/speak", json={"text": text, "session_id": session}, timeout=300)


def test_concurrent_sessions_each_stay_on_one_replica_and_get_exactly_their_clips(cluster: Cluster) -> None:
    """8 sessions × 3 concurrent /speak: each session is served by one replica, both replicas serve, and every
    session video is frame for frame what one server makes of the same sentences in the same order."""
    c = cluster
    jobs = [(f"s{i}", f"Sentence {k} of session {i}{'.' * i}") for i in range(N_SESSIONS)
            for k in range(SPEAKS_PER_SESSION)]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: (job, _speak(c, *job)), jobs))
    served: dict[str, set[str]] = {}
    for (session, text), r in answers:
        assert r.status_code == 200, r.text
        served.setdefault(session, set()).add(r.headers["x-served-by"])
        c.acknowledged.setdefault(session, []).append({**r.json(), "text": text})
    assert all(len(replicas) == 1 for replicas in served.values()), served
    assert len(set().union(*served.values())) == 2, served  # both replicas used

    health = c.health()
    ids = {r["id"] for r in health["replicas"]}
    assert set().union(*served.values()) <= ids
    assert all(isinstance(r["pid"], int) and r["pid"] > 0 and r["node"] and r["device"] == "cpu"
               for r in health["replicas"])
    assert health["totals"]["replicas"] == 2
    for row in health["replicas"]:  # each replica's own live-stream and GIL figures, as its /health has them
        assert {"tick_late_p95_ms", "video_age_p95_ms", "video_dropped"} <= set(row["streams"]), row
        assert row["gil"]["probes"] > 0, row

    # The reference: one in-process server speaks the same sentences, session by session, in clip order.
    reference = with_overrides(c.cfg, [f"server.results_dir={c.results.parent / 'reference'}"])
    with TestClient(create_app(reference), base_url="http://localhost") as client:
        for session, acks in c.acknowledged.items():
            acks.sort(key=lambda a: a["clip_index"])
            assert [a["clip_index"] for a in acks] == list(range(SPEAKS_PER_SESSION))
            c.texts[session] = [a["text"] for a in acks]
            for text in c.texts[session]:
                assert client.post("/speak", json={"text": text, "session_id": session}).status_code == 200
    for session, acks in c.acknowledged.items():
        frames = _decoded(_video(c, session))
        expected = _decoded(c.results.parent / "reference" / "sessions" / session / "full_session.mp4")
        assert len(frames) == sum(round(a["clip_duration_s"] * c.cfg.fps) for a in acks) == len(expected)
        assert acks[-1]["session_duration_s"] == pytest.approx(len(frames) / c.cfg.fps, abs=1e-6)
        assert all(np.array_equal(x, y) for x, y in zip(frames, expected, strict=True)), session
        c.frames[session] = frames
    # Sessions differ (different sentences → different mouths): a mix-up between sessions would show.
    assert len(c.frames["s0"]) != len(c.frames["s7"])


def test_the_cluster_serves_the_same_api(cluster: Cluster) -> None:
    """Errors, uploads (the session in a form field), the session video with Range, the web page, chat jobs,
    the live stream."""
    c = cluster
    owner = _speak(c, "s1", "Which replica owns me?").headers["x-served-by"]
    c.acknowledged["s1"].append({"text": "Which replica owns me?"})
    r = httpx.post(f"{c.url}/speak", json={"text": "   "})
    assert r.status_code == 422 and r.json()["error"] == "InvalidRequest"
    r = httpx.post(f"{c.url}/speak", json={"text": "hi", "avatar_id": "nobody"})
    assert r.status_code == 404 and r.json()["error"] == "AvatarNotFound"
    r = httpx.post(f"{c.url}/speak", content=b"x" * (c.cfg.server.max_body_bytes + 1),
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"] == "PayloadTooLarge"
    assert httpx.get(f"{c.url}/no/such/route").json() == {"error": "NotFound", "detail": "Not Found"}
    r = httpx.post(f"{c.url}/speak", json={"text": "hi"}, headers={"origin": "http://evil.example"})
    assert r.status_code == 403 and r.json()["error"] == "Forbidden"
    r = httpx.post(f"{c.url}/speak_audio", files={"file": ("a.wav", b"not audio")}, data={"session_id": "s1"})
    assert r.status_code == 422 and r.headers["x-served-by"] == owner  # the form field routed it
    r = httpx.get(f"{c.url}/sessions/s1/video", headers={"range": "bytes=0-99"})
    assert r.status_code == 206 and len(r.content) == 100 and r.headers["x-served-by"] == owner
    assert httpx.get(f"{c.url}/sessions/nobody/video").status_code == 404
    page = httpx.get(f"{c.url}/")
    assert page.status_code == 200 and "<html" in page.text.lower()
    assert httpx.get(f"{c.url}/docs").status_code == 200

    r = httpx.post(f"{c.url}/chat", json={"message": "Hello there!", "session_id": "chat1"})
    assert r.status_code == 202, r.text
    status_url = r.json()["status_url"]
    deadline = time.monotonic() + 120
    while (job := httpx.get(f"{c.url}{status_url}").json())["status"] not in ("done", "error"):
        assert time.monotonic() < deadline, job
        time.sleep(0.5)
    assert job["status"] == "done", job
    assert httpx.get(f"{c.url}/sessions/chat1/video").status_code == 200
    assert _watch(c, "s2") > 0  # the live stream: the offer reaches the session's replica, media flows


def test_a_killed_replica_s_sessions_are_served_again_with_every_acknowledged_clip(cluster: Cluster) -> None:
    """kill -9 of one replica while it renders: the request in flight is answered 503 (nothing acknowledged);
    within 90 s every session speaks again; its video keeps every acknowledged clip and nothing else."""
    c = cluster
    health = c.health()
    victim = health["replicas"][0]
    owners = {s: _speak_owner(c, s) for s in c.texts}
    moved = [s for s, r in owners.items() if r == victim["id"]]
    assert moved, owners
    # 400 characters of the tone voice: 20 s of speech, seconds of rendering on this CPU — in flight at the kill.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(_speak, c, moved[0], "An utterance cut by the kill. " * 13 + "The end.")
        time.sleep(1.5)
        assert not in_flight.done(), "the long utterance finished before the kill"
        os.kill(victim["pid"], signal.SIGKILL)
        t_kill = time.monotonic()
        cut = in_flight.result()
    assert cut.status_code == 503, cut.text  # never acknowledged: the client sends it again
    assert "retry-after" in cut.headers
    pending = set(c.texts)
    answers: dict[str, httpx.Response] = {}
    while pending:
        assert time.monotonic() - t_kill < MOVE_DEADLINE_S, f"not served again: {sorted(pending)}"
        for session in sorted(pending):
            r = _speak(c, session, "After the restart.")
            if r.status_code == 200:
                answers[session] = r
                pending.discard(session)
            else:
                assert r.status_code == 503, r.text  # the replica is gone: retry later, nothing else
        time.sleep(0.5)
    for session in c.texts:
        assert answers[session].headers["x-served-by"] != victim["id"]
        n_before = len(c.acknowledged[session])
        assert answers[session].json()["clip_index"] == n_before  # every acknowledged clip is still there
        frames = _decoded(_video(c, session))
        before = c.frames[session]
        assert all(np.array_equal(x, y) for x, y in zip(frames[: len(before)], before, strict=True)), session
        assert len(frames) == round(answers[session].json()["session_duration_s"] * c.cfg.fps)
    health = c.health()
    assert victim["pid"] not in {r["pid"] for r in health["replicas"]}
    assert _watch(c, moved[0]) > 0  # a viewer of a moved session reconnects to its new replica


def _watch(c: Cluster, session: str) -> int:
    """Connect a live viewer to `session` through the cluster; video frames received in 1 s."""

    async def watch() -> int:
        async with LiveViewer(c.url, session) as viewer:
            await asyncio.sleep(1.0)
            return len(viewer.received.video)

    return asyncio.run(watch())


def _speak_owner(c: Cluster, session: str) -> str:
    """Which replica serves `session` now (a read-only request: the session's video)."""
    r = httpx.get(f"{c.url}/sessions/{session}/video", headers={"range": "bytes=0-0"})
    assert r.status_code == 206, r.text
    return r.headers["x-served-by"]
