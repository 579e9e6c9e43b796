"""Identity-consistent face tracking over a whole video, from per-frame face candidates.

A detector sees every face-like thing in a frame (another person, a face printed on a shirt, a mission
patch) and has no memory of the frame before. `track_faces` follows ONE face through the video:

1. shape check: each candidate's 68 landmarks are compared with a mean face shape after a similarity
   Procrustes alignment; implausible sets (a regression cascade fitted to a non-face) are rejected;
2. tracklets: candidates are linked frame to frame by position and size (greedy, gated), tolerating
   gaps of up to one second;
3. identity: `face` picks the tracklet to follow — `largest` (largest median size), `center` (median
   centre nearest the frame centre) or an integer N (the N-th face from the left, 0-based) — among the
   tracklets that last at least a third as long as the longest one; later tracklets of the same person
   (after an occlusion) are joined when they continue it in position and size;
4. outliers: frames of the chosen track whose centre leaves the local median trend, whose size leaves the
   local median size, or whose rigid landmarks (brows, nose, eyes) differ from the track's median shape
   are rejected;
5. frames with no accepted face are marked missing and filled by linear interpolation.

Smoothing (One-Euro etc.) belongs after this step, so it never runs across an outlier.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike, NDArray

from musetalk.errors import InputError, NoFaceDetected

# iBUG-68 left/right mirror permutation: point i of a face is point MIRROR_68[i] of its mirror image.
MIRROR_68 = np.array(
    [16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17,
     27, 28, 29, 30, 35, 34, 33, 32, 31, 45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40, 54, 53, 52, 51,
     50, 49, 48, 59, 58, 57, 56, 55, 64, 63, 62, 61, 60, 67, 66, 65]
)  # fmt: skip

# The mean 68-point shape (centred, unit RMS radius, eyes level, image axes: y down). Construction, reproduced
# by tests/test_tracking.py: the dlib 68-point predictor's landmarks on the public-domain astronaut photo
# (scikit-image `data.astronaut()`), averaged with their own mirror image after Procrustes alignment (which
# removes the photo's slight head turn), renormalised and rotated so the eye centres are level.
MEAN_SHAPE_68 = np.array(
    [[-1.3143, -0.6127], [-1.2858, -0.2692], [-1.2431, 0.0451], [-1.186, 0.3887], [-1.0862, 0.703],
     [-0.8995, 0.9888], [-0.6287, 1.2176], [-0.3286, 1.4037], [0.0, 1.4471], [0.3286, 1.4037], [0.6287, 1.2176],
     [0.8995, 0.9888], [1.0862, 0.703], [1.186, 0.3887], [1.2431, 0.0451], [1.2858, -0.2692], [1.3143, -0.6127],
     [-1.1155, -0.9121], [-0.9722, -1.0689], [-0.7434, -1.1117], [-0.5139, -1.0832], [-0.2858, -0.9976],
     [0.2858, -0.9976], [0.5139, -1.0832], [0.7434, -1.1117], [0.9722, -1.0689], [1.1155, -0.9121],
     [0.0, -0.7268], [0.0, -0.4688], [0.0, -0.2407], [0.0, -0.0126], [-0.2858, 0.1171], [-0.1426, 0.1599],
     [0.0, 0.1884], [0.1426, 0.1599], [0.2858, 0.1171], [-0.8574, -0.7111], [-0.7149, -0.7966],
     [-0.5153, -0.7966], [-0.3713, -0.6541], [-0.5431, -0.6398], [-0.7142, -0.6398], [0.3713, -0.6541],
     [0.5153, -0.7966], [0.7149, -0.7966], [0.8574, -0.7111], [0.7142, -0.6398], [0.5431, -0.6398],
     [-0.6287, 0.3609], [-0.3999, 0.3466], [-0.1718, 0.3452], [0.0, 0.388], [0.1718, 0.3452], [0.3999, 0.3466],
     [0.6287, 0.3609], [0.4141, 0.661], [0.1853, 0.7893], [0.0, 0.8185], [-0.1853, 0.7893], [-0.4141, 0.661],
     [-0.5424, 0.4037], [-0.1568, 0.4457], [0.0, 0.4749], [0.1568, 0.4457], [0.5424, 0.4037], [0.1711, 0.646],
     [0.0, 0.6745], [-0.1711, 0.646]],
    dtype=np.float64,
)  # fmt: skip

RIGID_POINTS = np.arange(17, 48)  # brows, nose, eyes: they keep their shape while the mouth and jaw move

# Normalised Procrustes distances (RMS over the points, unit-RMS shapes). Faces the dlib predictor fits on the
# astronaut score ~0.02; the same predictor fitted to the suit's mission patch scores 0.13-0.23.
MAX_SHAPE_DISTANCE = 0.12
MAX_RIGID_DISTANCE = 0.10  # rigid points vs the track's own median shape (same person, any expression)

GATE_WIDTHS = 0.5  # a face moves less than half its size between consecutive frames
GATE_GROWTH_PER_FRAME = 0.1  # ... plus this much per missing frame across a gap
GATE_MAX_WIDTHS = 1.5
SIZE_RATIO_MAX = 1.3  # size change tolerated between linked detections (grows with the gap as well)
TREND_WIDTHS = 0.25  # a centre further than this from the local median trend is an outlier
TREND_HALF_WINDOW_S = 0.2
SIZE_OUTLIER_RATIO = 1.3  # a size this far (either way) from the track's local median size is an outlier
ELIGIBLE_LENGTH_RATIO = 1 / 3  # identity candidates last at least this share of the longest tracklet
MAX_UNRELIABLE_RATIO = 0.2  # default share of missing frames above which prep refuses (unless allowed)


@dataclass(frozen=True)
class FaceCandidate:
    """One face a detector found in one frame."""

    landmarks: NDArray[np.float32]  # (68, 2) iBUG order, frame px
    score: float = 1.0  # detector confidence (detector-specific scale; informational)


@dataclass(frozen=True)
class TrackStats:
    """What the tracker did (all counts in frames)."""

    n_frames: int
    n_detected: int  # frames where the tracked face was found and accepted
    n_rejected: int  # frames whose only candidates near the track were rejected as outliers or non-faces
    n_interpolated: int  # frames filled by interpolation (rejected + nothing found)
    n_faces: int  # distinct face tracks seen (the tracked one included)
    max_jump_ratio: float  # largest frame-to-frame move of the face centre, in face widths (tracked, unsmoothed)

    @property
    def unreliable_ratio(self) -> float:
        """Share of frames without an accepted detection."""
        return self.n_interpolated / self.n_frames if self.n_frames else 0.0

    def as_dict(self) -> dict[str, float | int]:
        """JSON-ready figures (for manifests and summaries)."""
        return {
            "n_frames": self.n_frames,
            "n_detected": self.n_detected,
            "n_rejected": self.n_rejected,
            "n_interpolated": self.n_interpolated,
            "n_faces": self.n_faces,
            "max_jump_ratio": round(self.max_jump_ratio, 4),
            "unreliable_ratio": round(self.unreliable_ratio, 4),
        }


@dataclass(frozen=True)
class TrackedFace:
    """The followed face: landmarks for every frame and which of them were measured."""

    landmarks: NDArray[np.float32]  # (N, 68, 2) accepted detections, missing frames interpolated
    detected: NDArray[np.bool_]  # (N,) True where an accepted detection was used
    rejected: NDArray[np.bool_]  # (N,) True where candidates of the track were rejected
    stats: TrackStats
    face_centres_px: list[tuple[float, float]] = field(default_factory=list)  # median centre of each face seen


class TrackingUnreliable(InputError):
    """Too many frames have no acceptable face for the avatar to be trusted."""


def normalise_shape(points: ArrayLike) -> NDArray[np.float64]:
    """(K, 2) points centred on their mean and scaled to unit RMS radius."""
    p = np.asarray(points, dtype=np.float64)
    p = p - p.mean(axis=0)
    rms = math.sqrt(float((p**2).sum(axis=1).mean()))
    return p / rms if rms > 0 else p


def procrustes_distance(points: ArrayLike, reference: ArrayLike) -> float:
    """RMS distance between two (K, 2) shapes after the best similarity alignment (unit-RMS normalised)."""
    a, b = normalise_shape(points), normalise_shape(reference)
    u, _, vt = np.linalg.svd(a.T @ b)
    rot = u @ vt
    if np.linalg.det(rot) < 0:  # a reflection is not a pose: keep a proper rotation
        u[:, -1] *= -1
        rot = u @ vt
    aligned = a @ rot
    scale = float((aligned * b).sum() / (aligned**2).sum())
    return math.sqrt(float(((scale * aligned - b) ** 2).sum(axis=1).mean()))


def shape_distance(landmarks: ArrayLike) -> float:
    """Procrustes distance of a (68, 2) landmark set to MEAN_SHAPE_68 (≈0.02 for a face, >0.12 implausible)."""
    return procrustes_distance(landmarks, MEAN_SHAPE_68)


def mouth_opening(landmarks: ArrayLike) -> NDArray[np.float64]:
    """(N, 68, 2) landmarks → (N,) inner-lip gap (mean of the three facing inner-lip pairs) in eye distances."""
    lm = np.asarray(landmarks, dtype=np.float64).reshape(-1, 68, 2)
    gap = np.mean([np.linalg.norm(lm[:, a] - lm[:, b], axis=1) for a, b in ((61, 67), (62, 66), (63, 65))], axis=0)
    eyes = np.linalg.norm(lm[:, 42:48].mean(axis=1) - lm[:, 36:42].mean(axis=1), axis=1)
    return np.asarray(gap / np.maximum(eyes, 1e-6), dtype=np.float64)


def closed_mouth_frame(landmarks: ArrayLike, detected: ArrayLike | None = None) -> int:
    """Index of the frame whose mouth is most closed (among detected frames when given)."""
    opening = mouth_opening(landmarks)
    if detected is not None and np.asarray(detected, dtype=bool).any():
        opening = np.where(np.asarray(detected, dtype=bool), opening, np.inf)
    return int(np.argmin(opening))


def _centre_size(landmarks: NDArray[np.float64]) -> tuple[NDArray[np.float64], float]:
    """Centre of the landmark box and its size (geometric mean of width and height), px."""
    lo, hi = landmarks.min(axis=0), landmarks.max(axis=0)
    wh = np.maximum(hi - lo, 1e-6)
    return (lo + hi) / 2, float(math.sqrt(wh[0] * wh[1]))


@dataclass
class _Tracklet:
    frames: list[int] = field(default_factory=list)
    picks: list[int] = field(default_factory=list)  # candidate index in each frame
    centres: list[NDArray[np.float64]] = field(default_factory=list)
    sizes: list[float] = field(default_factory=list)

    def add(self, frame: int, pick: int, centre: NDArray[np.float64], size: float) -> None:
        self.frames.append(frame)
        self.picks.append(pick)
        self.centres.append(centre)
        self.sizes.append(size)

    def median_size(self) -> float:
        return float(np.median(self.sizes))

    def median_centre(self) -> NDArray[np.float64]:
        return np.median(np.stack(self.centres), axis=0)


def _link_cost(
    centre_a: NDArray[np.float64], size_a: float, centre_b: NDArray[np.float64], size_b: float, gap: int
) -> float | None:
    """Cost of linking two detections `gap` frames apart (1 = consecutive), or None outside the gate."""
    size = max(size_a, size_b)
    dist = float(np.linalg.norm(centre_b - centre_a)) / size
    gate = min(GATE_WIDTHS + GATE_GROWTH_PER_FRAME * (gap - 1), GATE_MAX_WIDTHS)
    ratio = max(size_a, size_b) / min(size_a, size_b)
    ratio_max = SIZE_RATIO_MAX * (1.0 + 0.02 * (gap - 1))
    if dist > gate or ratio > ratio_max:
        return None
    return dist + abs(math.log(ratio))


def _build_tracklets(
    centres: list[list[NDArray[np.float64]]], sizes: list[list[float]], ok: list[list[bool]], max_gap: int
) -> list[_Tracklet]:
    """Greedy frame-by-frame association of the plausible candidates into tracklets."""
    done: list[_Tracklet] = []
    active: list[_Tracklet] = []
    for i in range(len(centres)):
        still: list[_Tracklet] = []
        for t in active:
            (still if i - t.frames[-1] <= max_gap else done).append(t)
        active = still
        pairs = []
        for ti, t in enumerate(active):
            for ci in range(len(centres[i])):
                if not ok[i][ci]:
                    continue
                cost = _link_cost(t.centres[-1], t.sizes[-1], centres[i][ci], sizes[i][ci], i - t.frames[-1])
                if cost is not None:
                    pairs.append((cost, ti, ci))
        used_t: set[int] = set()
        used_c: set[int] = set()
        for _, ti, ci in sorted(pairs):
            if ti in used_t or ci in used_c:
                continue
            used_t.add(ti)
            used_c.add(ci)
            active[ti].add(i, ci, centres[i][ci], sizes[i][ci])
        for ci in range(len(centres[i])):
            if ok[i][ci] and ci not in used_c:
                t = _Tracklet()
                t.add(i, ci, centres[i][ci], sizes[i][ci])
                active.append(t)
    return done + active


def _choose(tracklets: list[_Tracklet], face: str | int, frame_size_hw: tuple[int, int]) -> _Tracklet:
    """The tracklet `face` asks for among the long-lived ones."""
    longest = max(len(t.frames) for t in tracklets)
    eligible = [t for t in tracklets if len(t.frames) >= max(1.0, ELIGIBLE_LENGTH_RATIO * longest)]
    if face == "largest":
        return max(eligible, key=lambda t: t.median_size())
    if face == "center":
        mid = np.array([frame_size_hw[1], frame_size_hw[0]], dtype=np.float64) / 2
        return min(eligible, key=lambda t: float(np.linalg.norm(t.median_centre() - mid)))
    index = int(face)
    ordered = sorted(eligible, key=lambda t: float(t.median_centre()[0]))
    if not 0 <= index < len(ordered):
        where = ", ".join(f"{k}: x≈{t.median_centre()[0]:.0f} px" for k, t in enumerate(ordered))
        raise InputError(f"face {index} asked for, but the video shows {len(ordered)} face(s) (left to right: {where})")
    return ordered[index]


def _join(chosen: _Tracklet, others: list[_Tracklet]) -> dict[int, int]:
    """frame → candidate pick of the chosen person: its tracklet plus time-disjoint tracklets that continue it."""
    picks = dict(zip(chosen.frames, chosen.picks, strict=True))
    state = {f: (c, s) for f, c, s in zip(chosen.frames, chosen.centres, chosen.sizes, strict=True)}
    pending = [t for t in others if t is not chosen]
    changed = True
    while changed:
        changed = False
        for t in list(pending):
            if any(f in picks for f in t.frames):
                continue  # seen at the same time as the chosen face: someone else
            before = [f for f in state if f < t.frames[0]]
            after = [f for f in state if f > t.frames[-1]]
            links = []
            if before:
                f = max(before)
                links.append(_link_cost(state[f][0], state[f][1], t.centres[0], t.sizes[0], t.frames[0] - f))
            if after:
                f = min(after)
                links.append(_link_cost(t.centres[-1], t.sizes[-1], state[f][0], state[f][1], f - t.frames[-1]))
            if links and all(c is not None for c in links):
                picks.update(zip(t.frames, t.picks, strict=True))
                state.update({f: (c, s) for f, c, s in zip(t.frames, t.centres, t.sizes, strict=True)})
                pending.remove(t)
                changed = True
    return picks


def _outliers(
    frames: list[int], lms: NDArray[np.float64], centres: NDArray[np.float64], sizes: NDArray[np.float64], fps: float
) -> NDArray[np.bool_]:
    """(K,) True for accepted detections that leave the track's local trend, size or rigid shape."""
    k = len(frames)
    bad = np.zeros(k, dtype=bool)
    if k < 3:
        return bad
    f = np.asarray(frames)
    half = max(2, int(round(TREND_HALF_WINDOW_S * fps)))
    rigid_ref = np.median(np.stack([normalise_shape(lm[RIGID_POINTS]) for lm in lms]), axis=0)
    for j in range(k):
        near = np.abs(f - f[j]) <= half
        trend = np.median(centres[near], axis=0)
        local_size = float(np.median(sizes[near]))
        off_trend = float(np.linalg.norm(centres[j] - trend)) > TREND_WIDTHS * local_size
        off_size = max(sizes[j], local_size) / min(sizes[j], local_size) > SIZE_OUTLIER_RATIO
        bad[j] = off_trend or off_size or procrustes_distance(lms[j][RIGID_POINTS], rigid_ref) > MAX_RIGID_DISTANCE
    return bad


def _interpolate(values: NDArray[np.float64], known: NDArray[np.bool_]) -> NDArray[np.float64]:
    """Fill rows of (N, ...) values where `known` is False: linear in time, nearest at the ends."""
    if known.all():
        return values
    idx = np.arange(len(values))
    flat = values.reshape(len(values), -1).copy()
    for col in range(flat.shape[1]):
        flat[~known, col] = np.interp(idx[~known], idx[known], flat[known, col])
    return flat.reshape(values.shape)


def track_faces(
    candidates: Sequence[Sequence[FaceCandidate]],
    frame_size_hw: tuple[int, int],
    fps: float,
    face: str | int = "largest",
    max_shape_distance: float = MAX_SHAPE_DISTANCE,
) -> TrackedFace:
    """Follow one face through a video, given every frame's face candidates (see the module docstring).

    candidates: per frame, the faces a detector found (any order). face: `largest`, `center` or the
    0-based index of a face from the left. Raises NoFaceDetected when no frame has a plausible face and
    InputError when face N does not exist.
    """
    if face not in ("largest", "center") and not str(face).lstrip("-").isdigit():
        raise InputError(f"face must be largest, center or a number, not {face!r}")
    n = len(candidates)
    lms = [[np.asarray(c.landmarks, dtype=np.float64).reshape(68, 2) for c in frame] for frame in candidates]
    geo = [[_centre_size(lm) for lm in frame] for frame in lms]
    centres = [[g[0] for g in frame] for frame in geo]
    sizes = [[g[1] for g in frame] for frame in geo]
    ok = [[shape_distance(lm) <= max_shape_distance for lm in frame] for frame in lms]
    if not any(any(frame) for frame in ok):
        found = sum(1 for frame in candidates if frame)
        raise NoFaceDetected(
            f"no plausible face in any of the {n} frame(s)"
            + (f" ({found} frame(s) had face-like detections whose landmarks are not face-shaped)" if found else "")
        )
    tracklets = _build_tracklets(centres, sizes, ok, max_gap=max(1, int(round(fps))))
    chosen = _choose(tracklets, face, frame_size_hw)
    picks = _join(chosen, tracklets)
    frames = sorted(picks)
    track_lm = np.stack([lms[i][picks[i]] for i in frames])
    track_c = np.stack([centres[i][picks[i]] for i in frames])
    track_s = np.array([sizes[i][picks[i]] for i in frames])
    bad = _outliers(frames, track_lm, track_c, track_s, fps)

    if bad.all():
        raise NoFaceDetected(f"no consistent face track in any of the {n} frame(s)")
    detected = np.zeros(n, dtype=bool)
    rejected = np.zeros(n, dtype=bool)
    out = np.zeros((n, 68, 2), dtype=np.float64)
    for j, i in enumerate(frames):
        if bad[j]:
            rejected[i] = True
        else:
            detected[i] = True
            out[i] = track_lm[j]
    # Frames where only implausible shapes were found near the track also count as rejected.
    median_size = float(np.median(track_s))
    known_c = np.zeros((n, 2))
    known_c[detected] = np.stack([centres[i][picks[i]] for i in np.flatnonzero(detected).tolist()])
    path = _interpolate(known_c, detected)
    for i in np.flatnonzero(~detected & ~rejected).tolist():
        for c, good in zip(centres[i], ok[i], strict=True):
            if not good and float(np.linalg.norm(c - path[i])) <= GATE_WIDTHS * median_size:
                rejected[i] = True
    filled = _interpolate(out, detected)
    fc = np.stack([_centre_size(lm)[0] for lm in filled])
    fs = np.array([_centre_size(lm)[1] for lm in filled])
    jumps = np.linalg.norm(np.diff(fc, axis=0), axis=1) / fs[1:] if n > 1 else np.zeros(0)
    stats = TrackStats(
        n_frames=n,
        n_detected=int(detected.sum()),
        n_rejected=int(rejected.sum()),
        n_interpolated=int((~detected).sum()),
        n_faces=len([t for t in tracklets if len(t.frames) >= max(1.0, ELIGIBLE_LENGTH_RATIO * len(chosen.frames))]),
        max_jump_ratio=float(jumps.max()) if len(jumps) else 0.0,
    )
    return TrackedFace(
        landmarks=filled.astype(np.float32),
        detected=detected,
        rejected=rejected,
        stats=stats,
        face_centres_px=[(float(t.median_centre()[0]), float(t.median_centre()[1])) for t in tracklets],
    )


def check_reliable(stats: TrackStats, max_unreliable_ratio: float = MAX_UNRELIABLE_RATIO) -> None:
    """Raise TrackingUnreliable when more than max_unreliable_ratio of the frames have no accepted face."""
    if stats.unreliable_ratio > max_unreliable_ratio:
        raise TrackingUnreliable(
            f"the face could not be tracked in {stats.n_interpolated} of {stats.n_frames} frames "
            f"({100 * stats.unreliable_ratio:.0f} % > {100 * max_unreliable_ratio:.0f} %: "
            f"{stats.n_rejected} rejected as outliers or non-faces, the rest had no face); "
            "the avatar would show a guessed face there. "
            "Use a video where the face stays visible, pick another person with --face, or accept the "
            "interpolated frames with --allow-gaps"
        )
