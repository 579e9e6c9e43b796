"""The built-in demo avatar: the NASA astronaut photo (public domain, shipped with scikit-image) brought to
life with slow idle motion — sway, breathing, a slight head tilt — and natural blinks.

Nothing is committed as a binary: `make serve` / `make demo` build `data/video/demo.mp4` with this on
first use.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from numpy.typing import NDArray

from musetalk.avatar.synthetic import ASTRONAUT_FACE_XY, astronaut_bgr, render_frame, write_video

_EYES = ((36, 37, 38, 39, 40, 41), (42, 43, 44, 45, 46, 47))  # iBUG: corner, upper, upper, corner, lower, lower
PHOTO_PX = 512  # the astronaut photo is 512×512
BLINK_PROFILE = (0.35, 0.85, 1.0, 0.8, 0.45, 0.15)  # eyelid closure per frame of one blink at 25 fps (~240 ms)


def blink_closure(n_frames: int, fps: int, starts_s: tuple[float, ...]) -> NDArray[np.float32]:
    """Eyelid closure in [0, 1] per frame, one blink starting at each time in `starts_s`."""
    out = np.zeros(n_frames, dtype=np.float32)
    step = 25.0 / fps  # the profile is sampled at 25 fps
    for start in starts_s:
        first = int(round(start * fps))
        for k in range(int(np.ceil(len(BLINK_PROFILE) / step))):
            idx = first + k
            if 0 <= idx < n_frames:
                out[idx] = max(out[idx], BLINK_PROFILE[min(int(k * step), len(BLINK_PROFILE) - 1)])
    return out


def close_eyes(photo: NDArray[np.uint8], landmarks: NDArray[np.float32], amount: float) -> NDArray[np.uint8]:
    """Lower both upper eyelids by `amount` (0 open … 1 closed): the lid skin slides down over the eye."""
    if amount <= 0.0:
        return photo
    h, w = photo.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)  # (H, W) each
    shift = np.zeros((h, w), dtype=np.float32)
    for idx in _EYES:
        pts = landmarks[list(idx)]
        left, right = float(pts[0, 0]), float(pts[3, 0])
        upper_y = float(pts[[1, 2], 1].mean())
        lower_y = float(pts[[4, 5], 1].mean())
        eye_h = max(lower_y - upper_y, 1.0)
        eye_w = max(right - left, 1.0)
        cx = 0.5 * (left + right)
        # 1 across the eye, fading past the corners; the lid follows a gentle arc.
        across = np.clip(1.0 - (np.abs(xs - cx) - 0.5 * eye_w) / (0.35 * eye_w), 0.0, 1.0)
        # Full shift between the lids; the lid skin above stretches over 0.9 eye heights (brows stay).
        above = np.clip(1.0 - (upper_y - ys) / (0.9 * eye_h), 0.0, 1.0)
        below = np.clip(1.0 - (ys - lower_y) / (0.35 * eye_h), 0.0, 1.0)
        profile = np.where(ys < upper_y, above, np.where(ys <= lower_y, 1.0, below))
        shift = np.maximum(shift, amount * 1.05 * eye_h * across * profile)
    out = cv2.remap(photo, xs, ys - shift, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    return np.asarray(out, dtype=np.uint8)


def idle_transform(t_s: float, scale: float) -> tuple[NDArray[np.float64], float, float]:
    """(offset px (2,), roll deg, scale) of the head at time t: slow incommensurate sways and breathing."""
    offset = np.array(
        [
            3.0 * np.sin(2 * np.pi * 0.13 * t_s) + 1.0 * np.sin(2 * np.pi * 0.31 * t_s + 0.7),
            1.6 * np.sin(2 * np.pi * 0.21 * t_s + 1.1) + 0.8 * np.sin(2 * np.pi * 0.25 * t_s),  # breathing bob
        ]
    )
    roll = 0.7 * np.sin(2 * np.pi * 0.09 * t_s + 0.4)
    breathe = scale * (1.0 + 0.004 * np.sin(2 * np.pi * 0.25 * t_s))
    return offset, float(roll), float(breathe)


def write_demo_video(
    path: Path,
    landmarks: NDArray[np.float32],
    seconds: float = 6.0,
    fps: int = 25,
    size_hw: tuple[int, int] = (512, 512),
    blinks_s: tuple[float, ...] = (1.3, 4.4),
) -> Path:
    """Write the idle demo clip; `landmarks` (68, 2) are the photo's own (from any 68-point detector)."""
    photo = astronaut_bgr()
    n_frames = int(round(seconds * fps))
    closure = blink_closure(n_frames, fps, blinks_s)
    # A 4 % zoom keeps the sway and tilt from ever showing the photo's edges.
    scale = 1.04 * size_hw[0] / photo.shape[0]
    frames = []
    for i in range(n_frames):
        offset, roll, s = idle_transform(i / fps, scale)
        source = close_eyes(photo, landmarks, float(closure[i]))
        # The face stays where the photo has it (scaled), plus the idle offset.
        to_centre = np.asarray(ASTRONAUT_FACE_XY) * (size_hw[0] / PHOTO_PX) - np.array([size_hw[1], size_hw[0]]) / 2
        frames.append(render_frame(source, size_hw, to_centre + offset, roll, s, ASTRONAUT_FACE_XY))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.mp4")
    write_video(tmp, frames, fps, crf=14)
    tmp.replace(path)
    return path
