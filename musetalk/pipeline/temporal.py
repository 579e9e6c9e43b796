"""Motion-adaptive temporal smoothing of generated faces across consecutive frames of one utterance.

MuseTalk renders each frame independently, so texture inside the mouth (teeth, lip edges) shimmers from
frame to frame even when the mouth barely moves. Each pixel of a new face is blended with the previous
smoothed face by a weight that falls off with how much that pixel changed:

    w = strength · exp(−|Δ| / MOTION_SCALE),   out = (1 − w) · face + w · previous_out

|Δ| is the grey-level change (0-255) of the pixel, blurred a little so the decision follows regions rather
than noise. A still region (small |Δ|: shimmer) is averaged over recent frames; a moving mouth (large |Δ|)
passes through almost unchanged, so articulation is not smeared. strength 0 = off (faces pass unchanged).
"""

from __future__ import annotations

import cv2
import numpy as np
from numpy.typing import NDArray

MOTION_SCALE = 12.0  # grey levels of change at which the smoothing weight falls to 1/e of `strength`


class TemporalSmoother:
    """Stateful per-utterance smoother: feed faces in frame order; `reset()` between utterances."""

    def __init__(self, strength: float, motion_scale: float = MOTION_SCALE) -> None:
        if not 0.0 <= strength < 1.0:
            raise ValueError(f"temporal smoothing strength must be in [0, 1), got {strength}")
        self.strength = strength
        self.motion_scale = motion_scale
        self._prev: NDArray[np.float32] | None = None  # (S, S, 3) last smoothed face

    def reset(self) -> None:
        """Forget the previous face (a new utterance, or a gap of non-generated frames)."""
        self._prev = None

    def __call__(self, face: NDArray[np.uint8]) -> NDArray[np.uint8]:
        """(S, S, 3) uint8 BGR face → smoothed face of the same shape (the first one passes unchanged)."""
        if self.strength <= 0.0:
            return face
        cur = face.astype(np.float32)
        if self._prev is None or self._prev.shape != cur.shape:
            self._prev = cur
            return face
        delta = np.abs(cur - self._prev).mean(axis=2)  # (S, S) grey-level change
        delta = cv2.GaussianBlur(delta, (0, 0), sigmaX=1.5)
        weight = (self.strength * np.exp(-delta / self.motion_scale))[..., None]  # (S, S, 1)
        out = (1.0 - weight) * cur + weight * self._prev
        self._prev = out
        return np.clip(out + 0.5, 0, 255).astype(np.uint8)
