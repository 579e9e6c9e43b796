"""`make demo`'s script end to end: real server_fast subprocess on loopback, two /speak calls into its own
session (the user's default session is left alone), probed video."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from musetalk.avatar.demo import write_demo_video
from musetalk.avatar.synthetic import astronaut_bgr
from musetalk.faces.dlib_detector import DlibDetector
from scripts import demo


@pytest.mark.slow
def test_demo_speaks_two_sentences_and_prints_the_session(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    landmarks = DlibDetector().detect(astronaut_bgr())
    assert landmarks is not None
    video = write_demo_video(tmp_path / "demo.mp4", landmarks, seconds=2.0, size_hw=(256, 256))
    users_session = tmp_path / "results" / "full_session.mp4"  # the user's default session: not the demo's
    users_session.parent.mkdir(parents=True)
    users_session.write_bytes(b"the user's own session")
    code = demo.main(
        [
            "--set", f"video_path={video}",
            "--set", f"prep.cache_dir={tmp_path / 'avatars'}",
            "--set", f"server.results_dir={tmp_path / 'results'}",
            "--set", f"server.log_dir={tmp_path / 'logs'}",
            "--set", f"models.dir={tmp_path / 'no-models'}",
            "--set", "encode.preset=ultrafast",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"session video (session 'demo'): {tmp_path / 'results' / 'sessions' / 'demo' / 'full_session.mp4'}" in out
    assert users_session.read_bytes() == b"the user's own session"
    match = re.search(r"duration: ([\d.]+) s \(speech: ([\d.]+) s\)", out)
    assert match is not None, out
    assert float(match.group(1)) == pytest.approx(float(match.group(2)), abs=0.05)
    assert out.count("demo: spoke") == 2 and "renderer preview" in out
