"""force_prep: all per-avatar computer vision, done once and cached (the server does none).

Stages (each with a progress bar and a timing in the manifest):
  read     decode any video (resampled to cfg.fps by timestamp) or one photo → frames.jpgs (JPEG q95
           per frame, the cache's copy) and those frames decoded back into a raw working file for prep
  detect   every face candidate per frame (FaceDetector plugin) with 68 landmarks, then one identity
           tracked through the video (musetalk.faces.tracking.track_faces): non-face shapes and
           outliers rejected, frames without an accepted face interpolated
  track    LK roll (M_affine), upright boxes from landmarks (upstream v1.5 rule), One-Euro on the
           box corners, scale lock, sub-pixel crop → frame affines
  latents  VAE mean latents of the 256² crops, [masked lower half ‖ reference], batched
  masks    face parsing (BiSeNet or landmarks) of the 1.5× square crop, kept inside the lower
           half of the face box, warped to frame coordinates as hard 0/255 masks
  write    geometry, masks, latents, manifest — in a temp folder renamed into place at the end
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from numpy.typing import NDArray
from tqdm import tqdm

from musetalk.avatar import geometry as geo
from musetalk.avatar import stabilize as stab
from musetalk.avatar.cache import FACE_SIZE_PX, FrameStore
from musetalk.avatar.frames import FRAME_CODEC, JpegFrameWriter, NpyAppendWriter, NpyFrames
from musetalk.avatar.latents import encode_crops
from musetalk.avatar.source import SourceInfo, probe_source, read_source
from musetalk.avatar.store import (
    COORDS,
    FORMAT_VERSION,
    FRAMES,
    FRAMES_INDEX,
    GEOMETRY,
    LATENTS,
    MANIFEST,
    MASKS,
    avatar_dir,
    cache_root,
    current_model_records,
    prep_command,
    read_manifest,
    shaping_config,
    stale_reasons,
    write_json_atomic,
)
from musetalk.config import AppConfig, project_path
from musetalk.errors import NoFaceDetected
from musetalk.faces.base import FaceDetector, FaceParser
from musetalk.faces.parsing import PARSE_SIZE_PX, keep_upper_lip
from musetalk.faces.tracking import FaceCandidate, check_reliable, closed_mouth_frame, track_faces
from musetalk.utils.files import sha256_file

log = logging.getLogger(__name__)

STAGES = ("read", "detect", "track", "latents", "masks", "write")
WORK_FRAMES = "work-frames.npy"  # raw decoded frames while prep runs; not part of the published cache
UPPER_BOUNDARY_RATIO = 0.5  # upstream: the mask keeps rows below this fraction of the blend crop


@dataclass(frozen=True)
class PrepResult:
    """What force_prep did: where the cache is, whether it was reused, and how long each stage took."""

    avatar_id: str
    root: Path
    reused: bool
    n_frames: int
    fps: int
    size_hw: tuple[int, int]
    cache_bytes: int
    detector: str
    parser: str
    latents: bool
    n_interpolated: int = 0
    tracking: dict[str, Any] = field(default_factory=dict)  # TrackStats.as_dict() + max_box_jump_ratio
    seconds: dict[str, float] = field(default_factory=dict)
    reason: str = ""  # why it was (re)built, or why it was reused

    def frames_per_s(self, stage: str) -> float:
        """Throughput of one stage in frames per second (inf when it took no measurable time)."""
        s = self.seconds.get(stage, 0.0)
        return self.n_frames / s if s > 0 else math.inf


@dataclass
class _Components:
    detector: FaceDetector
    parser: FaceParser
    vae: Any  # AutoencoderKL or None (preview-only cache)
    vae_scale: float
    device: torch.device
    dtype: torch.dtype


def dir_bytes(root: Path) -> int:
    """Total size of the files under a folder."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _bar(progress: bool, desc: str, total: int | None) -> tqdm[Any]:
    return tqdm(total=total, desc=f"{desc:8s}", unit="frame", disable=not progress, leave=True, dynamic_ncols=True)


def _batches(n: int, size: int) -> Iterator[range]:
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


def _build_components(
    cfg: AppConfig, detector: FaceDetector | None, parser: FaceParser | None, vae_bundle: Any
) -> _Components:
    """Detector, parser and VAE, built before any slow work so missing weights fail fast."""
    from musetalk.faces import make_detector, make_parser
    from musetalk.models.bundle import load_models, missing_files, resolve_device, resolve_dtype

    device = resolve_device(cfg.runtime.device)
    dtype = resolve_dtype(cfg.runtime.dtype, device)
    det = detector or make_detector(cfg, device=str(device))
    par = parser or make_parser(cfg, device=device)
    vae, scale = None, 0.0
    bundle = vae_bundle
    if bundle is None and not missing_files(cfg.models, {"vae"}):
        bundle = load_models(cfg, parts={"vae"})
    if bundle is not None and bundle.vae is not None:
        vae, scale, device, dtype = bundle.vae, bundle.vae_scale, bundle.device, bundle.dtype
    else:
        log.warning(
            "VAE weights not found under %s: building a preview-only avatar cache (no latents). "
            "Fetch weights with `make weights` and re-run force_prep for lip-sync.",
            cfg.models.root() / cfg.models.vae,
        )
    return _Components(det, par, vae, scale, device, dtype)


def _input_record(video: Path, sha256: str, bbox_shift: int) -> dict[str, Any]:
    return {"video": str(video), "sha256": sha256, "bbox_shift": bbox_shift}


def _reusable(root: Path, cfg: AppConfig, inputs: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """(manifest, '') when the cache at root was built from these inputs with this config, else (None, why)."""
    manifest = read_manifest(root)
    if manifest is None:
        return None, "no cache yet" if not root.exists() else "previous cache incomplete"
    then = manifest.get("inputs", {})
    if then.get("sha256") != inputs["sha256"]:
        return None, "source file changed"
    if then.get("bbox_shift") != inputs["bbox_shift"]:
        return None, f"bbox_shift changed ({then.get('bbox_shift')} → {inputs['bbox_shift']})"
    reasons = stale_reasons(manifest, cfg)
    if reasons:
        return None, "stale: " + "; ".join(reasons)
    files = [name for name in manifest.get("files", {}).values() if name]
    missing = [name for name in files if not (root / name).is_file()]
    if missing:
        return None, f"cache files missing: {', '.join(missing)}"
    return manifest, ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_leftovers(parent: Path, avatar_id: str) -> None:
    """Delete temp folders of earlier preps of this avatar that were killed (their process is gone)."""
    for entry in parent.glob(f".{avatar_id}.*"):
        kind, _, rest = entry.name[len(avatar_id) + 2 :].partition("-")
        pid_text = rest.split("-", 1)[0]
        dead = kind == "old" or (kind == "tmp" and pid_text.isdigit() and not _pid_alive(int(pid_text)))
        if dead and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


def _publish(tmp: Path, final: Path) -> None:
    """Move a complete cache folder into place, replacing an older one."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{secrets.token_hex(4)}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _read_stage(cfg: AppConfig, video: Path, tmp: Path, progress: bool) -> tuple[SourceInfo, NpyFrames]:
    """Store the frames compressed (the cache's copy) and, decoded back, raw in a working file for prep."""
    writer: NpyAppendWriter | None = None
    stored = JpegFrameWriter(tmp / FRAMES)
    bar = _bar(progress, "read", None)

    def emit(frame: NDArray[np.uint8]) -> None:
        nonlocal writer
        served = stored.append(frame)  # what the server will decode: prep works on exactly these pixels
        if writer is None:
            writer = NpyAppendWriter(tmp / WORK_FRAMES, served.shape)
        writer.append(served)

    def on_progress(done: int, total: int | None) -> None:
        if total is not None and bar.total != max(total, done):
            bar.total = max(total, done)
        bar.update(done - bar.n)

    try:
        info = read_source(video, cfg.fps, cfg.prep.max_side_px, emit, on_progress)
    finally:
        bar.close()
        stored.close()
        if writer is not None:
            writer.close()
    return info, NpyFrames(tmp / WORK_FRAMES)


def _detect_stage(
    frames: NpyFrames, detector: FaceDetector, progress: bool, video: Path
) -> list[list[FaceCandidate]]:
    """Every face candidate of every frame (the tracker picks among them)."""
    n = len(frames)
    out: list[list[FaceCandidate]] = []
    with _bar(progress, "detect", n) as bar:
        for i in range(n):
            out.append(detector.detect_faces(frames[i]))
            bar.update(1)
    if not any(out):
        raise NoFaceDetected(f"{video}: no face found in any of its {n} frame(s)")
    return out


def box_jump_ratio(boxes: NDArray[np.floating]) -> float:
    """Largest frame-to-frame move of a (N, 4) box track's centre, in box widths."""
    b = np.asarray(boxes, dtype=np.float64)
    if len(b) < 2:
        return 0.0
    centres = (b[:, :2] + b[:, 2:]) / 2
    widths = np.maximum(b[:, 2] - b[:, 0], 1e-6)
    return float((np.linalg.norm(np.diff(centres, axis=0), axis=1) / widths[1:]).max())


@dataclass(frozen=True)
class Track:
    """Stabilised per-frame geometry (see AvatarCache for the meaning of each field)."""

    landmarks: NDArray[np.float32]  # (N, 68, 2) smoothed
    raw_boxes: NDArray[np.float32]  # (N, 4) before One-Euro and scale lock
    boxes: NDArray[np.float32]  # (N, 4) final, in the upright face's axes around each centre
    centres: NDArray[np.float64]  # (N, 2)
    sizes: NDArray[np.float64]  # (N, 2) w, h
    roll_rad: NDArray[np.float64]  # (N,)
    m_affine: NDArray[np.float32]  # (N, 2, 3) LK similarity reference → frame
    face_to_frame: NDArray[np.float32]  # (N, 2, 3)


def stabilise(
    cfg: AppConfig,
    frames: FrameStore,
    landmarks: NDArray[np.float32],
    found: NDArray[np.bool_],
    bbox_shift: int,
    on_frame: Callable[[], None] | None = None,
) -> Track:
    """LK roll, upright upstream boxes, One-Euro on box corners, scale lock → crop affines."""
    st = cfg.stabilize
    n = len(landmarks)
    if st.lk_enabled:
        ref = int(np.argmax(found))
        m_affine = stab.lk_affines(frames, landmarks, ref, on_frame)
        roll = stab.absolute_roll_rad(landmarks, stab.roll_from_affines(m_affine))
    else:
        m_affine = np.tile(np.array([[1, 0, 0], [0, 1, 0]], dtype=np.float32), (n, 1, 1))
        roll = np.zeros(n)
    centres, sizes = geo.face_boxes(landmarks, roll, bbox_shift, cfg.prep.extra_margin)
    raw_boxes = geo.boxes_from_centres(centres, sizes)
    smooth_lm = np.asarray(landmarks, dtype=np.float64)
    corners = raw_boxes.astype(np.float64)
    if st.one_euro_enabled:
        oe = (cfg.fps, st.one_euro.min_cutoff, st.one_euro.beta, st.one_euro.d_cutoff)
        corners = stab.smooth_track(corners, *oe, zero_phase=st.zero_phase)
        smooth_lm = stab.smooth_track(landmarks.reshape(n, -1), *oe, zero_phase=st.zero_phase).reshape(n, 68, 2)
        if st.lk_enabled:
            roll = stab.smooth_track(roll, *oe, zero_phase=st.zero_phase)
    centres_s = (corners[:, :2] + corners[:, 2:]) / 2
    sizes_s = corners[:, 2:] - corners[:, :2]
    if st.scale_lock_enabled:
        sizes_s = np.tile(stab.lock_scale(sizes, st.scale_lock_frames), (n, 1))
    f2f = np.stack(
        [geo.crop_to_frame(c, s, float(r), FACE_SIZE_PX) for c, s, r in zip(centres_s, sizes_s, roll, strict=True)]
    )
    return Track(
        landmarks=np.asarray(smooth_lm, dtype=np.float32),
        raw_boxes=raw_boxes,
        boxes=geo.boxes_from_centres(centres_s, sizes_s),
        centres=centres_s,
        sizes=sizes_s,
        roll_rad=np.asarray(roll, dtype=np.float64),
        m_affine=m_affine.astype(np.float32),
        face_to_frame=f2f.astype(np.float32),
    )


def _latents_stage(frames: NpyFrames, track: Track, comp: _Components, batch: int, progress: bool) -> torch.Tensor:
    n = len(frames)
    out: list[torch.Tensor] = []
    with _bar(progress, "latents", n) as bar:
        for idx in _batches(n, batch):
            crops = np.stack(
                [geo.warp_crop(frames[i], track.face_to_frame[i], FACE_SIZE_PX, cv2.INTER_LANCZOS4) for i in idx]
            )
            out.append(encode_crops(comp.vae, crops, comp.vae_scale, comp.device, comp.dtype))
            bar.update(len(idx))
    return torch.cat(out)


def lower_face_keep(size_px: int, box_wh_px: NDArray[np.float64]) -> NDArray[np.bool_]:
    """(S, S) bool: inside the face box (centred in the square crop) and below the crop's centre row."""
    centres = np.arange(size_px) + 0.5
    mid = size_px / 2
    half_w, half_h = float(box_wh_px[0]) / 2, float(box_wh_px[1]) / 2
    cols = (centres >= mid - half_w) & (centres < mid + half_w)
    rows = (centres >= size_px * UPPER_BOUNDARY_RATIO) & (centres < mid + half_h)
    return rows[:, None] & cols[None, :]


def _masks_stage(
    cfg: AppConfig, frames: NpyFrames, track: Track, parser: FaceParser, tmp: Path, batch: int, progress: bool
) -> tuple[NDArray[np.int32], NDArray[np.int64]]:
    n = len(frames)
    hw = (frames.shape[1], frames.shape[2])
    writer = NpyAppendWriter(tmp / MASKS, (), np.uint8)
    boxes = np.zeros((n, 4), dtype=np.int32)
    offsets = np.zeros(n + 1, dtype=np.int64)
    # Lower half of the 256² crop, as pixel-edge corners, mapped to the frame to bound the mask.
    lower_half = np.array([[-0.5, 127.5], [255.5, 127.5], [-0.5, 255.5], [255.5, 255.5]]) * (FACE_SIZE_PX / 256)
    try:
        with _bar(progress, "masks", n) as bar:
            for idx in _batches(n, batch):
                squares, crops, lms = [], [], []
                for i in idx:
                    side_px = float(track.sizes[i].max()) * cfg.prep.expand
                    sq = geo.crop_to_frame(
                        track.centres[i], np.array([side_px, side_px]), float(track.roll_rad[i]), PARSE_SIZE_PX
                    )
                    squares.append((sq, side_px))
                    # Upstream crops with PIL, which fills outside the frame with black.
                    crops.append(geo.warp_crop(frames[i], sq, PARSE_SIZE_PX, cv2.INTER_LINEAR, cv2.BORDER_CONSTANT))
                    lms.append(geo.apply_affine(geo.invert_affine(sq), track.landmarks[i]))
                parsed = parser.parse(np.stack(crops), np.stack(lms).astype(np.float32))
                for k, i in enumerate(idx):
                    sq, side_px = squares[k]
                    keep = lower_face_keep(PARSE_SIZE_PX, track.sizes[i] * PARSE_SIZE_PX / side_px)
                    mask_sq = np.where(keep, parsed[k], 0).astype(np.uint8)
                    if cfg.prep.keep_upper_lip:
                        mask_sq = keep_upper_lip(mask_sq, lms[k])
                    corners = geo.apply_affine(track.face_to_frame[i], lower_half)
                    box = geo.padded_int_box(corners, math.ceil(cfg.prep.mask_pad_ratio * side_px), hw)
                    # square px → mask-box px (forward map; OpenCV inverts it to sample)
                    sq_to_box = sq.astype(np.float64).copy()
                    sq_to_box[:, 2] -= box[:2]
                    warped = cv2.warpAffine(
                        mask_sq,
                        sq_to_box,
                        (int(box[2] - box[0]), int(box[3] - box[1])),
                        flags=cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_CONSTANT,
                        borderValue=0,
                    )
                    hard = np.where(warped >= 128, 255, 0).astype(np.uint8)
                    writer.append(hard.ravel())
                    boxes[i] = box
                    offsets[i + 1] = offsets[i] + hard.size
                bar.update(len(idx))
    finally:
        writer.close()
    return boxes, offsets


def prepare_avatar(
    cfg: AppConfig,
    avatar_id: str | None = None,
    video: Path | str | None = None,
    *,
    bbox_shift: int | None = None,
    force: bool = False,
    progress: bool = False,
    detector: FaceDetector | None = None,
    parser: FaceParser | None = None,
    vae_bundle: Any = None,
    allow_gaps: bool = False,
) -> PrepResult:
    """Build (or reuse) the cache of one avatar. Defaults come from cfg (avatar_id, video_path, bbox_shift).

    Reuses an existing cache when it was built from the same source file (SHA-256), bbox_shift,
    shaping config and model files, unless force. Raises InputError / NoFaceDetected for bad
    sources (nothing is left behind), TrackingUnreliable when more than 20 % of the frames have no
    acceptable face (unless allow_gaps), WeightsMissing / PluginUnavailable for unusable plugins.
    """
    avatar_id = avatar_id or cfg.avatar_id
    root = avatar_dir(cfg, avatar_id)
    source = project_path(video if video is not None else cfg.video_path)
    shift = cfg.bbox_shift if bbox_shift is None else int(bbox_shift)
    probe_source(source)  # a bad file fails here, before any model is loaded
    inputs = _input_record(source, sha256_file(source), shift)

    reason = "--force" if force else ""
    if not force:
        manifest, reason = _reusable(root, cfg, inputs)
        if manifest is not None:
            comps = manifest.get("components", {})
            log.info("avatar %s: cache up to date at %s, reusing it", avatar_id, root)
            return PrepResult(
                avatar_id, root, True, int(manifest["n_frames"]), int(manifest["fps"]),
                (int(manifest["frame_size_hw"][0]), int(manifest["frame_size_hw"][1])), dir_bytes(root),
                str(comps.get("detector")), str(comps.get("parser")), bool(comps.get("latents")),
                int(manifest.get("stats", {}).get("n_interpolated", 0)), dict(manifest.get("tracking", {})), {},
                "same source, config and models",
            )  # fmt: skip
    log.info("avatar %s: building cache (%s)", avatar_id, reason)

    comp = _build_components(cfg, detector, parser, vae_bundle)
    parent = cache_root(cfg)
    parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(parent, avatar_id)
    tmp = parent / f".{avatar_id}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    seconds: dict[str, float] = {}
    frames: NpyFrames | None = None
    try:
        t0 = time.perf_counter()
        info, frames = _read_stage(cfg, source, tmp, progress)
        seconds["read"] = time.perf_counter() - t0
        n = len(frames)
        batch = cfg.prep.batch_size

        t0 = time.perf_counter()
        candidates = _detect_stage(frames, comp.detector, progress, source)
        tracked = track_faces(
            candidates, info.size_hw, cfg.fps, cfg.prep.face, max_shape_distance=cfg.prep.max_shape_distance
        )
        if not allow_gaps:
            check_reliable(tracked.stats)
        found = tracked.detected
        landmarks = tracked.landmarks
        raw_lm = np.where(found[:, None, None], landmarks, 0.0).astype(np.float32)
        if not found.all():
            log.warning(
                "avatar %s: no acceptable face in %d of %d frames (%d rejected); interpolated from neighbours",
                avatar_id, int((~found).sum()), n, tracked.stats.n_rejected,
            )  # fmt: skip
        seconds["detect"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        with _bar(progress, "track", n if cfg.stabilize.lk_enabled else None) as bar:
            track = stabilise(cfg, frames, landmarks, found, shift, on_frame=lambda: bar.update(1))
        seconds["track"] = time.perf_counter() - t0
        tracking = {
            **tracked.stats.as_dict(),
            "max_box_jump_ratio": round(box_jump_ratio(track.boxes), 4),
            "closed_mouth_frame": closed_mouth_frame(landmarks, found),  # for prep.reference_frame=closed_mouth
        }

        latents = None
        if comp.vae is not None:
            t0 = time.perf_counter()
            latents = _latents_stage(frames, track, comp, batch, progress)
            seconds["latents"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        mask_boxes, mask_offsets = _masks_stage(cfg, frames, track, comp.parser, tmp, batch, progress)
        seconds["masks"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        np.savez(
            tmp / GEOMETRY,
            landmarks=track.landmarks,
            boxes=track.boxes,
            face_to_frame=track.face_to_frame,
            mask_boxes=mask_boxes,
            mask_offsets=mask_offsets,
            roll_rad=track.roll_rad.astype(np.float32),
            m_affine=track.m_affine,
            raw_boxes=track.raw_boxes,
            raw_landmarks=raw_lm,
            detected=found,
        )
        with (tmp / COORDS).open("wb") as fh:
            pickle.dump([tuple(float(v) for v in b) for b in track.boxes], fh)
        if latents is not None:
            torch.save(latents.contiguous(), tmp / LATENTS)
        seconds["write"] = time.perf_counter() - t0
        manifest = {
            "format_version": FORMAT_VERSION,
            "complete": True,
            "avatar_id": avatar_id,
            "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "inputs": inputs,
            "source": {
                "kind": info.kind,
                "fps": info.src_fps,
                "n_frames": info.n_src_frames,
                "size_hw": list(info.src_size_hw),
                "size_bytes": source.stat().st_size,
            },
            "fps": cfg.fps,
            "n_frames": n,
            "frame_size_hw": list(info.size_hw),
            "config": shaping_config(cfg),
            "components": {"detector": comp.detector.name, "parser": comp.parser.name, "latents": latents is not None},
            "models": current_model_records(cfg, comp.detector.name, comp.parser.name),
            "frames_codec": FRAME_CODEC,
            "files": {
                "frames": FRAMES,
                "frames_index": FRAMES_INDEX,
                "geometry": GEOMETRY,
                "masks": MASKS,
                "latents": LATENTS if latents is not None else None,
                "coords": COORDS,
            },
            "stats": {"n_detected": int(found.sum()), "n_interpolated": int((~found).sum()), "seconds": seconds},
            "tracking": {**tracking, "face": cfg.prep.face, "allow_gaps": allow_gaps},
            "command": prep_command(avatar_id, source, shift),
        }
        write_json_atomic(tmp / MANIFEST, manifest)
        frames.close()
        (tmp / WORK_FRAMES).unlink()
        _publish(tmp, root)
    except BaseException:
        if frames is not None:
            frames.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result = PrepResult(
        avatar_id, root, False, n, cfg.fps, info.size_hw, dir_bytes(root), comp.detector.name, comp.parser.name,
        latents is not None, int((~found).sum()), tracking, seconds, reason,
    )  # fmt: skip
    log.info("avatar %s: %d frames cached at %s (%.1f MB)", avatar_id, n, root, result.cache_bytes / 1e6)
    return result
