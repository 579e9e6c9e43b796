"""prep.reference_frame: the UNet reference latent (channels 4-7) chosen when the cache loads."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from musetalk.avatar import PrepResult, load_avatar
from musetalk.avatar.latents import reference_index
from musetalk.config import AppConfig, with_overrides
from musetalk.errors import ConfigError
from musetalk.faces.tracking import closed_mouth_frame, mouth_opening


def test_reference_choices_replace_only_channels_4_to_7(prepared_avatar: tuple[AppConfig, PrepResult]) -> None:
    cfg = prepared_avatar[0]
    same = load_avatar(cfg, cfg.avatar_id)
    assert same.latents is not None
    fixed = load_avatar(with_overrides(cfg, ["prep.reference_frame=fixed:3"]), cfg.avatar_id)
    assert fixed.latents is not None
    assert torch.equal(fixed.latents[:, :4], same.latents[:, :4])  # the masked half is untouched
    assert all(torch.equal(fixed.latents[i, 4:], same.latents[3, 4:]) for i in range(same.n_frames))
    closed = load_avatar(with_overrides(cfg, ["prep.reference_frame=closed_mouth"]), cfg.avatar_id)
    k = int(same.manifest["tracking"]["closed_mouth_frame"])
    assert closed.latents is not None and torch.equal(closed.latents[0, 4:], same.latents[k, 4:])
    assert reference_index(same, "same_frame") is None
    with pytest.raises(ConfigError, match="has 48"):
        load_avatar(with_overrides(cfg, ["prep.reference_frame=fixed:999"]), cfg.avatar_id)


def test_reference_frame_does_not_make_a_cache_stale(
    prepared_avatar: tuple[AppConfig, PrepResult], tmp_path: Path
) -> None:
    cfg = prepared_avatar[0]
    shutil.copytree(prepared_avatar[1].root, tmp_path / cfg.avatar_id)
    moved = with_overrides(cfg, [f"prep.cache_dir={tmp_path}", "prep.reference_frame=closed_mouth"])
    assert load_avatar(moved, cfg.avatar_id).n_frames == 48  # loads (no AvatarCacheStale)


def test_closed_mouth_frame_is_the_least_open(prepared_avatar: tuple[AppConfig, PrepResult]) -> None:
    cache = load_avatar(prepared_avatar[0], prepared_avatar[0].avatar_id)
    lm = cache.landmarks.copy()
    lm[7, [65, 66, 67]] = lm[7, [63, 62, 61]]  # frame 7: lips pressed together
    assert closed_mouth_frame(lm) == 7 and mouth_opening(lm)[7] < 1e-6
    detected = np.ones(len(lm), dtype=bool)
    detected[7] = False
    assert closed_mouth_frame(lm, detected) != 7  # an interpolated frame is never picked
