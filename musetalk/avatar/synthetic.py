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
