"""The server with the real engines: tiny MuseTalk weights, and the weight-free preview renderer."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from musetalk.avatar import PrepResult
from musetalk.avatar.synthetic import SyntheticVideo
from musetalk.config import AppConfig, load_config, with_overrides
from musetalk.server.app import create_app
from musetalk.server.renderer import resolve_renderer
from musetalk.utils.ffmpeg import probe


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
