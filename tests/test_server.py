"""The HTTP server in-process (TestClient with lifespan): /speak, sessions, errors, limits, auth, Range.

The renderer is a test double (tests/doubles.py); TTS, sessions, worker, HTTP and errors are real.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from doubles import (
    BrokenVoice,
    CorruptClipRenderer,
    GatedRenderer,
    OomOnceRenderer,
    SlowToneVoice,
    SyntheticTestRenderer,
)
from fastapi import APIRouter
from fastapi.testclient import TestClient

from musetalk.config import AppConfig, load_config
from musetalk.errors import AvatarNotPrepared, WeightsMissing
from musetalk.server.app import create_app
from musetalk.server.deps import SpeakServiceDep
from musetalk.session.stitcher import COMMIT_NAME, read_state
from musetalk.session.store import SessionStore
from musetalk.tts.base import VoiceEngine
from musetalk.tts.tone import ToneTTS
from musetalk.types import Renderer
from musetalk.utils.ffmpeg import probe

FPS = 25
LOCAL = "http://localhost"  # an allowed Host (the default allowlist: loopback names and the bind address)


def _cfg(tmp_path: Path, *overrides: str) -> AppConfig:
    base = [f"server.results_dir={tmp_path / 'results'}", "tts.engine=tone", "encode.preset=ultrafast"]
    return load_config(overrides=[*base, *overrides])


@contextmanager
def _client(
    tmp_path: Path,
    *overrides: str,
    renderer: Callable[[AppConfig], Renderer] = SyntheticTestRenderer,
    voice: VoiceEngine | None = None,
    **create_kwargs: Any,
) -> Iterator[TestClient]:
    cfg = _cfg(tmp_path, *overrides)
    app = create_app(cfg, renderer=renderer, voice=voice or ToneTTS(cfg.tts), **create_kwargs)
    with TestClient(app, base_url=LOCAL, raise_server_exceptions=False) as client:
        yield client


def _session_video(tmp_path: Path, session: str = "default") -> Path:
    results = tmp_path / "results"
    return results / "full_session.mp4" if session == "default" else results / "sessions" / session / "full_session.mp4"


def _state(tmp_path: Path, session: str = "default") -> Any:
    """The committed session as the files hold it, read without taking the session (the server has it)."""
    return read_state(SessionStore(tmp_path / "results", "default", FPS, load_config().encode).paths(session))


def test_speak_three_times_then_reset(tmp_path: Path) -> None:
    with _client(tmp_path) as client:
        assert client.get("/health").json()["ready"] is True
        replies = [client.post("/speak", json={"text": t}).json() for t in ("Hello.", "How are you today?", "Bye!")]
        video = _session_video(tmp_path)
        assert video.is_file() and replies[-1]["video_path"] == str(video)
        durations = [r["clip_duration_s"] for r in replies]
        assert [r["clip_index"] for r in replies] == [0, 1, 2]
        assert [r["clip_start_s"] for r in replies] == pytest.approx([0, durations[0], durations[0] + durations[1]])
        info = probe(video)
        assert abs(info.duration_s - sum(durations)) <= 3 / FPS  # one frame per clip
        assert replies[-1]["session_duration_s"] == pytest.approx(sum(durations))
        assert replies[-1]["video_url"] == "/sessions/default/video?v=3"
        assert set(replies[0]["timings_ms"]) >= {"tts", "render", "append", "total"}

        assert client.get("/reset").json() == {"session_id": "default", "removed": True}
        assert not video.exists() and not (tmp_path / "results" / "sessions" / "default").exists()
        assert client.get("/sessions/default/video").status_code == 404
        fresh = client.post("/speak", json={"text": "A new start."}).json()
        assert fresh["clip_index"] == 0 and fresh["n_clips"] == 1
        assert probe(video).duration_s == pytest.approx(fresh["clip_duration_s"], abs=1 / FPS)
        assert client.post("/reset").status_code == 200


def test_twenty_speaks_audio_and_video_agree(tmp_path: Path) -> None:
    with _client(tmp_path) as client:
        for i in range(20):
            r = client.post("/speak", json={"text": "word " * (1 + i % 4)})
            assert r.status_code == 200
        info = probe(_session_video(tmp_path))
        assert info.audio_duration_s is not None and info.video_duration_s is not None
        assert abs(info.audio_duration_s - info.video_duration_s) < 0.040
        assert abs(info.video_duration_s - r.json()["session_duration_s"]) < 1e-6


def test_concurrent_speaks_on_two_sessions(tmp_path: Path) -> None:
    texts = {"alpha": ["a" * n for n in (5, 10, 15, 20)], "beta": ["b" * n for n in (7, 12, 17, 22)]}
    jobs = [(sid, text) for sid in texts for text in texts[sid]]
    with _client(tmp_path) as client:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda j: client.post("/speak", json={"text": j[1], "session_id": j[0]}), jobs))
        assert [r.status_code for r in replies] == [200] * 8
        for sid in texts:
            mine = sorted((r.json() for r in replies if r.json()["session_id"] == sid), key=lambda b: b["clip_index"])
            assert [b["clip_index"] for b in mine] == [0, 1, 2, 3]
            state = _state(tmp_path, sid)
            # The session holds exactly its own four clips, in the order the server acknowledged them.
            assert [c.n_frames for c in state.clips] == [round(b["clip_duration_s"] * FPS) for b in mine]
            own_lengths = sorted(round(ToneTTS(load_config().tts).synthesize(t).duration_s * FPS) for t in texts[sid])
            assert sorted(c.n_frames for c in state.clips) == own_lengths
            assert probe(_session_video(tmp_path, sid)).n_video_frames == sum(own_lengths)


def test_requests_on_a_session_apply_in_arrival_order(tmp_path: Path) -> None:
    """A later request with faster TTS still lands after an earlier one on the same session."""
    voice = SlowToneVoice(delay_s=0.8)
    with _client(tmp_path, voice=voice) as client, concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(client.post, "/speak", json={"text": "slow and first"})
        deadline = time.monotonic() + 10
        while client.get("/health").json()["in_flight"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        second = pool.submit(client.post, "/speak", json={"text": "fast"})
        assert first.result().json()["clip_index"] == 0
        assert second.result().json()["clip_index"] == 1


BAD_INPUTS: list[tuple[str, dict[str, Any], int]] = [
    ("empty text", {"json": {"text": ""}}, 422),
    ("whitespace text", {"json": {"text": " \n\t "}}, 422),
    ("text over the limit", {"json": {"text": "x" * 101}}, 422),
    ("unknown field", {"json": {"text": "hi", "speed": 2}}, 422),
    ("not JSON", {"content": b"{text: hi", "headers": {"content-type": "application/json"}}, 422),
    ("plain text body", {"content": b"hello", "headers": {"content-type": "text/plain"}}, 422),
    ("text is a number", {"json": {"text": 42}}, 422),
    ("session_id is a list", {"json": {"text": "hi", "session_id": ["a"]}}, 422),
    ("missing text", {"json": {"session_id": "s"}}, 422),
    ("path traversal session", {"json": {"text": "hi", "session_id": "../../etc"}}, 422),
    ("slash in session", {"json": {"text": "hi", "session_id": "a/b"}}, 422),
    ("long session id", {"json": {"text": "hi", "session_id": "s" * 65}}, 422),
    ("bad avatar id", {"json": {"text": "hi", "avatar_id": "../demo"}}, 422),
    ("bad voice", {"json": {"text": "hi", "voice": "en us; rm"}}, 422),
    ("rate out of range", {"json": {"text": "hi", "rate": 100}}, 422),
    ("unknown avatar", {"json": {"text": "hi", "avatar_id": "nobody"}}, 404),
    ("avatar not prepared", {"json": {"text": "hi", "avatar_id": "unprepared"}}, 409),
    ("voice not in engine", {"json": {"text": "hi", "voice": "en-us"}}, 422),
    ("body over the size limit", {"json": {"text": "x" * 5000}}, 413),
]


def test_bad_input_gets_its_status_and_the_server_keeps_serving(tmp_path: Path) -> None:
    with _client(tmp_path, "server.max_text_chars=100", "server.max_body_bytes=4096") as client:
        assert client.post("/speak", json={"text": "before"}).status_code == 200
        video = _session_video(tmp_path)
        before = video.read_bytes()
        for name, kwargs, status in BAD_INPUTS:
            r = client.post("/speak", **kwargs)
            assert r.status_code == status, f"{name}: {r.status_code} {r.text}"
            body = r.json()
            assert body["error"] and body["detail"], name
        chunked = (part for part in [b'{"text": "', b"x" * 3000, b"y" * 3000, b'"}'])  # no Content-Length
        assert client.post("/speak", content=chunked, headers={"content-type": "application/json"}).status_code == 413
        assert client.get("/reset", params={"session_id": "../x"}).status_code == 422
        assert client.get("/sessions/..%2Fetc/video").status_code in (404, 422)
        assert client.get("/sessions/bad.id/video").status_code == 422
        assert client.get("/sessions/nothing_here/video").status_code == 404
        assert video.read_bytes() == before
        assert client.get("/health").status_code == 200
        assert client.post("/speak", json={"text": "after"}).json()["n_clips"] == 2


def test_not_prepared_message_names_the_command(tmp_path: Path) -> None:
    with _client(tmp_path) as client:
        r = client.post("/speak", json={"text": "hi", "avatar_id": "unprepared"})
        assert r.status_code == 409 and "force_prep" in r.json()["detail"]
        assert client.post("/speak", json={"text": "hi", "avatar_id": "demo"}).status_code == 200
        other = client.post("/speak", json={"text": "hi", "avatar_id": "other"})
        assert other.status_code == 409 and "reset" in other.json()["detail"]  # one avatar per session
        assert client.post("/speak", json={"text": "hi", "avatar_id": "other", "session_id": "s2"}).status_code == 200


def test_tts_failure_is_502(tmp_path: Path) -> None:
    with _client(tmp_path, voice=BrokenVoice()) as client:
        r = client.post("/speak", json={"text": "hi"})
        assert r.status_code == 502 and r.json()["error"] == "TTSFailed"
        assert client.get("/health").status_code == 200
        assert not _session_video(tmp_path).exists()


def test_cuda_out_of_memory_is_503_and_the_server_recovers(tmp_path: Path) -> None:
    with _client(tmp_path, renderer=OomOnceRenderer) as client:
        r = client.post("/speak", json={"text": "too big"})
        assert r.status_code == 503 and r.json()["error"] == "GpuOutOfMemory"
        assert int(r.headers["retry-after"]) >= 1
        ok = client.post("/speak", json={"text": "fits now"})
        assert ok.status_code == 200 and ok.json()["clip_index"] == 0


def test_ffmpeg_failure_is_500_and_the_session_is_unchanged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with _client(tmp_path, renderer=CorruptClipRenderer) as client:
        assert client.post("/speak", json={"text": "good clip"}).status_code == 200
        video = _session_video(tmp_path)
        digest = hashlib.sha256(video.read_bytes()).hexdigest()
        with caplog.at_level(logging.ERROR, logger="musetalk.server.errors"):
            r = client.post("/speak", json={"text": "broken clip"})
        assert r.status_code == 500 and r.json()["error"] == "FfmpegFailed"
        assert "ffmpeg failed" in caplog.text and "Invalid data" in caplog.text  # stderr tail in the log
        assert hashlib.sha256(video.read_bytes()).hexdigest() == digest
        assert len(_state(tmp_path).clips) == 1
        assert sorted(p.name for p in (video.parent / "sessions" / "default" / "clips").iterdir()) == [
            "clip_000001.mp4",
            "clip_000001.wav",
        ]
        assert client.get("/health").status_code == 200


def test_full_queue_answers_503_with_retry_after(tmp_path: Path) -> None:
    gated: list[GatedRenderer] = []

    def factory(cfg: AppConfig) -> GatedRenderer:
        gated.append(GatedRenderer(cfg))
        return gated[0]

    with _client(tmp_path, "server.queue_size=1", renderer=factory) as client:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            first = pool.submit(client.post, "/speak", json={"text": "occupies the queue"})
            assert gated[0].started.wait(10)
            busy = client.post("/speak", json={"text": "one too many", "session_id": "other"})
            assert busy.status_code == 503 and busy.headers["retry-after"] == "2"
            gated[0].gate.set()
            assert first.result().status_code == 200
        assert client.post("/speak", json={"text": "room again"}).status_code == 200


def _wav_bytes(seconds: float, rate: int = 16000, fmt: str = "WAV", subtype: str = "PCM_16") -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def test_speak_audio_uploads(tmp_path: Path) -> None:
    with _client(tmp_path, "server.max_upload_bytes=200000") as client:
        for name, data in (
            ("a.wav", _wav_bytes(0.6)),
            ("a.mp3", _wav_bytes(0.6, fmt="MP3", subtype="MPEG_LAYER_III")),
            ("a.ogg", _wav_bytes(0.6, fmt="OGG", subtype="VORBIS")),
        ):
            r = client.post("/speak_audio", files={"file": (name, data)}, data={"session_id": "up"})
            assert r.status_code == 200, r.text
            assert r.json()["clip_duration_s"] == pytest.approx(0.6, abs=0.1)
        assert r.json()["n_clips"] == 3
        garbage = client.post("/speak_audio", files={"file": ("x.wav", b"RIFF\x00\x00\x00\x00WAVEjunkjunk")})
        assert garbage.status_code == 422
        unknown = client.post("/speak_audio", files={"file": ("x.txt", b"just some text")})
        assert unknown.status_code == 422 and "unsupported" in unknown.json()["detail"]
        too_big = client.post("/speak_audio", files={"file": ("big.wav", _wav_bytes(8.0))})  # 256 kB
        assert too_big.status_code == 413
        missing = client.post("/speak_audio", data={"session_id": "up"})
        assert missing.status_code == 422
        bad_id = client.post("/speak_audio", files={"file": ("a.wav", _wav_bytes(0.2))}, data={"session_id": "a b"})
        assert bad_id.status_code == 422
        assert client.get("/health").status_code == 200


def test_session_video_supports_range_requests(tmp_path: Path) -> None:
    with _client(tmp_path) as client:
        client.post("/speak", json={"text": "some words to fill a clip", "session_id": "r1"})
        state = _state(tmp_path, "r1")
        on_disk = _session_video(tmp_path, "r1").read_bytes()
        data = on_disk[: state.layout.committed_bytes]  # the provisional audio tail after it is not served
        assert len(on_disk) > len(data)
        full = client.get("/sessions/r1/video?v=1")
        assert full.status_code == 200 and full.content == data
        assert full.headers["content-type"] == "video/mp4" and full.headers["accept-ranges"] == "bytes"
        part = client.get("/sessions/r1/video", headers={"Range": "bytes=100-1099"})
        assert part.status_code == 206 and part.content == data[100:1100]
        assert part.headers["content-range"] == f"bytes 100-1099/{len(data)}"
        tail = client.get("/sessions/r1/video", headers={"Range": "bytes=-500"})
        assert tail.status_code == 206 and tail.content == data[-500:]
        open_end = client.get("/sessions/r1/video", headers={"Range": "bytes=1000-"})
        assert open_end.status_code == 206 and open_end.content == data[1000:]
        past_end = client.get("/sessions/r1/video", headers={"Range": f"bytes={len(data) - 10}-{len(data) + 99}"})
        assert past_end.status_code == 206 and past_end.content == data[-10:]
        # Unsatisfiable: 416 with the documented JSON body and the length in Content-Range.
        for spec in (f"bytes={len(data) + 10}-", f"bytes={len(data)}-{len(data) + 5}", "bytes=-0"):
            r = client.get("/sessions/r1/video", headers={"Range": spec})
            assert r.status_code == 416, spec
            assert r.json()["error"] == "RangeNotSatisfiable" and str(len(data)) in r.json()["detail"]
            assert r.headers["content-range"] == f"bytes */{len(data)}"
        # Malformed, other units, several ranges, last < first: ignored (RFC 9110), the whole body.
        for spec in ("bytes=abc", "bytes=5-2", "items=0-5", "bytes=0-1,5-6", "bytes=-", "garbage", "bytes=0x10-"):
            r = client.get("/sessions/r1/video", headers={"Range": spec})
            assert r.status_code == 200 and r.content == data, spec


def test_damaged_session_is_409_without_server_paths(tmp_path: Path) -> None:
    with _client(tmp_path) as client:
        assert client.post("/speak", json={"text": "hello there", "session_id": "d1"}).status_code == 200
    (tmp_path / "results" / "sessions" / "d1" / COMMIT_NAME).write_bytes(bytes(100))  # both slots unreadable
    with _client(tmp_path) as client:
        for r in (client.post("/speak", json={"text": "again", "session_id": "d1"}), client.get("/sessions/d1/video")):
            assert r.status_code == 409 and r.json()["error"] == "SessionConflict"
            assert "'d1'" in r.json()["detail"] and "/reset" in r.json()["detail"]
            assert str(tmp_path) not in r.json()["detail"] and "results" not in r.json()["detail"]
        assert client.get("/reset?session_id=d1").status_code == 200
        assert client.post("/speak", json={"text": "fresh", "session_id": "d1"}).json()["clip_index"] == 0


def test_bearer_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_MUSETALK_TOKEN", "s3cret")
    with _client(tmp_path, "server.auth_token_env=TEST_MUSETALK_TOKEN") as client:
        assert client.get("/health").status_code == 200
        assert client.post("/speak", json={"text": "hi"}).status_code == 401
        wrong = client.post("/speak", json={"text": "hi"}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        ok = client.post("/speak", json={"text": "hi"}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert client.get("/sessions/default/video").status_code == 401
        assert client.get("/sessions/default/video?token=s3cret").status_code == 200
        assert client.get("/reset").status_code == 401


def test_cors_origins_from_config(tmp_path: Path) -> None:
    with _client(tmp_path, "server.cors_origins=[http://app.example]") as client:
        r = client.get("/health", headers={"Origin": "http://app.example"})
        assert r.headers["access-control-allow-origin"] == "http://app.example"
        other = client.get("/health", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_request_log_has_timings(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO), _client(tmp_path) as client:
        request_id = client.post("/speak", json={"text": "logged"}).headers["x-request-id"]
    access = [r.getMessage() for r in caplog.records if r.name == "musetalk.server.access"]
    assert any(f"id={request_id}" in m and "path=/speak" in m and "status=200" in m and " ms=" in m for m in access)
    speak = [r.getMessage() for r in caplog.records if r.getMessage().startswith("speak ")]
    assert speak and all(k in speak[0] for k in ("tts_ms=", "render_ms=", "append_ms=", "total_ms="))


def test_renders_run_on_the_render_threads(tmp_path: Path) -> None:
    made: list[SyntheticTestRenderer] = []

    def factory(cfg: AppConfig) -> SyntheticTestRenderer:
        made.append(SyntheticTestRenderer(cfg))
        return made[0]

    with _client(tmp_path, renderer=factory) as client:
        client.post("/speak", json={"text": "one"})
        client.post("/speak", json={"text": "two"})
    assert {n.split("_")[0] for n in made[0].thread_names} == {"render"}
    # The cursor continues across clips: the second render starts where the first stopped.
    (_, c0, n0), (_, c1, _) = made[0].calls
    assert c0 == 0 and c1 == n0


def test_extra_routers_get_the_speak_path(tmp_path: Path) -> None:
    """The web app mounts its own routes and speaks through the same path as /speak."""
    chat = APIRouter()

    @chat.post("/chat_test")
    async def chat_test(speaker: SpeakServiceDep) -> dict[str, Any]:
        result = await speaker.speak_text("reply from the assistant", session_id="chat")
        return {"url": result.video_url, "start": result.clip_start_s, "dur": result.clip_duration_s}

    with _client(tmp_path, routers=[chat]) as client:
        first, second = client.post("/chat_test").json(), client.post("/chat_test").json()
        assert first["url"] == "/sessions/chat/video?v=1" and second["start"] == pytest.approx(first["dur"])
        assert client.get(second["url"]).status_code == 200


def test_real_espeak_speak(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "tts.engine=espeak")
    with TestClient(create_app(cfg, renderer=SyntheticTestRenderer), base_url=LOCAL) as client:
        assert client.get("/health").json()["tts"] == "espeak"
        r = client.post("/speak", json={"text": "Hello from the offline voice.", "rate": 1.5})
        assert r.status_code == 200
        assert 0.5 < r.json()["clip_duration_s"] < 5.0
        info = probe(_session_video(tmp_path))
        assert info.n_video_frames == round(r.json()["clip_duration_s"] * FPS)


def test_startup_refuses_an_unprepared_configured_avatar(tmp_path: Path) -> None:
    app = create_app(_cfg(tmp_path, "server.avatars=[unprepared]"), renderer=SyntheticTestRenderer)
    with pytest.raises(AvatarNotPrepared, match="force_prep --avatar-id unprepared"), TestClient(app):
        pass
    assert isinstance(app.state.startup_error, AvatarNotPrepared)


def test_startup_with_the_real_engine_names_what_is_missing(tmp_path: Path) -> None:
    app = create_app(_cfg(tmp_path, f"models.dir={tmp_path / 'no-models'}", "server.renderer=musetalk"))
    with pytest.raises(WeightsMissing, match="make weights") as info, TestClient(app):
        pass
    assert any(p.name == "unet.pth" for p in info.value.missing)


def test_admission_refuses_new_sessions_beyond_capacity(tmp_path: Path) -> None:
    gated: list[GatedRenderer] = []

    def factory(cfg: AppConfig) -> GatedRenderer:
        gated.append(GatedRenderer(cfg))
        return gated[0]

    with _client(tmp_path, "server.max_live_sessions=1", renderer=factory) as client:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(client.post, "/speak", json={"text": "speaking", "session_id": "a"})
            assert gated[0].started.wait(10)
            busy = client.post("/speak", json={"text": "a new session", "session_id": "b"})
            assert busy.status_code == 503 and busy.headers["retry-after"] == "2"
            assert "max_live_sessions" in busy.json()["detail"]
            health = client.get("/health").json()
            assert health["live_sessions"] == 1 and health["capacity"]["max_live_sessions"] == 1
            # The live session itself may queue its next sentence.
            second = pool.submit(client.post, "/speak", json={"text": "and more", "session_id": "a"})
            gated[0].gate.set()
            assert first.result().status_code == 200 and second.result().status_code == 200
        assert client.post("/speak", json={"text": "room again", "session_id": "b"}).status_code == 200


def test_health_reports_collections_and_the_heap_is_frozen_while_serving(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """server.gc_freeze (default): long-lived objects are frozen after start-up and thawed at shutdown, when the
    log says what a full collection would have walked."""
    import gc

    caplog.set_level(logging.INFO, logger="musetalk.server.app")
    with _client(tmp_path) as client:
        client.post("/speak", json={"text": "Hello."})
        figures = client.get("/health").json()["gc"]
        assert figures["frozen_objects"] > 10_000 and gc.get_freeze_count() > 10_000  # the app, its libraries
        assert set(figures) == {"collections", "pause_p95_ms", "pause_max_ms", "full_pause_max_ms",
                                "full_pause_max_freed", "frozen_objects"}
        gil = client.get("/health").json()["gil"]
        assert set(gil) == {"probes", "wait_p95_ms", "wait_max_ms"} and gil["probes"] > 0
    assert gc.get_freeze_count() == 0
    census = [r.getMessage() for r in caplog.records if r.getMessage().startswith("heap at stop")]
    assert len(census) == 1 and all(f"{k}=" in census[0] for k in ("walked_objects", "top_types", "largest"))
    with _client(tmp_path, "server.gc_freeze=false") as client:
        assert client.get("/health").json()["gc"]["frozen_objects"] == 0


def test_the_gil_switch_interval_is_set_while_serving_and_restored_after(tmp_path: Path) -> None:
    import sys

    before = sys.getswitchinterval()
    with _client(tmp_path, "server.gil_switch_interval_ms=1") as client:
        assert client.post("/speak", json={"text": "Hello."}).status_code == 200
        assert sys.getswitchinterval() == pytest.approx(0.001)
    assert sys.getswitchinterval() == before
    with _client(tmp_path) as client:  # 0: Python's own setting is left alone
        assert sys.getswitchinterval() == before
