"""Stabiliser functions on synthetic tracks with known truth: One-Euro, scale lock, interpolation, geometry."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from musetalk.avatar import geometry as geo
from musetalk.avatar import stabilize as stab
from musetalk.avatar.synthetic import smooth_path
from musetalk.config import OneEuroConfig

FPS = 25
OE = OneEuroConfig()  # the shipped defaults are what is being tested


def jitter(track: np.ndarray, truth: np.ndarray) -> float:
    """RMS frame-to-frame change of the error (track − truth): how much the box shakes around the true motion."""
    return float(np.sqrt(np.mean(np.diff(track - truth, axis=0) ** 2)))


def _noisy(seed: int, n: int = 48, sigma: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    truth = np.hstack([smooth_path(n, FPS, (12.0, 6.0), (0.3, 0.2))] * 2)  # (N, 4) box corners moving with the head
    rng = np.random.default_rng(seed)
    return truth + np.clip(rng.normal(0, sigma, truth.shape), -2 * sigma, 2 * sigma), truth


def test_one_euro_passes_a_constant_and_smooths_a_step() -> None:
    filt = stab.OneEuro(FPS, min_cutoff=1.0, beta=0.0)
    assert [float(filt(5.0)) for _ in range(5)] == [5.0] * 5
    filt.reset()
    out = [float(filt(0.0))] + [float(filt(10.0)) for _ in range(30)]
    assert 0 < out[1] < 10 and all(b >= a for a, b in zip(out, out[1:], strict=False))  # no overshoot
    assert out[-1] == pytest.approx(10.0, abs=0.2)


def test_one_euro_beta_follows_fast_motion_more_closely() -> None:
    ramp = np.arange(50, dtype=np.float64) * 4.0  # 100 px/s
    slow = stab.smooth_track(ramp, FPS, 1.0, 0.0, 1.0, zero_phase=False)
    fast = stab.smooth_track(ramp, FPS, 1.0, 0.5, 1.0, zero_phase=False)
    assert abs(ramp[-1] - fast[-1]) < abs(ramp[-1] - slow[-1]) / 3


@pytest.mark.parametrize("seed", range(20))
def test_one_euro_cuts_box_jitter_5x_and_stays_within_2px_of_the_path(seed: int) -> None:
    # 1 px (σ) detection jitter on a 12 px / 0.3 Hz head sway; every frame, the clip edges included
    raw, truth = _noisy(seed)
    smooth = stab.smooth_track(raw, FPS, OE.min_cutoff, OE.beta, OE.d_cutoff, zero_phase=True)
    assert jitter(raw, truth) / jitter(smooth, truth) >= 5.0
    assert np.abs(smooth - truth).max() <= 2.0


@pytest.mark.parametrize("sigma", [0.5, 2.0, 4.0])
def test_one_euro_jitter_reduction_holds_across_noise_levels(sigma: float) -> None:
    raw, truth = _noisy(7, sigma=sigma)
    smooth = stab.smooth_track(raw, FPS, OE.min_cutoff, OE.beta, OE.d_cutoff, zero_phase=True)
    assert jitter(raw, truth) / jitter(smooth, truth) >= 5.0


def test_zero_phase_removes_the_lag_of_the_causal_filter() -> None:
    raw, truth = _noisy(0, n=60, sigma=0.5)
    causal = stab.smooth_track(raw, FPS, OE.min_cutoff, OE.beta, OE.d_cutoff, zero_phase=False)
    zero = stab.smooth_track(raw, FPS, OE.min_cutoff, OE.beta, OE.d_cutoff, zero_phase=True)
    assert np.abs(zero - truth).max() < np.abs(causal - truth).max() / 2


def test_lock_scale_is_the_median_of_the_first_frames() -> None:
    sizes = np.array([[100, 130], [102, 128], [98, 131], [300, 400], [300, 400]], dtype=np.float64)
    assert stab.lock_scale(sizes, 3).tolist() == [100.0, 130.0]
    assert stab.lock_scale(sizes[:1], 50).tolist() == [100.0, 130.0]


def test_interpolate_missing_fills_linearly_and_holds_the_ends() -> None:
    values = np.array([[0.0], [0.0], [2.0], [0.0], [6.0], [0.0]])
    found = np.array([False, True, False, True, True, False])
    values[1], values[3] = 1.0, 3.0
    out = stab.interpolate_missing(values, found)
    assert out[:, 0].tolist() == [1.0, 1.0, 2.0, 3.0, 6.0, 6.0]
    with pytest.raises(ValueError):
        stab.interpolate_missing(values, np.zeros(6, dtype=bool))


def _landmarks() -> np.ndarray:
    """A plausible upright 68-point face: jaw arc, brows, nose, eyes, lips (frame px)."""
    lm = np.zeros((68, 2))
    t = np.linspace(-1, 1, 17)
    lm[:17] = np.stack([100 + 45 * t, 120 + 60 * np.sqrt(1 - 0.7 * t**2) - 10], 1)  # jaw, chin at y≈170
    lm[17:27] = np.stack([np.linspace(65, 135, 10), np.full(10, 85.0)], 1)
    lm[27:31] = np.stack([np.full(4, 100.0), np.linspace(95, 125, 4)], 1)  # bridge: lm[29] at y=115
    lm[31:36] = np.stack([np.linspace(88, 112, 5), np.full(5, 130.0)], 1)
    lm[36:42] = np.stack([np.linspace(72, 92, 6), np.full(6, 100.0)], 1)
    lm[42:48] = np.stack([np.linspace(108, 128, 6), np.full(6, 100.0)], 1)
    lm[48:60] = np.stack(
        [
            80 + 40 * (0.5 + 0.5 * np.cos(np.linspace(0, 2 * np.pi, 12))),
            148 + 6 * np.sin(np.linspace(0, 2 * np.pi, 12)),
        ],
        1,
    )
    lm[60:68] = np.stack(
        [85 + 30 * (0.5 + 0.5 * np.cos(np.linspace(0, 2 * np.pi, 8))), 148 + 2 * np.sin(np.linspace(0, 2 * np.pi, 8))],
        1,
    )
    return lm


def test_upstream_box_rule() -> None:
    lm = _landmarks()
    chin = lm[:, 1].max()
    x1, y1, x2, y2 = geo.upstream_box(lm, 0, 10)
    assert (x1, x2) == (lm[:, 0].min(), lm[:, 0].max())
    assert y1 == pytest.approx(lm[29, 1] - (chin - lm[29, 1]))  # centre at landmark 29, height twice nose→chin
    assert y2 == pytest.approx(chin + 10)
    _, y1_shift, _, y2_shift = geo.upstream_box(lm, 5, 0)
    assert y1_shift == pytest.approx(lm[29, 1] + 5 - (chin - lm[29, 1] - 5)) and y2_shift == pytest.approx(chin)
    with pytest.raises(Exception, match="bbox_shift"):
        geo.upstream_box(lm, 200, 0)


def test_face_boxes_of_a_rotated_face_match_the_upright_face() -> None:
    lm = _landmarks()
    theta = math.radians(12)
    pivot = np.array([160.0, 140.0])
    rotated = (lm - pivot) @ geo.rotation(theta).T + pivot
    c0, s0 = geo.face_boxes(lm[None], np.zeros(1), 0, 10)
    c1, s1 = geo.face_boxes(rotated[None], np.array([theta]), 0, 10)
    np.testing.assert_allclose(s1, s0, atol=1e-9)  # same size: the box of the upright face, not a bigger one
    np.testing.assert_allclose(c1[0], (c0[0] - pivot) @ geo.rotation(theta).T + pivot, atol=1e-9)


def test_crop_to_frame_samples_like_resizing_the_box() -> None:
    rng = np.random.default_rng(0)
    frame = np.asarray(cv2.GaussianBlur(rng.integers(0, 255, (200, 240, 3), dtype=np.uint8), (5, 5), 0), np.uint8)
    x1, y1, x2, y2 = 40, 30, 168, 158  # a 128 px box → 2× upsampling to 256
    matrix = geo.crop_to_frame(np.array([(x1 + x2) / 2, (y1 + y2) / 2]), np.array([x2 - x1, y2 - y1]), 0.0, 256)
    ours = geo.warp_crop(frame, matrix, 256, cv2.INTER_LINEAR).astype(int)
    ref = cv2.resize(frame[y1:y2, x1:x2], (256, 256), interpolation=cv2.INTER_LINEAR).astype(int)
    assert np.abs(ours[2:-2, 2:-2] - ref[2:-2, 2:-2]).max() <= 2  # same pixel grid; only rounding differs
    # crop pixel (u, v) lands where the matrix says: the crop centre maps to the box centre
    centre = geo.apply_affine(matrix, np.array([[127.5, 127.5]]))[0]
    np.testing.assert_allclose(centre, [(x1 + x2) / 2 - 0.5, (y1 + y2) / 2 - 0.5], atol=1e-4)


def test_crop_to_frame_rotates_about_the_box_centre() -> None:
    m = geo.crop_to_frame(np.array([100.0, 80.0]), np.array([64.0, 128.0]), math.radians(90), 256)
    # crop right edge (u → 256) points along +y in the frame after a 90° clockwise roll
    p0, p1 = geo.apply_affine(m, np.array([[127.5, 127.5], [255.5, 127.5]]))
    np.testing.assert_allclose(p1 - p0, [0.0, 32.0], atol=1e-4)


def test_padded_int_box_is_clipped_and_never_empty() -> None:
    box = geo.padded_int_box(np.array([[-50.0, -50.0], [-40.0, -45.0]]), 2, (100, 120))
    assert box.tolist() == [0, 0, 1, 1]
    box = geo.padded_int_box(np.array([[10.2, 20.7], [30.0, 40.0]]), 3, (100, 120))
    assert box.tolist() == [7, 17, 34, 44]
