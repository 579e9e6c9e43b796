"""Face-track stabilisation computed once at prep time: One-Euro smoothing, scale lock, LK roll.

All of it is offline: prep sees the whole video, so the One-Euro filter can run forward and then
backward over the track (zero phase, like `filtfilt`), which removes the lag a causal filter has
behind a moving head while keeping its jitter suppression.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import cv2
import numpy as np
from numpy.typing import ArrayLike, NDArray

from musetalk.avatar.cache import FrameStore

# iBUG-68 points that stay rigid while the mouth moves: eye corners and lids (36-47) and the nose
# bridge (27-30). Lucas-Kanade tracks these to measure head roll.
STABLE_POINTS = np.array([27, 28, 29, 30, *range(36, 48)])
LEFT_EYE = slice(36, 42)  # image-left eye (the subject's right)
RIGHT_EYE = slice(42, 48)

_MIN_LK_POINTS = 4
_FB_ERROR_PX = 1.0  # forward-backward LK disagreement above this marks a point as lost


class OneEuro:
    """One-Euro filter (Casiez, Roussel, Vogel, CHI 2012) for a vector signal at a fixed rate.

    A first-order low-pass whose cutoff rises with the signal's speed: still → heavy smoothing
    (min_cutoff), fast → little lag (beta). Units: Hz for the cutoffs, signal units/s for speed.
    """

    def __init__(self, freq_hz: float, min_cutoff: float = 1.0, beta: float = 0.0, d_cutoff: float = 1.0) -> None:
        if freq_hz <= 0 or min_cutoff <= 0 or d_cutoff <= 0 or beta < 0:
            raise ValueError("OneEuro needs freq_hz, min_cutoff, d_cutoff > 0 and beta >= 0")
        self.freq_hz = freq_hz
        self.min_cutoff = min_cutoff
        self.beta = beta
        self.d_cutoff = d_cutoff
        self._x: NDArray[np.float64] | None = None
        self._dx: NDArray[np.float64] | None = None

    def _alpha(self, cutoff_hz: NDArray[np.float64] | float) -> NDArray[np.float64]:
        tau_s = 1.0 / (2.0 * math.pi * np.asarray(cutoff_hz, dtype=np.float64))
        return 1.0 / (1.0 + tau_s * self.freq_hz)

    def reset(self) -> None:
        """Forget the state; the next sample passes through unchanged."""
        self._x = None
        self._dx = None

    def __call__(self, value: ArrayLike) -> NDArray[np.float64]:
        """Filter one sample (scalar or vector) and return the smoothed value."""
        x = np.array(value, dtype=np.float64)
        if self._x is None or self._dx is None:
            self._x, self._dx = x.copy(), np.zeros_like(x)
            return x
        dx = (x - self._x) * self.freq_hz
        a_d = self._alpha(self.d_cutoff)
        edx = a_d * dx + (1.0 - a_d) * self._dx
        a = self._alpha(self.min_cutoff + self.beta * np.abs(edx))
        x_hat = a * x + (1.0 - a) * self._x
        self._x, self._dx = x_hat, edx
        return x_hat.copy()


def _run(track: NDArray[np.float64], make: Callable[[], OneEuro]) -> NDArray[np.float64]:
    filt = make()
    return np.stack([filt(row) for row in track])


def _linear_pad(track: NDArray[np.float64], n_pad: int, n_fit: int) -> NDArray[np.float64]:
    """Extend both ends by n_pad samples along a line fitted to the n_fit samples at each end.

    Extrapolating a fit (instead of mirroring raw samples) keeps one noisy end sample from
    pulling the zero-phase result at the clip's edges.
    """
    n = len(track)
    k = min(n_fit, n)
    design = np.stack([np.ones(k), np.arange(k, dtype=np.float64)], axis=1)
    head = np.linalg.lstsq(design, track[:k], rcond=None)[0]  # (2, D): value at 0, slope
    tail = np.linalg.lstsq(design, track[::-1][:k], rcond=None)[0]
    steps = np.arange(n_pad, 0, -1, dtype=np.float64)[:, None]  # n_pad … 1
    pre = head[0] - head[1] * steps
    post = (tail[0] - tail[1] * steps)[::-1]
    return np.concatenate([pre, track, post])


def smooth_track(
    track: ArrayLike,
    freq_hz: float,
    min_cutoff: float,
    beta: float,
    d_cutoff: float,
    zero_phase: bool = True,
) -> NDArray[np.float64]:
    """One-Euro-smooth a (N, D) track along time; zero_phase runs it forward then backward."""
    data = np.asarray(track, dtype=np.float64)
    squeeze = data.ndim == 1
    data = data[:, None] if squeeze else data
    if len(data) < 2:
        return data[:, 0].copy() if squeeze else data.copy()

    def make() -> OneEuro:
        return OneEuro(freq_hz, min_cutoff, beta, d_cutoff)

    if zero_phase:
        n_pad = max(2, int(round(freq_hz)))  # one second of run-in on each side
        # the end lines are fitted over 0.6 s: long enough to average jitter, short enough for curvature
        padded = _linear_pad(data, n_pad, n_fit=max(2, int(round(0.6 * freq_hz))))
        forward = _run(padded, make)
        out = _run(forward[::-1], make)[::-1][n_pad : n_pad + len(data)]
    else:
        out = _run(data, make)
    return out[:, 0] if squeeze else out


def lock_scale(sizes_wh: ArrayLike, n_frames: int) -> NDArray[np.float64]:
    """The locked box size: median (w, h) over the first n_frames frames → (2,)."""
    sizes = np.asarray(sizes_wh, dtype=np.float64).reshape(-1, 2)
    return np.median(sizes[: max(1, n_frames)], axis=0)


def interpolate_missing(values: ArrayLike, found: ArrayLike) -> NDArray[np.float32]:
    """Fill rows where `found` is False by linear interpolation in time (nearest at the ends).

    values: (N, ...) per-frame data; found: (N,) bool. Raises ValueError when nothing was found.
    """
    data = np.array(values, dtype=np.float32)
    mask = np.asarray(found, dtype=bool)
    if not mask.any():
        raise ValueError("no frame has data to interpolate from")
    if mask.all():
        return data
    idx = np.arange(len(data))
    flat = data.reshape(len(data), -1)
    for col in range(flat.shape[1]):
        flat[~mask, col] = np.interp(idx[~mask], idx[mask], flat[mask, col])
    return flat.reshape(data.shape)


def eye_line_angle_rad(landmarks: NDArray[np.float32]) -> NDArray[np.float64]:
    """Angle of the line between the eye centres, image coordinates (y down) → (N,) radians."""
    lm = np.asarray(landmarks, dtype=np.float64).reshape(-1, 68, 2)
    d = lm[:, RIGHT_EYE].mean(axis=1) - lm[:, LEFT_EYE].mean(axis=1)
    return np.arctan2(d[:, 1], d[:, 0])


def _similarity(src: NDArray[np.float32], dst: NDArray[np.float32]) -> NDArray[np.float64] | None:
    m, _ = cv2.estimateAffinePartial2D(src, dst, method=cv2.LMEDS)
    return None if m is None else m.astype(np.float64)


def _lk_window_px(landmarks: NDArray[np.float32]) -> int:
    """LK window ~1/3 of the eye distance (odd, 11-41 px): big enough for texture, small enough to stay rigid."""
    eyes = landmarks[RIGHT_EYE].mean(axis=0) - landmarks[LEFT_EYE].mean(axis=0)
    size = int(np.clip(np.hypot(*eyes) / 3.0, 11, 41))
    return size | 1


def lk_affines(
    frames: FrameStore,
    landmarks: NDArray[np.float32],
    ref_index: int,
    on_frame: Callable[[], None] | None = None,
) -> NDArray[np.float32]:
    """Per-frame similarity M_affine (N, 2, 3) mapping reference-frame points to frame-i points.

    Lucas-Kanade tracks the stable points (eyes, nose bridge) from the reference frame directly to
    each frame (no chaining, so no drift), seeded with a landmark-based guess; points failing the
    forward-backward check are dropped. Frames where too few points survive fall back to the
    similarity between the landmarks themselves.
    """
    n = len(frames)
    lm = np.asarray(landmarks, dtype=np.float32)
    ref_pts = np.ascontiguousarray(lm[ref_index, STABLE_POINTS])  # (K, 2)
    ref_gray = cv2.cvtColor(np.asarray(frames[ref_index]), cv2.COLOR_BGR2GRAY)
    win = _lk_window_px(lm[ref_index])
    lk_args: dict[str, object] = {
        "winSize": (win, win),
        "maxLevel": 3,
        "criteria": (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 40, 0.01),
        "flags": cv2.OPTFLOW_USE_INITIAL_FLOW,
    }
    out = np.zeros((n, 2, 3), dtype=np.float32)
    for i in range(n):
        guess = _similarity(ref_pts, np.ascontiguousarray(lm[i, STABLE_POINTS]))
        if guess is None:
            guess = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
            guess[:, 2] = (lm[i, STABLE_POINTS] - ref_pts).mean(axis=0)
        if i == ref_index:
            out[i] = np.array([[1, 0, 0], [0, 1, 0]], dtype=np.float32)
        else:
            init = (ref_pts @ guess[:, :2].T + guess[:, 2]).astype(np.float32)
            gray = cv2.cvtColor(np.asarray(frames[i]), cv2.COLOR_BGR2GRAY)
            fwd, st_f, _ = cv2.calcOpticalFlowPyrLK(ref_gray, gray, ref_pts, init.copy(), **lk_args)  # type: ignore[call-overload]
            back, st_b, _ = cv2.calcOpticalFlowPyrLK(gray, ref_gray, fwd, ref_pts.copy(), **lk_args)  # type: ignore[call-overload]
            good = (st_f[:, 0] == 1) & (st_b[:, 0] == 1) & (np.linalg.norm(back - ref_pts, axis=1) < _FB_ERROR_PX)
            m = _similarity(ref_pts[good], fwd[good]) if good.sum() >= _MIN_LK_POINTS else None
            out[i] = m if m is not None else guess
        if on_frame is not None:
            on_frame()
    return out


def roll_from_affines(m_affine: NDArray[np.float32]) -> NDArray[np.float64]:
    """Rotation angle (radians, image coordinates) of each (2, 3) similarity → (N,)."""
    m = np.asarray(m_affine, dtype=np.float64)
    return np.arctan2(m[:, 1, 0], m[:, 0, 0])


def absolute_roll_rad(landmarks: NDArray[np.float32], relative_roll_rad: NDArray[np.float64]) -> NDArray[np.float64]:
    """Roll of every frame: LK's precise relative roll plus one robust offset from the eye lines.

    The offset is the median over frames of (eye-line angle − relative roll), so a single noisy
    reference frame cannot tilt every crop.
    """
    rel = np.asarray(relative_roll_rad, dtype=np.float64)
    diff = eye_line_angle_rad(landmarks) - rel
    offset = math.atan2(float(np.median(np.sin(diff))), float(np.median(np.cos(diff))))
    return rel + offset
