"""Blending: only the mask region changes; every mode and placement runs; the face lands where the box says."""

from __future__ import annotations

import numpy as np
import pytest

from musetalk.avatar.cache import AvatarCache
from musetalk.config import BlendConfig
from musetalk.pipeline.blend import Blender, feather_kernel_px, poisson_clone
from musetalk.pipeline.synthetic import synthetic_avatar


@pytest.fixture(scope="module")
def avatar() -> AvatarCache:
    return synthetic_avatar(n_frames=4, height=150, width=200, roll_deg=8.0)


def _face(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)


MODES = [
    BlendConfig(blend_mode="feather", subpixel_enabled=True),
    BlendConfig(blend_mode="feather", subpixel_enabled=False),
    BlendConfig(blend_mode="poisson", subpixel_enabled=True),
    BlendConfig(blend_mode="poisson", subpixel_enabled=False),
    BlendConfig(blend_mode="feather", subpixel_enabled=True, color_match=True),
]


def _mode_id(c: BlendConfig) -> str:
    return f"{c.blend_mode}-sub{int(c.subpixel_enabled)}-cm{int(c.color_match)}"


@pytest.mark.parametrize("cfg", MODES, ids=_mode_id)
def test_only_the_mask_region_changes(avatar: AvatarCache, cfg: BlendConfig) -> None:
    blender = Blender(cfg, expand=1.5)
    for i in range(avatar.n_frames):
        src = np.asarray(avatar.frames[i])
        before = src.copy()
        out = blender.blend(avatar, i, _face(i))
        assert out.shape == src.shape and out.dtype == np.uint8
        assert np.array_equal(src, before), "the cached frame must not be modified"
        x1, y1, x2, y2 = avatar.mask_boxes[i]
        outside = np.ones(src.shape[:2], bool)
        outside[y1:y2, x1:x2] = False
        assert np.array_equal(out[outside], src[outside])  # bit-identical outside the mask box
        changed = np.any(out != src, axis=2)
        assert changed.any(), "the face must show up"
        # Inside the box, only where the (blurred) mask is > 0: nothing in the rows above the hard mask's
        # top minus the blur radius can change.
        mask = avatar.masks[i]
        top = int(np.flatnonzero(mask.any(axis=1))[0])
        radius = feather_kernel_px(avatar.boxes[i], cfg.feather_ratio, 1.5) // 2
        assert not changed[y1 : y1 + max(0, top - radius - 1)].any()


def test_feather_alpha_is_zero_where_the_blurred_mask_is_zero(avatar: AvatarCache) -> None:
    blender = Blender(BlendConfig(feather_ratio=0.02), expand=1.5)
    src = np.asarray(avatar.frames[0])
    out = blender.blend(avatar, 0, _face())
    x1, y1, x2, y2 = avatar.mask_boxes[0]
    mask = avatar.masks[0]
    import cv2

    k = feather_kernel_px(avatar.boxes[0], 0.02, 1.5)
    soft = cv2.GaussianBlur(mask, (k, k), 0, borderType=cv2.BORDER_CONSTANT)
    region_changed = np.any(out[y1:y2, x1:x2] != src[y1:y2, x1:x2], axis=2)
    assert not (region_changed & (soft == 0)).any()
    assert (region_changed & (mask > 0)).mean() > 0.5 * (mask > 0).mean()


def test_subpixel_paste_follows_the_affine_and_rounded_paste_the_box(avatar: AvatarCache) -> None:
    # A face with one bright dot at its centre must land at face_to_frame(128, 128) (subpixel, rotated)
    # or at the centre of the rounded box (upstream-style).
    face = np.full((256, 256, 3), 100, np.uint8)
    face[120:136, 120:136] = 255
    i = 1
    centre = avatar.face_to_frame[i] @ np.array([128.0, 128.0, 1.0])
    for subpixel in (True, False):
        out = Blender(BlendConfig(subpixel_enabled=subpixel, feather_ratio=0.01), 1.5).blend(avatar, i, face)
        ys, xs = np.nonzero(np.all(out >= 250, axis=2) & ~np.all(np.asarray(avatar.frames[i]) >= 250, axis=2))
        # The dot is at the face centre, i.e. at the box centre row: the lower-half mask shows its lower part.
        assert len(xs) > 0
        x1, _, x2, _ = avatar.boxes[i]
        expected_x = centre[0] if subpixel else (round(float(x1)) + round(float(x2))) / 2
        assert abs(xs.mean() - expected_x) < 2.0


def test_weight_scales_the_change_and_zero_returns_the_source(avatar: AvatarCache) -> None:
    blender = Blender(BlendConfig(), 1.5)
    src = np.asarray(avatar.frames[2])
    assert np.array_equal(blender.blend(avatar, 2, _face(), weight=0.0), src)
    assert np.array_equal(blender.blend(avatar, 2, None), src)
    full = blender.blend(avatar, 2, _face()).astype(int)
    half = blender.blend(avatar, 2, _face(), weight=0.5).astype(int)
    d_full, d_half = np.abs(full - src).sum(), np.abs(half - src).sum()
    assert 0.4 * d_full < d_half < 0.6 * d_full


def test_poisson_clone_keeps_pixels_outside_its_mask() -> None:
    rng = np.random.default_rng(3)
    src = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    face = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    mask = np.zeros((60, 80), np.uint8)
    mask[20:40, 30:60] = 255
    out = poisson_clone(src, face, mask)
    assert out.shape == src.shape
    assert np.array_equal(out[:15], src[:15]) and np.array_equal(out[45:], src[45:])
