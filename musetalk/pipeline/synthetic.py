"""Synthetic in-memory avatars (for tests and benchmarks): no video, no face detection, no weights needed.

A textured background with a moving, slightly rolling face-like ellipse; the face box, crop affine,
hard lower-face mask and mask box follow the conventions of `musetalk.avatar.cache`. Latents are the
VAE encodings of the real crops when a VAE is given (as force_prep makes them), else random.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch
from numpy.typing import NDArray

from musetalk.avatar.cache import FACE_SIZE_PX, AvatarCache

if TYPE_CHECKING:
    from musetalk.models.nets_vae import AutoencoderKL


def crop_affine(center_xy: tuple[float, float], size_wh: tuple[float, float], roll_rad: float) -> NDArray[np.float32]:
    """2×3 map from crop px (u, v) ∈ [0, 256)² to frame px: scale to the box, rotate by roll about its centre."""
    sx, sy = size_wh[0] / FACE_SIZE_PX, size_wh[1] / FACE_SIZE_PX
    c, s = math.cos(roll_rad), math.sin(roll_rad)
    half = FACE_SIZE_PX / 2
    a = np.array([[c * sx, -s * sy], [s * sx, c * sy]], dtype=np.float64)
    t = np.array(center_xy, dtype=np.float64) - a @ np.array([half, half])
    return np.hstack([a, t[:, None]]).astype(np.float32)


def _texture(rng: np.random.Generator, h: int, w: int) -> NDArray[np.uint8]:
    noise = rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
    base = cv2.resize(noise, (w, h), interpolation=cv2.INTER_CUBIC)
    return np.asarray(cv2.addWeighted(base, 0.7, rng.integers(0, 256, (h, w, 3), dtype=np.uint8), 0.3, 0))


@torch.inference_mode()
def encode_crops(vae: AutoencoderKL, crops_bgr: NDArray[np.uint8], scale: float) -> torch.Tensor:
    """(N, 256, 256, 3) BGR crops → (N, 8, 32, 32) float32 [lower-half-masked ‖ full] latents × scale."""
    param = next(vae.parameters())
    rgb = torch.from_numpy(np.ascontiguousarray(crops_bgr[..., ::-1])).to(param.device)
    x = rgb.permute(0, 3, 1, 2).to(param.dtype) / 255.0  # (N, 3, 256, 256) in [0, 1]
    masked = x.clone()
    masked[:, :, FACE_SIZE_PX // 2 :, :] = 0
    out = []
    for img in (masked, x):
        out.append(vae.encode(img * 2 - 1) * scale)  # the posterior mean (= its mode)
    return torch.cat(out, dim=1).float().cpu()


def synthetic_avatar(
    n_frames: int = 8,
    height: int = 120,
    width: int = 160,
    seed: int = 0,
    roll_deg: float = 4.0,
    vae: AutoencoderKL | None = None,
    vae_scale: float = 0.18215,
    expand: float = 1.5,
    avatar_id: str = "synthetic",
    fps: int = 25,
) -> AvatarCache:
    """An AvatarCache of `n_frames` BGR frames (height × width) with a moving face; all arrays in memory."""
    rng = np.random.default_rng(seed)
    background = _texture(rng, height, width)
    face_w, face_h = 0.30 * height, 0.36 * height
    frames = np.empty((n_frames, height, width, 3), dtype=np.uint8)
    boxes = np.empty((n_frames, 4), dtype=np.float32)
    affines = np.empty((n_frames, 2, 3), dtype=np.float32)
    mask_boxes = np.empty((n_frames, 4), dtype=np.int32)
    landmarks = np.zeros((n_frames, 68, 2), dtype=np.float32)
    masks: list[NDArray[np.uint8]] = []
    crops = np.empty((n_frames, FACE_SIZE_PX, FACE_SIZE_PX, 3), dtype=np.uint8)
    skin = rng.integers(60, 200, 3).tolist()
    for i in range(n_frames):
        phase = 2 * math.pi * i / max(n_frames, 1)
        cx = width / 2 + 0.03 * width * math.sin(phase) + 0.37  # sub-pixel positions on purpose
        cy = height / 2 + 0.02 * height * math.cos(phase) + 0.21
        roll = math.radians(roll_deg) * math.sin(phase)
        frame = background.copy()
        axes = (int(face_w / 2), int(face_h / 2))
        cv2.ellipse(frame, (int(cx), int(cy)), axes, math.degrees(roll), 0, 360, skin, -1)
        mouth = (int(cx), int(cy + face_h * 0.22))
        cv2.ellipse(frame, mouth, (int(face_w * 0.18), max(1, int(face_h * 0.04))), math.degrees(roll), 0, 360,
                    (40, 30, 120), -1)
        for dx in (-0.18, 0.18):
            cv2.circle(frame, (int(cx + dx * face_w), int(cy - face_h * 0.12)), max(1, int(face_w * 0.05)),
                       (30, 30, 30), -1)
        frames[i] = frame
        boxes[i] = (cx - face_w / 2, cy - face_h / 2, cx + face_w / 2, cy + face_h / 2)
        affines[i] = crop_affine((cx, cy), (face_w, face_h), roll)
        side = max(face_w, face_h) * expand
        mx1, my1 = max(0, int(cx - side / 2)), max(0, int(cy - side / 2))
        mx2, my2 = min(width, int(math.ceil(cx + side / 2))), min(height, int(math.ceil(cy + side / 2)))
        mask_boxes[i] = (mx1, my1, mx2, my2)
        # Hard mask: lower half of the face ellipse (below the box centre), as in upstream's jaw region.
        m = np.zeros((my2 - my1, mx2 - mx1), dtype=np.uint8)
        cv2.ellipse(m, (int(cx - mx1), int(cy - my1)), (int(face_w * 0.45), int(face_h * 0.45)),
                    math.degrees(roll), 0, 360, 255, -1)
        m[: max(0, int(cy - my1)), :] = 0
        masks.append(m)
        crops[i] = cv2.warpAffine(frame, affines[i].astype(np.float64), (FACE_SIZE_PX, FACE_SIZE_PX),
                                  flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE)
        landmarks[i, :, 0] = np.linspace(boxes[i, 0], boxes[i, 2], 68)
        landmarks[i, :, 1] = np.linspace(boxes[i, 1], boxes[i, 3], 68)
    if vae is not None:
        latents = encode_crops(vae, crops, vae_scale)
    else:
        latents = torch.from_numpy(rng.standard_normal((n_frames, 8, 32, 32)).astype(np.float32))
    return AvatarCache(
        avatar_id=avatar_id,
        root=Path("."),
        fps=fps,
        frames=frames,
        landmarks=landmarks,
        boxes=boxes,
        face_to_frame=affines,
        masks=masks,
        mask_boxes=mask_boxes,
        latents=latents,
        manifest={"synthetic": True, "seed": seed},
    )
