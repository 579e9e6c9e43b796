"""scripts/preprocess.py on real generated videos: 25 fps, clips, wavs, meta JSONs, lists, resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import yaml

from musetalk.avatar.synthetic import astronaut_bgr, render_frame, smooth_path
from musetalk.config import PROJECT_ROOT

SIZE_HW = (176, 176)  # small, but the face stays above dlib HOG's ~80 px minimum


def _video(path: Path, fps: int, seconds: float, rate: int = 44100) -> None:
    photo = astronaut_bgr()
    n = int(round(fps * seconds))
    offsets = smooth_path(n, fps, (5.0, 3.0), (0.2, 0.1))
    with av.open(str(path), "w") as c:
        vs = c.add_stream("libx264", rate=fps)
        vs.height, vs.width = SIZE_HW
        vs.pix_fmt = "yuv420p"
        vs.options = {"crf": "28", "preset": "ultrafast"}
        a = c.add_stream("aac", rate=rate, layout="stereo")
        t = np.arange(int(seconds * rate)) / rate
        tone = (0.2 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)
        af = av.AudioFrame.from_ndarray(np.stack([tone, tone]), format="fltp", layout="stereo")
        af.sample_rate, af.pts = rate, 0
        for p in [*a.encode(af), *a.encode(None)]:
            c.mux(p)
        for i in range(n):
            img = render_frame(photo, SIZE_HW, offsets[i], 0.0, 0.5)
            c.mux(vs.encode(av.VideoFrame.from_ndarray(img, format="bgr24")))
        c.mux(vs.encode(None))


def _run(cfg_path: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "scripts.preprocess", "--config", str(cfg_path), "--workers", "2", "--quiet"]
    return subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.slow
def test_preprocess_two_videos_resumes_and_reports_a_bad_one(tmp_path: Path) -> None:
    raw = tmp_path / "source"
    raw.mkdir()
    _video(raw / "WDA_TomPerez_000.mp4", fps=30, seconds=40)
    _video(raw / "RD_Other_001.mp4", fps=24, seconds=40)
    (raw / "broken.mp4").write_bytes(b"not a video at all")
    d = tmp_path / "HDTF"
    cfg = {
        "clip_len_second": 30,
        "video_root_raw": str(raw),
        "val_list_hdtf": ["WDA_TomPerez_000", "RD_Radio7_000"],
        "video_root_25fps": str(d / "video_root_25fps"),
        "video_file_list": str(d / "video_file_list.txt"),
        "video_audio_clip_root": str(d / "clips"),
        "meta_root": str(d / "meta"),
        "video_clip_file_list_train": str(d / "train.txt"),
        "video_clip_file_list_val": str(d / "val.txt"),
    }
    cfg_path = tmp_path / "preprocess.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg), encoding="utf-8")

    first = _run(cfg_path)
    assert first.returncode == 1, first.stderr
    assert "FAILED broken" in first.stdout and "2/3 videos done" in first.stdout

    for name in ("WDA_TomPerez_000", "RD_Other_001"):
        with av.open(str(d / "video_root_25fps" / f"{name}.mp4")) as c:
            v = c.streams.video[0]
            assert v.average_rate == 25
            assert sum(1 for _ in c.decode(video=0)) == pytest.approx(1000, abs=2)
    clips = sorted(p.name for p in (d / "clips").glob("*.mp4"))
    assert clips == [
        "clip000_RD_Other_001.mp4", "clip000_WDA_TomPerez_000.mp4",
        "clip001_RD_Other_001.mp4", "clip001_WDA_TomPerez_000.mp4",
    ]  # fmt: skip
    metas = sorted((d / "meta").glob("*.json"))
    assert [m.stem + ".mp4" for m in metas] == clips
    total_frames = 0
    for meta_path in metas:
        meta = json.loads(meta_path.read_text())
        wav = Path(meta["wav_path"])
        assert wav == d / "clips" / (meta_path.stem + ".wav")
        info = sf.info(str(wav))
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        assert abs(info.duration - meta["frames"] / 25) < 0.1
        assert meta["isvalid"] is True
        assert meta["video_size"] == list(SIZE_HW)
        assert len(meta["face_list"]) == len(meta["landmark_list"]) == meta["frames"] > 0
        assert all(len(b) == 4 and b[0] < b[2] and b[1] < b[3] for b in meta["face_list"])
        assert all(np.asarray(lm).shape == (68, 2) for lm in meta["landmark_list"])
        b = meta["face_list"][0]
        assert meta["face_size"] == [b[3] - b[1], b[2] - b[0]]
        total_frames += meta["frames"]
    assert total_frames == pytest.approx(2000, abs=4)
    assert (d / "val.txt").read_text().split() == ["clip000_WDA_TomPerez_000.json", "clip001_WDA_TomPerez_000.json"]
    assert (d / "train.txt").read_text().split() == ["clip000_RD_Other_001.json", "clip001_RD_Other_001.json"]
    assert len((d / "video_file_list.txt").read_text().split()) == 2

    (raw / "broken.mp4").unlink()
    stamps = {p: p.stat().st_mtime_ns for p in [*metas, *(d / "clips").iterdir(), *(d / "video_root_25fps").iterdir()]}
    second = _run(cfg_path)
    assert second.returncode == 0, second.stderr
    assert "4 clips (0 new, 4 already done)" in second.stdout
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
