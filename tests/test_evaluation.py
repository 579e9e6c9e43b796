"""scripts.evaluate and musetalk.evaluation: every figure on a synthetic video whose answer is known."""

from __future__ import annotations

import json
import wave
from pathlib import Path

import cv2
import numpy as np
import pytest

from musetalk.avatar.synthetic import astronaut_bgr, render_frame, write_face_video, write_video
from musetalk.evaluation import metrics as m
from musetalk.evaluation.report import Media, evaluate_media, read_clip_boundaries, read_media
from musetalk.faces.dlib_detector import DlibDetector
from musetalk.render.preview import open_mouth
from scripts.evaluate import main as evaluate_main

FPS = 25
RATE = 16000


@pytest.fixture(scope="module")
def detector() -> DlibDetector:
    return DlibDetector()


def _syllables(n: int, seed: int) -> np.ndarray:
    """(n,) loudness in [0, 1] per frame: bursts of 3-7 frames separated by 2-6 silent frames."""
    rng = np.random.default_rng(seed)
    out = np.zeros(n)
    f = 3
    while f < n - 3:
        length = int(rng.integers(3, 8))
        out[f : f + length] = rng.uniform(0.5, 1.0) * np.sin(np.linspace(0.3, np.pi - 0.3, length))
        f += length + int(rng.integers(2, 7))
    return out


def _audio(level: np.ndarray, seed: int) -> np.ndarray:
    """Noise whose per-frame amplitude follows `level` (exact digital silence where level is 0)."""
    rng = np.random.default_rng(seed)
    per_frame = RATE // FPS
    amp = np.repeat(level, per_frame) * 0.3
    return (rng.uniform(-1, 1, len(amp)) * amp).astype(np.float32)


def _write_wav(path: Path, samples: np.ndarray) -> Path:
    with wave.open(str(path), "wb") as fh:
        fh.setnchannels(1)
        fh.setsampwidth(2)
        fh.setframerate(RATE)
        fh.writeframes((np.clip(samples, -1, 1) * 32767).astype(np.int16).tobytes())
    return path


def _talking_frames(openings: np.ndarray, detector: DlibDetector) -> list[np.ndarray]:
    """The astronaut (256² around his face, 2×) with the mouth opened to openings[f] in frame f."""
    photo = np.asarray(cv2.resize(astronaut_bgr()[40:296, 95:351], (512, 512), interpolation=cv2.INTER_CUBIC), np.uint8)
    lm = detector.detect(photo)
    assert lm is not None
    return [open_mouth(photo, lm, float(o)) for o in openings]


@pytest.mark.parametrize("delay", [3, -2])
def test_av_offset_finds_a_known_delay(delay: int, detector: DlibDetector, tmp_path: Path) -> None:
    n = 100
    level = _syllables(n + 10, seed=1)
    opening = np.roll(level, delay)[:n]  # mouth follows the sound `delay` frames later
    media = Media(_talking_frames(opening, detector), FPS, _audio(level[:n], seed=2))
    result = evaluate_media(media, detector)
    assert result["av_offset_frames"] == pytest.approx(delay, abs=0.5)
    assert result["mouth_audio_corr"] > 0.6
    assert result["frames"] == n and result["fps"] == FPS and result["syncnet"] is None


@pytest.mark.slow
def test_mouth_open_in_silence_scores_zero(detector: DlibDetector) -> None:
    n = 80
    level = _syllables(n, seed=3)
    wrong = (level < 0.05).astype(float)  # open exactly when silent, closed while speaking
    right = level / level.max()
    samples = _audio(level, seed=4)
    assert evaluate_media(Media(_talking_frames(wrong, detector), FPS, samples), detector)[
        "silence_mouth_closed_ratio"
    ] == pytest.approx(0.0, abs=0.05)
    assert evaluate_media(Media(_talking_frames(right, detector), FPS, samples), detector)[
        "silence_mouth_closed_ratio"
    ] == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("jitter_px", [2.0, 4.0])
def test_box_jitter_measures_injected_jitter(jitter_px: float, detector: DlibDetector, tmp_path: Path) -> None:
    video = write_face_video(tmp_path / "j.mp4", n_frames=75, jitter_px=jitter_px, amplitude_px=(12.0, 6.0), seed=5)
    media = read_media(video.path)
    assert media.samples_16k is None
    result = evaluate_media(media, detector)
    injected = float(np.sqrt((video.jitter_px**2).mean()))  # RMS per axis of what was added
    assert result["box_jitter_px"] == pytest.approx(injected, rel=0.2)
    assert result["av_offset_frames"] is None and result["silence_mouth_closed_ratio"] is None


def test_box_jitter_of_a_steady_path_is_small(detector: DlibDetector, tmp_path: Path) -> None:
    video = write_face_video(tmp_path / "s.mp4", n_frames=60, jitter_px=0.0, amplitude_px=(12.0, 6.0))
    assert evaluate_media(read_media(video.path), detector)["box_jitter_px"] < 0.6


def test_seam_flicker_sees_a_flickering_blend_boundary(detector: DlibDetector, tmp_path: Path) -> None:
    video = write_face_video(tmp_path / "f.mp4", n_frames=40, jitter_px=0.5, amplitude_px=(8.0, 4.0))
    clean = read_media(video.path)
    regions = m.seam_regions()
    band = regions.band.astype(np.uint8) * 255
    flickering = []
    for k, frame in enumerate(clean.frames):
        lm = detector.detect(frame)
        assert lm is not None
        to_frame = cv2.invertAffineTransform(m.canonical_affine(lm))
        in_frame = cv2.warpAffine(band, to_frame, (frame.shape[1], frame.shape[0])) > 127
        out = frame.astype(np.int16)
        out[in_frame] += 12 if k % 2 else -12  # the pasted region's edge changes brightness frame to frame
        flickering.append(np.clip(out, 0, 255).astype(np.uint8))
    base = evaluate_media(clean, detector)["seam_flicker"]
    bad = evaluate_media(Media(flickering, FPS, None), detector)["seam_flicker"]
    assert base < 2.0 and bad > 3 * base, (base, bad)  # clean moving face ≈ 1.45, flickering seam ≈ 8.5


def test_clip_joins_measure_a_pose_jump(detector: DlibDetector, tmp_path: Path) -> None:
    photo = astronaut_bgr()
    offsets = np.stack([np.linspace(0, 6, 60), np.zeros(60)], axis=1)
    offsets[30:, 0] += 20.0  # the second clip starts 20 px to the right
    frames = [render_frame(photo, (320, 320), o, 0.0, 1.0) for o in offsets]
    clips = []
    for k, (a, b) in enumerate(((0, 15), (15, 30), (30, 60))):
        clips.append(tmp_path / f"clip_{k}.mp4")
        write_video(clips[-1], frames[a:b], FPS)
    listing = tmp_path / "concat_list.txt"
    listing.write_text("".join(f"file '{c}'\n" for c in clips))
    assert read_clip_boundaries(listing) == [15, 30]
    result = evaluate_media(Media(frames, FPS, None), detector, clip_boundaries=[15, 30])
    joins = {j["frame"]: j for j in result["clip_joins"]["joins"]}
    assert joins[30]["jump_px"] == pytest.approx(20.1, abs=2.0) and joins[15]["jump_px"] < 2.0
    assert result["clip_joins"]["max_jump_px"] == joins[30]["jump_px"]


@pytest.mark.slow
def test_cli_writes_json_and_rejects_bad_input(
    detector: DlibDetector, tmp_path: Path, tiny_models_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    n = 50
    level = _syllables(n, seed=6)
    video = tmp_path / "talk.mp4"
    write_video(video, _talking_frames(level, detector), FPS)
    wav = _write_wav(tmp_path / "talk.wav", _audio(level, seed=7))
    out = tmp_path / "figures.json"
    assert evaluate_main([str(video), "--audio", str(wav), "--json", str(out), "--set", "prep.detector=dlib"]) == 0
    figures = json.loads(out.read_text())
    for key in (
        "frames", "fps", "av_offset_frames", "mouth_audio_corr", "silence_mouth_closed_ratio", "box_jitter_px",
        "seam_flicker", "clip_joins", "syncnet",
    ):  # fmt: skip
        assert key in figures
    assert figures["frames"] == n and abs(figures["av_offset_frames"]) <= 0.5
    assert figures["syncnet"] is None  # no models/syncnet/latentsync_syncnet.pt in this checkout
    assert "av_offset_frames" in capsys.readouterr().out
    with_sync = [str(video), "--audio", str(wav), "--json", str(out), "--set", f"models.dir={tiny_models_dir}"]
    assert evaluate_main([*with_sync, "--set", "runtime.device=cpu", "--set", "prep.detector=dlib"]) == 0
    assert set(json.loads(out.read_text())["syncnet"]) == {"lse_c", "lse_d", "offset_frames", "windows"}
    capsys.readouterr()
    assert evaluate_main([str(tmp_path / "missing.mp4")]) == 2
    assert evaluate_main([str(video), "--audio", str(video)]) == 2  # no audio track in it
    assert "no audio" in capsys.readouterr().err
