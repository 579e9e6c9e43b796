"""DWPose (RTMPose-l whole-body, mmpose): upstream MuseTalk's landmark source, for crop parity.

Optional and GPU-host only: mmpose/mmcv do not install cleanly on CPU CI. Never
imported unless `prep.detector: dwpose` is chosen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from musetalk.errors import PluginUnavailable, WeightsMissing
from musetalk.faces.base import DetectorBase

# COCO-WholeBody: 17 body + 6 feet keypoints come first, then the 68 face points.
FACE_SLICE = slice(23, 91)
MIN_FACE_SCORE = 0.3  # mean face-keypoint score below this = no face (upstream used S3FD for that)
CONFIG_RELPATH = Path(
    ".mim/configs/wholebody_2d_keypoint/rtmpose/ubody/rtmpose-l_8xb32-270e_coco-ubody-wholebody-384x288.py"
)

INSTALL_RECIPE = """DWPose needs mmpose, which is not installed. Recipe that works:
  pip install -c constraints.txt mmengine==0.10.7 "setuptools<81" wheel ninja
  MMCV_WITH_OPS=1 MAX_JOBS=4 pip install --no-build-isolation -c constraints.txt mmcv==2.1.0
  pip install -c constraints.txt mmdet==3.3.0
  pip install -c constraints.txt --no-deps mmpose==1.3.2
  pip install -c constraints.txt json_tricks munkres scipy
  pip install --force-reinstall --no-deps --no-binary xtcocotools xtcocotools
  (GPU hosts: install the matching CUDA torchvision; never install torchvision on a CPU-only torch)
then `make weights` for models/dwpose/dw-ll_ucoco_384.pth. Or use prep.detector=dlib / face_alignment."""


def default_config() -> Path:
    """The RTMPose-l wholebody config shipped inside the mmpose package."""
    import mmpose

    return Path(mmpose.__file__).parent / CONFIG_RELPATH


class DwposeDetector(DetectorBase):
    """Whole-image top-down DWPose; keypoints 23-90 are the 68 face points."""

    name = "dwpose"

    def __init__(self, checkpoint: Path, config: Path | None = None, device: str = "cuda") -> None:
        try:
            from mmpose.apis import inference_topdown, init_model
            from mmpose.structures import merge_data_samples
        except ImportError:
            raise PluginUnavailable(INSTALL_RECIPE) from None
        if not checkpoint.is_file():
            raise WeightsMissing([checkpoint])
        cfg_path = config or default_config()
        if not cfg_path.is_file():
            raise PluginUnavailable(f"mmpose config not found: {cfg_path}; set prep.dwpose_config")
        self._infer: Any = inference_topdown
        self._merge: Any = merge_data_samples
        self._model = init_model(str(cfg_path), str(checkpoint), device=device)
        self._files = [checkpoint]

    def detect(self, frame_bgr: NDArray[np.uint8]) -> NDArray[np.float32] | None:
        """(68, 2) face keypoints, or None when their mean score is low."""
        merged = self._merge(self._infer(self._model, frame_bgr))
        keypoints = np.asarray(merged.pred_instances.keypoints[0][FACE_SLICE], dtype=np.float32)
        scores = np.asarray(merged.pred_instances.keypoint_scores[0][FACE_SLICE], dtype=np.float32)
        return keypoints if float(scores.mean()) >= MIN_FACE_SCORE else None

    def weight_files(self) -> list[Path]:
        """The DWPose checkpoint."""
        return list(self._files)
