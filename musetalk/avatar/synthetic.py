"""Synthetic avatar sources with known ground truth, for tests, benchmarks and weight-free demos.

The face is a real photo shipped with scikit-image (`skimage.data.astronaut()`, NASA, public
domain), moved along a known smooth path with per-frame jitter and an optional known roll, and
encoded with PyAV. The returned ground truth lets tests measure stabilisation error in pixels.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
from numpy.typing import ArrayLike, NDArray

# Centre of the face in the 512×512 astronaut photo (dlib HOG box (179, 83)-(266, 170)).
ASTRONAUT_FACE_XY = (222.5, 126.5)


def astronaut_bgr() -> NDArray[np.uint8]:
    """The 512×512 astronaut photo as BGR uint8 (needs scikit-image)."""
    from skimage import data

    return np.ascontiguousarray(cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR))


@dataclass(frozen=True)
class SyntheticVideo:
    """A generated face video and the truth it was made from (all per frame, frame px / degrees)."""

    path: Path
    fps: int
    size_hw: tuple[int, int]
    path_px: NDArray[np.float64]  # (N, 2) smooth translation of the face, without jitter
    jitter_px: NDArray[np.float64]  # (N, 2) per-frame jitter added on top of the path
    roll_deg: NDArray[np.float64]  # (N,) known roll about the face centre (clockwise on screen)
    scale: float  # photo → frame scale

    @property
    def n_frames(self) -> int:
        """Number of frames written."""
        return len(self.path_px)

    @property
    def offsets_px(self) -> NDArray[np.float64]:
        """(N, 2) actual translation of each frame: path + jitter."""
        return self.path_px + self.jitter_px


def smooth_path(
    n_frames: int, fps: int, amplitude_px: tuple[float, float], freq_hz: tuple[float, float]
) -> NDArray[np.float64]:
    """(N, 2) sinusoidal head sway: x = A_x sin(2π f_x t), y = A_y sin(2π f_y t + 1)."""
    t = np.arange(n_frames) / fps
    return np.stack(
        [
            amplitude_px[0] * np.sin(2 * np.pi * freq_hz[0] * t),
            amplitude_px[1] * np.sin(2 * np.pi * freq_hz[1] * t + 1.0),
        ],
        axis=1,
    )


def render_frame(
    photo: NDArray[np.uint8],
    size_hw: tuple[int, int],
    offset_px: ArrayLike,
    roll_deg: float,
    scale: float,
    face_xy: tuple[float, float] = ASTRONAUT_FACE_XY,
) -> NDArray[np.uint8]:
    """The photo scaled and rotated about its face centre, face placed at frame centre + offset."""
    h, w = size_hw
    theta = np.deg2rad(roll_deg)
    lin = scale * np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    target = np.array([w / 2, h / 2]) + np.asarray(offset_px, dtype=np.float64)
    matrix = np.hstack([lin, (target - lin @ np.asarray(face_xy))[:, None]])
    frame = cv2.warpAffine(photo, matrix, (w, h), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT_101)
    return np.asarray(frame, dtype=np.uint8)


def write_video(path: Path, frames: Iterable[NDArray[np.uint8]], fps: float, crf: int = 12) -> int:
    """Encode BGR frames to H.264 (yuv420p) with PyAV; returns the frame count."""
    import av

    n = 0
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast"}
        for img in frames:
            if n == 0:
                stream.height, stream.width = img.shape[0], img.shape[1]
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="bgr24")):
                container.mux(packet)
            n += 1
        for packet in stream.encode():
            container.mux(packet)
    return n


def write_face_video(
    path: Path,
    n_frames: int = 48,
    fps: int = 25,
    size_hw: tuple[int, int] = (320, 320),
    amplitude_px: tuple[float, float] = (12.0, 6.0),
    freq_hz: tuple[float, float] = (0.3, 0.2),
    jitter_px: float = 1.0,
    roll_deg: ArrayLike | None = None,
    scale: float = 1.0,
    seed: int = 0,
    crf: int = 12,
) -> SyntheticVideo:
    """Write the astronaut moving along a smooth path plus Gaussian jitter (σ = jitter_px, clipped at 2σ).

    roll_deg: None (upright), a constant, or one angle per frame.
    """
    rng = np.random.default_rng(seed)
    path_px = smooth_path(n_frames, fps, amplitude_px, freq_hz)
    jitter = (
        np.clip(rng.normal(0.0, jitter_px, (n_frames, 2)), -2 * jitter_px, 2 * jitter_px)
        if jitter_px
        else np.zeros((n_frames, 2))
    )
    roll = np.broadcast_to(np.asarray(0.0 if roll_deg is None else roll_deg, dtype=np.float64), (n_frames,)).copy()
    photo = astronaut_bgr()
    frames = (render_frame(photo, size_hw, path_px[i] + jitter[i], float(roll[i]), scale) for i in range(n_frames))
    write_video(path, frames, fps, crf)
    return SyntheticVideo(path, fps, size_hw, path_px, jitter, roll, scale)


def write_faceless_video(
    path: Path, n_frames: int = 12, fps: int = 25, size_hw: tuple[int, int] = (240, 320), seed: int = 0
) -> Path:
    """A video of smooth colour noise with no face in it."""
    rng = np.random.default_rng(seed)
    h, w = size_hw
    frames = (
        np.asarray(cv2.resize(rng.integers(0, 255, (h // 16, w // 16, 3), dtype=np.uint8), (w, h)), dtype=np.uint8)
        for _ in range(n_frames)
    )
    write_video(path, frames, fps)
    return path


@dataclass(frozen=True)
class CrowdVideo:
    """A generated video with two people and a face-like distractor, and where each face really is."""

    path: Path
    fps: int
    size_hw: tuple[int, int]
    main_xy: NDArray[np.float64]  # (N, 2) centre of the main face (the astronaut), frame px
    main_width_px: float  # width of the main face's dlib box
    second_xy: NDArray[np.float64]  # (N, 2) centre of the second face, frame px
    second_scale: NDArray[np.float64]  # (N,) second face size relative to the main face
    occluded: NDArray[np.bool_]  # (N,) frames where the main face is covered


# The head of the astronaut photo (rows, cols) used as the second person; dlib box ~ (179, 83)-(266, 170).
_HEAD_ROWS, _HEAD_COLS = slice(30, 230), slice(130, 320)


def write_crowd_video(
    path: Path,
    n_frames: int = 60,
    fps: int = 25,
    occluded: tuple[int, ...] = (20, 21, 22, 23),
    crf: int = 14,
) -> CrowdVideo:
    """Two people and a distractor, 448×640: the astronaut (whose suit carries a face-like mission patch)
    swaying on the left, and a mirrored copy of his head on the right whose size swings from 0.75× to 1.15×
    of the main face (so it is the largest face in some frames); the main face is covered by a grey card
    in the `occluded` frames."""
    h, w = 448, 640
    photo = astronaut_bgr()
    head = np.ascontiguousarray(photo[_HEAD_ROWS, _HEAD_COLS][:, ::-1])
    head_face_xy = np.array([_HEAD_COLS.stop - ASTRONAUT_FACE_XY[0], ASTRONAUT_FACE_XY[1] - _HEAD_ROWS.start])
    t = np.arange(n_frames) / fps
    main_xy = np.stack([200 + 10 * np.sin(2 * np.pi * 0.4 * t), 120 + 5 * np.sin(2 * np.pi * 0.3 * t + 1)], axis=1)
    second_xy = np.stack([480 + 15 * np.sin(2 * np.pi * 0.25 * t + 2), 150 + 8 * np.sin(2 * np.pi * 0.5 * t)], axis=1)
    second_scale = 0.95 + 0.2 * np.sin(2 * np.pi * 0.5 * t)
    covered = np.zeros(n_frames, dtype=bool)
    covered[[i for i in occluded if 0 <= i < n_frames]] = True
    frames = []
    for i in range(n_frames):
        shift = main_xy[i] - np.asarray(ASTRONAUT_FACE_XY)
        m = np.array([[1.0, 0.0, shift[0]], [0.0, 1.0, shift[1]]])
        frame = cv2.warpAffine(photo, m, (w, h), flags=cv2.INTER_LINEAR, borderValue=(90, 90, 90))
        s = float(second_scale[i])
        at = second_xy[i] - s * head_face_xy
        m2 = np.array([[s, 0.0, at[0]], [0.0, s, at[1]]])
        hh, hw = head.shape[:2]
        on = cv2.warpAffine(np.full((hh, hw), 255, np.uint8), m2, (w, h), flags=cv2.INTER_NEAREST)
        pasted = cv2.warpAffine(head, m2, (w, h), flags=cv2.INTER_LINEAR)
        frame = np.where(on[..., None] > 0, pasted, frame)
        if covered[i]:
            x, y = main_xy[i].astype(int)
            cv2.rectangle(frame, (x - 70, y - 80), (x + 70, y + 80), (128, 128, 128), -1)
        frames.append(np.asarray(frame, dtype=np.uint8))
    write_video(path, frames, fps, crf)
    return CrowdVideo(path, fps, (h, w), main_xy, 88.0, second_xy, second_scale, covered)
