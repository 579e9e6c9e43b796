"""Planar YUV frames for PyAV's encoders: filled without holding the GIL, or viewing the array itself."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    import av


def i420_video_frame(i420: NDArray[np.uint8]) -> av.VideoFrame:
    """A yuv420p VideoFrame from a planar (H·3/2, W) I420 array (cv2's COLOR_BGR2YUV_I420 layout).

    The planes are filled by numpy copies, which run without the GIL; PyAV's from_ndarray copies while
    holding it, which serialised every session's encoder feeding behind one lock.
    """
    import av

    rows, width = i420.shape
    height = rows * 2 // 3
    frame = av.VideoFrame(width, height, "yuv420p")
    flat = i420.reshape(-1)
    offset = 0
    sizes = ((height, width), (height // 2, width // 2), (height // 2, width // 2))
    for plane, (h, w) in zip(frame.planes, sizes, strict=True):
        dst = np.frombuffer(plane, np.uint8).reshape(h, plane.line_size)[:, :w]  # type: ignore[call-overload]
        np.copyto(dst, flat[offset : offset + h * w].reshape(h, w))
        offset += h * w
    return frame


def i420_frame_view(i420: NDArray[np.uint8]) -> av.VideoFrame:
    """A yuv420p VideoFrame that reads the (H·3/2, W) I420 array in place (no copy), for frames that are
    never modified while an encoder may still read them; a copy (i420_video_frame) if not contiguous."""
    import av

    if not i420.flags.c_contiguous:
        return i420_video_frame(i420)
    return av.VideoFrame.from_numpy_buffer(i420, format="yuv420p")
