"""Decode an avatar source (any video container, or one photo) into frames at the configured fps.

Video frames are picked by timestamp: output frame k shows the source frame nearest to k / fps, so
a 30 fps or variable-rate source plays at the right speed (upstream keeps the source rate and a
30 fps avatar plays 20% slow). A photo becomes a one-frame still avatar.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from numpy.typing import NDArray

from musetalk.errors import InputError

# FFmpeg demuxers that "decode" any text as pictures (tty renders ANSI art): not an avatar source.
_NOT_VIDEO_FORMATS = frozenset({"tty"})
_Frames = Generator[tuple[float, NDArray[np.uint8]], None, None]
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"})


@dataclass(frozen=True)
class SourceInfo:
    """What was read: kind ('video' | 'photo'), source rate and frame count, output size."""

    path: Path
    kind: str
    src_fps: float | None
    n_src_frames: int
    n_frames: int
    size_hw: tuple[int, int]  # output frames (even, after max_side_px)
    src_size_hw: tuple[int, int]


def output_size_hw(src_hw: tuple[int, int], max_side_px: int) -> tuple[int, int]:
    """Frame size after the optional downscale, made even (yuv420p needs even sizes)."""
    h, w = src_hw
    if max_side_px and max(h, w) > max_side_px:
        scale = max_side_px / max(h, w)
        h, w = max(2, round(h * scale)), max(2, round(w * scale))
    return h - h % 2, w - w % 2


def conform(frame: NDArray[np.uint8], size_hw: tuple[int, int]) -> NDArray[np.uint8]:
    """Downscale (area) if needed, then drop an odd last row/column."""
    h, w = size_hw
    if frame.shape[0] >= h + 2 or frame.shape[1] >= w + 2:
        frame = np.asarray(cv2.resize(frame, (w, h), interpolation=cv2.INTER_AREA), dtype=np.uint8)
    return np.ascontiguousarray(frame[:h, :w])


def upright(frame: NDArray[np.uint8], rotation_deg: float) -> NDArray[np.uint8]:
    """Apply a container's display rotation (phone videos) the way ffmpeg's autorotate does."""
    turn = int(round(rotation_deg / 90.0)) % 4  # counterclockwise quarter turns
    if turn == 0:
        return frame
    code = {1: cv2.ROTATE_90_COUNTERCLOCKWISE, 2: cv2.ROTATE_180, 3: cv2.ROTATE_90_CLOCKWISE}[turn]
    return np.ascontiguousarray(cv2.rotate(frame, code))


def check_readable(path: Path) -> None:
    """Raise InputError with one clear line for a missing, empty or unreadable path."""
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if not path.is_file():
        raise InputError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: file is empty")


def _read_photo(path: Path) -> NDArray[np.uint8] | None:
    data = np.fromfile(path, dtype=np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_COLOR)
    return None if img is None else np.asarray(img, dtype=np.uint8)


def _timed_frames(path: Path) -> tuple[_Frames, float | None, int | None]:
    """Decoded (time_s, BGR frame) pairs of the first video stream, its average rate and frame count."""
    import av

    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a readable video or image ({type(exc).__name__})") from None
    if container.format.name in _NOT_VIDEO_FORMATS:
        container.close()
        raise InputError(f"{path}: not a readable video or image (looks like a {container.format.name} file)")
    if not container.streams.video:
        container.close()
        raise InputError(f"{path}: no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    rate = float(stream.average_rate) if stream.average_rate else None
    n_hint = int(stream.frames) if stream.frames else None

    def frames() -> _Frames:
        period = 1.0 / (rate or 25.0)
        try:
            for k, frame in enumerate(container.decode(stream)):
                t = frame.time if frame.time is not None else k * period
                yield float(t), upright(np.asarray(frame.to_ndarray(format="bgr24"), dtype=np.uint8), frame.rotation)
        except av.FFmpegError as exc:
            raise InputError(f"{path}: video is corrupt or truncated ({type(exc).__name__}: {exc})") from None
        finally:
            container.close()

    return frames(), rate, n_hint


def probe_source(path: Path) -> str:
    """'photo' or 'video' if `path` yields at least one frame; else InputError (one clear line)."""
    check_readable(path)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        if _read_photo(path) is None:
            raise InputError(f"{path}: not a readable image")
        return "photo"
    frames, _, _ = _timed_frames(path)
    try:
        next(frames)
    except StopIteration:
        raise InputError(f"{path}: video has no decodable frames") from None
    finally:
        frames.close()
    return "video"


def read_source(
    path: Path,
    fps: int,
    max_side_px: int,
    emit: Callable[[NDArray[np.uint8]], None],
    on_progress: Callable[[int, int | None], None] | None = None,
) -> SourceInfo:
    """Decode `path`, resample to `fps`, conform sizes, and pass each output frame to `emit` in order.

    Streams: at most two decoded frames are held at a time. Raises InputError for anything unusable.
    on_progress(n_emitted, expected_total_or_None) is called after each emitted frame.
    """
    check_readable(path)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        img = _read_photo(path)
        if img is None:
            raise InputError(f"{path}: not a readable image")
        photo_hw = output_size_hw((img.shape[0], img.shape[1]), max_side_px)
        if min(photo_hw) < 2:
            raise InputError(f"{path}: image too small ({img.shape[1]}x{img.shape[0]})")
        emit(conform(img, photo_hw))
        if on_progress:
            on_progress(1, 1)
        return SourceInfo(path, "photo", None, 1, 1, photo_hw, (img.shape[0], img.shape[1]))

    frames, rate, n_hint = _timed_frames(path)
    expected = math.floor(n_hint / rate * fps) if n_hint and rate else None
    t0: float | None = None
    prev: tuple[float, NDArray[np.uint8]] | None = None
    size: tuple[int, int] = (0, 0)
    src_hw: tuple[int, int] = (0, 0)
    n_src = 0
    k = 0
    for t_abs, img in frames:
        if t0 is None:
            t0 = t_abs
            src_hw = (img.shape[0], img.shape[1])
            size = output_size_hw(src_hw, max_side_px)
            if min(size) < 2:
                raise InputError(f"{path}: video frames too small ({img.shape[1]}x{img.shape[0]})")
        t = t_abs - t0
        n_src += 1
        if prev is not None:
            # Emit the previous frame for every output time closer to it than to this one.
            midpoint = (prev[0] + t) / 2
            while k / fps < midpoint - 1e-9:
                emit(conform(prev[1], size))
                k += 1
                if on_progress:
                    on_progress(k, expected)
        prev = (t, img)
    if prev is None:
        raise InputError(f"{path}: video has no decodable frames")
    # The last frame lasts one source period (or one output frame when the rate is unknown).
    end = prev[0] + 1.0 / (rate or fps)
    while k / fps < end - 1e-9 or k == 0:
        emit(conform(prev[1], size))
        k += 1
        if on_progress:
            on_progress(k, expected)
    return SourceInfo(path, "video", rate, n_src, k, size, src_hw)
