"""Demo avatar builder and the make-demo helpers."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from musetalk.avatar.demo import blink_closure, close_eyes, write_demo_video
from musetalk.avatar.synthetic import astronaut_bgr
from musetalk.faces.dlib_detector import DlibDetector
from musetalk.utils.ffmpeg import probe
from scripts.contact_sheet import contact_sheet


def test_blinks_are_short_and_complete() -> None:
    closure = blink_closure(150, 25, (1.0, 4.0))
    assert closure.max() == 1.0 and closure[0] == 0.0
    assert 8 <= int(np.count_nonzero(closure)) <= 14  # two blinks of ~6 frames each
    assert closure[25] > 0 and closure[100] > 0 and closure[60] == 0


def test_closed_eyes_change_only_the_eye_region() -> None:
    photo = astronaut_bgr()
    lm = DlibDetector().detect(photo)
    assert lm is not None
    closed = close_eyes(photo, lm, 1.0)
    diff = np.abs(closed.astype(int) - photo.astype(int)).sum(axis=2)
    ys, xs = np.nonzero(diff)
    assert lm[36:48, 1].min() - 30 < ys.min() and ys.max() < lm[36:48, 1].max() + 10
    assert np.all(diff[int(lm[48:68, 1].min()) :] == 0)  # the mouth is untouched
    assert close_eyes(photo, lm, 0.0) is photo


def test_demo_video_and_contact_sheet(tmp_path: Path) -> None:
    photo = astronaut_bgr()
    lm = DlibDetector().detect(photo)
    assert lm is not None
    video = write_demo_video(tmp_path / "demo.mp4", lm, seconds=1.0, size_hw=(256, 256))
    info = probe(video)
    assert info.n_video_frames == 25 and info.width == 256 and info.fps == 25
    sheet = contact_sheet(video, tmp_path / "sheet.png", cols=2, rows=2, tile_px=64)
    assert sheet.stat().st_size > 1000
