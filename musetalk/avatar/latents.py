"""VAE latents of face crops in MuseTalk's 8-channel UNet input layout.

Deterministic: encodes with the posterior mean (upstream inference samples, unseeded; v1.5
training uses the mean), so re-preparing an avatar gives the same cache.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import torch
from numpy.typing import NDArray

from musetalk.errors import ConfigError
from musetalk.faces.tracking import closed_mouth_frame

if TYPE_CHECKING:
    from musetalk.avatar.cache import AvatarCache
    from musetalk.models.nets_vae import AutoencoderKL

REFERENCE_CHANNELS = slice(4, 8)  # the UNet input is [masked lower half ‖ reference]: channels 4-7


def reference_index(cache: AvatarCache, choice: str) -> int | None:
    """The source frame every UNet call should use as its reference, or None for upstream's same-frame rule."""
    if choice == "same_frame":
        return None
    if choice == "closed_mouth":
        recorded = cache.manifest.get("tracking", {}).get("closed_mouth_frame")
        return int(recorded) if recorded is not None else closed_mouth_frame(cache.landmarks)
    match = re.fullmatch(r"fixed:(\d+)", choice)
    if match is None:
        raise ConfigError(f"prep.reference_frame: {choice!r}; choose same_frame, closed_mouth or fixed:<frame>")
    index = int(match.group(1))
    if index >= cache.n_frames:
        raise ConfigError(
            f"prep.reference_frame: frame {index} asked for, avatar {cache.avatar_id!r} has {cache.n_frames}"
        )
    return index


def with_reference(cache: AvatarCache, choice: str) -> AvatarCache:
    """The cache with channels 4-7 of every latent replaced by one frame's reference latent (see reference_index).

    Upstream feeds each frame's own unmasked face as the reference, so the source mouth shape leaks into
    the generated one; a single closed-mouth reference removes that leak. Preview caches have no latents.
    """
    index = reference_index(cache, choice)
    if index is None or cache.latents is None:
        return cache
    latents = cache.latents.clone()
    latents[:, REFERENCE_CHANNELS] = cache.latents[index, REFERENCE_CHANNELS]
    return replace(cache, latents=latents)


@torch.inference_mode()
def encode_crops(
    vae: AutoencoderKL, crops_bgr: NDArray[np.uint8], scale: float, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """(B, S, S, 3) BGR uint8 face crops → (B, 8, S/8, S/8) float32 CPU: [masked lower half ‖ reference] × scale.

    The masked copy has its lower half (rows ≥ S/2) set to 0 before normalisation, i.e. −1 after
    it, exactly like upstream's half mask. Both copies go through the encoder in one batch.
    """
    x = torch.from_numpy(np.ascontiguousarray(crops_bgr[..., ::-1])).to(device)  # (B, S, S, 3) RGB
    # contiguous: a permuted (channels-last) tensor runs CPU GroupNorm down a less exact path (~1e-4 off)
    x = x.permute(0, 3, 1, 2).contiguous().to(dtype) / 255.0  # (B, 3, S, S) in [0, 1]
    masked = x.clone()
    masked[:, :, x.shape[2] // 2 :, :] = 0
    both = torch.cat([masked, x], dim=0) * 2.0 - 1.0
    latents = vae.encode(both) * scale  # (2B, 4, S/8, S/8): the posterior mean
    n = x.shape[0]
    return torch.cat([latents[:n], latents[n:]], dim=1).float().cpu()
