"""The server with the real engines: tiny MuseTalk weights, and the weight-free preview renderer."""

from __future__ import annotations

import concurrent.futures
import io
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import soundfile as sf
from fastapi.testclient import TestClient

from musetalk.avatar import PrepResult
from musetalk.avatar.synthetic import SyntheticVideo
from musetalk.config import AppConfig, load_config, with_overrides
from musetalk.server.app import create_app
from musetalk.server.renderer import resolve_renderer
from musetalk.utils.ffmpeg import probe, run_ffmpeg


@contextmanager
def _server(cfg: AppConfig) -> Iterator[TestClient]:
    with TestClient(create_app(cfg), base_url="http://localhost", raise_server_exceptions=False) as client:
        yield client


def _cfg(prepared: tuple[AppConfig, PrepResult], tmp_path: Path, *extra: str) -> AppConfig:
    base, _ = prepared
    return with_overrides(
        base,
        [f"server.results_dir={tmp_path / 'results'}", "tts.engine=tone", "encode.preset=ultrafast", *extra],
    )


def test_musetalk_engine_serves_tiny_model_clips(prepared_avatar: tuple[AppConfig, PrepResult], tmp_path: Path) -> None:
    cfg = _cfg(prepared_avatar, tmp_path, "server.renderer=musetalk", "audio.silence_enabled=false")
    with _server(cfg) as client:
        health = client.get("/health").json()
        assert health["ready"] and health["renderer"]["name"] == "musetalk" and health["device"] == "cpu"
        frames = []
        for text in ("Hello there.", "How are you today?"):
            r = client.post("/speak", json={"text": text})
            assert r.status_code == 200, r.text
            frames.append(round(r.json()["clip_duration_s"] * cfg.fps))
        info = probe(tmp_path / "results" / "full_session.mp4")
        assert info.n_video_frames == sum(frames)
        assert info.width is not None and info.height is not None
        assert client.post("/speak", json={"text": "x", "avatar_id": "nobody"}).status_code == 404


def test_preview_renderer_needs_no_weights(prepared_avatar: tuple[AppConfig, PrepResult], tmp_path: Path) -> None:
    cfg = _cfg(prepared_avatar, tmp_path, f"models.dir={tmp_path / 'no-models'}")
    assert resolve_renderer(cfg) == "preview"  # auto without weights
    with _server(cfg) as client:
        health = client.get("/health").json()
        assert health["renderer"]["name"] == "preview" and "make weights" in health["renderer"]["note"]
        r = client.post("/speak", json={"text": "A preview of the avatar speaking."})
        assert r.status_code == 200, r.text
        assert probe(tmp_path / "results" / "full_session.mp4").n_video_frames == round(
            r.json()["clip_duration_s"] * cfg.fps
        )


def test_auto_picks_musetalk_when_weights_exist(prepared_avatar: tuple[AppConfig, PrepResult]) -> None:
    assert resolve_renderer(prepared_avatar[0]) == "musetalk"


def test_startup_prepares_the_default_avatar(face_video: SyntheticVideo, tmp_path: Path) -> None:
    video = tmp_path / "me.mp4"
    shutil.copy(face_video.path, video)
    cfg = load_config(
        overrides=[
            f"models.dir={tmp_path / 'no-models'}",
            f"prep.cache_dir={tmp_path / 'avatars'}",
            f"server.results_dir={tmp_path / 'results'}",
            f"video_path={video}",
            "avatar_id=me",
            "tts.engine=tone",
            "encode.preset=ultrafast",
            "runtime.device=cpu",
        ]
    )
    with _server(cfg) as client:
        assert client.get("/health").json()["ready"]
        assert (tmp_path / "avatars" / "me" / "manifest.json").is_file()
        assert client.post("/speak", json={"text": "Prepared on start."}).status_code == 200
    # preparation off and no cache: the server refuses to start, naming force_prep.
    shutil.rmtree(tmp_path / "avatars")
    with pytest.raises(Exception, match="force_prep"), _server(with_overrides(cfg, ["preparation=false"])):
        pass


def _speech_wav(seconds: float, f0: float) -> bytes:
    t = np.arange(round(seconds * 16000)) / 16000
    x = 0.25 * np.sin(2 * np.pi * f0 * t) * (0.55 + 0.45 * np.sin(2 * np.pi * 3.3 * t))
    buf = io.BytesIO()
    sf.write(buf, x.astype(np.float32), 16000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _decoded(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def test_concurrent_sessions_each_get_exactly_their_own_frames(
    prepared_avatar: tuple[AppConfig, PrepResult], tmp_path: Path
) -> None:
    """Four sessions speak at once through the frame scheduler; each session video is pixel-identical to
    the same utterances spoken one after another on their own. (x264's threads are fixed here: the automatic
    count depends on how many clips are encoding, and each thread's slice changes the coded bytes.)"""
    cfg = _cfg(prepared_avatar, tmp_path, f"models.dir={tmp_path / 'no-models'}", "server.max_live_sessions=8",
               "encode.threads=1")  # fmt: skip
    uploads = [_speech_wav(0.8 + 0.3 * i, 150 + 40 * i) for i in range(4)]
    results = tmp_path / "results" / "sessions"
    with _server(cfg) as client:

        def speak(session: str, data: bytes) -> dict[str, Any]:
            r = client.post("/speak_audio", files={"file": ("a.wav", data)}, data={"session_id": session})
            assert r.status_code == 200, r.text
            return dict(r.json())

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            together = list(pool.map(speak, [f"together{i}" for i in range(4)], uploads))
        alone = [speak(f"alone{i}", data) for i, data in enumerate(uploads)]
        stats = client.get("/health").json()["scheduler"]
    assert stats["live_utterances"] == 0
    for i, (a, b) in enumerate(zip(together, alone, strict=True)):
        assert a["clip_duration_s"] == b["clip_duration_s"]
        frames_a = _decoded(results / f"together{i}" / "full_session.mp4")
        frames_b = _decoded(results / f"alone{i}" / "full_session.mp4")
        assert len(frames_a) == len(frames_b) == round(a["clip_duration_s"] * cfg.fps)  # exact frame counts
        assert all(np.array_equal(x, y) for x, y in zip(frames_a, frames_b, strict=True))
    # The sessions differ from each other (different audio → different mouths): a mix-up would show.
    assert not np.array_equal(_decoded(results / "together0" / "full_session.mp4")[5],
                              _decoded(results / "together1" / "full_session.mp4")[5])
    for key in ("upload", "queued", "first_frame", "generate", "blend", "encode", "append", "total", "render_wait",
                "prepare"):  # fmt: skip
        assert key in together[0]["timings_ms"], key
    assert together[0]["timings_ms"]["prepare"] <= together[0]["timings_ms"]["queued"] + 1e-6  # a part of it
    assert all(0 < r["timings_ms"]["upload"] < 60_000 for r in together)  # request in → audio decoded


def test_health_reports_capacity_and_the_scheduler(
    prepared_avatar: tuple[AppConfig, PrepResult], tmp_path: Path
) -> None:
    cfg = _cfg(prepared_avatar, tmp_path, f"models.dir={tmp_path / 'no-models'}")
    with _server(cfg) as client:
        health = client.get("/health").json()
    capacity, scheduler = health["capacity"], health["scheduler"]
    assert capacity["source"] == "measured" and capacity["max_live_sessions"] >= 1
    assert capacity["frames_per_s"] > 0 and capacity["host_fps"] > 0
    assert set(scheduler) >= {"live_utterances", "frames_per_s", "lateness_p95_ms", "accelerated"}


@pytest.mark.slow
def test_audio_context_conditions_a_sentence_on_the_one_before(
    prepared_avatar: tuple[AppConfig, PrepResult], tmp_path: Path
) -> None:
    """audio.context_ms: a session's second sentence is rendered hearing the first one's end. The same two
    sentences with and without context: first clips identical, second clips differ (same cursor, same audio)."""
    uploads = (_speech_wav(1.0, 170), _speech_wav(0.8, 230))
    results = tmp_path / "results" / "sessions"
    frames = {}
    for context_ms in (0, 1000):
        cfg = _cfg(prepared_avatar, tmp_path, "server.renderer=musetalk", "audio.silence_enabled=false",
                   f"audio.context_ms={context_ms}")
        session = f"ctx{context_ms}"
        with _server(cfg) as client:
            lengths = []
            for data in uploads:
                r = client.post("/speak_audio", files={"file": ("a.wav", data)}, data={"session_id": session})
                assert r.status_code == 200, r.text
                lengths.append(round(r.json()["clip_duration_s"] * cfg.fps))
        frames[context_ms] = _decoded(results / session / "full_session.mp4")
    n1 = lengths[0]
    assert all(np.array_equal(a, b) for a, b in zip(frames[0][:n1], frames[1000][:n1], strict=True))
    assert not np.array_equal(frames[0][n1], frames[1000][n1])


def test_a_clips_session_audio_is_encoded_while_it_renders(
    prepared_avatar: tuple[AppConfig, PrepResult], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = _cfg(prepared_avatar, tmp_path, f"models.dir={tmp_path / 'no-models'}")
    caplog.set_level(logging.INFO, logger="musetalk.server.service")
    with _server(cfg) as client:
        for text in ("Hello there.", "And once more."):
            r = client.post("/speak", json={"text": text, "session_id": "ahead"})
            assert r.status_code == 200, r.text
        speaks = [rec.getMessage() for rec in caplog.records if rec.getMessage().startswith("speak session=ahead")]
    assert len(speaks) == 2 and all("audio_ahead=True" in line for line in speaks), speaks
    video = tmp_path / "results" / "sessions" / "ahead" / "full_session.mp4"
    run_ffmpeg(["-xerror", "-i", str(video), "-f", "null", "-"])
