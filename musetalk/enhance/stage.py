"""The optional server stage: GFPGAN on the generated lower half of MuseTalk's 256×256 face crops.

Contract (`MouthEnhancer.enhance`): (B, 256, 256, 3) BGR uint8 faces, as the face generator returns
them → enhanced faces of the same shape and dtype. Everything runs on the network's device in
batches of `batch_size`; only the rows the generator produced (below `upper_boundary_ratio` of the
crop, the part MuseTalk repaints) change, blended in with a feathered mask × `weight`; the upper
part of every face is returned bit-identical.

MuseTalk's crop is not GFPGAN's aligned template: the crop box (landmark x-extent, nose bridge to
chin doubled, plus the chin margin) is stretched to a square. `CROP_IN_TEMPLATE_PX` places that box
inside the 512² template; it was measured once by running the project's dlib detector on the
astronaut test photo (scikit-image) and mapping its MuseTalk box through its 5-point template
alignment (tests/test_enhance_stage.py re-measures it).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from musetalk.enhance.align import FACE_SIZE_PX
from musetalk.enhance.restore import FaceRestorer

CROP_PX = 256
CROP_IN_TEMPLATE_PX = (122.0, 117.0, 402.0, 506.0)  # x0, y0, x1, y1 of the MuseTalk crop box in the 512² template
UPPER_BOUNDARY_RATIO = 0.5  # upstream: the generator repaints the rows below half of the crop
FEATHER_PX = 12  # mask ramp width in crop px


def _norm(size: int) -> torch.Tensor:
    """3×3 map from pixel coordinates (OpenCV centres) to grid_sample's [-1, 1] (align_corners=False)."""
    s = 2.0 / size
    return torch.tensor([[s, 0.0, s / 2 - 1], [0.0, s, s / 2 - 1], [0.0, 0.0, 1.0]], dtype=torch.float64)


def _theta(dst_from_src_px: torch.Tensor, src_size: int, dst_size: int) -> torch.Tensor:
    """affine_grid theta (1, 2, 3) sampling a src image for each dst pixel, given src px → dst px."""
    src_from_dst = torch.linalg.inv(dst_from_src_px)
    return (_norm(src_size) @ src_from_dst @ torch.linalg.inv(_norm(dst_size)))[:2].float()[None]


def mouth_mask(
    size: int = CROP_PX, upper_ratio: float = UPPER_BOUNDARY_RATIO, feather_px: int = FEATHER_PX
) -> torch.Tensor:
    """(size, size) float in [0, 1]: 0 above the boundary row (exactly), ramping to 1 below it and inside the sides."""
    rows = torch.arange(size, dtype=torch.float32)
    top = ((rows - upper_ratio * size) / feather_px).clamp(0, 1)
    side = (torch.minimum(rows + 1, size - rows) / feather_px).clamp(0, 1)
    return top[:, None] * side[None, :]


class MouthEnhancer:
    """GFPGAN on the generated mouth region of 256² faces, batched on the restorer's device."""

    def __init__(self, restorer: FaceRestorer, weight: float = 0.5) -> None:
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"weight must be within [0, 1], got {weight}")
        self.restorer = restorer
        self.weight = weight
        x0, y0, x1, y1 = CROP_IN_TEMPLATE_PX
        crop_to_template = torch.tensor(
            [[(x1 - x0) / CROP_PX, 0.0, x0], [0.0, (y1 - y0) / CROP_PX, y0], [0.0, 0.0, 1.0]], dtype=torch.float64
        )
        device = restorer.device
        self._to_template = _theta(crop_to_template, CROP_PX, FACE_SIZE_PX).to(device)
        self._to_crop = _theta(torch.linalg.inv(crop_to_template), FACE_SIZE_PX, CROP_PX).to(device)
        self._mask = (mouth_mask() * weight).to(device)  # (256, 256)

    @torch.inference_mode()
    def enhance_tensor(self, faces_rgb: torch.Tensor) -> torch.Tensor:
        """(B, 3, 256, 256) RGB float in [0, 1] on the device → same, the generated rows restored."""
        b = faces_rgb.shape[0]
        grid = F.affine_grid(
            self._to_template.expand(b, -1, -1), [b, 3, FACE_SIZE_PX, FACE_SIZE_PX], align_corners=False
        )
        aligned = F.grid_sample(faces_rgb, grid, mode="bilinear", padding_mode="border", align_corners=False)
        restored = self.restorer.restore_tensor(aligned)
        grid = F.affine_grid(self._to_crop.expand(b, -1, -1), [b, 3, CROP_PX, CROP_PX], align_corners=False)
        back = F.grid_sample(restored, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return faces_rgb + self._mask * (back - faces_rgb)

    @torch.inference_mode()
    def enhance_device(self, faces_bgr: torch.Tensor) -> torch.Tensor:
        """(B, 256, 256, 3) BGR uint8 on the restorer's device → enhanced, same; rows above the boundary unchanged."""
        if faces_bgr.ndim != 4 or tuple(faces_bgr.shape[1:]) != (CROP_PX, CROP_PX, 3):
            raise ValueError(f"expected (B, {CROP_PX}, {CROP_PX}, 3) faces, got {tuple(faces_bgr.shape)}")
        if self.weight == 0 or faces_bgr.shape[0] == 0:
            return faces_bgr.clone()
        rgb = faces_bgr.flip(-1).permute(0, 3, 1, 2).float() / 255
        out = (self.enhance_tensor(rgb).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).flip(-1)
        # Exactly the input where the mask is 0 (float round trips of 8-bit values are exact, but say so).
        boundary = int(np.ceil(UPPER_BOUNDARY_RATIO * CROP_PX))
        out[:, :boundary] = faces_bgr[:, :boundary]
        return out.contiguous()

    def enhance(self, faces_bgr: NDArray[np.uint8]) -> NDArray[np.uint8]:
        """(B, 256, 256, 3) BGR uint8 → enhanced, same shape; rows above the boundary are unchanged."""
        x = torch.from_numpy(np.ascontiguousarray(faces_bgr)).to(self.restorer.device)
        return np.ascontiguousarray(self.enhance_device(x).cpu().numpy())
