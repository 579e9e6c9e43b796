"""Face boxes from landmarks (upstream v1.5 rules) and the crop ↔ frame affines.

Pixel convention: integer coordinates are pixel centres (OpenCV's). A box (x1, y1, x2, y2) is in
continuous coordinates, so a crop of `size` pixels spans it exactly the way `cv2.resize` of the
box region would: crop pixel u samples frame x = x1 + (u + 0.5)·(x2 − x1)/size − 0.5.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from numpy.typing import NDArray

from musetalk.errors import InputError

NOSE_MID = 29  # upstream's "half face" landmark: the box's vertical centre (before extra_margin)


def rotation(theta_rad: float) -> NDArray[np.float64]:
    """2×2 rotation by theta in image coordinates (y down: positive = clockwise on screen)."""
    c, s = math.cos(theta_rad), math.sin(theta_rad)
    return np.array([[c, -s], [s, c]])


def upstream_box(landmarks: NDArray[np.floating], bbox_shift_px: float, extra_margin_px: float) -> NDArray[np.float64]:
    """Face box (x1, y1, x2, y2) from 68 landmarks as upstream v1.5 computes it, as floats.

    Vertical centre = landmark 29 moved down by bbox_shift; height = twice the distance from there
    to the chin; width = the landmarks' x extent; then extra_margin is added below the chin.
    Unlike upstream the box is not clipped to the frame: crops use a replicated border, so a face
    near an edge keeps its size instead of being squashed.
    """
    lm = np.asarray(landmarks, dtype=np.float64)
    half_y = lm[NOSE_MID, 1] + bbox_shift_px
    chin_y = lm[:, 1].max()
    half_h = chin_y - half_y
    if half_h <= 1.0:
        raise InputError(f"bbox_shift {bbox_shift_px:+g} px moves the face centre below the chin; use a smaller value")
    return np.array([lm[:, 0].min(), half_y - half_h, lm[:, 0].max(), chin_y + extra_margin_px])


def face_boxes(
    landmarks: NDArray[np.float32], roll_rad: NDArray[np.float64], bbox_shift_px: float, extra_margin_px: float
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Per-frame box centres (N, 2) in frame px and sizes (N, 2) (w, h) in the face's own upright axes.

    Each frame's landmarks are rotated upright (by −roll about their mean) before the upstream box
    rule is applied, so a tilted head gets the box of the upright face, not a larger axis-aligned one.
    """
    lm = np.asarray(landmarks, dtype=np.float64)
    centres = np.zeros((len(lm), 2))
    sizes = np.zeros((len(lm), 2))
    for i, (pts, theta) in enumerate(zip(lm, roll_rad, strict=True)):
        pivot = pts.mean(axis=0)
        rot = rotation(float(theta))
        upright = (pts - pivot) @ rot  # row-vector form of R(−θ)·(p − pivot)
        x1, y1, x2, y2 = upstream_box(upright + pivot, bbox_shift_px, extra_margin_px)
        centre_upright = np.array([(x1 + x2) / 2, (y1 + y2) / 2]) - pivot
        centres[i] = rot @ centre_upright + pivot
        sizes[i] = (x2 - x1, y2 - y1)
    return centres, sizes


def crop_to_frame(
    centre_xy: NDArray[np.float64], size_wh: NDArray[np.float64], roll_rad: float, out_px: int
) -> NDArray[np.float32]:
    """(2, 3) affine mapping pixel (u, v) of an out_px² crop to frame px.

    The crop covers the box of `size_wh` centred on `centre_xy` (continuous coordinates), rotated
    by `roll_rad` about that centre; scale is non-uniform (w/out_px, h/out_px) like upstream.
    """
    scale = np.diag([float(size_wh[0]) / out_px, float(size_wh[1]) / out_px])
    lin = rotation(roll_rad) @ scale
    # crop pixel centre u+0.5 relative to the crop centre, mapped, then back to pixel-index coordinates
    offset = np.asarray(centre_xy, dtype=np.float64) - 0.5 + lin @ np.array([0.5 - out_px / 2, 0.5 - out_px / 2])
    return np.hstack([lin, offset[:, None]]).astype(np.float32)


def boxes_from_centres(centres: NDArray[np.float64], sizes_wh: NDArray[np.float64]) -> NDArray[np.float32]:
    """(N, 4) x1, y1, x2, y2 boxes of the given centres and sizes (axes of the upright face)."""
    half = np.asarray(sizes_wh, dtype=np.float64) / 2
    c = np.asarray(centres, dtype=np.float64)
    return np.hstack([c - half, c + half]).astype(np.float32)


def warp_crop(
    frame: NDArray[np.uint8],
    to_frame: NDArray[np.float32],
    out_px: int,
    interpolation: int,
    border: int = cv2.BORDER_REPLICATE,
) -> NDArray[np.uint8]:
    """Sample an out_px² crop from `frame` through a crop→frame affine (outside: replicated edge, or black)."""
    crop = cv2.warpAffine(
        frame,
        np.asarray(to_frame, dtype=np.float64),
        (out_px, out_px),
        flags=interpolation | cv2.WARP_INVERSE_MAP,
        borderMode=border,
        borderValue=(0, 0, 0),
    )
    return np.asarray(crop, dtype=np.uint8)


def apply_affine(matrix: NDArray[np.floating], points: NDArray[np.floating]) -> NDArray[np.float64]:
    """Map (K, 2) points through a (2, 3) affine."""
    m = np.asarray(matrix, dtype=np.float64)
    return np.asarray(points, dtype=np.float64) @ m[:, :2].T + m[:, 2]


def invert_affine(matrix: NDArray[np.floating]) -> NDArray[np.float64]:
    """Inverse of a (2, 3) affine."""
    return np.asarray(cv2.invertAffineTransform(np.asarray(matrix, dtype=np.float64)), dtype=np.float64)


def padded_int_box(points: NDArray[np.floating], pad_px: float, frame_hw: tuple[int, int]) -> NDArray[np.int32]:
    """Integer (x1, y1, x2, y2) end-exclusive box around points, padded and clipped to the frame.

    Always at least 1×1 inside the frame, so a mask box can be sliced even for a face at the edge.
    """
    h, w = frame_hw
    pts = np.asarray(points, dtype=np.float64)
    x1 = int(math.floor(pts[:, 0].min() - pad_px))
    y1 = int(math.floor(pts[:, 1].min() - pad_px))
    x2 = int(math.ceil(pts[:, 0].max() + pad_px)) + 1
    y2 = int(math.ceil(pts[:, 1].max() + pad_px)) + 1
    x1, x2 = min(max(x1, 0), w - 1), min(max(x2, 1), w)
    y1, y2 = min(max(y1, 0), h - 1), min(max(y2, 1), h)
    return np.array([x1, y1, max(x2, x1 + 1), max(y2, y1 + 1)], dtype=np.int32)
