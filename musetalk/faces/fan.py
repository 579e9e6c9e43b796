"""face_alignment (S3FD detector + FAN 68-point landmarks), the seed's choice — weights from models/ only.

face_alignment fetches its weights through torch hub into `<hub dir>/checkpoints/`. We point the
hub dir at `models/face-alignment` for the duration of construction and refuse to start when a
file is missing, so it can never reach for the network.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from musetalk.errors import PluginUnavailable, WeightsMissing
from musetalk.faces.base import DetectorBase, largest
from musetalk.faces.tracking import FaceCandidate

# Names face_alignment 1.4-1.5 derives from its URLs (with torch versions it has no table for).
FAN_FILES = ("s3fd-619a316812.pth", "2DFAN4-cd938726ad.zip")
INSTALL_HINT = (
    "pip install face-alignment==1.5.0 (pulls opencv-python and numba; on CPU machines prefer "
    "prep.detector=dlib), then `make weights` for its files"
)


def fan_weight_files(hub_dir: Path) -> list[Path]:
    """The S3FD and FAN files face_alignment will look for under hub_dir/checkpoints."""
    return [hub_dir / "checkpoints" / name for name in FAN_FILES]


def fan_available(hub_dir: Path) -> bool:
    """True when face_alignment is installed and both weight files are present."""
    return importlib.util.find_spec("face_alignment") is not None and all(
        p.is_file() for p in fan_weight_files(hub_dir)
    )


class FaceAlignmentDetector(DetectorBase):
    """S3FD boxes + FAN landmarks; the largest face wins."""

    name = "face_alignment"

    def __init__(self, hub_dir: Path, device: str = "cpu") -> None:
        files = fan_weight_files(hub_dir)
        missing = [p for p in files if not p.is_file()]
        if missing:
            raise WeightsMissing(missing)
        try:
            import face_alignment
            import torch
        except ImportError:
            raise PluginUnavailable(
                f"prep.detector=face_alignment needs the face_alignment package: {INSTALL_HINT}"
            ) from None
        self._files = files
        landmarks_type: Any = getattr(face_alignment.LandmarksType, "TWO_D", None) or face_alignment.LandmarksType._2D
        previous = torch.hub.get_dir()
        torch.hub.set_dir(str(hub_dir))
        try:
            self._fa = face_alignment.FaceAlignment(
                landmarks_type, device=device, flip_input=False, face_detector="sfd"
            )
        finally:
            torch.hub.set_dir(previous)

    def detect(self, frame_bgr: NDArray[np.uint8]) -> NDArray[np.float32] | None:
        """(68, 2) landmarks of the largest face, or None."""
        rgb = cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2RGB)
        landmarks, _, boxes = self._fa.get_landmarks_from_image(rgb, return_bboxes=True)
        if not landmarks:
            return None
        best = largest(np.asarray(boxes)) if boxes is not None and len(boxes) == len(landmarks) else 0
        return np.asarray(landmarks[best], dtype=np.float32)[:, :2]

    def detect_faces(self, frame_bgr: NDArray[np.uint8]) -> list[FaceCandidate]:
        """Every S3FD face with its FAN landmarks and detection score."""
        rgb = cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2RGB)
        landmarks, _, boxes = self._fa.get_landmarks_from_image(rgb, return_bboxes=True)
        if not landmarks:
            return []
        scores = [float(b[4]) if b is not None and len(b) > 4 else 1.0 for b in (boxes or [None] * len(landmarks))]
        return [
            FaceCandidate(np.asarray(lm, dtype=np.float32)[:, :2], s) for lm, s in zip(landmarks, scores, strict=True)
        ]

    def weight_files(self) -> list[Path]:
        """S3FD and FAN files."""
        return list(self._files)
