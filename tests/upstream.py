"""Reference transcriptions of upstream MuseTalk computations, for comparison tests."""

from __future__ import annotations

import math

import torch


def upstream_whisper_chunks(
    feature: torch.Tensor, num_samples: int, fps: int = 25, left: int = 2, right: int = 2
) -> torch.Tensor:
    """MuseTalk's AudioProcessor.get_whisper_chunk, transcribed from upstream (float math and all)."""
    per_frame = 2 * (left + right + 1)
    multiplier = 50.0 / fps
    n_frames = math.floor((num_samples / 16000) * fps)
    actual_length = math.floor((num_samples / 16000) * 50)
    feature = feature[:, :actual_length]  # (1, R, L, C)
    pad = math.ceil(multiplier)
    zeros = torch.zeros_like(feature[:, :1])
    feature = torch.cat([zeros.repeat(1, pad * left, 1, 1), feature, zeros.repeat(1, pad * 3 * right, 1, 1)], dim=1)
    chunks = []
    for f in range(n_frames):
        index = math.floor(f * multiplier)
        clip = feature[:, index : index + per_frame]
        assert clip.shape[1] == per_frame
        chunks.append(clip)
    stacked = torch.cat(chunks, dim=0)  # (T, 10, L, C)
    return stacked.reshape(stacked.shape[0], -1, stacked.shape[-1])  # "b c h w -> b (c h) w"
