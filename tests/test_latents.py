"""VAE encode of face crops matches a float64 reference of the same model."""

from __future__ import annotations

import numpy as np
import torch

from musetalk.avatar.latents import encode_crops
from musetalk.models.nets_vae import AutoencoderKL, vae_spec
from musetalk.testing import TINY_VAE_CONFIG


def test_encode_crops_matches_float64_reference() -> None:
    torch.manual_seed(0)
    vae = AutoencoderKL(vae_spec(TINY_VAE_CONFIG)).eval()
    crops = np.random.default_rng(0).integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)  # (B, S, S, 3) BGR
    got = encode_crops(vae, crops, 0.18215, torch.device("cpu"), torch.float32)  # (B, 8, 32, 32)

    x = torch.from_numpy(np.ascontiguousarray(crops[..., ::-1])).permute(0, 3, 1, 2).contiguous().double() / 255
    masked = x.clone()
    masked[:, :, 128:, :] = 0
    with torch.inference_mode():
        lat = vae.double().encode(torch.cat([masked, x]) * 2 - 1) * 0.18215
    ref = torch.cat([lat[:2], lat[2:]], dim=1)
    # float32 on a contiguous input: ~3e-7 off; a channels-last input drifts to ~1e-4 through GroupNorm.
    assert got.shape == ref.shape
    assert (got.double() - ref).abs().max().item() < 1e-5
