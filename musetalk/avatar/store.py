"""The on-disk avatar cache: layout, manifest, staleness rules, and `load_avatar`.

    <prep.cache_dir>/<avatar_id>/          (default results/avatars/<id>/, the seed path)
      manifest.json    format version, inputs (source hash, bbox_shift), the config values and model
                       files that shaped the cache, frame count, fps, size, stage timings
      frames.jpgs      the N BGR source frames at cfg.fps, one JPEG each (q95, 4:4:4), decoded on demand
      frames.jpgs.idx.npy  (N + 1,) int64 byte offsets of those frames (format 1: raw frames.npy)
      geometry.npz     landmarks, boxes, face_to_frame, mask_boxes, mask_offsets, roll, LK M_affine,
                       raw detections — everything per frame the runtime and diagnostics need
      masks.npy        all hard blend masks, flattened back to back (see mask_offsets)
      latents.pt       (N, 8, 32, 32) float32 [masked ‖ reference] (absent for preview-only caches)
      coords.pkl       the N stabilised boxes as a list of (x1, y1, x2, y2) floats (seed file name)

A cache is built in a hidden temp folder next to it and renamed into place when complete, so a
reader sees either the previous complete cache or the new complete one — never a partial one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np
import torch
from numpy.typing import NDArray

from musetalk.avatar.cache import FACE_SIZE_PX, AvatarCache
from musetalk.avatar.frames import JpegFrames, NpyFrames, index_path
from musetalk.avatar.latents import with_reference
from musetalk.config import AppConfig, is_valid_id, project_path
from musetalk.errors import AvatarCacheStale, AvatarNotPrepared, InputError

FORMAT_VERSION = 2  # 2: frames compressed (frames.jpgs); 1: raw frames.npy, still read
READABLE_FORMAT_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
FRAMES = "frames.jpgs"
FRAMES_INDEX = index_path(Path(FRAMES)).name
FRAMES_V1 = "frames.npy"
GEOMETRY = "geometry.npz"
MASKS = "masks.npy"
LATENTS = "latents.pt"
COORDS = "coords.pkl"
_FINGERPRINT_SPAN = 1 << 20  # bytes hashed at each end of a big model file


def cache_root(cfg: AppConfig) -> Path:
    """Folder holding every avatar cache (prep.cache_dir, relative to the project)."""
    return project_path(cfg.prep.cache_dir)


def avatar_dir(cfg: AppConfig, avatar_id: str) -> Path:
    """`<cache_dir>/<avatar_id>`; the id is validated before it touches a path."""
    if not is_valid_id(avatar_id):
        raise InputError(f"avatar id {avatar_id!r} must match ^[A-Za-z0-9_-]{{1,64}}$")
    return cache_root(cfg) / avatar_id


def fingerprint(path: Path) -> str:
    """Cheap content id of a (possibly multi-GB) file: size + SHA-256 of its first and last MiB."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with path.open("rb") as fh:
        h.update(fh.read(_FINGERPRINT_SPAN))
        if size > 2 * _FINGERPRINT_SPAN:
            fh.seek(size - _FINGERPRINT_SPAN)
            h.update(fh.read(_FINGERPRINT_SPAN))
        elif size > _FINGERPRINT_SPAN:
            h.update(fh.read())
    return f"{size}:{h.hexdigest()[:32]}"


def file_record(path: Path, root: Path) -> dict[str, str]:
    """{'path': …, 'fingerprint': …} for the manifest; the path is relative to the models folder, or
    just the file name for files elsewhere (e.g. inside a pip package), so moving a venv or the
    models folder does not make caches stale — only content does."""
    try:
        shown = str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        shown = path.name
    return {"path": shown, "fingerprint": fingerprint(path)}


def shaping_config(cfg: AppConfig) -> dict[str, Any]:
    """The config values that change what prep writes, as flat dotted keys.

    Left out: where caches live, batch sizes, runtime device/dtype (float16 vs float32 latents
    differ by rounding only) and the per-avatar inputs (video, bbox_shift), which are recorded
    separately and checked by force_prep when it decides whether to reuse a cache.
    """
    prep = cfg.prep.model_dump(mode="json", exclude={"cache_dir", "batch_size", "reference_frame"})
    flat: dict[str, Any] = {"fps": cfg.fps}
    flat.update({f"prep.{k}": v for k, v in prep.items()})
    for key, value in cfg.stabilize.model_dump(mode="json").items():
        if isinstance(value, dict):
            flat.update({f"stabilize.{key}.{k}": v for k, v in value.items()})
        else:
            flat[f"stabilize.{key}"] = value
    return flat


def prep_command(avatar_id: str, video: str | Path | None, bbox_shift: int = 0, force: bool = False) -> str:
    """The force_prep command line that (re)builds an avatar."""
    parts = ["python", "-m", "scripts.force_prep", "--avatar-id", avatar_id, "--video", str(video) if video else "PATH"]
    if bbox_shift:
        parts += ["--bbox-shift", str(bbox_shift)]
    if force:
        parts.append("--force")
    return shlex.join(parts)


def source_mismatch(cfg: AppConfig) -> str | None:
    """A warning when the cache of cfg.avatar_id was built from another file than cfg.video_path, else None."""
    manifest = read_manifest(avatar_dir(cfg, cfg.avatar_id))
    built_from = manifest.get("inputs", {}).get("video") if manifest else None
    if not built_from:
        return None
    configured = project_path(cfg.video_path).resolve()
    if Path(built_from).resolve() == configured:
        return None
    return (
        f"avatar {cfg.avatar_id!r} is served from a cache built from {built_from}, not from its configured "
        f"video_path {cfg.video_path}; rebuild it with: {prep_command(cfg.avatar_id, cfg.video_path, force=True)}"
    )


def read_manifest(root: Path) -> dict[str, Any] | None:
    """The manifest of a complete cache folder, or None when absent/unreadable/incomplete."""
    try:
        data = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or data.get("complete") is not True:
        return None
    return data


def current_model_records(cfg: AppConfig, detector: str, parser: str) -> dict[str, Any]:
    """Fingerprints of the model files prep would use now for this detector/parser (and the VAE)."""
    from musetalk.faces.dlib_detector import predictor_path
    from musetalk.faces.fan import fan_weight_files
    from musetalk.models.vae import vae_weights_file

    root = cfg.models.root()
    records: dict[str, Any] = {}
    vae = vae_weights_file(root / cfg.models.vae)
    if vae is not None and (root / cfg.models.vae / "config.json").is_file():
        records["vae"] = [file_record(root / cfg.models.vae / "config.json", root), file_record(vae, root)]
    parser_file = root / cfg.models.face_parser
    if parser == "bisenet" and parser_file.is_file():
        records["face_parser"] = [file_record(parser_file, root)]
    det_files: list[Path] = []
    if detector == "dlib":
        found = predictor_path()
        det_files = [found] if found is not None else []
    elif detector == "face_alignment":
        det_files = fan_weight_files(root / cfg.models.face_alignment)
    elif detector == "dwpose":
        det_files = [root / cfg.models.dwpose]
    records["detector"] = [file_record(p, root) for p in det_files if p.is_file()]
    return records


def stale_reasons(manifest: dict[str, Any], cfg: AppConfig) -> list[str]:
    """Why a cache no longer matches the current config and model files (empty list = usable)."""
    from musetalk.faces import resolve_detector_name, resolve_parser_name

    reasons: list[str] = []
    version = manifest.get("format_version")
    if version not in READABLE_FORMAT_VERSIONS:
        return [f"cache format version {version}, this build reads {READABLE_FORMAT_VERSIONS}"]
    built = manifest.get("config", {})
    now = shaping_config(cfg)
    for key in sorted(set(built) | set(now)):
        if built.get(key) != now.get(key):
            reasons.append(f"{key}: cache {built.get(key)!r}, config {now.get(key)!r}")
    comps = manifest.get("components", {})
    detector, parser = resolve_detector_name(cfg), resolve_parser_name(cfg)
    if comps.get("detector") != detector:
        reasons.append(f"face detector: cache {comps.get('detector')!r}, now {detector!r}")
    if comps.get("parser") != parser:
        reasons.append(f"face parser: cache {comps.get('parser')!r}, now {parser!r}")
    models_then = manifest.get("models", {})
    models_now = current_model_records(cfg, detector, parser)
    if not comps.get("latents") and "vae" in models_now:
        reasons.append("built without VAE weights (preview only); VAE weights are present now")
    for part in ("vae", "face_parser", "detector"):
        if part in models_then and part in models_now and models_then[part] != models_now[part]:
            reasons.append(f"{part} model files changed since the cache was built")
    return reasons


def _rebuild_command(manifest: dict[str, Any], avatar_id: str) -> str:
    inputs = manifest.get("inputs", {})
    return prep_command(avatar_id, inputs.get("video"), int(inputs.get("bbox_shift", 0) or 0), force=True)


class PackedMasks(Sequence[NDArray[np.uint8]]):
    """The N variable-size masks stored back to back in one memory-mapped uint8 array."""

    def __init__(self, data: NDArray[np.uint8], offsets: NDArray[np.int64], boxes: NDArray[np.int32]) -> None:
        self._data = data
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._boxes = np.asarray(boxes, dtype=np.int32)

    def __len__(self) -> int:
        """Number of masks N."""
        return len(self._boxes)

    @overload
    def __getitem__(self, index: int) -> NDArray[np.uint8]: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[NDArray[np.uint8]]: ...

    def __getitem__(self, index: int | slice) -> NDArray[np.uint8] | Sequence[NDArray[np.uint8]]:
        """Mask `index` (h_i, w_i) uint8 0/255, read-only."""
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self)
        i = index + n if index < 0 else index
        if not 0 <= i < n:
            raise IndexError(f"mask {index} out of range for {n} masks")
        x1, y1, x2, y2 = (int(v) for v in self._boxes[i])
        start = int(self._offsets[i])
        return self._data[start : start + (y2 - y1) * (x2 - x1)].reshape(y2 - y1, x2 - x1)

    def __iter__(self) -> Iterator[NDArray[np.uint8]]:
        """Masks in frame order."""
        return (self[i] for i in range(len(self)))


def open_cache(
    root: Path, manifest: dict[str, Any], mmap_frames: bool = False, frame_cache_frames: int = 16
) -> AvatarCache:
    """Open the files of a complete cache folder as an AvatarCache (frames and masks stay on disk)."""
    with np.load(root / GEOMETRY, allow_pickle=False) as geo:
        arrays = {k: geo[k] for k in geo.files}
    n = int(manifest["n_frames"])
    frames_name = str(manifest.get("files", {}).get("frames") or FRAMES_V1)
    frames: NpyFrames | JpegFrames
    if frames_name == FRAMES_V1:  # a format-1 cache: raw frames
        frames = NpyFrames(root / FRAMES_V1, mmap=mmap_frames)
    else:
        h, w = (int(v) for v in manifest["frame_size_hw"])
        frames = JpegFrames(root / FRAMES, (h, w), cache_frames=frame_cache_frames)
    if len(frames) != n or len(arrays["landmarks"]) != n:
        raise ValueError(
            f"frame count mismatch: manifest {n}, frames {len(frames)}, landmarks {len(arrays['landmarks'])}"
        )
    masks = PackedMasks(np.load(root / MASKS, mmap_mode="r"), arrays["mask_offsets"], arrays["mask_boxes"])
    latents: torch.Tensor | None = None
    if manifest.get("components", {}).get("latents"):
        latents = torch.load(root / LATENTS, map_location="cpu", weights_only=True, mmap=True)
        if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != (
            n,
            8,
            FACE_SIZE_PX // 8,
            FACE_SIZE_PX // 8,
        ):
            raise ValueError(f"latents.pt holds {getattr(latents, 'shape', type(latents))}, expected ({n}, 8, 32, 32)")
    return AvatarCache(
        avatar_id=str(manifest["avatar_id"]),
        root=root,
        fps=int(manifest["fps"]),
        frames=frames,
        landmarks=arrays["landmarks"].astype(np.float32),
        boxes=arrays["boxes"].astype(np.float32),
        face_to_frame=arrays["face_to_frame"].astype(np.float32),
        masks=masks,
        mask_boxes=arrays["mask_boxes"].astype(np.int32),
        latents=latents,
        manifest=manifest,
        raw_landmarks=_measured_landmarks(arrays),
    )


def _measured_landmarks(arrays: dict[str, NDArray[Any]]) -> NDArray[np.float32] | None:
    """Unsmoothed landmarks where a face was detected, the smoothed track elsewhere; None in older caches."""
    if "raw_landmarks" not in arrays or "detected" not in arrays:
        return None
    found = arrays["detected"].astype(bool)[:, None, None]
    return np.where(found, arrays["raw_landmarks"], arrays["landmarks"]).astype(np.float32)


def load_avatar(cfg: AppConfig, avatar_id: str, check: bool = True, mmap_frames: bool = False) -> AvatarCache:
    """Open a prepared avatar; AvatarNotPrepared / AvatarCacheStale name the force_prep command.

    check=False skips the config/model comparison (tools inspecting an old cache).
    """
    root = avatar_dir(cfg, avatar_id)
    video = cfg.video_path if avatar_id == cfg.avatar_id else None
    manifest = read_manifest(root)
    if manifest is None:
        state = "has no cache" if not root.exists() else "has an incomplete cache"
        raise AvatarNotPrepared(
            f"avatar {avatar_id!r} {state} at {root}; build it with: {prep_command(avatar_id, video, cfg.bbox_shift)}"
        )
    if check:
        reasons = stale_reasons(manifest, cfg)
        if reasons:
            raise AvatarCacheStale(
                f"avatar {avatar_id!r} cache at {root} does not match the current config/models: "
                + "; ".join(reasons)
                + f". Rebuild it with: {_rebuild_command(manifest, avatar_id)}"
            )
    try:
        cache = open_cache(root, manifest, mmap_frames=mmap_frames, frame_cache_frames=cfg.engine.frame_cache_frames)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise AvatarNotPrepared(
            f"avatar {avatar_id!r} cache at {root} is damaged ({type(exc).__name__}: {exc}); "
            f"rebuild it with: {_rebuild_command(manifest, avatar_id)}"
        ) from exc
    return with_reference(cache, cfg.prep.reference_frame)  # applied at load: the cache on disk stays upstream's


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON to a temp name in the same folder, then rename into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
