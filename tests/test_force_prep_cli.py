"""scripts.force_prep: exit codes, messages, reuse/--force, a real subprocess, and a killed run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from musetalk.avatar import load_avatar
from musetalk.avatar.store import source_mismatch
from musetalk.avatar.synthetic import SyntheticVideo, write_face_video, write_faceless_video
from musetalk.config import PROJECT_ROOT, load_config
from musetalk.errors import AvatarNotPrepared
from scripts.force_prep import main


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> SyntheticVideo:
    return write_face_video(tmp_path_factory.mktemp("clip") / "clip.mp4", n_frames=10, size_hw=(256, 256))


def _args(models: Path, cache: Path, *extra: str) -> list[str]:
    return [
        "--quiet",
        "--set",
        f"models.dir={models}",
        "--set",
        f"prep.cache_dir={cache}",
        "--set",
        "runtime.device=cpu",
        *extra,
    ]


def test_prepare_reuse_and_force(
    tiny_models_dir: Path, clip: SyntheticVideo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _args(
        tiny_models_dir, tmp_path, "--avatar-id", "cli", "--video", str(clip.path), "--set", "prep.parser=landmarks"
    )
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "avatar cli: 10 frames at 25 fps, 256x256" in out and "frames/s" in out and str(tmp_path / "cli") in out
    for stage in ("read", "detect", "track", "latents", "masks", "write"):
        assert f"  {stage} " in out
    created = (tmp_path / "cli" / "manifest.json").stat().st_mtime_ns
    assert main(args) == 0
    assert "cache up to date, reused" in capsys.readouterr().out
    assert (tmp_path / "cli" / "manifest.json").stat().st_mtime_ns == created
    assert main([*args, "--force"]) == 0
    assert "reused" not in capsys.readouterr().out
    assert (tmp_path / "cli" / "manifest.json").stat().st_mtime_ns != created
    cfg = load_config(
        overrides=[f"models.dir={tiny_models_dir}", f"prep.cache_dir={tmp_path}", "prep.parser=landmarks"]
    )
    cache = load_avatar(cfg, "cli")
    assert cache.latents is not None and tuple(cache.latents.shape) == (10, 8, 32, 32)


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(bytes(np.random.default_rng(0).integers(0, 255, 8192, dtype=np.uint8)))
    text = tmp_path / "notes.txt"
    text.write_text("not a video\n" * 50)
    faceless = write_faceless_video(tmp_path / "faceless.mp4", n_frames=8)
    return {
        "empty": (empty, "file is empty"),
        "corrupt": (corrupt, "not a readable video"),
        "text": (text, "not a readable video"),
        "faceless": (faceless, "no face found in any of its 8 frame(s)"),
        "missing": (tmp_path / "missing.mov", "no such file"),
    }


@pytest.mark.parametrize("case", ["empty", "corrupt", "text", "faceless", "missing"])
def test_bad_input_exits_2_with_one_line_and_leaves_no_cache(
    tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    video, message = _bad_inputs(tmp_path)[case]
    cache = tmp_path / "cache"
    assert main(_args(tmp_path / "no-models", cache, "--avatar-id", "bad", "--video", str(video))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err
    if case != "faceless":  # unreadable files are refused before any model loads: the error is all there is
        assert len(err) == 1, err
    assert not (cache / "bad").exists() and (not cache.exists() or list(cache.iterdir()) == [])


def test_bad_config_and_bad_id_exit_2(tmp_path: Path, clip: SyntheticVideo, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_args(tmp_path, tmp_path, "--video", str(clip.path), "--set", "prep.parsing_mode=chin")) == 2
    assert "prep.parsing_mode" in capsys.readouterr().err
    assert main(_args(tmp_path, tmp_path, "--video", str(clip.path), "--avatar-id", "../etc")) == 2
    assert "avatar_id" in capsys.readouterr().err


def test_missing_detector_weights_exit_1_naming_them(
    tmp_path: Path, clip: SyntheticVideo, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _args(
        tmp_path, tmp_path / "cache", "--avatar-id", "det", "--video", str(clip.path),
        "--set", "prep.detector=face_alignment",
    )  # fmt: skip
    assert main(args) == 1
    assert "s3fd-619a316812.pth" in capsys.readouterr().err


def test_other_source_for_the_configured_avatar_needs_force(
    tiny_models_dir: Path, clip: SyntheticVideo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _args(tiny_models_dir, tmp_path, "--video", str(clip.path), "--set", "prep.parser=landmarks")
    assert main(args) == 2  # no --avatar-id: this would silently replace the configured "demo" avatar
    err = capsys.readouterr().err
    assert "'demo'" in err and "data/video/demo.mp4" in err and str(clip.path) in err and "--avatar-id" in err
    assert not (tmp_path / "demo").exists()
    assert main([*args, "--force"]) == 0
    cfg = load_config(overrides=[f"prep.cache_dir={tmp_path}"])
    warning = source_mismatch(cfg)  # what the server logs at start
    assert warning is not None and str(clip.path) in warning and "data/video/demo.mp4" in warning
    assert source_mismatch(load_config(overrides=[f"prep.cache_dir={tmp_path}", f"video_path={clip.path}"])) is None


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "HF_HUB_OFFLINE": "1"}


@pytest.mark.slow
def test_real_subprocess_run(tiny_models_dir: Path, clip: SyntheticVideo, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "scripts.force_prep", "--avatar-id", "sub", "--video", str(clip.path)]
    cmd += _args(tiny_models_dir, tmp_path, "--set", "prep.parser=landmarks")[1:]  # with progress bars
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "avatar sub: 10 frames" in proc.stdout and "cache:" in proc.stdout
    assert "detect" in proc.stderr and "100%" in proc.stderr  # tqdm bars per stage


@pytest.mark.slow
def test_killed_prep_leaves_no_loadable_cache(tiny_models_dir: Path, tmp_path: Path) -> None:
    # BiSeNet parsing on the CPU takes seconds per batch, so the kill lands mid-prep. No VAE: get there fast.
    models = tmp_path / "models"
    models.mkdir()
    (models / "face-parse-bisent").symlink_to(tiny_models_dir / "face-parse-bisent")
    video = write_face_video(tmp_path / "long.mp4", n_frames=32, size_hw=(256, 256))
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "scripts.force_prep", "--avatar-id", "killed", "--video", str(video.path)]
    cmd += _args(models, cache, "--set", "prep.parser=bisenet")
    proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list(cache.glob(".killed.tmp-*/masks.npy")):
            assert proc.poll() is None, "prep finished or died before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert not (cache / "killed").exists()
    cfg = load_config(overrides=[f"models.dir={models}", f"prep.cache_dir={cache}", "prep.parser=bisenet"])
    with pytest.raises(AvatarNotPrepared, match="force_prep"):
        load_avatar(cfg, "killed")
    leftovers = list(cache.glob(".killed.tmp-*"))
    assert leftovers  # the dead run's temp folder …
    from musetalk.avatar.prep import _remove_leftovers

    _remove_leftovers(cache, "killed")
    assert not list(cache.glob(".killed.*"))  # … is cleaned up by the next prep of that avatar
