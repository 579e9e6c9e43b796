"""Evaluate one video file: read it, track the face, compute every figure of metrics.py as one JSON-ready dict."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
from numpy.typing import NDArray

from musetalk.avatar.cache import AvatarCache
from musetalk.errors import InputError
from musetalk.evaluation import metrics as m
from musetalk.faces.base import FaceDetector
from musetalk.faces.tracking import mouth_opening, track_faces
from musetalk.pipeline.silence import frame_rms_db

AUDIO_RATE_HZ = 16000
SILENCE_DB = -45.0  # the server's default silence threshold (audio.silence_threshold_db)


class SyncScorer(Protocol):
    """Scores lip sync of face frames against 16 kHz audio (LSE-C / LSE-D), e.g. SyncNet."""

    def score(
        self,
        frames_bgr: list[NDArray[np.uint8]],
        landmarks: NDArray[np.float32],
        samples_16k: NDArray[np.float32],
        fps: float,
    ) -> dict[str, float]:
        """{"lse_c": ..., "lse_d": ..., "offset_frames": ...}."""
        ...


@dataclass(frozen=True)
class Media:
    """A decoded video: BGR frames, its frame rate, and its (or a given) audio at 16 kHz mono."""

    frames: list[NDArray[np.uint8]]  # N × (H, W, 3) uint8
    fps: float
    samples_16k: NDArray[np.float32] | None  # (n,) float32 in [-1, 1]


def _decode_audio(path: Path) -> NDArray[np.float32] | None:
    import av

    chunks: list[NDArray[np.float32]] = []
    with av.open(str(path)) as container:
        if not container.streams.audio:
            return None
        resampler = av.AudioResampler(format="flt", layout="mono", rate=AUDIO_RATE_HZ)
        for frame in container.decode(container.streams.audio[0]):
            chunks.extend(out.to_ndarray().reshape(-1).astype(np.float32) for out in resampler.resample(frame))
        chunks.extend(out.to_ndarray().reshape(-1).astype(np.float32) for out in resampler.resample(None))
    return np.concatenate(chunks) if chunks else None


def read_media(video: Path, audio: Path | None = None) -> Media:
    """Decode every frame of `video` and the audio (from `audio` when given, else the video's own track)."""
    import av

    try:
        with av.open(str(video)) as container:
            if not container.streams.video:
                raise InputError(f"{video}: no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 25)
            frames = [np.asarray(f.to_ndarray(format="bgr24"), np.uint8) for f in container.decode(stream)]
        samples = _decode_audio(audio if audio is not None else video)
    except av.FFmpegError as exc:
        raise InputError(f"cannot decode {audio or video}: {exc}") from exc
    if not frames:
        raise InputError(f"{video}: no frames")
    if audio is not None and samples is None:
        raise InputError(f"{audio}: no audio stream")
    return Media(frames, fps, samples)


def read_clip_boundaries(concat_list: Path) -> list[int]:
    """First frame of every clip after the first, from a session's concat_list.txt (clips probed for length)."""
    from musetalk.utils.ffmpeg import probe

    bounds, total = [], 0
    for line in concat_list.read_text(encoding="utf-8").splitlines():
        match = re.match(r"\s*file\s+'(.*)'\s*$", line)
        if not match:
            continue
        clip = Path(match.group(1).replace("'\\''", "'"))
        if not clip.is_absolute():
            clip = concat_list.parent / clip
        if total:
            bounds.append(total)
        total += probe(clip).n_video_frames or 0
    return bounds


def avatar_blend_region(cache: AvatarCache, every: int = 5) -> NDArray[np.bool_]:
    """The avatar's blend masks (from force_prep) averaged in the canonical crop → (S, S) bool (> half)."""
    acc = np.zeros((m.CANON_PX, m.CANON_PX), np.float32)
    count = 0
    for i in range(0, cache.n_frames, every):
        x1, y1, x2, y2 = (int(v) for v in cache.mask_boxes[i])
        mask = np.asarray(cache.masks[i]).reshape(y2 - y1, x2 - x1)
        aff = m.canonical_affine(cache.landmarks[i])
        aff[:, 2] += aff[:, :2] @ np.array([x1, y1], dtype=np.float64)  # mask-box px → canonical px
        acc += cv2.warpAffine(mask, aff, (m.CANON_PX, m.CANON_PX)).astype(np.float32) / 255.0
        count += 1
    return acc / max(count, 1) > 0.5


def evaluate_media(
    media: Media,
    detector: FaceDetector,
    clip_boundaries: list[int] | None = None,
    blend_region: NDArray[np.bool_] | None = None,
    sync: SyncScorer | None = None,
    silence_db: float = SILENCE_DB,
) -> dict[str, Any]:
    """Every figure for one decoded video (keys documented in docs/REALISM.md)."""
    n = len(media.frames)
    h, w = media.frames[0].shape[:2]
    tracked = track_faces([detector.detect_faces(f) for f in media.frames], (h, w), media.fps)
    lm = tracked.landmarks
    opening = mouth_opening(lm)
    out: dict[str, Any] = {
        "frames": n,
        "fps": round(media.fps, 3),
        "face_detected_frames": tracked.stats.n_detected,
        "av_offset_frames": None,
        "mouth_audio_corr": None,
        "silence_mouth_closed_ratio": None,
        "box_jitter_px": None,
        "seam_flicker": None,
        "clip_joins": None,
        "syncnet": None,
    }
    if media.samples_16k is not None:
        fps_int = int(round(media.fps))
        level_db = frame_rms_db(media.samples_16k, n, fps_int, AUDIO_RATE_HZ)
        lag, corr = m.av_offset(level_db, opening, media.fps)
        out["av_offset_frames"] = None if lag is None else round(lag, 3)
        out["mouth_audio_corr"] = None if corr is None else round(corr, 4)
        ratio = m.silence_closed_ratio(level_db, opening, silence_db)
        out["silence_mouth_closed_ratio"] = None if ratio is None else round(ratio, 4)
        if sync is not None:
            out["syncnet"] = sync.score(media.frames, lm, media.samples_16k, media.fps)
    jitter = m.box_jitter_px(m.rigid_centres(lm))
    out["box_jitter_px"] = None if jitter is None else round(jitter, 4)
    flicker = m.seam_flicker(media.frames, lm, m.seam_regions(blend_region))
    out["seam_flicker"] = None if flicker is None else round(flicker, 4)
    if clip_boundaries is not None:
        joins = m.clip_joins(lm, clip_boundaries)
        out["clip_joins"] = {
            "n": len(joins),
            "max_jump_px": max((float(j["jump_px"] or 0.0) for j in joins), default=0.0),
            "joins": joins,
        }
    return out

