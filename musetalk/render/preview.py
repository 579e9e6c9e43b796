"""Weight-free preview mouth: opens the avatar's own mouth in time with the audio loudness.

No model is involved. The amount of opening per video frame comes from the audio's RMS envelope (shaped
by phoneme timings when the TTS reports them). Two ways to show it:

- real mouths (videos in which the person talks): the source frames are ranked by their landmark-measured
  mouth opening; each output frame takes the source frame whose opening matches the wanted one, aligns it
  to the current face on the rigid landmarks (eyes, nose) and blends its lower face in with a feathered mask;
- warp (photos, idle videos — the fallback): below the line where the lips meet, the lower lip, lower teeth
  and jaw of the upright 256×256 face crop move down (a landmark-anchored displacement field applied with
  cv2.remap), and the gap between the lips is filled with a soft, dark inner mouth.

The result goes through the same blending and encoding path as MuseTalk's generated faces.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from numpy.typing import NDArray

from musetalk.avatar.cache import FACE_SIZE_PX, AvatarCache
from musetalk.avatar.geometry import apply_affine, invert_affine, warp_crop
from musetalk.faces.tracking import mouth_opening
from musetalk.pipeline.generate import ClipJob, FaceRequest
from musetalk.pipeline.silence import frame_rms_db
from musetalk.types import Audio

# iBUG 68-point indices
_MOUTH_OUTER = slice(48, 60)
_LOWER_LIP = [54, 55, 56, 57, 58, 59, 48]
_CHIN = 8

# Loudness → opening: below FLOOR_DB the mouth is closed, at CEIL_DB fully open.
FLOOR_DB = -42.0
CEIL_DB = -14.0
MAX_OPEN_RATIO = 0.22  # full opening = this × mouth width (px)

# espeak-ng phoneme mnemonics (stress marks stripped) by how they shape the mouth.
_LIPS_CLOSED = frozenset({"p", "b", "m"})
_LIP_TO_TEETH = frozenset({"f", "v"})
_OPEN_VOWELS = frozenset({"a", "a:", "A:", "A", "aI", "aU", "a#", "O:", "O", "0", "V", "A@", "aI@", "aU@"})
_MID_VOWELS = frozenset({"E", "e", "e:", "eI", "@", "3:", "3", "oU", "o", "o:", "e@", "OI", "@L", "@2", "O@", "o@"})
_CLOSE_VOWELS = frozenset({"i:", "i", "I", "I2", "u:", "U", "u", "I@", "U@", "y", "y:"})


def _bare(name: str) -> str:
    """The mnemonic without espeak-ng's stress marks (' primary, , secondary)."""
    return name.lstrip("',")


def phoneme_shape(name: str) -> float:
    """How far a phoneme lets the jaw open, 0 (lips together) … 1 (open vowel); espeak-ng mnemonics."""
    base = _bare(name)
    if not base or base.startswith("_"):
        return 0.0  # pause
    if base in _LIPS_CLOSED:
        return 0.0
    if base in _LIP_TO_TEETH:
        return 0.2
    if base in _OPEN_VOWELS:
        return 1.0
    if base in _MID_VOWELS:
        return 0.75
    if base in _CLOSE_VOWELS:
        return 0.5
    return 0.45  # other consonants: the jaw half follows the neighbouring vowels


def phoneme_factors(phonemes: tuple[tuple[float, str], ...], n_frames: int, fps: int) -> NDArray[np.float32]:
    """Per video frame: 0 where lips close (p/b/m for ≥ 15 ms of the frame), else the time-weighted shape."""
    out = np.ones(n_frames, dtype=np.float32)
    if not phonemes:
        return out
    starts = np.array([t for t, _ in phonemes] + [max(phonemes[-1][0] + 0.1, n_frames / fps)])
    shapes = [phoneme_shape(name) for _, name in phonemes]
    closed = [_bare(name) in _LIPS_CLOSED for _, name in phonemes]
    for f in range(n_frames):
        t0, t1 = f / fps, (f + 1) / fps
        overlap = np.clip(np.minimum(starts[1:], t1) - np.maximum(starts[:-1], t0), 0.0, None)  # (P,) s
        if any(o >= 0.015 and c for o, c in zip(overlap, closed, strict=True)):
            out[f] = 0.0
        elif overlap.sum() > 0:
            out[f] = float(np.dot(overlap, shapes) / overlap.sum())
    return out


def mouth_openings(audio: Audio, n_frames: int, fps: int) -> NDArray[np.float32]:
    """Opening in [0, 1] per video frame: loudness × phoneme shape, fast attack, short release.

    Without phoneme timings (uploaded audio, other voices) the loudness alone drives the jaw.
    """
    level_db = frame_rms_db(audio.samples, n_frames, fps, audio.sample_rate)  # (n_frames,)
    level = np.clip((level_db - FLOOR_DB) / (CEIL_DB - FLOOR_DB), 0.0, 1.0)
    level = np.sqrt(level)  # perceptual: moderate speech already opens the mouth visibly
    shape = phoneme_factors(audio.phonemes, n_frames, fps)
    out = np.zeros(n_frames, dtype=np.float32)
    prev = 0.0
    for i in range(n_frames):
        target = float(level[i] * shape[i])
        # Lips meet on p/b/m at once; otherwise the jaw opens quickly and closes a little slower,
        # and a closed mouth reaches exactly 0.
        closing = max(target, prev * 0.45 - 0.02)
        prev = 0.0 if shape[i] == 0.0 else (target if target >= prev else closing)
        out[i] = prev
    return out


def open_mouth(face: NDArray[np.uint8], landmarks: NDArray[np.float32], opening: float) -> NDArray[np.uint8]:
    """Warp one upright face crop (S, S, 3) BGR with its 68 landmarks (crop px) to `opening` in [0, 1]."""
    if opening <= 0.0:
        return face.copy()
    size_y, size_x = face.shape[:2]
    lips = landmarks[_MOUTH_OUTER]
    mouth_w = float(np.ptp(lips[:, 0]))
    cx = float(lips[:, 0].mean())
    # Where the lips meet: corners 60/64 and the midpoints of facing inner-lip points → (5, 2)
    seam = np.stack(
        [
            landmarks[60],
            (landmarks[61] + landmarks[67]) / 2,
            (landmarks[62] + landmarks[66]) / 2,
            (landmarks[63] + landmarks[65]) / 2,
            landmarks[64],
        ]
    ).astype(np.float32)
    lip_line = float(seam[1:4, 1].mean())
    lower_lip_y = float(landmarks[_LOWER_LIP, 1].max())
    chin_y = float(landmarks[_CHIN, 1])
    drop_px = opening * MAX_OPEN_RATIO * mouth_w
    half_w = max(0.5 * float(seam[-1, 0] - seam[0, 0]), 1.0)

    ys, xs = np.mgrid[0:size_y, 0:size_x].astype(np.float32)  # (S, S) each
    cols = xs[0]
    seam_y = np.interp(cols, seam[:, 0], seam[:, 1]).astype(np.float32)[None, :]  # (1, S)
    # Opening profile across the mouth: 1 in the middle, 0 at the corners (a lens, not a box).
    profile = (np.clip(1.0 - ((cols - cx) / half_w) ** 2, 0.0, 1.0) ** 0.6)[None, :]  # (1, S)
    fx = np.exp(-0.5 * ((xs - cx) / (0.75 * mouth_w)) ** 4)  # jaw drop: full under the mouth, fading outside
    below = (ys > seam_y).astype(np.float32)
    ramp = np.clip((ys - lip_line) / max(lower_lip_y - lip_line, 1.0), 0.0, 1.0)
    fade = np.clip(1.0 - (ys - chin_y) / max(0.6 * (chin_y - lip_line), 1.0), 0.0, 1.0)
    # Across the seam the shift jumps by profile × drop (the gap we fill); elsewhere it is continuous,
    # so cheeks and chin stretch smoothly instead of tearing.
    shift = drop_px * fade * (profile * below + (1.0 - profile) * ramp * fx)
    warped = cv2.remap(face, xs, ys - shift, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)

    # The inner mouth: between the seam and the seam moved down by the gap.
    xs_poly = np.linspace(float(seam[0, 0]), float(seam[-1, 0]), 24, dtype=np.float32)
    top = np.interp(xs_poly, seam[:, 0], seam[:, 1])
    gap = drop_px * np.clip(1.0 - ((xs_poly - cx) / half_w) ** 2, 0.0, 1.0) ** 0.6
    poly = np.concatenate([np.stack([xs_poly, top], 1), np.stack([xs_poly, top + gap], 1)[::-1]])
    mask = np.zeros((size_y, size_x), dtype=np.uint8)
    cv2.fillPoly(mask, [np.round(poly * 4).astype(np.int32)], 255, lineType=cv2.LINE_AA, shift=2)
    soft = cv2.GaussianBlur(mask, (0, 0), sigmaX=max(0.7, 0.015 * mouth_w))
    alpha = (soft.astype(np.float32) / 255.0)[..., None]
    # Darker towards the middle of the gap (the throat), lighter near the lips.
    depth = np.clip(1.0 - np.abs(ys - (seam_y + 0.5 * drop_px)) / max(0.6 * drop_px, 1.0), 0.0, 1.0)[..., None]
    inner = np.array([40.0, 34.0, 78.0], np.float32) * (1.0 - 0.55 * depth)  # red-brown, BGR
    out = warped.astype(np.float32) * (1.0 - alpha) + inner * alpha
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


# A video "shows the person talking" when its mouth opening (inner-lip gap / eye distance) spans at least this
# much between its 5th and 95th percentile frames; an idle or still avatar spans ~0.01.
TALKING_RANGE = 0.08
MIN_MOUTH_FRAMES = 10
_RIGID = np.r_[27:36, 36:48]  # nose and eyes: they do not move with the mouth
_LOWER_FACE = np.r_[2:15, 31:36]  # jaw from cheek to cheek, closed over the nostrils


class MouthBank:
    """The avatar's own frames ranked by mouth opening, when its video shows the person talking."""

    def __init__(self, landmarks: NDArray[np.float32]) -> None:
        self.opening = mouth_opening(landmarks)  # (N,) eye distances
        self.low, self.high = (float(v) for v in np.percentile(self.opening, [5, 95]))
        self.usable = len(self.opening) >= MIN_MOUTH_FRAMES and self.high - self.low >= TALKING_RANGE

    def donor(self, wanted: float) -> int:
        """Source frame whose opening is nearest to `wanted` in [0, 1] of the video's own range."""
        target = self.low + float(np.clip(wanted, 0.0, 1.0)) * (self.high - self.low)
        return int(np.argmin(np.abs(self.opening - target)))


def paste_mouth(
    face: NDArray[np.uint8],
    landmarks: NDArray[np.float32],
    donor: NDArray[np.uint8],
    donor_landmarks: NDArray[np.float32],
) -> NDArray[np.uint8]:
    """Blend the donor crop's lower face (S, S, 3), aligned on the rigid landmarks, into `face` (same size)."""
    size_y, size_x = face.shape[:2]
    m, _ = cv2.estimateAffinePartial2D(
        np.asarray(donor_landmarks, np.float32)[_RIGID], np.asarray(landmarks, np.float32)[_RIGID], method=cv2.LMEDS
    )
    if m is None:
        return face.copy()
    warped = cv2.warpAffine(donor, m, (size_x, size_y), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    moved = apply_affine(np.asarray(m, np.float64), np.asarray(donor_landmarks, np.float64))
    # Both lower faces: wherever either jaw reaches, the donor's pixels (lips, teeth, chin or neck) belong.
    pts = np.concatenate([np.asarray(landmarks, np.float64)[_LOWER_FACE], moved[_LOWER_FACE]])
    mask = np.zeros((size_y, size_x), np.uint8)
    cv2.fillConvexPoly(mask, cv2.convexHull(np.round(pts * 4).astype(np.int32)), 255, lineType=cv2.LINE_AA, shift=2)
    face_w = float(np.ptp(np.asarray(landmarks)[:17, 0]))
    alpha = cv2.GaussianBlur(mask, (0, 0), sigmaX=max(1.0, 0.04 * face_w)).astype(np.float32)[..., None] / 255.0
    out = face.astype(np.float32) * (1.0 - alpha) + warped.astype(np.float32) * alpha
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


class _Ready:
    """A batch that was computed synchronously."""

    def __init__(self, faces: NDArray[np.uint8]) -> None:
        self._faces = faces

    def wait(self) -> NDArray[np.uint8]:
        """(B, 256, 256, 3) BGR uint8."""
        return self._faces


@dataclass
class PreviewConditioning:
    """One utterance: its avatar and the mouth opening of every clip frame."""

    cache: AvatarCache
    openings: NDArray[np.float32]  # (T,) in [0, 1]
    bank: MouthBank  # the avatar's own mouths, when its video shows talking
    warp_ms: float = 0.0

    def crop(self, source_id: int) -> tuple[NDArray[np.uint8], NDArray[np.float32]]:
        """Upright 256² crop of a source frame and its landmarks in crop px."""
        to_frame = self.cache.face_to_frame[source_id]
        crop = warp_crop(self.cache.frames[source_id], to_frame, FACE_SIZE_PX, cv2.INTER_LINEAR)
        landmarks = apply_affine(invert_affine(to_frame), self.cache.landmarks[source_id]).astype(np.float32)
        return crop, landmarks

    def timings_ms(self) -> dict[str, float]:
        """Time spent warping mouths."""
        return {"preview_ms": self.warp_ms}


class PreviewFaces:
    """FaceSource with no model: opens the avatar's mouth with the loudness envelope (see module doc)."""

    name = "preview"
    composites = False  # faces go to the CPU blend pool

    def __init__(self, fps: int, batch_size: int = 8) -> None:
        self.fps = fps
        self.first_batch_size = 1
        self.batch_size = batch_size

    def prepare(
        self,
        cache: AvatarCache,
        samples_16k: NDArray[np.float32],
        n_frames: int,
        phonemes: tuple[tuple[float, str], ...] = (),
    ) -> PreviewConditioning:
        """Per-frame openings from the 16 kHz audio (and phoneme timings); the cache needs landmarks only."""
        openings = mouth_openings(Audio(samples_16k, 16000, phonemes), n_frames, self.fps)
        bank = MouthBank(cache.raw_landmarks if cache.raw_landmarks is not None else cache.landmarks)
        return PreviewConditioning(cache, openings, bank)

    def submit(self, requests: Sequence[FaceRequest]) -> _Ready:
        """Each request's crop with its frame's opening: one of the avatar's own mouths, or the warp (synchronously)."""
        faces = np.empty((len(requests), FACE_SIZE_PX, FACE_SIZE_PX, 3), dtype=np.uint8)
        for k, (cond, frame_id, source_id, _) in enumerate(requests):
            t0 = time.perf_counter()
            crop, landmarks = cond.crop(source_id)
            wanted = float(cond.openings[frame_id])
            if cond.bank.usable:
                donor = cond.bank.donor(wanted)
                faces[k] = crop if donor == source_id else paste_mouth(crop, landmarks, *cond.crop(donor))
            else:
                faces[k] = open_mouth(crop, landmarks, wanted)
            cond.warp_ms += (time.perf_counter() - t0) * 1000
        return _Ready(faces)

    def accelerated(self) -> dict[int, str]:
        """No fixed shapes: any batch size runs as it is."""
        return {}

    def start(
        self,
        cache: AvatarCache,
        samples_16k: NDArray[np.float32],
        n_frames: int,
        phonemes: tuple[tuple[float, str], ...] = (),
    ) -> ClipJob:
        """One clip's faces without a scheduler."""
        return ClipJob(self, self.prepare(cache, samples_16k, n_frames, phonemes))
