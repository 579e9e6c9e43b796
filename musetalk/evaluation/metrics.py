"""Realism figures of a talking-head video, each a plain function of landmarks, audio levels or frames.

Landmarks come from the project's own face detector and tracker (musetalk.faces), so a figure means the
same thing for our videos and anyone else's. Conventions: `fps` video frames per second; landmarks
(N, 68, 2) iBUG order in frame px; audio levels (N,) dBFS per video frame.

- mouth opening (musetalk.faces.tracking.mouth_opening): inner-lip gap (mean of the three facing inner-lip
  pairs) / distance between the eye centres, per frame;
- av_offset_frames: the lag (sub-frame, parabolic peak) that maximises the cross-correlation of the mouth
  opening with the audio envelope; positive = the mouth moves after the sound (video late);
- silence_mouth_closed_ratio: share of silent frames (audio below the silence threshold) whose mouth is
  closed, closed meaning within a quarter of the video's opening range of its most closed state;
- box_jitter_px: RMS per axis of the face position after removing smooth head motion (a centred moving
  average), corrected for the share of white noise the average itself absorbs;
- seam_flicker: temporal change along the blend boundary (normalised by the local image gradient) divided by
  the same over the rest of the face, in a face-aligned canonical crop (≈1 = the seam changes no more than
  the face does; higher = a visible, flickering seam);
- clip_joins: position/size jump of the face at each clip boundary of a session video.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from numpy.typing import NDArray

from musetalk.faces.tracking import MEAN_SHAPE_68, RIGID_POINTS

MAX_LAG_S = 0.4  # lip sync searched within ±0.4 s
JITTER_WINDOW = 9  # frames of the moving average taken as smooth head motion (0.36 s at 25 fps)
CLOSED_RANGE_SHARE = 0.25
CLOSED_MIN_MARGIN = 0.03  # opening units (eye distances): below this above the most closed state = closed

# Canonical face crop for seam flicker: MEAN_SHAPE_68 × CANON_SCALE + CANON_OFFSET in a CANON_PX² image.
CANON_PX = 128
CANON_SCALE = 40.0
CANON_OFFSET = np.array([64.0, 58.0])
SEAM_BAND_PX = 3


def _zscore(x: NDArray[np.float64]) -> NDArray[np.float64]:
    sd = float(x.std())
    return (x - x.mean()) / sd if sd > 1e-12 else np.zeros_like(x)


def lagged_correlation(audio: NDArray[np.floating], video: NDArray[np.floating], lag: int) -> float:
    """Pearson correlation of audio[t] with video[t + lag] over the frames both cover."""
    a, v = np.asarray(audio, dtype=np.float64), np.asarray(video, dtype=np.float64)
    n = min(len(a), len(v))
    if lag >= 0:
        a, v = a[: n - lag], v[lag:n]
    else:
        a, v = a[-lag:n], v[: n + lag]
    if len(a) < 3 or a.std() < 1e-12 or v.std() < 1e-12:
        return 0.0
    return float(np.mean(_zscore(a) * _zscore(v)))


def av_offset(
    level_db: NDArray[np.floating], opening: NDArray[np.floating], fps: float, max_lag_s: float = MAX_LAG_S
) -> tuple[float | None, float | None]:
    """(lag in frames, correlation at the best whole-frame lag); positive lag = video late. None when flat."""
    a, v = np.asarray(level_db, dtype=np.float64), np.asarray(opening, dtype=np.float64)
    if a.std() < 1e-9 or v.std() < 1e-9:
        return None, None
    max_lag = max(1, int(round(max_lag_s * fps)))
    lags = np.arange(-max_lag, max_lag + 1)
    corr = np.array([lagged_correlation(a, v, int(k)) for k in lags])
    best = int(np.argmax(corr))
    lag = float(lags[best])
    if 0 < best < len(lags) - 1:  # parabola through the peak and its neighbours → sub-frame lag
        c0, c1, c2 = corr[best - 1], corr[best], corr[best + 1]
        denom = c0 - 2 * c1 + c2
        if denom < 0:
            lag += float(np.clip(0.5 * (c0 - c2) / denom, -0.5, 0.5))
    return lag, float(corr[best])


def silence_closed_ratio(
    level_db: NDArray[np.floating], opening: NDArray[np.floating], silence_db: float
) -> float | None:
    """Share of silent frames whose mouth is closed; None when the audio has no silent frame."""
    a, v = np.asarray(level_db, dtype=np.float64), np.asarray(opening, dtype=np.float64)
    n = min(len(a), len(v))
    silent = a[:n] < silence_db
    if not silent.any():
        return None
    lo, hi = float(np.percentile(v, 5)), float(np.percentile(v, 95))
    closed = v[:n] - lo <= max(CLOSED_RANGE_SHARE * (hi - lo), CLOSED_MIN_MARGIN)
    return float(closed[silent].mean())


def _moving_average(x: NDArray[np.float64], window: int) -> NDArray[np.float64]:
    """Centred moving average of (N, D) along time; 'valid' part only → (N - window + 1, D)."""
    kernel = np.ones(window) / window
    return np.stack([np.convolve(x[:, d], kernel, mode="valid") for d in range(x.shape[1])], axis=1)


def box_jitter_px(centres_px: NDArray[np.floating], window: int = JITTER_WINDOW) -> float | None:
    """High-frequency RMS motion per axis (px) of a (N, 2) face-position track; None when too short."""
    c = np.asarray(centres_px, dtype=np.float64).reshape(-1, 2)
    if len(c) < window + 2:
        return None
    half = window // 2
    residual = c[half : len(c) - half] - _moving_average(c, window)
    # Subtracting a k-frame mean also removes 1/k of white jitter's variance: undo that.
    var = float((residual**2).mean()) / (1.0 - 1.0 / window)
    return math.sqrt(var)


def rigid_centres(landmarks: NDArray[np.floating]) -> NDArray[np.float64]:
    """(N, 68, 2) → (N, 2) centre of the rigid points (brows, nose, eyes): the head, not the mouth."""
    return np.asarray(landmarks, dtype=np.float64)[:, RIGID_POINTS].mean(axis=1)


def canonical_affine(landmarks: NDArray[np.floating]) -> NDArray[np.float64]:
    """(2, 3) similarity mapping frame px → canonical crop px, fitted on the rigid points."""
    dst = (MEAN_SHAPE_68[RIGID_POINTS] * CANON_SCALE + CANON_OFFSET).astype(np.float32)
    src = np.asarray(landmarks, dtype=np.float32)[RIGID_POINTS]
    m, _ = cv2.estimateAffinePartial2D(src, dst, method=cv2.LMEDS)
    if m is None:
        raise ValueError("degenerate landmarks")
    return np.asarray(m, dtype=np.float64)


def _hull_mask(points: NDArray[np.float64], dilate_px: int = 0) -> NDArray[np.bool_]:
    mask = np.zeros((CANON_PX, CANON_PX), np.uint8)
    cv2.fillConvexPoly(mask, cv2.convexHull(np.round(points).astype(np.int32)), 255)
    if dilate_px:
        return np.asarray(cv2.dilate(mask, np.ones((2 * dilate_px + 1, 2 * dilate_px + 1), np.uint8)) > 0)
    return mask > 0


def default_blend_region() -> NDArray[np.bool_]:
    """(CANON_PX, CANON_PX) MuseTalk's pasted region in the canonical crop: the face below mid-nose."""
    pts = MEAN_SHAPE_68 * CANON_SCALE + CANON_OFFSET
    top = float(pts[29, 1])
    lower = np.concatenate([pts[0:17], [[pts[0, 0], top], [pts[16, 0], top]]])
    region = _hull_mask(lower)
    region[: int(math.ceil(top))] = False
    return region


@dataclass(frozen=True)
class SeamRegions:
    """Canonical-crop masks used by seam_flicker."""

    band: NDArray[np.bool_]  # (S, S) pixels within SEAM_BAND_PX of the blend boundary, inside the face
    rest: NDArray[np.bool_]  # (S, S) the rest of the face, minus eyes and mouth (they move on their own)


def seam_regions(blend_region: NDArray[np.bool_] | None = None) -> SeamRegions:
    """Band along the blend boundary and the reference face area, in the canonical crop."""
    region = default_blend_region() if blend_region is None else blend_region
    pts = MEAN_SHAPE_68 * CANON_SCALE + CANON_OFFSET
    face = _hull_mask(pts, dilate_px=2)
    k = np.ones((2 * SEAM_BAND_PX + 1, 2 * SEAM_BAND_PX + 1), np.uint8)
    r8 = region.astype(np.uint8) * 255
    band = (cv2.dilate(r8, k) > 0) & ~(cv2.erode(r8, k) > 0) & face
    moving = _hull_mask(pts[48:60], dilate_px=4) | _hull_mask(pts[36:42], 3) | _hull_mask(pts[42:48], 3)
    return SeamRegions(band=band, rest=face & ~band & ~moving)


def seam_flicker(
    frames_bgr: Sequence[NDArray[np.uint8]],
    landmarks: NDArray[np.floating],
    regions: SeamRegions | None = None,
) -> float | None:
    """Temporal change along the seam relative to the rest of the face, in face-aligned crops.

    Each region's figure is Σ|I_t − I_{t−1}| / Σ|∇I| (normal-flow style): the temporal change that sub-pixel
    head motion causes is proportional to the image gradient, so dividing by it leaves a seam that flickers
    by itself (brightness or shape changing frame to frame) while a sharp jaw line that merely moves
    scores like the rest of the face.
    """
    if len(frames_bgr) < 2:
        return None
    reg = regions or seam_regions()
    prev: NDArray[np.float32] | None = None
    sums = np.zeros(4)  # band Δ, band ∇, rest Δ, rest ∇
    for frame, lm in zip(frames_bgr, landmarks, strict=True):
        crop = cv2.warpAffine(cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY), canonical_affine(lm), (CANON_PX, CANON_PX))
        cur = crop.astype(np.float32)
        if prev is not None:
            diff = np.abs(cur - prev)
            mid = (cur + prev) / 2
            grad = np.abs(cv2.Sobel(mid, cv2.CV_32F, 1, 0, ksize=3)) + np.abs(cv2.Sobel(mid, cv2.CV_32F, 0, 1, ksize=3))
            grad = grad / 8.0 + 1.0  # Sobel gain; +1 grey level keeps flat skin from dividing by ~0
            sums += [diff[reg.band].sum(), grad[reg.band].sum(), diff[reg.rest].sum(), grad[reg.rest].sum()]
        prev = cur
    rest = sums[2] / sums[3]
    return float((sums[0] / sums[1]) / rest) if rest > 1e-9 else None


def clip_joins(
    landmarks: NDArray[np.floating], boundaries: Sequence[int]
) -> list[dict[str, float | int | None]]:
    """Per clip boundary b (first frame of a clip): face jump from frame b-1 to b in px and in face widths,
    and its ratio to the median frame-to-frame move of the video."""
    lm = np.asarray(landmarks, dtype=np.float64)
    c = rigid_centres(lm)
    width = np.ptp(lm[:, :, 0], axis=1)
    steps = np.linalg.norm(np.diff(c, axis=0), axis=1)
    typical = float(np.median(steps)) if len(steps) else 0.0
    out: list[dict[str, float | int | None]] = []
    for b in boundaries:
        if not 0 < b < len(lm):
            continue
        jump = float(steps[b - 1])
        out.append(
            {
                "frame": int(b),
                "jump_px": round(jump, 3),
                "jump_face_widths": round(jump / max(float(width[b]), 1e-6), 4),
                "ratio_to_median_step": round(jump / typical, 3) if typical > 1e-9 else None,
            }
        )
    return out
