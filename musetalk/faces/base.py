"""Plugin interfaces: a face detector gives 68 iBUG landmarks, a face parser gives a blend mask."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from musetalk.faces.tracking import FaceCandidate

N_LANDMARKS = 68
JAW = list(range(0, 17))
BROWS = list(range(17, 27))
NOSE = list(range(27, 36))
LEFT_EYE = list(range(36, 42))  # image-left eye
RIGHT_EYE = list(range(42, 48))
OUTER_LIPS = list(range(48, 60))
INNER_LIPS = list(range(60, 68))


@runtime_checkable
class FaceDetector(Protocol):
    """Finds the main face in a BGR frame and returns its 68 landmarks (iBUG order, frame px)."""

    name: str

    def detect(self, frame_bgr: NDArray[np.uint8]) -> NDArray[np.float32] | None:
        """(68, 2) float32 landmarks of the largest face, or None when there is no face."""
        ...

    def detect_batch(self, frames_bgr: Sequence[NDArray[np.uint8]]) -> list[NDArray[np.float32] | None]:
        """detect() for several frames (GPU detectors batch them)."""
        ...

    def detect_faces(self, frame_bgr: NDArray[np.uint8]) -> list[FaceCandidate]:
        """Every face found in the frame (any order), for the tracker to choose from."""
        ...

    def weight_files(self) -> list[Path]:
        """Model files whose content shapes the landmarks (recorded in the avatar manifest)."""
        ...


@runtime_checkable
class FaceParser(Protocol):
    """Turns square face crops into 0/255 blend masks (parsing mode applied, not yet box-limited)."""

    name: str

    def parse(self, crops_bgr: NDArray[np.uint8], landmarks: NDArray[np.float32]) -> NDArray[np.uint8]:
        """crops (B, S, S, 3) BGR uint8 + landmarks (B, 68, 2) in crop px → masks (B, S, S) uint8 0/255."""
        ...

    def weight_files(self) -> list[Path]:
        """Model files whose content shapes the masks (recorded in the avatar manifest)."""
        ...


class DetectorBase:
    """detect_batch as a loop over detect(); detectors that can batch override it."""

    name = "base"

    def detect(self, frame_bgr: NDArray[np.uint8]) -> NDArray[np.float32] | None:
        """Subclasses implement this."""
        raise NotImplementedError

    def detect_batch(self, frames_bgr: Sequence[NDArray[np.uint8]]) -> list[NDArray[np.float32] | None]:
        """detect() each frame in turn."""
        return [self.detect(f) for f in frames_bgr]

    def detect_faces(self, frame_bgr: NDArray[np.uint8]) -> list[FaceCandidate]:
        """The one face detect() returns (detectors that see several faces override this)."""
        lm = self.detect(frame_bgr)
        return [] if lm is None else [FaceCandidate(np.asarray(lm, dtype=np.float32).reshape(68, 2))]

    def weight_files(self) -> list[Path]:
        """No weight files by default."""
        return []


def largest(boxes_xyxy: NDArray[np.floating]) -> int:
    """Index of the box with the largest area among (K, >=4) x1, y1, x2, y2 rows."""
    b = np.asarray(boxes_xyxy, dtype=np.float64)
    return int(np.argmax((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])))
