"""Identity-consistent face tracking: shape check, identity choice, outliers, gaps, and force_prep on real videos."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from musetalk.avatar import load_avatar, prepare_avatar
from musetalk.avatar.demo import write_demo_video
from musetalk.avatar.prep import box_jump_ratio
from musetalk.avatar.source import read_source
from musetalk.avatar.synthetic import CrowdVideo, astronaut_bgr, write_crowd_video
from musetalk.config import AppConfig, load_config, with_overrides
from musetalk.errors import InputError, NoFaceDetected
from musetalk.faces.dlib_detector import DlibDetector
from musetalk.faces.tracking import (
    MAX_SHAPE_DISTANCE,
    MEAN_SHAPE_68,
    MIRROR_68,
    FaceCandidate,
    TrackingUnreliable,
    check_reliable,
    normalise_shape,
    procrustes_distance,
    shape_distance,
    track_faces,
)
from musetalk.pipeline.engine import Engine
from musetalk.render.preview import PreviewFaces
from musetalk.types import Audio
from scripts.force_prep import main as force_prep_main


@pytest.fixture(scope="module")
def detector() -> DlibDetector:
    return DlibDetector()


@pytest.fixture(scope="module")
def astronaut_lm(detector: DlibDetector) -> np.ndarray:
    lm = detector.detect(astronaut_bgr())
    assert lm is not None
    return lm.astype(np.float64)


@pytest.fixture(scope="module")
def crowd(tmp_path_factory: pytest.TempPathFactory) -> CrowdVideo:
    return write_crowd_video(tmp_path_factory.mktemp("crowd") / "crowd.mp4")


@pytest.fixture(scope="module")
def crowd_candidates(crowd: CrowdVideo, detector: DlibDetector) -> list[list[FaceCandidate]]:
    frames: list[np.ndarray] = []
    read_source(crowd.path, crowd.fps, 0, frames.append)
    return [detector.detect_faces(f) for f in frames]


def test_mean_shape_is_the_documented_construction(astronaut_lm: np.ndarray) -> None:
    a = normalise_shape(astronaut_lm)
    mirrored = a * [-1, 1]
    mirrored = mirrored[MIRROR_68]
    u, _, vt = np.linalg.svd(mirrored.T @ a)
    mean = normalise_shape((a + mirrored @ (u @ vt)) / 2)
    eyes = mean[42:48].mean(axis=0) - mean[36:42].mean(axis=0)
    angle = np.arctan2(eyes[1], eyes[0])
    c, s = np.cos(-angle), np.sin(-angle)
    mean = mean @ np.array([[c, s], [-s, c]])
    assert np.abs(mean - MEAN_SHAPE_68).max() < 1e-3
    assert MEAN_SHAPE_68[:, 0].sum() == pytest.approx(0, abs=1e-3)  # left-right symmetric
    assert sorted(MIRROR_68.tolist()) == list(range(68)) and np.all(MIRROR_68[MIRROR_68] == np.arange(68))


def test_shape_distance_is_pose_invariant_and_flags_non_faces(astronaut_lm: np.ndarray) -> None:
    base = shape_distance(astronaut_lm)
    assert base < 0.05
    theta = np.deg2rad(25)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    moved = 2.7 * astronaut_lm @ rot.T + [300, -40]
    assert shape_distance(moved) == pytest.approx(base, abs=1e-9)
    # an open mouth (lower lip and chin 25 % of the mouth-to-chin distance down) is still a face
    open_mouth = astronaut_lm.copy()
    drop = 0.25 * (astronaut_lm[8, 1] - astronaut_lm[51, 1])
    open_mouth[[5, 6, 7, 8, 9, 10, 11, 55, 56, 57, 58, 59, 65, 66, 67], 1] += drop
    assert shape_distance(open_mouth) < MAX_SHAPE_DISTANCE
    rng = np.random.default_rng(0)
    assert shape_distance(rng.uniform(0, 100, (68, 2))) > 0.5
    assert procrustes_distance(astronaut_lm, astronaut_lm * [-1, 1]) > 0.05  # a mirror is not a rotation


def _cand(lm: np.ndarray, dx: float = 0.0, dy: float = 0.0, scale: float = 1.0) -> FaceCandidate:
    c = lm.mean(axis=0)
    return FaceCandidate(((lm - c) * scale + c + [dx, dy]).astype(np.float32))


def test_outliers_are_rejected_and_gaps_interpolated(astronaut_lm: np.ndarray) -> None:
    n = 40
    frames: list[list[FaceCandidate]] = [[_cand(astronaut_lm, dx=0.5 * i)] for i in range(n)]
    frames[10] = [_cand(astronaut_lm, dx=0.5 * 10 + 35)]  # a one-frame jump of 0.4 face widths: an outlier
    frames[20] = []  # nothing found
    garbled = astronaut_lm.copy()
    garbled[36:48] += [0, 25]  # eyes on the nose: implausible
    frames[30] = [FaceCandidate((garbled + [15, 0]).astype(np.float32))]
    t = track_faces(frames, (512, 512), 25)
    assert not t.detected[[10, 20, 30]].any() and t.detected.sum() == n - 3
    assert t.rejected[10] and t.rejected[30] and not t.rejected[20]
    assert (t.stats.n_detected, t.stats.n_rejected, t.stats.n_interpolated) == (n - 3, 2, 3)
    for i in (10, 20, 30):  # filled on the line between the neighbours
        assert np.abs(t.landmarks[i] - (astronaut_lm + [0.5 * i, 0])).max() < 1e-3
    assert t.stats.max_jump_ratio < 0.02
    check_reliable(t.stats)
    with pytest.raises(TrackingUnreliable, match="--allow-gaps"):
        check_reliable(t.stats, max_unreliable_ratio=0.05)


def test_identity_choice_and_errors(astronaut_lm: np.ndarray) -> None:
    n = 30
    # the right face grows and shrinks (0.75× to 1.15×): larger than the left one in a third of the frames
    frames = [
        [_cand(astronaut_lm, dx=-150), _cand(astronaut_lm, dx=120, scale=0.95 + 0.2 * np.sin(2 * np.pi * i / n))]
        for i in range(n)
    ]
    left = astronaut_lm.mean(axis=0)[0] - 150
    for face, expect_x in (("largest", left), ("0", left), ("1", left + 270)):
        t = track_faces(frames, (512, 800), 25, face)
        assert np.abs(t.landmarks.mean(axis=1)[:, 0] - expect_x).max() < 1.0, face
        assert t.stats.n_faces == 2 and t.stats.n_interpolated == 0
    with pytest.raises(InputError, match="2 face"):
        track_faces(frames, (512, 800), 25, "2")
    with pytest.raises(NoFaceDetected):
        track_faces([[], []], (512, 512), 25)
    with pytest.raises(NoFaceDetected, match="not face-shaped"):
        noise = np.random.default_rng(1).uniform(0, 99, (68, 2)).astype(np.float32)
        track_faces([[FaceCandidate(noise)]], (99, 99), 25)


def test_crowd_video_per_frame_largest_is_wrong_tracker_is_right(
    crowd: CrowdVideo, crowd_candidates: list[list[FaceCandidate]]
) -> None:
    def centre(lm: np.ndarray) -> np.ndarray:
        return (lm.min(axis=0) + lm.max(axis=0)) / 2

    # What a memoryless "largest face" detector does on this video: the wrong person in many frames.
    wrong = 0
    for i, cands in enumerate(crowd_candidates):
        if cands:
            big = max(cands, key=lambda c: float(np.ptp(c.landmarks[:, 0]) * np.ptp(c.landmarks[:, 1])))
            wrong += float(np.linalg.norm(centre(big.landmarks) - crowd.main_xy[i])) > crowd.main_width_px / 2
    assert wrong >= 10
    assert any(shape_distance(c.landmarks) > MAX_SHAPE_DISTANCE for cands in crowd_candidates for c in cands)
    for face, truth in (("largest", crowd.main_xy), ("center", crowd.main_xy), ("1", crowd.second_xy)):
        t = track_faces(crowd_candidates, crowd.size_hw, crowd.fps, face)
        err = np.linalg.norm(np.stack([centre(lm) for lm in t.landmarks]) - truth, axis=1)
        assert err.max() < crowd.main_width_px / 4, face
    t = track_faces(crowd_candidates, crowd.size_hw, crowd.fps, "largest")
    assert not t.detected[crowd.occluded].any() and t.detected[~crowd.occluded].all()


def _prep_cfg(cache: Path, *extra: str) -> AppConfig:
    return load_config(
        overrides=[
            "models.dir=/nonexistent-models",
            "runtime.device=cpu",
            f"prep.cache_dir={cache}",
            "prep.detector=dlib",
            "prep.parser=landmarks",
            *extra,
        ]
    )


@pytest.mark.slow
def test_force_prep_boxes_follow_the_chosen_face(crowd: CrowdVideo, tmp_path: Path) -> None:
    for face, truth in (("largest", crowd.main_xy), ("1", crowd.second_xy)):
        cfg = _prep_cfg(tmp_path, f"prep.face={face}")
        result = prepare_avatar(cfg, f"crowd{face}", crowd.path)
        geom = np.load(result.root / "geometry.npz")
        boxes = geom["boxes"]
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        err = np.linalg.norm(centres - truth, axis=1)
        assert err.max() < crowd.main_width_px / 2, (face, float(err.max()))  # every stabilised box on the true face
        manifest = json.loads((result.root / "manifest.json").read_text())
        stats = manifest["tracking"]
        assert stats["face"] == face and stats["n_faces"] == 2
        assert stats["n_detected"] + stats["n_interpolated"] == stats["n_frames"] == len(crowd.main_xy)
        assert result.tracking["max_box_jump_ratio"] == pytest.approx(box_jump_ratio(boxes), abs=1e-4)
    assert json.loads((tmp_path / "crowdlargest" / "manifest.json").read_text())["tracking"]["n_interpolated"] == 4


@pytest.mark.slow
def test_force_prep_refuses_a_mostly_hidden_face(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    video = write_crowd_video(tmp_path / "hidden.mp4", n_frames=60, occluded=tuple(range(20, 34)))
    args = [
        "--quiet", "--avatar-id", "hidden", "--video", str(video.path), "--set", "models.dir=/nonexistent-models",
        "--set", f"prep.cache_dir={tmp_path / 'cache'}", "--set", "runtime.device=cpu", "--set", "prep.detector=dlib",
        "--set", "prep.parser=landmarks",
    ]  # fmt: skip
    assert force_prep_main(args) == 2
    err = capsys.readouterr().err
    assert "14 of 60 frames" in err and "--allow-gaps" in err
    assert not (tmp_path / "cache" / "hidden").exists()
    assert force_prep_main([*args, "--allow-gaps"]) == 0
    out = capsys.readouterr().out
    assert "face track: 46 frame(s) detected" in out and "14 interpolated" in out
    assert force_prep_main([*args, "--force", "--allow-gaps", "--face", "1"]) == 0  # the other person: visible
    assert "0 interpolated" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_avatar_boxes_never_jump_and_the_preview_mouth_stays_on_the_face(
    tmp_path: Path, detector: DlibDetector
) -> None:
    """The demo video's suit patch is face-like; the box must stay on the face (≤ 15 % of its width per frame),
    and 300 frames of preview speech change nothing outside the lower face."""
    lm = detector.detect(astronaut_bgr())
    assert lm is not None
    video = write_demo_video(tmp_path / "demo.mp4", lm)
    cfg = _prep_cfg(tmp_path / "cache")
    result = prepare_avatar(cfg, "demo", video)
    geom = np.load(result.root / "geometry.npz")
    boxes = geom["boxes"]
    assert box_jump_ratio(boxes) < 0.15
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    assert centres[:, 1].max() < 250  # the face is in the upper half; the patch sits at y ≈ 400
    assert result.tracking["n_interpolated"] == 0 and result.tracking["max_jump_ratio"] < 0.15
    cache = load_avatar(cfg, "demo")
    rng = np.random.default_rng(0)
    t = np.arange(12 * 16000) / 16000  # 12 s = 300 frames of syllable-like noise
    envelope = np.clip(np.sin(2 * np.pi * 3.5 * t), 0, None) * (np.sin(2 * np.pi * 0.3 * t) > -0.5)
    audio = Audio((0.2 * envelope * rng.standard_normal(len(t))).astype(np.float32), 16000)
    engine = Engine(with_overrides(cfg, ["audio.silence_enabled=false"]), PreviewFaces(cfg.fps, cfg.batch_size))
    try:
        with engine.frames(audio, cache) as stream:
            out = list(stream)
            ids = [int(i) for i in stream.plan.source_ids]
    finally:
        engine.close()
    assert len(out) == 300
    changed_inside = 0
    for frame, i in zip(out, ids, strict=True):
        diff = np.abs(frame.astype(np.int16) - np.asarray(cache.frames[i]).astype(np.int16)).max(axis=2)
        x1, y1, x2, y2 = cache.boxes[i]
        pad = 0.1 * (x2 - x1)
        lower_face = np.zeros(diff.shape, dtype=bool)
        lower_face[int((y1 + y2) / 2 - pad) : int(y2 + pad), int(x1 - pad) : int(x2 + pad)] = True
        assert diff[~lower_face].max() <= 2, i  # only the pasted lower face may change (feather rounding aside)
        changed_inside += int(diff[lower_face].max() > 30)
    assert changed_inside > 100  # and the mouth does move
