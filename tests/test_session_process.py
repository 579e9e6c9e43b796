"""Sessions across real processes: kill -9 at every step of an append, and one writer per session.

A child process (tests/session_child.py) appends clips to a session; the stitcher's test fault hook
SIGKILLs it at a named step of one append. The session must then open with exactly the acknowledged
clips (the ones committed before the kill), decode, and take the next append.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from session_child import CLICK_AT_S, CLIP_FRAMES, FPS, make_clip

from musetalk.config import EncodeConfig
from musetalk.errors import SessionLocked
from musetalk.session.stitcher import APPEND_STEPS, FAULT_ENV, read_state
from musetalk.session.store import SessionStore

CHILD = Path(__file__).resolve().parent / "session_child.py"
RATE = 48000


def _child(results: Path, n_clips: int, *flags: str, **env: str) -> subprocess.Popen[str]:
    full_env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CHILD.parent.parent), full_env.get("PYTHONPATH", "")]))
    full_env.update(env)
    return subprocess.Popen(
        [sys.executable, str(CHILD), str(results), str(n_clips), *flags],
        env=full_env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _decode(path: Path) -> tuple[int, np.ndarray]:
    """(video frames, mono audio) decoded from a file."""
    with av.open(str(path)) as c:
        n_video = sum(1 for _ in c.decode(video=0))
    with av.open(str(path)) as c:
        audio = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    return n_video, audio


def _clicks_on_the_video_clock(audio: np.ndarray, lengths: list[int]) -> bool:
    loud = np.flatnonzero(np.abs(audio) > 0.3)
    onsets = [int(loud[0])] + [int(b) for a, b in zip(loud[:-1], loud[1:], strict=True) if b - a > 2000]
    starts = np.cumsum([0, *lengths[:-1]]) * RATE // FPS + int(CLICK_AT_S * RATE)
    return len(onsets) == len(lengths) and bool(np.abs(np.array(onsets) - starts).max() < 0.002 * RATE)


@pytest.fixture
def results(tmp_path: Path) -> Path:
    return tmp_path / "results"


CASES = [(step, 3) for step in APPEND_STEPS] + [("during_write", 1), ("before_commit", 1), ("after_commit", 1)]


@pytest.mark.parametrize(("step", "n"), CASES, ids=[f"{s}-clip{n}" for s, n in CASES])
def test_kill_at_every_step_of_an_append(results: Path, tmp_path: Path, step: str, n: int) -> None:
    child = _child(results, n, **{FAULT_ENV: f"{step}:{n}"})
    out, err = child.communicate(timeout=120)
    assert child.returncode == -signal.SIGKILL, err
    acknowledged = n if step == "after_commit" else n - 1
    assert out.split() == [w for i in range(1, n) for w in ("appended", str(i))]  # the killed append never returned
    lengths = list(CLIP_FRAMES[:acknowledged])
    paths = SessionStore(results, "default", FPS, EncodeConfig()).paths("default")
    committed = read_state(paths)
    committed_bytes = committed.layout.committed_bytes if committed and committed.layout else 0
    if step in ("during_write", "after_write", "before_commit", "during_commit"):
        assert paths.video.stat().st_size > committed_bytes  # the kill left uncommitted bytes behind

    store = SessionStore(results, "default", FPS, EncodeConfig())
    try:
        state = store.state("default")
        assert [c.n_frames for c in state.clips] == lengths
        video = store.paths("default").video
        if acknowledged:
            f, n_bytes = store.open_video("default")
            f.close()
            assert video.stat().st_size == n_bytes  # whatever the kill left after the commit is cut off
            assert _decode(video)[0] == sum(lengths)
        else:
            assert not video.exists()  # a first append that never committed leaves no video
        # The session takes the next append and plays on the video clock.
        store.append("default", make_clip(store, "default", 15, seed=9), cursor=0, avatar_id="demo")
        lengths.append(15)
        n_video, audio = _decode(video)
        assert n_video == sum(lengths) and _clicks_on_the_video_clock(audio, lengths)
        assert len((store.paths("default").concat_list).read_text().splitlines()) == len(lengths)
        assert sorted(p.name for p in store.paths("default").clips_dir.glob("*.mp4")) == [
            c.name for c in store.state("default").clips
        ]
    finally:
        store.close()


def test_a_download_that_started_before_an_append_stays_byte_exact(results: Path, tmp_path: Path) -> None:
    store = SessionStore(results, "default", FPS, EncodeConfig())
    try:
        for i in range(2):
            store.append("default", make_clip(store, "default", CLIP_FRAMES[i], i), cursor=0, avatar_id="demo")
        f, n_bytes = store.open_video("default")  # what the route holds while it streams
        first_part = f.read(1000)
        before = store.paths("default").video.read_bytes()[:n_bytes]
        for i in range(2, 4):  # appends while the download is in progress
            store.append("default", make_clip(store, "default", CLIP_FRAMES[i], i), cursor=0, avatar_id="demo")
        downloaded = first_part + f.read(n_bytes - 1000)
        f.close()
        assert downloaded == before
        path = tmp_path / "download.mp4"
        path.write_bytes(downloaded)
        n_video, audio = _decode(path)
        assert n_video == sum(CLIP_FRAMES[:2]) and _clicks_on_the_video_clock(audio, list(CLIP_FRAMES[:2]))
    finally:
        store.close()


def _lines_until(proc: subprocess.Popen[str], word: str) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip() == word:
            return
    raise AssertionError(f"child ended before {word!r}: {proc.stderr.read() if proc.stderr else ''}")


@pytest.mark.parametrize("how", ["exits", "kill-9"])
def test_a_second_process_is_refused_while_one_holds_the_session(results: Path, how: str) -> None:
    holder = _child(results, 2, "--hold")
    try:
        _lines_until(holder, "holding")
        store = SessionStore(results, "default", FPS, EncodeConfig())
        paths = store.paths("default")
        before = paths.video.read_bytes()
        with pytest.raises(SessionLocked, match=rf"in use by another process \(pid {holder.pid} on "):
            store.state("default")
        with pytest.raises(SessionLocked):
            store.reset("default")
        # Refused, it wrote nothing; and it can still read what the holder committed.
        assert paths.video.read_bytes() == before
        f, n_bytes = store.open_video("default")
        f.close()
        state = read_state(paths)
        assert state is not None and state.layout is not None and len(state.clips) == 2
        assert n_bytes == state.layout.committed_bytes
        if how == "exits":
            assert holder.stdin is not None
            holder.stdin.write("done\n")
            holder.stdin.flush()
            assert holder.wait(timeout=60) == 0
        else:
            holder.kill()
            assert holder.wait(timeout=60) == -signal.SIGKILL
        # The lock went with the process: now this one writes.
        assert len(store.state("default").clips) == 2
        store.append("default", make_clip(store, "default", 15, seed=7), cursor=0, avatar_id="demo")
        n_video, audio = _decode(paths.video)
        lengths = [*CLIP_FRAMES[:2], 15]
        assert n_video == sum(lengths) and _clicks_on_the_video_clock(audio, lengths)
        store.close()
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.wait(timeout=60)


def test_the_server_answers_409_while_another_process_holds_the_session(results: Path) -> None:
    from doubles import SyntheticTestRenderer
    from fastapi.testclient import TestClient

    from musetalk.config import load_config
    from musetalk.server.app import create_app
    from musetalk.tts.tone import ToneTTS

    holder = _child(results, 2, "--hold")
    try:
        _lines_until(holder, "holding")
        cfg = load_config(overrides=[f"server.results_dir={results}", "tts.engine=tone", "encode.preset=ultrafast"])
        app = create_app(cfg, renderer=SyntheticTestRenderer, voice=ToneTTS(cfg.tts))
        with TestClient(app, base_url="http://localhost", raise_server_exceptions=False) as client:
            before = (results / "full_session.mp4").read_bytes()
            for r in (client.post("/speak", json={"text": "hello"}), client.get("/reset")):
                assert r.status_code == 409 and r.json()["error"] == "SessionLocked"
                assert f"in use by another process (pid {holder.pid} on " in r.json()["detail"]
            assert (results / "full_session.mp4").read_bytes() == before
            served = client.get("/sessions/default/video")  # reading needs no lock
            assert served.status_code == 200 and before.startswith(served.content)
            assert client.post("/speak", json={"text": "mine", "session_id": "other"}).status_code == 200
            assert holder.stdin is not None
            holder.stdin.write("done\n")
            holder.stdin.flush()
            assert holder.wait(timeout=60) == 0
            r = client.post("/speak", json={"text": "now it is free"})
            assert r.status_code == 200 and r.json()["n_clips"] == 3
        n_video, _ = _decode(results / "full_session.mp4")
        state = read_state(SessionStore(results, "default", FPS, EncodeConfig()).paths("default"))
        assert state is not None and n_video == state.total_frames
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.wait(timeout=60)
