"""The 512×512 face template GFPGAN was trained on, 5-point similarity alignment, and soft paste-back.

Pixel convention: OpenCV's (integer coordinates are pixel centres), as in `cv2.warpAffine`.
"""

from __future__ import annotations

import cv2
import numpy as np
from numpy.typing import NDArray

from musetalk.faces.base import LEFT_EYE, RIGHT_EYE

FACE_SIZE_PX = 512
# FFHQ alignment points in the 512² crop (the template facexlib aligns GFPGAN's training faces to):
# image-left eye centre, image-right eye centre, nose tip, image-left and image-right mouth corner.
TEMPLATE_512 = np.array(
    [
        [192.98138, 239.94708],
        [318.90277, 240.1936],
        [256.63416, 314.01935],
        [201.26117, 371.41043],
        [313.08905, 371.15118],
    ],
    dtype=np.float64,
)
NOSE_TIP, MOUTH_LEFT, MOUTH_RIGHT = 30, 48, 54  # iBUG 68-point indices
MASK_INSET_PX = 16  # the restored crop's outer band is ignored: it holds warp border and GAN edge artefacts
MASK_FEATHER_PX = 24  # Gaussian sigma of the paste mask's fall-off, in template px


def five_points(landmarks: NDArray[np.floating]) -> NDArray[np.float64]:
    """(68, 2) iBUG landmarks → (5, 2) eye centres, nose tip, mouth corners in template order."""
    lm = np.asarray(landmarks, dtype=np.float64)
    return np.stack(
        [lm[LEFT_EYE].mean(axis=0), lm[RIGHT_EYE].mean(axis=0), lm[NOSE_TIP], lm[MOUTH_LEFT], lm[MOUTH_RIGHT]]
    )


def similarity(src: NDArray[np.floating], dst: NDArray[np.floating]) -> NDArray[np.float64]:
    """Least-squares rotation + uniform scale + translation (2×3) mapping src (N, 2) points onto dst (N, 2)."""
    s = np.asarray(src, dtype=np.float64)
    d = np.asarray(dst, dtype=np.float64)
    s_mean, d_mean = s.mean(axis=0), d.mean(axis=0)
    sc, dc = s - s_mean, d - d_mean
    # Closed form for the complex-number model d = z·s + t (z = scale·e^{iθ}), which excludes reflections.
    a = float((sc[:, 0] * dc[:, 0] + sc[:, 1] * dc[:, 1]).sum())
    b = float((sc[:, 0] * dc[:, 1] - sc[:, 1] * dc[:, 0]).sum())
    norm = float((sc**2).sum())
    if norm <= 1e-12:
        raise ValueError("alignment points are degenerate (all equal)")
    a, b = a / norm, b / norm
    rot = np.array([[a, -b], [b, a]])
    return np.hstack([rot, (d_mean - rot @ s_mean)[:, None]])


def face_to_template(landmarks: NDArray[np.floating], size_px: int = FACE_SIZE_PX) -> NDArray[np.float64]:
    """2×3 affine from frame px to the `size_px`² template crop of this face."""
    return similarity(five_points(landmarks), TEMPLATE_512 * (size_px / FACE_SIZE_PX))


def warp_to_template(
    frame_bgr: NDArray[np.uint8], matrix: NDArray[np.floating], size_px: int = FACE_SIZE_PX
) -> NDArray[np.uint8]:
    """(H, W, 3) frame → (size, size, 3) aligned crop; outside the frame is a reflected border."""
    return np.asarray(
        cv2.warpAffine(frame_bgr, matrix, (size_px, size_px), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101),
        dtype=np.uint8,
    )


def template_mask(size_px: int = FACE_SIZE_PX) -> NDArray[np.float32]:
    """(size, size) float32 in [0, 1]: 1 inside, a Gaussian fall-off to 0 at the crop's inset border."""
    scale = size_px / FACE_SIZE_PX
    inset = max(1, round((MASK_INSET_PX + 2 * MASK_FEATHER_PX) * scale))
    mask = np.zeros((size_px, size_px), np.float32)
    mask[inset:-inset, inset:-inset] = 1.0
    sigma = MASK_FEATHER_PX * scale
    blurred = np.asarray(
        cv2.GaussianBlur(mask, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_CONSTANT), dtype=np.float32
    )
    blurred[blurred < 1.0 / 512] = 0.0  # below half a grey level: leave those pixels exactly as they were
    return blurred


def paste_back(
    frame_bgr: NDArray[np.uint8],
    restored_bgr: NDArray[np.uint8],
    matrix: NDArray[np.floating],
    mask: NDArray[np.float32],
    weight: float,
) -> NDArray[np.uint8]:
    """Warp the restored crop back with the inverse of `matrix` and blend it in by mask × weight.

    Only the crop's bounding box is touched; every pixel where mask × weight is 0 keeps its exact value.
    """
    out = frame_bgr.copy()
    if weight <= 0:
        return out
    h, w = frame_bgr.shape[:2]
    size = restored_bgr.shape[0]
    inv = cv2.invertAffineTransform(np.asarray(matrix, dtype=np.float64))
    corners = np.array([[0, 0], [size, 0], [0, size], [size, size]], np.float64) - 0.5
    xy = corners @ inv[:, :2].T + inv[:, 2]
    x0, y0 = (max(0, int(np.floor(v))) for v in xy.min(axis=0))
    x1, y1 = min(w, int(np.ceil(xy[:, 0].max())) + 1), min(h, int(np.ceil(xy[:, 1].max())) + 1)
    if x1 <= x0 or y1 <= y0:
        return out
    roi_inv = inv.copy()
    roi_inv[:, 2] -= (x0, y0)
    dsize = (x1 - x0, y1 - y0)
    face = cv2.warpAffine(restored_bgr, roi_inv, dsize, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    alpha = cv2.warpAffine(mask, roi_inv, dsize, flags=cv2.INTER_LINEAR, borderValue=0.0) * float(weight)
    roi = out[y0:y1, x0:x1]
    blended = roi + alpha[..., None] * (face.astype(np.float32) - roi)
    touched = alpha > 0
    roi[touched] = np.clip(np.rint(blended[touched]), 0, 255).astype(np.uint8)
    return out
