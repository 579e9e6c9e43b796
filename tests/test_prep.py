"""force_prep end to end on a generated face video with known motion (tiny models, CPU)."""

from __future__ import annotations

import json
import math
import pickle
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from musetalk.avatar import geometry as geo
from musetalk.avatar import load_avatar, prepare_avatar
from musetalk.avatar.latents import encode_crops
from musetalk.avatar.prep import PrepResult, stabilise
from musetalk.avatar.source import read_source
from musetalk.avatar.stabilize import eye_line_angle_rad, roll_from_affines
from musetalk.avatar.store import FORMAT_VERSION, avatar_dir
from musetalk.avatar.synthetic import SyntheticVideo, write_face_video
from musetalk.config import AppConfig, load_config, with_overrides
from musetalk.errors import AvatarCacheStale, AvatarNotPrepared
from musetalk.faces.dlib_detector import DlibDetector
from musetalk.faces.parsing import LandmarkParser
from musetalk.faces.tracking import FaceCandidate
from musetalk.models import load_models
from musetalk.utils.files import sha256_file

CACHE_FILES = (
    "manifest.json", "frames.jpgs", "frames.jpgs.idx.npy", "geometry.npz", "masks.npy", "latents.pt", "coords.pkl",
)  # fmt: skip


def _cfg(models_dir: Path, cache_dir: Path, *extra: str) -> AppConfig:
    return load_config(
        overrides=[
            f"models.dir={models_dir}",
            "runtime.device=cpu",
            f"prep.cache_dir={cache_dir}",
            "prep.parser=landmarks",
            *extra,
        ]
    )


def _jitter(track: np.ndarray, truth: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.diff(track - truth, axis=0) ** 2)))


# --- the prepared cache ------------------------------------------------------------------------


def test_cache_files_and_manifest(prepared_avatar: tuple[AppConfig, PrepResult], face_video: SyntheticVideo) -> None:
    cfg, result = prepared_avatar
    assert not result.reused and result.root == avatar_dir(cfg, "synth")
    assert all((result.root / name).is_file() for name in CACHE_FILES)
    assert not [p for p in result.root.parent.iterdir() if p.name.startswith(".")]  # no temp folders left
    m = json.loads((result.root / "manifest.json").read_text())
    assert m["format_version"] == FORMAT_VERSION and m["complete"] is True
    assert m["inputs"]["sha256"] == sha256_file(face_video.path) and m["inputs"]["bbox_shift"] == 0
    assert m["n_frames"] == face_video.n_frames == result.n_frames and m["fps"] == 25
    assert m["frame_size_hw"] == [320, 320] and m["source"]["kind"] == "video"
    assert m["config"]["prep.extra_margin"] == 10 and m["config"]["stabilize.one_euro.min_cutoff"] == 1.0
    assert m["components"] == {"detector": "dlib", "parser": "landmarks", "latents": True}
    assert [r["path"] for r in m["models"]["vae"]] == ["sd-vae/config.json", "sd-vae/diffusion_pytorch_model.bin"]
    assert m["models"]["detector"][0]["path"] == "shape_predictor_68_face_landmarks.dat"
    assert set(m["stats"]["seconds"]) == {"read", "detect", "track", "latents", "masks", "write"}
    assert "scripts.force_prep" in m["command"]


def test_loaded_cache_has_the_runtime_fields(prepared_avatar: tuple[AppConfig, PrepResult]) -> None:
    cfg, result = prepared_avatar
    cache = load_avatar(cfg, "synth")
    n = result.n_frames
    assert cache.n_frames == n and cache.frame_size_hw == (320, 320) and cache.fps == 25
    assert cache.latents is not None and tuple(cache.latents.shape) == (n, 8, 32, 32)
    assert cache.latents.dtype == torch.float32 and cache.latents.device.type == "cpu"
    assert cache.landmarks.shape == (n, 68, 2) and cache.landmarks.dtype == np.float32
    assert cache.boxes.shape == (n, 4) and cache.face_to_frame.shape == (n, 2, 3)
    assert cache.mask_boxes.shape == (n, 4) and cache.mask_boxes.dtype == np.int32 and len(cache.masks) == n
    frame0 = cache.frames[0]
    assert frame0.shape == (320, 320, 3) and frame0.dtype == np.uint8
    coords = pickle.loads((result.root / "coords.pkl").read_bytes())
    np.testing.assert_allclose(np.array(coords), cache.boxes, atol=1e-4)


def test_format_1_cache_with_raw_frames_still_loads(prepared_avatar: tuple[AppConfig, PrepResult]) -> None:
    cfg, result = prepared_avatar
    new = load_avatar(cfg, "synth")
    old_root = result.root.parent / "format1"
    shutil.copytree(result.root, old_root)
    np.save(old_root / "frames.npy", np.stack([new.frames[i] for i in range(new.n_frames)]))
    for name in ("frames.jpgs", "frames.jpgs.idx.npy"):
        (old_root / name).unlink()
    manifest = json.loads((old_root / "manifest.json").read_text())
    manifest.update(format_version=1, avatar_id="format1")
    del manifest["frames_codec"], manifest["files"]["frames_index"]
    manifest["files"]["frames"] = "frames.npy"
    (old_root / "manifest.json").write_text(json.dumps(manifest))
    try:
        old = load_avatar(cfg, "format1")
        assert old.n_frames == new.n_frames
        np.testing.assert_array_equal(old.frames[3], new.frames[3])
    finally:
        shutil.rmtree(old_root)


def test_masks_are_hard_lower_face_masks_with_room_to_feather(prepared_avatar: tuple[AppConfig, PrepResult]) -> None:
    cfg, _ = prepared_avatar
    cache = load_avatar(cfg, "synth")
    for i in range(cache.n_frames):
        x1, y1, x2, y2 = (int(v) for v in cache.mask_boxes[i])
        mask = cache.masks[i]
        assert 0 <= x1 < x2 <= 320 and 0 <= y1 < y2 <= 320 and mask.shape == (y2 - y1, x2 - x1)
        assert set(np.unique(mask)) == {0, 255}
        ys, xs = np.nonzero(mask)
        side = float(max(cache.boxes[i, 2] - cache.boxes[i, 0], cache.boxes[i, 3] - cache.boxes[i, 1])) * 1.5
        room = 0.1 * side / 2  # a Gaussian feather of kernel 0.1 × blend crop width reaches this far out
        assert xs.min() >= room and ys.min() >= room and mask.shape[1] - 1 - xs.max() >= room
        assert y2 == 320 or mask.shape[0] - 1 - ys.max() >= room
        # in the (rolled) face crop: only the lower half of the face box (upper_boundary_ratio 0.5)
        uv = geo.apply_affine(geo.invert_affine(cache.face_to_frame[i]), np.stack([xs + x1, ys + y1], axis=1))
        assert uv[:, 1].min() >= 127.0 and uv[:, 1].max() <= 256.0 and uv[:, 0].min() >= -1 and uv[:, 0].max() <= 256
        # the mouth is inside, the eyes are not
        mouth = cache.landmarks[i, 48:68].mean(axis=0)
        assert mask[int(mouth[1]) - y1, int(mouth[0]) - x1] == 255
        eye = cache.landmarks[i, 36:42].mean(axis=0)
        assert not (x1 <= eye[0] < x2 and y1 <= eye[1] < y2) or mask[int(eye[1]) - y1, int(eye[0]) - x1] == 0


def test_crops_through_face_to_frame_are_the_encoded_latents(
    prepared_avatar: tuple[AppConfig, PrepResult], tiny_models_dir: Path
) -> None:
    cfg, _ = prepared_avatar
    cache = load_avatar(cfg, "synth")
    bundle = load_models(cfg, parts={"vae"})
    assert cache.latents is not None and bundle.vae is not None
    idx = [0, 17]
    crops = np.stack([geo.warp_crop(cache.frames[i], cache.face_to_frame[i], 256, cv2.INTER_LANCZOS4) for i in idx])
    with torch.inference_mode():
        x = torch.from_numpy(crops[..., ::-1].copy()).permute(0, 3, 1, 2).contiguous().float() / 255
        ref = bundle.vae.encode(x * 2 - 1) * bundle.vae_scale
        masked_x = x.clone()
        masked_x[:, :, 128:] = 0
        masked = bundle.vae.encode(masked_x * 2 - 1) * bundle.vae_scale
    torch.testing.assert_close(cache.latents[idx, :4], masked, atol=1e-4, rtol=1e-4)  # channels 0-3: masked
    torch.testing.assert_close(cache.latents[idx, 4:], ref, atol=1e-4, rtol=1e-4)  # channels 4-7: reference
    again = encode_crops(bundle.vae, crops, bundle.vae_scale, bundle.device, bundle.dtype)
    assert torch.equal(again, cache.latents[idx])  # mean, not a sample: deterministic


def test_one_euro_cuts_jitter_5x_and_follows_the_known_path(
    prepared_avatar: tuple[AppConfig, PrepResult], face_video: SyntheticVideo
) -> None:
    _, result = prepared_avatar
    geom = np.load(result.root / "geometry.npz")
    truth = np.hstack([face_video.path_px, face_video.path_px])  # every box corner moves with the head
    raw, final = geom["raw_boxes"].astype(np.float64), geom["boxes"].astype(np.float64)
    offset = np.median(raw - truth, axis=0)  # where the box sits relative to the face centre
    assert _jitter(raw, truth + offset) / _jitter(final, truth + offset) >= 5.0
    assert np.abs(final - truth - offset).max() <= 2.0


def test_scale_lock_holds(prepared_avatar: tuple[AppConfig, PrepResult]) -> None:
    cfg, result = prepared_avatar
    geom = np.load(result.root / "geometry.npz")
    sizes = geom["boxes"][:, 2:] - geom["boxes"][:, :2]
    raw_sizes = geom["raw_boxes"][:, 2:] - geom["raw_boxes"][:, :2]
    assert raw_sizes.std(axis=0).max() > 0.1  # the detections do vary …
    np.testing.assert_allclose(sizes, np.broadcast_to(sizes[0], sizes.shape), atol=1e-3)  # … the box does not
    np.testing.assert_allclose(sizes[0], np.median(raw_sizes[: cfg.stabilize.scale_lock_frames], axis=0), atol=1e-3)
    f2f = geom["face_to_frame"]
    assert np.ptp(np.hypot(f2f[:, 0, 0], f2f[:, 1, 0])) < 1e-5  # the crop scale is constant too


def test_a_rerun_with_the_same_inputs_reuses_the_cache(
    prepared_avatar: tuple[AppConfig, PrepResult], face_video: SyntheticVideo
) -> None:
    cfg, result = prepared_avatar
    before = (result.root / "manifest.json").read_text()
    again = prepare_avatar(cfg, video=face_video.path)
    assert again.reused and again.n_frames == result.n_frames and again.seconds == {}
    assert (result.root / "manifest.json").read_text() == before


def test_stale_config_names_the_rebuild_command(
    prepared_avatar: tuple[AppConfig, PrepResult], face_video: SyntheticVideo
) -> None:
    cfg, _ = prepared_avatar
    with pytest.raises(AvatarCacheStale) as err:
        load_avatar(with_overrides(cfg, ["prep.extra_margin=20"]), "synth")
    msg = str(err.value)
    assert "prep.extra_margin: cache 10, config 20" in msg
    assert f"python -m scripts.force_prep --avatar-id synth --video {face_video.path} --force" in msg
    with pytest.raises(AvatarCacheStale, match="face parser"):
        load_avatar(with_overrides(cfg, ["prep.parser=auto"]), "synth")  # auto → bisenet: weights exist
    assert load_avatar(with_overrides(cfg, ["batch_size=4", "prep.batch_size=2"]), "synth").n_frames > 0


def test_unprepared_avatar_names_the_command(prepared_avatar: tuple[AppConfig, PrepResult]) -> None:
    cfg, _ = prepared_avatar
    with pytest.raises(AvatarNotPrepared, match=r"python -m scripts\.force_prep --avatar-id nobody --video PATH"):
        load_avatar(cfg, "nobody")


# --- rebuilds, failures, variants --------------------------------------------------------------


@pytest.fixture()
def no_weights(tmp_path: Path) -> Path:
    """An empty models folder: dlib + landmark parser, no VAE → fast preview-only preps."""
    (tmp_path / "no-models").mkdir()
    return tmp_path / "no-models"


@pytest.fixture(scope="module")
def short_video(tmp_path_factory: pytest.TempPathFactory) -> SyntheticVideo:
    return write_face_video(tmp_path_factory.mktemp("short") / "short.mp4", n_frames=12, size_hw=(256, 256))


def test_force_rebuilds_deterministically(tiny_models_dir: Path, short_video: SyntheticVideo, tmp_path: Path) -> None:
    cfg = _cfg(tiny_models_dir, tmp_path)
    first = prepare_avatar(cfg, "a", short_video.path)
    latents = torch.load(first.root / "latents.pt")
    (first.root / "marker").write_text("old")
    second = prepare_avatar(cfg, "a", short_video.path, force=True)
    assert not second.reused and second.reason == "--force"
    assert not (second.root / "marker").exists()  # a new folder replaced the old one
    assert torch.equal(torch.load(second.root / "latents.pt"), latents)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


class _Exploding(LandmarkParser):
    def parse(self, crops_bgr: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        raise RuntimeError("boom")


def test_failed_prep_leaves_no_loadable_cache(no_weights: Path, short_video: SyntheticVideo, tmp_path: Path) -> None:
    tmp_path = tmp_path / "cache"
    tmp_path.mkdir()
    cfg = _cfg(no_weights, tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        prepare_avatar(cfg, "b", short_video.path, parser=_Exploding("jaw", 90, 90))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(AvatarNotPrepared):
        load_avatar(cfg, "b")
    # an interrupted --force rebuild keeps the previous complete cache
    prepare_avatar(cfg, "b", short_video.path)
    before = (tmp_path / "b" / "manifest.json").read_text()
    with pytest.raises(RuntimeError, match="boom"):
        prepare_avatar(cfg, "b", short_video.path, force=True, parser=_Exploding("jaw", 90, 90))
    assert (tmp_path / "b" / "manifest.json").read_text() == before
    assert load_avatar(cfg, "b").n_frames == short_video.n_frames
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_changed_source_or_bbox_shift_rebuilds(no_weights: Path, short_video: SyntheticVideo, tmp_path: Path) -> None:
    cfg = _cfg(no_weights, tmp_path / "cache")
    prepare_avatar(cfg, "c", short_video.path)
    shifted = prepare_avatar(cfg, "c", short_video.path, bbox_shift=4)
    assert not shifted.reused and "bbox_shift" in shifted.reason
    assert prepare_avatar(cfg, "c", short_video.path, bbox_shift=4).reused
    copy = tmp_path / "copy.mp4"
    shutil.copy(short_video.path, copy)
    with copy.open("ab") as fh:
        fh.write(b"\0")  # same frames, different file
    changed = prepare_avatar(cfg, "c", copy, bbox_shift=4)
    assert not changed.reused and changed.reason == "source file changed"


def test_without_vae_weights_the_cache_is_preview_only(
    tiny_models_dir: Path, no_weights: Path, short_video: SyntheticVideo, tmp_path: Path
) -> None:
    cfg = _cfg(no_weights, tmp_path / "cache")
    result = prepare_avatar(cfg, "p", short_video.path)
    assert not result.latents and not (result.root / "latents.pt").exists()
    cache = load_avatar(cfg, "p")
    assert cache.latents is None and cache.manifest["components"]["latents"] is False
    with pytest.raises(AvatarCacheStale, match="preview only"):
        load_avatar(_cfg(tiny_models_dir, tmp_path / "cache"), "p")


def test_changed_model_weights_make_the_cache_stale(
    tiny_models_dir: Path, short_video: SyntheticVideo, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    shutil.copytree(tiny_models_dir / "sd-vae", models / "sd-vae")
    cfg = _cfg(models, tmp_path / "cache")
    prepare_avatar(cfg, "w", short_video.path)
    assert load_avatar(cfg, "w").latents is not None
    with (models / "sd-vae" / "diffusion_pytorch_model.bin").open("ab") as fh:
        fh.write(b"\0")  # other weights
    with pytest.raises(AvatarCacheStale, match="vae model files changed"):
        load_avatar(cfg, "w")
    assert not prepare_avatar(cfg, "w", short_video.path).reused  # force_prep rebuilds it by itself


def test_a_photo_becomes_a_still_avatar(tiny_models_dir: Path, tmp_path: Path) -> None:
    from musetalk.avatar.synthetic import astronaut_bgr

    photo = tmp_path / "face.jpg"
    cv2.imwrite(str(photo), astronaut_bgr()[:, :511])
    cfg = _cfg(tiny_models_dir, tmp_path / "cache")
    result = prepare_avatar(cfg, "still", photo)
    cache = load_avatar(cfg, "still")
    assert result.n_frames == cache.n_frames == 1 and cache.frame_size_hw == (512, 510)
    assert cache.latents is not None and tuple(cache.latents.shape) == (1, 8, 32, 32)
    assert cache.manifest["source"]["kind"] == "photo"


def test_lk_recovers_a_known_roll_within_1_degree(tmp_path: Path) -> None:
    roll_deg = np.linspace(0.0, 8.0, 30)
    video = write_face_video(tmp_path / "roll.mp4", n_frames=30, amplitude_px=(6.0, 3.0), roll_deg=roll_deg)
    frames: list[np.ndarray] = []
    read_source(video.path, 25, 0, frames.append)
    detector = DlibDetector()
    landmarks = np.stack([detector.detect(f) for f in frames])  # type: ignore[misc]
    cfg = load_config(overrides=["runtime.device=cpu"])
    track = stabilise(cfg, frames, landmarks, np.ones(len(frames), dtype=bool), 0)
    lk = np.rad2deg(roll_from_affines(track.m_affine))
    assert np.abs(lk - (roll_deg - roll_deg[0])).max() < 1.0  # M_affine: the relative roll, frame by frame
    rel = np.rad2deg(track.roll_rad - track.roll_rad[0])
    assert np.abs(rel - (roll_deg - roll_deg[0])).max() < 1.0  # the smoothed roll used for the crops
    # crops come out upright: the eye line, mapped into crop coordinates, is level
    crop_lm = np.stack(
        [geo.apply_affine(geo.invert_affine(m), lm) for m, lm in zip(track.face_to_frame, landmarks, strict=True)]
    )
    assert np.abs(np.rad2deg(eye_line_angle_rad(crop_lm.astype(np.float32)))).max() < 2.0
    # with LK off the roll is 0
    flat = stabilise(with_overrides(cfg, ["stabilize.lk_enabled=false"]), frames, landmarks, np.ones(30, dtype=bool), 0)
    assert (
        np.all(flat.roll_rad == 0)
        and np.all(flat.face_to_frame[:, 0, 1] == 0)
        and np.all(flat.face_to_frame[:, 1, 0] == 0)
    )
    assert math.isclose(float(np.abs(flat.m_affine - [[1, 0, 0], [0, 1, 0]]).max()), 0.0)


def test_frames_without_a_face_are_interpolated(no_weights: Path, short_video: SyntheticVideo, tmp_path: Path) -> None:
    real = DlibDetector()

    class Blinking(DlibDetector):
        """Misses the face on frames 3 and 4."""

        def __init__(self) -> None:
            self.calls = 0

        def detect_faces(self, frame_bgr: np.ndarray) -> list[FaceCandidate]:
            self.calls += 1
            return [] if self.calls in (4, 5) else real.detect_faces(frame_bgr)

        def weight_files(self) -> list[Path]:
            return real.weight_files()

    cfg = _cfg(no_weights, tmp_path / "cache")
    result = prepare_avatar(cfg, "gap", short_video.path, detector=Blinking())
    geom = np.load(result.root / "geometry.npz")
    assert result.n_interpolated == 2 and geom["detected"].tolist().count(False) == 2
    lm = geom["raw_landmarks"]
    filled = load_avatar(cfg, "gap").landmarks
    assert np.abs(filled[3] - (lm[2] + (lm[5] - lm[2]) / 3)).max() < 2.0  # close to the line between neighbours
