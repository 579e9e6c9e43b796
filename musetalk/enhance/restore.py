"""Batched GFPGAN restoration of aligned faces, motion-adaptive temporal smoothing, and a flicker figure."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import nn

MOUTH = list(range(48, 68))  # iBUG lip landmarks


class FaceRestorer:
    """Runs GFPGAN on (B, 512, 512, 3) BGR uint8 aligned crops, `batch_size` at a time, on the model's device.

    `net` is a GFPGANv1Clean, or any module with the same call: net(x in [-1, 1], fixed_noise=...) → same shape.
    """

    def __init__(self, net: nn.Module, batch_size: int = 8, fixed_noise: bool = True) -> None:
        self.net = net
        param = next(net.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.batch_size = batch_size
        # Stored noise maps make the output a function of the input alone: fresh noise per frame
        # (upstream's default) is itself a source of frame-to-frame flicker.
        self.fixed_noise = fixed_noise

    @torch.inference_mode()
    def restore_tensor(self, faces_rgb: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) RGB float in [0, 1] on the device → restored, same shape, float32 in [0, 1]."""
        outs = []
        for start in range(0, faces_rgb.shape[0], self.batch_size):
            x = faces_rgb[start : start + self.batch_size].to(self.device, self.dtype) * 2 - 1
            outs.append(((self.net(x, fixed_noise=self.fixed_noise).float() + 1) / 2).clamp(0, 1))
        return torch.cat(outs)

    def restore(self, crops_bgr: NDArray[np.uint8]) -> torch.Tensor:
        """(B, S, S, 3) BGR uint8 → (B, 3, S, S) RGB float32 in [0, 1] on the device."""
        x = torch.from_numpy(np.ascontiguousarray(crops_bgr)).to(self.device)
        x = x.flip(-1).permute(0, 3, 1, 2).float() / 255
        return self.restore_tensor(x)


def to_bgr_uint8(images: torch.Tensor) -> NDArray[np.uint8]:
    """(B, 3, S, S) RGB float in [0, 1] → (B, S, S, 3) BGR uint8 on the host."""
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).flip(-1)
    return np.ascontiguousarray(pixels.cpu().numpy())


class DetailSmoother:
    """Motion-adaptive temporal filter of the detail a restorer adds, in the aligned crop.

    detail_t = restored_t − source_t is blended with the previous frame's smoothed detail:
    where the source crop changes by `tau` grey levels or more (a moving mouth), the new detail is
    taken in full; where it is still, only `min_follow` of it, so frame-wise restoration noise on a
    still face is averaged away while motion is followed. Output = source_t + smoothed detail.
    """

    def __init__(self, tau: float = 12.0, min_follow: float = 0.2, blur_px: int = 9) -> None:
        self.tau = tau / 255.0
        self.min_follow = min_follow
        self.blur_px = blur_px | 1
        self._prev_grey: torch.Tensor | None = None
        self._detail: torch.Tensor | None = None

    def reset(self) -> None:
        """Forget the previous frame (no face, or a cut)."""
        self._prev_grey = self._detail = None

    def step(self, source: torch.Tensor, restored: torch.Tensor) -> torch.Tensor:
        """source, restored (3, S, S) float in [0, 1] → smoothed restored (3, S, S)."""
        grey = source.mean(dim=0, keepdim=True)
        detail = restored - source
        if self._prev_grey is not None and self._detail is not None:
            motion = F.avg_pool2d(
                (grey - self._prev_grey).abs()[None], self.blur_px, stride=1, padding=self.blur_px // 2
            )[0]
            follow = (motion / self.tau).clamp(self.min_follow, 1.0)
            detail = follow * detail + (1 - follow) * self._detail
        self._prev_grey, self._detail = grey, detail
        return (source + detail).clamp(0, 1)

    def run(self, sources: torch.Tensor, restored: torch.Tensor, keep: Sequence[bool]) -> torch.Tensor:
        """Filter a batch in order; keep[i] False resets the state before face i (a new shot or track)."""
        out = torch.empty_like(restored)
        for i in range(restored.shape[0]):
            if not keep[i]:
                self.reset()
            out[i] = self.step(sources[i], restored[i])
        return out


def mouth_box(landmarks: NDArray[np.floating], frame_hw: tuple[int, int], pad: float = 0.25) -> tuple[int, ...]:
    """(x0, y0, x1, y1) integer box around the lips, padded by `pad` of the lip width on every side."""
    lips = np.asarray(landmarks, dtype=np.float64)[MOUTH]
    (lx0, ly0), (lx1, ly1) = lips.min(axis=0), lips.max(axis=0)
    p = pad * (lx1 - lx0)
    h, w = frame_hw
    return (max(0, int(lx0 - p)), max(0, int(ly0 - p)), min(w, int(np.ceil(lx1 + p))), min(h, int(np.ceil(ly1 + p))))


class FlickerMeter:
    """Temporal-difference figures in the mouth box, in grey levels (0-255), averaged over frame pairs.

    source_td / output_td: mean |Y_t − Y_{t−1}| of each video inside the mouth box of frame t
    (talking moves the mouth, so the source is not 0); added: mean |(O_t − O_{t−1}) − (S_t − S_{t−1})|,
    the frame-to-frame change the restoration adds on top of the source's own (0 = none added).
    Pairs where either frame has no face are skipped.
    """

    def __init__(self) -> None:
        self._prev: tuple[NDArray[np.uint8], NDArray[np.uint8]] | None = None
        self.sums = {"source_td": 0.0, "output_td": 0.0, "added": 0.0}
        self.pairs = 0

    def add(self, source: NDArray[np.uint8], output: NDArray[np.uint8], box: tuple[int, ...] | None) -> None:
        """Feed the next frame (H, W, 3) of both videos and its mouth box (None = no face)."""
        prev, self._prev = self._prev, ((source, output) if box is not None else None)
        if prev is None or box is None:
            return
        x0, y0, x1, y1 = box
        if x1 <= x0 or y1 <= y0:
            return

        def grey(frame: NDArray[np.uint8]) -> NDArray[np.float32]:
            return np.asarray(frame[y0:y1, x0:x1], np.float32).mean(axis=2)

        ds = grey(source) - grey(prev[0])
        do = grey(output) - grey(prev[1])
        self.sums["source_td"] += float(np.abs(ds).mean())
        self.sums["output_td"] += float(np.abs(do).mean())
        self.sums["added"] += float(np.abs(do - ds).mean())
        self.pairs += 1

    def result(self) -> dict[str, float]:
        """{"pairs", "source_td", "output_td", "added"}; all 0 when no pair had a face."""
        n = max(1, self.pairs)
        return {"pairs": float(self.pairs), **{k: v / n for k, v in self.sums.items()}}


def mouth_flicker(
    source: Sequence[NDArray[np.uint8]],
    output: Sequence[NDArray[np.uint8]],
    boxes: Sequence[tuple[int, ...] | None],
) -> dict[str, float]:
    """FlickerMeter over two whole frame sequences with one mouth box (or None) per frame."""
    meter = FlickerMeter()
    for src, out, box in zip(source, output, boxes, strict=True):
        meter.add(src, out, box)
    return meter.result()
