"""Blending on the GPU: generated faces pasted into avatar frames and converted to I420 on the device.

With many sessions the CPU blend pool was the server's limit: every 1080p frame took ~20 numpy/OpenCV calls,
each giving the GIL back and waiting for it again, so a 2 ms paste took 20–30 ms of wall time once sixteen
sessions blended at once. Here the whole batch is pasted with a few tensor operations right after the
decoder, on the scheduler's GPU thread, and only the finished I420 planes (what x264 takes) cross to the host.

Same pixels as the CPU path (pipeline/blend.py, feather mode), by construction:
- the alpha maps are the CPU Blender's own (the same Gaussian feather × coverage, the same shrunken region);
- outside a frame's alpha region every pixel is the source frame's, bit for bit;
- I420 uses OpenCV's integer BT.601 arithmetic exactly (Y per pixel, U/V from the top-left pixel of each
  2×2 block), so generated and silent (CPU-converted) frames of one clip match;
- placement is bilinear sampling of the 256² face at the same source coordinates as cv2.warpAffine /
  cv2.resize; OpenCV quantises those coordinates to 1/32 px, so the pasted face differs by a level or two.
Colour matching, Poisson blending and temporal smoothing stay on the CPU path (`supports`).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from musetalk.avatar.cache import FACE_SIZE_PX, AvatarCache
from musetalk.config import BlendConfig
from musetalk.pipeline.blend import Blender, rounded_box

_MAX_AVATARS = 4  # avatars whose frames stay on the device (a 1080p frame is 6 MB)
# OpenCV's RGB → YUV (BT.601, limited range) in 20-bit fixed point.
_SHIFT = 20
_Y = (269484, 528482, 102760)  # r, g, b
_U = (-155188, -305135, 460324)
_V = (460324, -385875, -74448)


def host_to_device(values: Sequence[float] | Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small list as a device tensor without a stream sync (a pageable host→device copy waits for the GPU)."""
    t = torch.tensor(list(values), dtype=dtype)
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def weight_scale(weight: float) -> float:
    """What alpha (uint8 values) is multiplied by for a face weight, as blend.composite does: weight / 255."""
    return min(max(weight, 0.0), 1.0) / 255.0


def supports(cfg: BlendConfig) -> bool:
    """Whether the device path produces what the CPU path would for this blend config."""
    return cfg.blend_mode == "feather" and not cfg.color_match and cfg.temporal_smoothing == 0


def bgr_to_i420(frames: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 BGR, H and W even → (B, H·3/2, W) uint8 I420, bit-identical to cv2.COLOR_BGR2YUV_I420."""
    b, h, w, _ = frames.shape
    px = frames.to(torch.int32)
    blue, green, red = px[..., 0], px[..., 1], px[..., 2]
    half = 1 << (_SHIFT - 1)
    y = (_Y[0] * red + _Y[1] * green + _Y[2] * blue + ((16 << _SHIFT) + half)) >> _SHIFT  # (B, H, W)
    r2, g2, b2 = red[:, ::2, ::2], green[:, ::2, ::2], blue[:, ::2, ::2]  # OpenCV takes the top-left pixel
    u = (_U[0] * r2 + _U[1] * g2 + _U[2] * b2 + ((128 << _SHIFT) + half)) >> _SHIFT  # (B, H/2, W/2)
    v = (_V[0] * r2 + _V[1] * g2 + _V[2] * b2 + ((128 << _SHIFT) + half)) >> _SHIFT
    planes = torch.cat([y.reshape(b, -1), u.reshape(b, -1), v.reshape(b, -1)], dim=1)
    return planes.clamp_(0, 255).to(torch.uint8).reshape(b, h * 3 // 2, w)


@dataclass
class _DeviceAvatar:
    """One avatar's frames and paste geometry on the device; frames and alphas are uploaded as first used."""

    cache: AvatarCache
    frames: torch.Tensor  # (N, H, W, 3) uint8 BGR, cropped to even H and W
    loaded: np.ndarray  # (N,) bool: which rows of `frames` and `alpha` are on the device yet
    origin: torch.Tensor  # (N, 2) int64: top-left (x, y) of each frame's paste window
    origin_host: np.ndarray  # (N, 2) int64: the same, on the host
    alpha: torch.Tensor  # (N, Rh, Rw) float32: the CPU blender's alpha (0..255) inside the window, 0 elsewhere
    # (Rh, Rw) = the avatar's largest mask box: every frame's alpha region lies inside its own mask box.
    to_face: torch.Tensor  # (N, 2, 3) float32: window-pixel (j, i, 1) → face pixel (x, y) it samples


class DeviceCompositor:
    """Pastes batches of faces into avatar frames on one device and returns I420 frames; used by one thread."""

    def __init__(self, cfg: BlendConfig, expand: float, device: torch.device) -> None:
        if not supports(cfg):
            raise ValueError("device compositing needs feather blending without colour matching or temporal smoothing")
        self.cfg = cfg
        self.device = device
        self._blender = Blender(cfg, expand)  # the alpha maps, computed exactly as the CPU path does
        self._avatars: dict[int, _DeviceAvatar] = {}
        self._lock = threading.Lock()
        self.frames_composed = 0  # since start

    def frame_size_hw(self, cache: AvatarCache) -> tuple[int, int]:
        """Size of the frames `compose` returns for this avatar (odd sizes lose their last row/column)."""
        h, w = cache.frame_size_hw
        return h - h % 2, w - w % 2

    def _avatar(self, cache: AvatarCache) -> _DeviceAvatar:
        with self._lock:
            hit = self._avatars.get(id(cache))
            if hit is not None and hit.cache is cache:
                return hit
        n = cache.n_frames
        fh, fw = cache.frame_size_hw
        # One window size for the avatar: its largest mask box (every frame's alpha region lies in its box).
        boxes = np.asarray(cache.mask_boxes, dtype=np.int64).reshape(n, 4)  # (N, 4) x1, y1, x2, y2
        rh = min(fh, max(1, int((boxes[:, 3] - boxes[:, 1]).max())))
        rw = min(fw, max(1, int((boxes[:, 2] - boxes[:, 0]).max())))
        origin = np.zeros((n, 2), np.int64)
        to_face = np.zeros((n, 2, 3), np.float64)
        for i, (x1, y1, _, _) in enumerate(boxes):
            ox, oy = max(0, min(int(x1), fw - rw)), max(0, min(int(y1), fh - rh))  # the window lies in the frame
            origin[i] = ox, oy
            to_face[i] = _window_to_face(cache, i, (ox, oy), self.cfg.subpixel_enabled)
        h2, w2 = fh - fh % 2, fw - fw % 2
        entry = _DeviceAvatar(
            cache=cache,
            frames=torch.empty((n, h2, w2, 3), dtype=torch.uint8, device=self.device),
            loaded=np.zeros(n, dtype=bool),
            origin=torch.from_numpy(origin).to(self.device),
            origin_host=origin,
            alpha=torch.zeros((n, rh, rw), dtype=torch.float32, device=self.device),
            to_face=torch.from_numpy(to_face.astype(np.float32)).to(self.device),
        )
        with self._lock:
            if len(self._avatars) >= _MAX_AVATARS:
                self._avatars.clear()
            self._avatars[id(cache)] = entry
        return entry

    def _frames(self, avatar: _DeviceAvatar, source_ids: list[int], ids: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 copies of the source frames on the device (uploading any not there yet).

        A frame and its alpha map go to the device when first used (a 250-frame avatar's blurred masks take
        about half a second to compute, which no single request should wait for)."""
        h, w = avatar.frames.shape[1:3]
        for i in sorted(set(source_ids)):
            if not avatar.loaded[i]:
                frame = np.ascontiguousarray(avatar.cache.frames[i][:h, :w])  # (H, W, 3) uint8
                avatar.frames[i].copy_(torch.from_numpy(frame))
                fa = self._blender.frame_alpha(avatar.cache, i)
                x1, y1, x2, y2 = fa.region
                ox, oy = (int(v) for v in avatar.origin_host[i])
                if x2 > x1 and y2 > y1:
                    alpha = torch.from_numpy(fa.alpha.astype(np.float32))  # (h, w) values 0..255
                    avatar.alpha[i, y1 - oy : y2 - oy, x1 - ox : x2 - ox].copy_(alpha)
                avatar.loaded[i] = True
        return avatar.frames.index_select(0, ids)

    def compose(
        self,
        cache: AvatarCache,
        faces: torch.Tensor,
        source_ids: list[int],
        weights: list[float] | None = None,
        *,
        device_ids: torch.Tensor | None = None,
        device_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, 256, 256, 3) uint8 BGR faces (device) pasted into source frames `source_ids` with `weights`
        (0 = source untouched, 1 = full face) → (B, H·3/2, W) uint8 I420 on the device.

        `device_ids` / `device_scale`: the source ids and the `weight_scale`s already on the device (a caller
        batching its transfers), instead of `weights`.
        """
        b = len(source_ids)
        if faces.shape[1:] != (FACE_SIZE_PX, FACE_SIZE_PX, 3) or faces.shape[0] != b:
            raise ValueError(f"faces {tuple(faces.shape)} for {b} frames")
        ids = host_to_device(source_ids, torch.long, self.device) if device_ids is None else device_ids
        if device_scale is None:
            if weights is None or len(weights) != b:
                raise ValueError(f"{b} frames need {b} weights")
            device_scale = host_to_device([weight_scale(w) for w in weights], torch.float32, self.device)
        avatar = self._avatar(cache)
        frames = self._frames(avatar, source_ids, ids)  # (B, H, W, 3)
        rh, rw = avatar.alpha.shape[1:]
        origin = avatar.origin.index_select(0, ids)  # (B, 2)
        ys = origin[:, 1:2] + torch.arange(rh, device=self.device)  # (B, Rh)
        xs = origin[:, 0:1] + torch.arange(rw, device=self.device)  # (B, Rw)
        rows = torch.arange(b, device=self.device)[:, None, None]
        window = frames[rows, ys[:, :, None], xs[:, None, :]].float()  # (B, Rh, Rw, 3)

        # Where each window pixel samples the face, normalised for grid_sample (pixel centres at ±1).
        m = avatar.to_face.index_select(0, ids)  # (B, 2, 3)
        j = torch.arange(rw, device=self.device, dtype=torch.float32)[None, None, :]
        i = torch.arange(rh, device=self.device, dtype=torch.float32)[None, :, None]
        fx = m[:, 0, 0, None, None] * j + m[:, 0, 1, None, None] * i + m[:, 0, 2, None, None]  # (B, Rh, Rw)
        fy = m[:, 1, 0, None, None] * j + m[:, 1, 1, None, None] * i + m[:, 1, 2, None, None]
        grid = torch.stack([fx, fy], dim=-1) * (2.0 / (FACE_SIZE_PX - 1)) - 1.0  # (B, Rh, Rw, 2)
        src = faces.permute(0, 3, 1, 2).float()  # (B, 3, 256, 256)
        placed = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=True)
        placed = placed.permute(0, 2, 3, 1).round_()  # (B, Rh, Rw, 3): OpenCV's warp returns uint8 too

        alpha = avatar.alpha.index_select(0, ids) * device_scale[:, None, None]
        out = (window + (placed - window) * alpha[..., None]).round_().to(torch.uint8)  # as blend.composite
        frames[rows, ys[:, :, None], xs[:, None, :]] = out
        self.frames_composed += b
        return bgr_to_i420(frames)


def _window_to_face(cache: AvatarCache, index: int, origin_xy: tuple[int, int], subpixel: bool) -> np.ndarray:
    """(2, 3) affine: window pixel (j, i) → the face pixel the CPU blender samples for frame pixel (ox+j, oy+i)."""
    ox, oy = origin_xy
    if subpixel:
        # cv2.warpAffine samples the face at inverse(face_to_frame) · (x, y).
        fwd = np.vstack([np.asarray(cache.face_to_frame[index], dtype=np.float64), [0.0, 0.0, 1.0]])
        inv = np.linalg.inv(fwd)[:2]
    else:
        # cv2.resize of the face into the rounded box: x_face = (x − x1 + 0.5)·256/box_w − 0.5.
        x1, y1, x2, y2 = rounded_box(cache.boxes[index])
        sx, sy = FACE_SIZE_PX / (x2 - x1), FACE_SIZE_PX / (y2 - y1)
        inv = np.array([[sx, 0.0, (0.5 - x1) * sx - 0.5], [0.0, sy, (0.5 - y1) * sy - 0.5]])
    shift = np.array([[1.0, 0.0, ox], [0.0, 1.0, oy], [0.0, 0.0, 1.0]])  # window → frame coordinates
    return np.asarray(inv @ shift)
