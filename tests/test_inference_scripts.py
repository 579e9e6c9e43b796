"""Upstream-style scripts: realtime_inference (task file of avatars × clips) and inference (offline tasks)."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import yaml

from musetalk.avatar import load_avatar
from musetalk.avatar.cache import cycle_index
from musetalk.avatar.synthetic import SyntheticVideo, write_face_video
from musetalk.config import AppConfig, load_config
from musetalk.errors import ConfigError
from musetalk.pipeline.audio import num_frames
from musetalk.tasklists import OfflineTask, load_offline_tasks, load_realtime_tasks
from musetalk.utils.ffmpeg import probe
from scripts import inference, realtime_inference
from scripts.realtime_inference import effective_bbox_shift

RATE_HZ = 16000
FPS = 25
N_SOURCE = 24


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> SyntheticVideo:
    return write_face_video(tmp_path_factory.mktemp("rt_video") / "face.mp4", n_frames=N_SOURCE, size_hw=(256, 256))


def _tone(path: Path, seconds: float, hz: float = 190.0) -> int:
    """Write a modulated tone (speech-loud, never silent); returns the frames the clip must have."""
    t = np.arange(round(seconds * RATE_HZ)) / RATE_HZ
    x = 0.3 * np.sin(2 * np.pi * hz * t) * (1 + 0.5 * np.sin(2 * np.pi * 4 * t))
    sf.write(path, x.astype(np.float32), RATE_HZ)
    return num_frames(len(x), FPS)


def _write_yaml(path: Path, data: dict[str, object]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _common(models: Path, cache: Path) -> list[str]:
    return [
        "--quiet",
        *("--set", f"models.dir={models}"),
        *("--set", f"prep.cache_dir={cache}"),
        *("--set", "runtime.device=cpu"),
        *("--set", "prep.parser=landmarks"),
        *("--set", "engine.blend_workers=2"),
    ]


def _cfg(models: Path, cache: Path) -> AppConfig:
    return load_config(
        overrides=[f"models.dir={models}", f"prep.cache_dir={cache}", "runtime.device=cpu", "prep.parser=landmarks"]
    )


def _first_frame(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        frame = next(container.decode(video=0))
        return frame.to_ndarray(format="bgr24")  # (H, W, 3) uint8


def _mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a.astype(np.float32) - b.astype(np.float32)) ** 2))


@pytest.mark.slow
def test_realtime_prepares_once_continues_cursor_and_reuses(
    tiny_models_dir: Path, video: SyntheticVideo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache_dir = tmp_path / "avatars"
    n0 = _tone(tmp_path / "a0.wav", 0.6)
    n1 = _tone(tmp_path / "a1.wav", 0.52, hz=240.0)
    task = {"video_path": str(video.path), "bbox_shift": 5, "preparation": True}
    task["audio_clips"] = {"audio_0": str(tmp_path / "a0.wav"), "audio_1": str(tmp_path / "a1.wav")}
    tasks = _write_yaml(tmp_path / "realtime.yaml", {"avator_1": task})
    args = [*_common(tiny_models_dir, cache_dir), "--inference_config", str(tasks)]

    assert realtime_inference.main(args) == 0
    out = capsys.readouterr().out
    assert out.count("avatar avator_1: prepared (24 frames") == 1
    vid_output = cache_dir / "avator_1" / "vid_output"
    clips = [vid_output / "audio_0.mp4", vid_output / "audio_1.mp4"]
    for path, n in zip(clips, (n0, n1), strict=True):
        info = probe(path)
        assert info.n_video_frames == n  # upstream dropped the last frame of every clip
        assert info.audio_rate is not None and info.audio_duration_s == pytest.approx(n / FPS, abs=0.03)
        assert (info.width, info.height) == (256, 256)
    assert sorted(p.name for p in vid_output.iterdir()) == ["audio_0.mp4", "audio_1.mp4"]  # no leftover wav/tmp
    # The second clip starts where the first stopped (upstream restarted every clip at frame 0).
    assert f"cursor 0 -> {n0})" in out and f"cursor {n0} -> {n0 + n1})" in out

    # ...and its first frame really shows that source frame: the head is where the cycle left it.
    cache = load_avatar(_cfg(tiny_models_dir, cache_dir), "avator_1")
    first = _first_frame(clips[1])
    continued, restarted = cache.frames[cycle_index(n0, N_SOURCE)], cache.frames[0]
    assert _mse(first, continued) < 0.25 * _mse(first, restarted)
    assert _mse(_first_frame(clips[0]), restarted) < 0.25 * _mse(_first_frame(clips[0]), continued)

    # preparation: false → the cache is used as it is, not rebuilt; clips are written again.
    manifest = cache_dir / "avator_1" / "manifest.json"
    built_ns = manifest.stat().st_mtime_ns
    written_ns = clips[0].stat().st_mtime_ns
    task["preparation"] = False
    _write_yaml(tasks, {"avator_1": task})
    assert realtime_inference.main(args) == 0
    out = capsys.readouterr().out
    assert "avatar avator_1: loaded from its cache" in out and "prepared" not in out
    assert manifest.stat().st_mtime_ns == built_ns
    assert clips[0].stat().st_mtime_ns != written_ns and probe(clips[0]).n_video_frames == n0


def test_offline_runs_good_tasks_and_names_the_failed_one(
    tiny_models_dir: Path, video: SyntheticVideo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    n = _tone(tmp_path / "speech.wav", 0.48)
    tasks = _write_yaml(
        tmp_path / "test.yaml",
        {
            "task_0": {"video_path": str(video.path), "audio_path": str(tmp_path / "speech.wav"), "result_name": "ok"},
            "task_1": {"video_path": str(tmp_path / "missing.mp4"), "audio_path": str(tmp_path / "speech.wav")},
            "task_2": {"video_path": str(video.path), "audio_path": str(tmp_path / "speech.wav"), "bbox_shift": -7},
        },
    )
    result_dir = tmp_path / "results"
    args = [
        *_common(tiny_models_dir, tmp_path / "avatars"),
        *("--inference-config", str(tasks)),
        *("--result-dir", str(result_dir)),
    ]
    assert inference.main(args) == 1
    captured = capsys.readouterr()
    assert "error: task task_1:" in captured.err and "no such file" in captured.err
    assert "2 of 3 task(s) written; failed: task_1" in captured.out
    written = sorted(p.name for p in (result_dir / "v15").iterdir())
    assert written == ["face_speech.mp4", "ok.mp4"]  # upstream naming without result_name; no wav left
    for name in written:
        assert probe(result_dir / "v15" / name).n_video_frames == n
    # v1.5 ignores the task's bbox_shift (as upstream), so task_2 reuses task_0's cache.
    assert captured.out.count("prepared (24 frames") == 1 and "cache up to date, reused" in captured.out


def test_missing_weights_fail_clearly(
    tmp_path: Path, video: SyntheticVideo, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "no-models"
    empty.mkdir()
    _tone(tmp_path / "a.wav", 0.2)
    rt = _write_yaml(
        tmp_path / "rt.yaml", {"a": {"video_path": str(video.path), "audio_clips": {"c": str(tmp_path / "a.wav")}}}
    )
    off = _write_yaml(
        tmp_path / "off.yaml", {"t": {"video_path": str(video.path), "audio_path": str(tmp_path / "a.wav")}}
    )
    for main, tasks in ((realtime_inference.main, rt), (inference.main, off)):
        rc = main(
            [*_common(empty, tmp_path / "avatars"), "--inference_config", str(tasks), "--result_dir", str(tmp_path)]
        )
        err = capsys.readouterr().err
        assert rc == 1
        assert (
            "model file(s) missing" in err and "make weights" in err and str(empty / "musetalkV15" / "unet.pth") in err
        )
    assert not (tmp_path / "avatars").exists() and not (tmp_path / "v15").exists()


def test_bad_task_files_exit_2_naming_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases: dict[str, tuple[dict[str, object], str]] = {
        "unknown key": ({"av": {"video_path": "v.mp4", "audio_clip": {}}}, "av.audio_clip: unknown key"),
        "clip name": ({"av": {"video_path": "v.mp4", "audio_clips": {"../x": "a.wav"}}}, "av.audio_clips: Value error"),
        "avatar id": ({"bad id": {"video_path": "v.mp4"}}, "bad id: id must match"),
        "no video": ({"av": {"audio_clips": {}}}, "av.video_path: Field required"),
    }
    for label, (data, message) in cases.items():
        path = _write_yaml(tmp_path / "t.yaml", data)
        assert realtime_inference.main(["--inference_config", str(path)]) == 2, label
        assert message in capsys.readouterr().err, label
    assert inference.main(["--inference_config", str(tmp_path / "nope.yaml")]) == 2
    assert "no such task file" in capsys.readouterr().err
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping of task ids"):
        load_offline_tasks(tmp_path / "list.yaml")


def test_task_helpers() -> None:
    task = OfflineTask.model_validate({"video_path": "data/video/my clip.v2.mp4", "audio_path": "a/b.wav"})
    assert task.output_name() == "my clip.v2_b.mp4"
    assert OfflineTask.model_validate({**task.model_dump(), "result_name": "x"}).output_name() == "x.mp4"
    assert OfflineTask.model_validate({**task.model_dump(), "result_name": "x.MP4"}).output_name() == "x.MP4"
    with pytest.raises(ValueError, match="plain file name"):
        OfflineTask.model_validate({**task.model_dump(), "result_name": "../x.mp4"})
    ids = {
        task.avatar_id(0),
        task.avatar_id(-7),
        OfflineTask(video_path=Path("other/my clip.v2.mp4"), audio_path=Path("a")).avatar_id(0),
    }
    assert len(ids) == 3 and all(i.startswith("my_clip_v2-") for i in ids)
    v15 = load_config(overrides=["bbox_shift=3"])
    v1 = load_config(overrides=["models.version=v1", "bbox_shift=3"])
    assert effective_bbox_shift(v15, -7, "t") == 3 and effective_bbox_shift(v15, None, "t") == 3
    assert effective_bbox_shift(v1, -7, "t") == -7 and effective_bbox_shift(v1, None, "t") == 3
    shipped = Path(__file__).resolve().parent.parent / "configs" / "inference"
    assert list(load_realtime_tasks(shipped / "realtime.yaml")) == ["avator_1"]
    assert all(t.video_path == Path("data/video/demo.mp4") for t in load_offline_tasks(shipped / "test.yaml").values())
