"""Where the audio is silent, show the original (closed-mouth) avatar frame instead of a generated face.

MuseTalk rarely closes the mouth in pauses: the model saw few closed mouths in
training. So each frame gets a face weight in [0, 1]: 1 = generated face, 0 = the source frame untouched
(no model call at all). Silent runs shorter than `silence_min_frames` count as speech (short gaps between
words keep moving). Silent frames within `crossfade_frames` of speech get a falling weight, so the mouth
closes over a few frames instead of snapping shut; the ramp lies in the silence, so speech onsets keep
their full motion (the model already anticipates them through its 80 ms look-ahead).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from musetalk.config import AudioConfig

SILENCE_FLOOR_DB = -120.0  # RMS of digital silence, instead of -inf


def frame_rms_db(samples: NDArray[np.float32], n_frames: int, fps: int, rate_hz: int) -> NDArray[np.float32]:
    """RMS level (dBFS) of each video frame's own audio span → (n_frames,) float32."""
    out = np.full(n_frames, SILENCE_FLOOR_DB, dtype=np.float32)
    for f in range(n_frames):
        seg = samples[f * rate_hz // fps : (f + 1) * rate_hz // fps]
        if len(seg):
            rms = float(np.sqrt(np.mean(np.square(seg, dtype=np.float64))))
            if rms > 0:
                out[f] = max(SILENCE_FLOOR_DB, 20.0 * np.log10(rms))
    return out


def _fill_short_runs(silent: NDArray[np.bool_], min_frames: int) -> NDArray[np.bool_]:
    """Silent runs shorter than `min_frames` become speech."""
    out = silent.copy()
    f = 0
    while f < len(out):
        if not out[f]:
            f += 1
            continue
        end = f
        while end < len(out) and out[end]:
            end += 1
        if end - f < min_frames:
            out[f:end] = False
        f = end
    return out


def face_weights(rms_db: NDArray[np.float32], cfg: AudioConfig) -> NDArray[np.float32]:
    """Per-frame weight of the generated face (T,) float32 in [0, 1]; 0 means 'show the source frame'."""
    n = len(rms_db)
    if not cfg.silence_enabled or n == 0:
        return np.ones(n, dtype=np.float32)
    silent = _fill_short_runs(rms_db < cfg.silence_threshold_db, cfg.silence_min_frames)
    speech = np.flatnonzero(~silent)
    weights = np.zeros(n, dtype=np.float32)
    if len(speech) == 0:
        return weights
    weights[speech] = 1.0
    ramp = cfg.crossfade_frames
    if ramp:
        # Distance (in frames) from each frame to the nearest speech frame.
        idx = np.arange(n)
        pos = np.searchsorted(speech, idx)
        left = np.where(pos > 0, idx - speech[np.maximum(pos - 1, 0)], n + 1)
        right = np.where(pos < len(speech), speech[np.minimum(pos, len(speech) - 1)] - idx, n + 1)
        dist = np.minimum(np.abs(left), np.abs(right))
        fade = (dist >= 1) & (dist <= ramp)
        weights[fade] = 1.0 - dist[fade] / (ramp + 1.0)
    return weights
