"""Face parsing → blend masks: BiSeNet (upstream) and a weight-free landmark parser.

Both produce a CelebAMask-HQ label map of the 512×512 square crop and share one label → mask step
that reproduces upstream's `jaw` and `raw` modes exactly.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import torch
from numpy.typing import NDArray

from musetalk.faces.base import BROWS, INNER_LIPS, JAW, LEFT_EYE, NOSE, OUTER_LIPS, RIGHT_EYE

PARSE_SIZE_PX = 512  # upstream parses every crop at 512×512; cheek widths are in these pixels

# CelebAMask-HQ labels
SKIN, L_BROW, R_BROW, L_EYE, R_EYE = 1, 2, 3, 4, 5
NOSE_LABEL, MOUTH, U_LIP, L_LIP = 10, 11, 12, 13
RAW_LABELS = (SKIN, MOUTH, U_LIP, L_LIP)
# raw + the nose: upstream maintainers' fix for nostrils misaligned after the paste (the nose comes from the model).
RAW_NOSE_LABELS = (*RAW_LABELS, NOSE_LABEL)
LIP_LABELS = (MOUTH, U_LIP, L_LIP)

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@lru_cache(maxsize=1)
def jaw_kernel() -> NDArray[np.uint8]:
    """Upstream's 33×33 dilation kernel: rows 10-20 a centred triangle (widths 1…21), rows 21-32 a 21-wide bar."""
    cone_h, tail_h = 21, 12
    size = cone_h + tail_h
    kernel = np.zeros((size, size), dtype=np.uint8)
    centre = size // 2
    for row in range(cone_h // 2, cone_h):
        half = row - cone_h // 2
        kernel[row, centre - half : centre + half + 1] = 1
    base_half = int(kernel[cone_h - 1].sum()) // 2
    kernel[cone_h:, max(0, centre - base_half) : min(size, centre + base_half + 1)] = 1
    return kernel


def cheek_mask(left_cheek_width: int, right_cheek_width: int, size_px: int = PARSE_SIZE_PX) -> NDArray[np.uint8]:
    """255 on the two side bands x ≤ c − left and x ≥ c + right (c = size/2), full height; else 0."""
    mask = np.zeros((size_px, size_px), dtype=np.uint8)
    centre = size_px // 2
    mask[:, : max(0, centre - left_cheek_width + 1)] = 255
    mask[:, min(size_px, centre + right_cheek_width) :] = 255
    return mask


@lru_cache(maxsize=1)
def cheek_erode_kernel() -> NDArray[np.uint8]:
    """Upstream's "flatter" horizontal ellipse (35×3) that erodes the cheeks."""
    return np.asarray(cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (35, 3)), dtype=np.uint8)


def labels_to_mask(
    labels: NDArray[np.integer], mode: str, left_cheek_width: int, right_cheek_width: int
) -> NDArray[np.uint8]:
    """Label map (S, S) → 0/255 mask. raw: skin + mouth + lips; raw_nose: raw + nose. jaw: skin dilated by the
    jaw kernel in the central band and eroded on the cheeks, minus the nose, plus mouth and lips."""
    lab = np.asarray(labels)
    if mode in ("raw", "raw_nose"):
        return np.where(np.isin(lab, RAW_LABELS if mode == "raw" else RAW_NOSE_LABELS), 255, 0).astype(np.uint8)
    if mode != "jaw":
        raise ValueError(f"unknown parsing mode {mode!r}; choose jaw, raw or raw_nose")
    skin = np.where(lab == SKIN, 255, 0).astype(np.uint8)
    dilated = cv2.dilate(skin, jaw_kernel(), iterations=1)
    eroded = cv2.erode(dilated, cheek_erode_kernel(), iterations=2)
    cheeks = cheek_mask(left_cheek_width, right_cheek_width, lab.shape[0])
    region = cv2.bitwise_or(cv2.bitwise_and(eroded, cheeks), cv2.bitwise_and(dilated, cv2.bitwise_not(cheeks)))
    keep = ((region == 255) & (lab != NOSE_LABEL)) | np.isin(lab, LIP_LABELS)
    return np.where(keep, 255, 0).astype(np.uint8)


def keep_upper_lip(mask: NDArray[np.uint8], landmarks: NDArray[np.floating]) -> NDArray[np.uint8]:
    """Clear the (S, S) mask above the line where the lips meet (inner upper lip 60-64, extended sideways), so
    the upper lip and philtrum are pasted from the source and only the lower lip and jaw are generated."""
    lm = np.asarray(landmarks, dtype=np.float64)
    line = lm[[60, 61, 62, 63, 64]]
    size = mask.shape[1]
    cols = np.arange(size) + 0.5
    xs = np.concatenate([[0.0], line[:, 0], [float(size)]])
    ys = np.concatenate([[line[0, 1]], line[:, 1], [line[-1, 1]]])
    order = np.argsort(xs, kind="stable")
    limit = np.interp(cols, xs[order], ys[order])  # (S,) first kept row per column
    rows = np.arange(mask.shape[0])[:, None] + 0.5
    return np.where(rows >= limit[None, :], mask, 0).astype(np.uint8)


class BiSeNetParser:
    """BiSeNet (79999_iter.pth) label maps, batched on the model's device."""

    name = "bisenet"

    def __init__(
        self,
        net: torch.nn.Module,
        mode: str,
        left_cheek_width: int,
        right_cheek_width: int,
        weights: Path | None = None,
    ) -> None:
        self.net = net.eval()
        self.mode = mode
        self.left_cheek_width = left_cheek_width
        self.right_cheek_width = right_cheek_width
        self._weights = weights
        param = next(net.parameters())
        self.device, self.dtype = param.device, param.dtype

    @torch.inference_mode()
    def labels(self, crops_bgr: NDArray[np.uint8]) -> NDArray[np.int64]:
        """(B, S, S, 3) BGR uint8 → (B, S, S) int64 class labels."""
        x = torch.from_numpy(np.ascontiguousarray(crops_bgr[..., ::-1])).to(self.device)
        x = x.permute(0, 3, 1, 2).to(self.dtype) / 255.0
        mean = torch.tensor(_IMAGENET_MEAN, device=self.device, dtype=self.dtype).view(1, 3, 1, 1)
        std = torch.tensor(_IMAGENET_STD, device=self.device, dtype=self.dtype).view(1, 3, 1, 1)
        logits = self.net((x - mean) / std)
        return logits.argmax(dim=1).cpu().numpy().astype(np.int64)

    def parse(self, crops_bgr: NDArray[np.uint8], landmarks: NDArray[np.float32]) -> NDArray[np.uint8]:
        """(B, S, S, 3) crops → (B, S, S) 0/255 masks in the configured mode (landmarks unused)."""
        labels = self.labels(crops_bgr)
        return np.stack(
            [labels_to_mask(lab, self.mode, self.left_cheek_width, self.right_cheek_width) for lab in labels]
        )

    def weight_files(self) -> list[Path]:
        """79999_iter.pth."""
        return [self._weights] if self._weights is not None else []


def landmark_labels(landmarks: NDArray[np.floating], size_px: int) -> NDArray[np.uint8]:
    """A coarse CelebAMask-HQ label map drawn from 68 landmarks: skin, brows, eyes, nose, lips, mouth."""
    lm = np.asarray(landmarks, dtype=np.float64)
    # Draw with 4 fractional bits so sub-pixel landmark positions move the edges smoothly.
    shift = 4

    def poly(idx: list[int]) -> NDArray[np.int32]:
        return np.round(lm[idx] * (1 << shift)).astype(np.int32)

    labels = np.zeros((size_px, size_px), dtype=np.uint8)
    outline = JAW + BROWS[::-1]  # jaw line, closed over the brows
    cv2.fillPoly(labels, [poly(outline)], SKIN, lineType=cv2.LINE_8, shift=shift)
    cv2.fillPoly(labels, [poly(BROWS[:5])], L_BROW, shift=shift)
    cv2.fillPoly(labels, [poly(BROWS[5:])], R_BROW, shift=shift)
    cv2.fillPoly(labels, [poly(LEFT_EYE)], L_EYE, shift=shift)
    cv2.fillPoly(labels, [poly(RIGHT_EYE)], R_EYE, shift=shift)
    # nose: bridge top, down the left wing, across the nostrils, up the right wing
    cv2.fillPoly(labels, [poly([NOSE[0], NOSE[4], NOSE[5], NOSE[6], NOSE[7], NOSE[8]])], NOSE_LABEL, shift=shift)
    cv2.fillPoly(labels, [poly(OUTER_LIPS)], U_LIP, shift=shift)
    cv2.fillPoly(labels, [poly(INNER_LIPS)], MOUTH, shift=shift)
    return labels


class LandmarkParser:
    """Weight-free parser: labels drawn from the landmarks, then the same jaw/raw rules as BiSeNet."""

    name = "landmarks"

    def __init__(self, mode: str, left_cheek_width: int, right_cheek_width: int) -> None:
        self.mode = mode
        self.left_cheek_width = left_cheek_width
        self.right_cheek_width = right_cheek_width

    def parse(self, crops_bgr: NDArray[np.uint8], landmarks: NDArray[np.float32]) -> NDArray[np.uint8]:
        """(B, S, S, 3) crops (unused) + (B, 68, 2) crop-px landmarks → (B, S, S) 0/255 masks."""
        size = crops_bgr.shape[1]
        return np.stack(
            [
                labels_to_mask(landmark_labels(lm, size), self.mode, self.left_cheek_width, self.right_cheek_width)
                for lm in landmarks
            ]
        )

    def weight_files(self) -> list[Path]:
        """None: landmarks only."""
        return []
