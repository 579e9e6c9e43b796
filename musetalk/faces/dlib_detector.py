"""dlib HOG face detector + a 68-point shape predictor (by default the one in `face-recognition-models`).

Works on any machine with no weights folder at all: the predictor file comes with the pip package
(no download at run time). The package itself is never imported (it needs pkg_resources); its files are found
with importlib. The 68-point model is trained on iBUG 300-W (non-commercial terms).
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from musetalk.errors import PluginUnavailable, WeightsMissing
from musetalk.faces.base import DetectorBase
from musetalk.faces.tracking import FaceCandidate

PREDICTOR_FILE = "shape_predictor_68_face_landmarks.dat"
INSTALL_HINT = "pip install dlib-bin==20.0.1.post1 face-recognition-models==0.3.0 (both are in requirements.txt)"


def predictor_path() -> Path | None:
    """Path of the 68-point predictor inside the installed face_recognition_models package, or None."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / PREDICTOR_FILE
    return path if path.is_file() else None


def dlib_available() -> bool:
    """True when dlib imports would succeed and the predictor file is installed."""
    return importlib.util.find_spec("dlib") is not None and predictor_path() is not None


class DlibDetector(DetectorBase):
    """HOG detection on a downscaled grey copy, landmarks on the full-size grey frame."""

    name = "dlib"

    def __init__(self, detect_max_side_px: int = 640, predictor: Path | None = None) -> None:
        try:
            import dlib
        except ImportError:
            raise PluginUnavailable(f"the dlib face detector needs dlib: {INSTALL_HINT}") from None
        if predictor is None:
            found = predictor_path()
            if found is None:
                raise WeightsMissing([Path("face_recognition_models/models") / PREDICTOR_FILE], hint=INSTALL_HINT)
            path = found
        else:
            path = Path(predictor)
            if not path.is_file():
                raise WeightsMissing([path], hint="prep.dlib_predictor names a 68-point dlib predictor (.dat)")
        self._dlib: Any = dlib
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(str(path))
        parts = self._predictor(np.zeros((8, 8), np.uint8), dlib.rectangle(0, 0, 7, 7)).num_parts
        if parts != 68:
            raise ValueError(f"{path}: a {parts}-point shape predictor; the dlib detector needs 68")
        self._path = path
        self.detect_max_side_px = detect_max_side_px

    def sibling(self) -> DlibDetector:
        """A detector for another thread: its own HOG detector (which is not thread-safe: two threads on one
        crash the process), the same landmark model (read-only, safe to share; no second 100 MB load)."""
        twin = copy.copy(self)
        twin._detector = self._dlib.get_frontal_face_detector()
        return twin

    def _rects(self, gray: NDArray[np.uint8]) -> tuple[list[Any], list[float], float]:
        scale = min(1.0, self.detect_max_side_px / max(gray.shape))
        small = gray if scale >= 1.0 else cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        rects, scores, _ = self._detector.run(small, 0, 0.0)
        if not rects:
            # HOG finds faces down to ~80 px; one upsampling reaches ~40 px faces.
            rects, scores, _ = self._detector.run(small, 1, 0.0)
        return list(rects), [float(s) for s in scores], scale

    def _landmarks(self, gray: NDArray[np.uint8], small_rect: Any, scale: float) -> NDArray[np.float32]:
        rect = self._dlib.rectangle(
            int(round(small_rect.left() / scale)),
            int(round(small_rect.top() / scale)),
            int(round(small_rect.right() / scale)),
            int(round(small_rect.bottom() / scale)),
        )
        shape = self._predictor(gray, rect)
        return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float32)

    def detect(self, frame_bgr: NDArray[np.uint8]) -> NDArray[np.float32] | None:
        """(68, 2) landmarks of the largest face, or None."""
        gray = np.asarray(cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2GRAY), dtype=np.uint8)
        rects, _, scale = self._rects(gray)
        if not rects:
            return None
        return self._landmarks(gray, max(rects, key=lambda r: r.width() * r.height()), scale)

    def detect_faces(self, frame_bgr: NDArray[np.uint8]) -> list[FaceCandidate]:
        """Every HOG detection with its landmarks and SVM score."""
        gray = np.asarray(cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2GRAY), dtype=np.uint8)
        rects, scores, scale = self._rects(gray)
        return [FaceCandidate(self._landmarks(gray, r, scale), s) for r, s in zip(rects, scores, strict=True)]

    def weight_files(self) -> list[Path]:
        """The shape predictor file."""
        return [self._path]
