"""Paste generated 256×256 faces back into avatar frames.

Contract (tested): only pixels inside the frame's mask box whose (blurred) mask is > 0 can change; every
other pixel of the output is bit-identical to the source frame.

- Placement: with `subpixel_enabled`, the face is warped into the frame with the cached `face_to_frame`
  affine (float box position, scale and head roll; bilinear). Without it, like upstream: the float box is
  rounded to integers and the face is resized into it (no rotation).
- `feather`: alpha = Gaussian-blurred hard parsing mask (kernel = feather_ratio × crop width, odd, as
  upstream's `int(r·W // 2 · 2) + 1`) × the face's coverage. Blurring treats everything outside the mask
  box as 0, so the feather fades out inside the box instead of being cut at its edge.
- `poisson`: cv2.seamlessClone (normal clone) of the face over the hard mask.
- `color_match`: shift/scale each channel of the face to the source's mean/std under the mask first.
- A per-frame `weight` in [0, 1] scales the change (speech/silence cross-fade); weight 0 returns the
  source frame itself.
Per-avatar alpha maps depend only on the (read-only) cache and config, so they are computed once per
source frame and kept (bounded).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import cv2
import numpy as np
from numpy.typing import NDArray

from musetalk.avatar.cache import FACE_SIZE_PX, AvatarCache
from musetalk.config import BlendConfig

_STD_RATIO_LIMITS = (0.5, 2.0)  # colour matching never rescales a channel by more than this


def feather_kernel_px(box: NDArray[np.float32], ratio: float, expand: float) -> int:
    """Odd blur kernel for a face box: upstream's int(r·W // 2 · 2) + 1 with W = the blend-crop side."""
    side = float(max(box[2] - box[0], box[3] - box[1])) * expand
    return int(ratio * side // 2 * 2) + 1


def feather_mask(mask: NDArray[np.uint8], kernel_px: int) -> NDArray[np.uint8]:
    """Blur a hard 0/255 mask (h, w) → soft (h, w) uint8; outside the box counts as 0."""
    if kernel_px <= 1:
        return mask.copy()
    return np.asarray(cv2.GaussianBlur(mask, (kernel_px, kernel_px), 0, borderType=cv2.BORDER_CONSTANT))


def shifted_affine(face_to_frame: NDArray[np.float32], origin_xy: tuple[int, int]) -> NDArray[np.float64]:
    """The crop→frame affine re-expressed in coordinates relative to `origin_xy` → (2, 3) float64."""
    m = np.asarray(face_to_frame, dtype=np.float64).copy()
    m[0, 2] -= origin_xy[0]
    m[1, 2] -= origin_xy[1]
    return m


def rounded_box(box: NDArray[np.float32]) -> tuple[int, int, int, int]:
    """Integer face box (x1, y1, x2, y2) as upstream pastes it."""
    x1, y1, x2, y2 = (int(round(float(v))) for v in box)
    return x1, y1, max(x2, x1 + 1), max(y2, y1 + 1)


def coverage_rounded(box: tuple[int, int, int, int], region: tuple[int, int, int, int]) -> NDArray[np.uint8]:
    """255 where the integer face box covers the region (x1, y1, x2, y2) → (h, w) uint8."""
    rx1, ry1, rx2, ry2 = region
    cov = np.zeros((ry2 - ry1, rx2 - rx1), dtype=np.uint8)
    x1, y1, x2, y2 = max(box[0], rx1), max(box[1], ry1), min(box[2], rx2), min(box[3], ry2)
    if x2 > x1 and y2 > y1:
        cov[y1 - ry1 : y2 - ry1, x1 - rx1 : x2 - rx1] = 255
    return cov


def coverage_warped(face_to_frame: NDArray[np.float32], region: tuple[int, int, int, int]) -> NDArray[np.uint8]:
    """Where the warped 256² face lands in the region (anti-aliased edge) → (h, w) uint8."""
    rx1, ry1, rx2, ry2 = region
    ones = np.full((FACE_SIZE_PX, FACE_SIZE_PX), 255, dtype=np.uint8)
    m = shifted_affine(face_to_frame, (rx1, ry1))
    return np.asarray(
        cv2.warpAffine(ones, m, (rx2 - rx1, ry2 - ry1), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    )


def place_face(
    face: NDArray[np.uint8],
    region: tuple[int, int, int, int],
    face_to_frame: NDArray[np.float32],
    box: NDArray[np.float32],
    subpixel: bool,
) -> NDArray[np.uint8]:
    """The 256² BGR face placed over region (x1, y1, x2, y2) of the frame → (h, w, 3) uint8."""
    rx1, ry1, rx2, ry2 = region
    w, h = rx2 - rx1, ry2 - ry1
    if subpixel:
        m = shifted_affine(face_to_frame, (rx1, ry1))
        return np.asarray(cv2.warpAffine(face, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE))
    x1, y1, x2, y2 = rounded_box(box)
    resized = cv2.resize(face, (x2 - x1, y2 - y1))  # bilinear, as upstream
    out = np.zeros((h, w, 3), dtype=np.uint8)
    cx1, cy1, cx2, cy2 = max(x1, rx1), max(y1, ry1), min(x2, rx2), min(y2, ry2)
    if cx2 > cx1 and cy2 > cy1:
        out[cy1 - ry1 : cy2 - ry1, cx1 - rx1 : cx2 - rx1] = resized[cy1 - y1 : cy2 - y1, cx1 - x1 : cx2 - x1]
    return out


def match_color(
    face: NDArray[np.uint8], source: NDArray[np.uint8], alpha: NDArray[np.uint8]
) -> NDArray[np.uint8]:
    """Per-channel mean/std of `face` matched to `source` under alpha > 50% → (h, w, 3) uint8."""
    sel = alpha > 127
    if int(sel.sum()) < 16:
        return face
    f = face.astype(np.float32)
    fs, ss = f[sel], source[sel].astype(np.float32)  # (k, 3)
    f_mean, f_std = fs.mean(axis=0), fs.std(axis=0) + 1e-3
    s_mean, s_std = ss.mean(axis=0), ss.std(axis=0) + 1e-3
    scale = np.clip(s_std / f_std, *_STD_RATIO_LIMITS)
    return np.asarray(np.clip(np.rint((f - f_mean) * scale + s_mean), 0, 255), dtype=np.uint8)


def composite(source: NDArray[np.uint8], face: NDArray[np.uint8], alpha: NDArray[np.float32]) -> NDArray[np.uint8]:
    """source + (face − source)·alpha, rounded; exactly `source` where alpha == 0 → (h, w, 3) uint8."""
    s = source.astype(np.float32)
    out = s + (face.astype(np.float32) - s) * alpha[..., None]
    return np.asarray(np.rint(out), dtype=np.uint8)


def poisson_clone(source: NDArray[np.uint8], face: NDArray[np.uint8], mask: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """cv2.seamlessClone of `face` into `source` (same-size regions) over a binary mask → (h, w, 3) uint8."""
    m = mask.copy()
    m[:2, :], m[-2:, :], m[:, :2], m[:, -2:] = 0, 0, 0, 0  # the solver needs a border around the mask
    ys, xs = np.nonzero(m)
    if len(xs) == 0:
        return source.copy()
    bx, by = int(xs.min()), int(ys.min())
    bw, bh = int(xs.max()) - bx + 1, int(ys.max()) - by + 1
    # OpenCV centres the mask's bounding rect on `center` (integer halves), so this keeps it in place.
    center = (bx + bw // 2, by + bh // 2)
    return np.asarray(cv2.seamlessClone(face, source, m, center, cv2.NORMAL_CLONE))


@dataclass(frozen=True)
class FrameAlpha:
    """Cached per source frame: where blending can act and how strongly."""

    region: tuple[int, int, int, int]  # x1, y1, x2, y2 (frame px): the part of the mask box that can change
    alpha: NDArray[np.uint8]  # (h, w) feather alpha in the region (blurred mask × coverage / 255)
    hard: NDArray[np.uint8]  # (h, w) binary 0/255 (hard mask ∧ full coverage), for poisson


class Blender:
    """Blends faces into frames of any AvatarCache; thread-safe; caches alpha maps per (avatar, frame)."""

    def __init__(self, cfg: BlendConfig, expand: float, max_cached_frames: int = 1024) -> None:
        self.cfg = cfg
        self.expand = expand
        self._max_cached = max_cached_frames
        self._alpha: dict[tuple[int, int], FrameAlpha] = {}
        self._owners: dict[int, AvatarCache] = {}  # keeps cached ids valid
        self._lock = threading.Lock()

    def frame_alpha(self, cache: AvatarCache, index: int) -> FrameAlpha:
        """Where frame `index` can change and how strongly (computed once per frame, then cached)."""
        key = (id(cache), index)
        hit = self._alpha.get(key)
        if hit is not None:
            return hit
        x1, y1, x2, y2 = (int(v) for v in cache.mask_boxes[index])
        fh, fw = cache.frame_size_hw
        if not (0 <= x1 < x2 <= fw and 0 <= y1 < y2 <= fh):
            raise ValueError(f"mask box {(x1, y1, x2, y2)} of frame {index} is not inside the {fw}x{fh} frame")
        hard_mask = np.asarray(cache.masks[index], dtype=np.uint8)
        if hard_mask.shape != (y2 - y1, x2 - x1):
            raise ValueError(f"mask {hard_mask.shape} of frame {index} does not match its box {(x1, y1, x2, y2)}")
        region = (x1, y1, x2, y2)
        if self.cfg.subpixel_enabled:
            cov = coverage_warped(cache.face_to_frame[index], region)
        else:
            cov = coverage_rounded(rounded_box(cache.boxes[index]), region)
        kernel = feather_kernel_px(cache.boxes[index], self.cfg.feather_ratio, self.expand)
        soft = feather_mask(hard_mask, kernel)
        alpha = ((soft.astype(np.uint16) * cov + 127) // 255).astype(np.uint8)
        hard = np.where((hard_mask > 0) & (cov == 255), 255, 0).astype(np.uint8)
        # Shrink to where anything can change: less warping and arithmetic per frame.
        ys, xs = np.nonzero(alpha)
        if len(xs):
            ax1, ay1, ax2, ay2 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        else:
            ax1 = ay1 = ax2 = ay2 = 0
        entry = FrameAlpha(
            region=(x1 + ax1, y1 + ay1, x1 + ax2, y1 + ay2),
            alpha=np.ascontiguousarray(alpha[ay1:ay2, ax1:ax2]),
            hard=np.ascontiguousarray(hard[ay1:ay2, ax1:ax2]),
        )
        with self._lock:
            if len(self._alpha) >= self._max_cached:
                self._alpha.clear()
                self._owners.clear()
            self._alpha[key] = entry
            self._owners[id(cache)] = cache
        return entry

    def blend(
        self, cache: AvatarCache, index: int, face: NDArray[np.uint8] | None, weight: float = 1.0
    ) -> NDArray[np.uint8]:
        """Source frame `index` with `face` (256, 256, 3) BGR uint8 pasted in → new (H, W, 3) BGR uint8."""
        frame = np.array(cache.frames[index], dtype=np.uint8, copy=True)  # (H, W, 3)
        if face is None or weight <= 0.0:
            return frame
        if face.shape != (FACE_SIZE_PX, FACE_SIZE_PX, 3):
            raise ValueError(f"face must be ({FACE_SIZE_PX}, {FACE_SIZE_PX}, 3), got {face.shape}")
        fa = self.frame_alpha(cache, index)
        x1, y1, x2, y2 = fa.region
        if x2 <= x1 or y2 <= y1:
            return frame
        src = frame[y1:y2, x1:x2]
        placed = place_face(face, fa.region, cache.face_to_frame[index], cache.boxes[index], self.cfg.subpixel_enabled)
        if self.cfg.color_match:
            placed = match_color(placed, src, fa.alpha)
        if self.cfg.blend_mode == "poisson":
            cloned = poisson_clone(src, placed, fa.hard)
            # The solver also nudges pixels between the mask and its bounding rect: keep only the mask.
            alpha = (fa.hard > 0).astype(np.float32) * np.float32(min(weight, 1.0))
            out = composite(src, cloned, alpha)
        else:
            alpha = fa.alpha.astype(np.float32) * np.float32(min(weight, 1.0) / 255.0)
            out = composite(src, placed, alpha)
        frame[y1:y2, x1:x2] = out
        return frame
