"""LSE-C / LSE-D with LatentSync's SyncNet: how well the mouth matches the speech, as the network sees it.

Faces: each frame is aligned by a similarity on its rigid landmarks to a 256² template (the mean face shape),
converted to RGB in [-1, 1], and its lower half kept; 16 consecutive frames form one visual window.
Audio: the 80-bin log-mel spectrogram LatentSync (after Wav2Lip) trains on — 800-sample STFT, 200-sample hop,
55-7600 Hz Slaney filters, pre-emphasis 0.97, dB relative to 20 dB, scaled to [-4, 4] — cut into 52-frame
windows aligned with each visual window shifted by -K…K video frames.
For each shift the Euclidean distance between the unit embeddings is averaged over windows: LSE-D is the
smallest average distance, `offset_frames` the shift where it occurs (positive = video late), and LSE-C the
median minus the minimum (confidence: how clearly one shift wins). These use LatentSync's SyncNet, not the
original SyncNet (syncnet_v2) papers quote, so compare them between our own A/B runs only.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from numpy.typing import NDArray

from musetalk.faces.tracking import MEAN_SHAPE_68, RIGID_POINTS
from musetalk.models.nets_whisper import mel_filter_bank
from musetalk.models.syncnet import FACE_PX, MEL_BINS, MEL_FRAMES, N_FRAMES, SyncNet

RATE_HZ = 16000
N_FFT = 800
HOP = 200
PREEMPHASIS = 0.97
REF_LEVEL_DB = 20.0
MIN_LEVEL_DB = -100.0
MAX_ABS = 4.0
MAX_SHIFT_FRAMES = 8
WINDOW_STEP_FRAMES = 4
TEMPLATE_SCALE = 80.0  # px per unit of the mean shape in the 256² template
TEMPLATE_OFFSET = np.array([128.0, 112.0])


def log_mel(samples_16k: NDArray[np.float32]) -> NDArray[np.float32]:
    """(n,) 16 kHz samples → (80, T) normalised log-mel, T = n / 200 + 1 (centred frames)."""
    x = np.asarray(samples_16k, dtype=np.float32)
    x = np.append(x[:1], x[1:] - PREEMPHASIS * x[:-1]).astype(np.float32)
    spec = torch.stft(
        torch.from_numpy(x), N_FFT, HOP, N_FFT, window=torch.hann_window(N_FFT), center=True,
        pad_mode="reflect", return_complex=True,
    ).abs().numpy()  # (401, T)  # fmt: skip
    filters = mel_filter_bank(N_FFT // 2 + 1, MEL_BINS, RATE_HZ, f_min=55.0, f_max=7600.0)  # (401, 80) Slaney
    mel_db = 20.0 * np.log10(np.maximum(1e-5, filters.T @ spec)) - REF_LEVEL_DB
    scaled = 2 * MAX_ABS * (mel_db - MIN_LEVEL_DB) / -MIN_LEVEL_DB - MAX_ABS
    return np.clip(scaled, -MAX_ABS, MAX_ABS).astype(np.float32)


def lower_face(frame_bgr: NDArray[np.uint8], landmarks: NDArray[np.floating]) -> NDArray[np.float32]:
    """(3, 128, 256) RGB in [-1, 1]: the lower half of the frame's face aligned to the 256² template."""
    dst = (MEAN_SHAPE_68[RIGID_POINTS] * TEMPLATE_SCALE + TEMPLATE_OFFSET).astype(np.float32)
    m, _ = cv2.estimateAffinePartial2D(np.asarray(landmarks, np.float32)[RIGID_POINTS], dst, method=cv2.LMEDS)
    if m is None:
        m = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    crop = cv2.warpAffine(frame_bgr, m, (FACE_PX, FACE_PX), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    rgb = cv2.cvtColor(crop, cv2.COLOR_BGR2RGB)[FACE_PX // 2 :]
    return np.ascontiguousarray(rgb.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0)


class SyncNetScorer:
    """Scores a video's lip sync with a loaded SyncNet (see the module docstring)."""

    def __init__(self, net: SyncNet, max_shift_frames: int = MAX_SHIFT_FRAMES) -> None:
        self.net = net
        self.max_shift = max_shift_frames
        self.device = next(net.parameters()).device

    @torch.no_grad()
    def score(
        self,
        frames_bgr: list[NDArray[np.uint8]],
        landmarks: NDArray[np.float32],
        samples_16k: NDArray[np.float32],
        fps: float,
    ) -> dict[str, float]:
        """{"lse_c", "lse_d", "offset_frames", "windows"}; empty when the video is shorter than one window."""
        n = len(frames_bgr)
        mel = log_mel(samples_16k)
        mel_per_frame = RATE_HZ / HOP / fps
        starts = [
            s for s in range(self.max_shift, n - N_FRAMES - self.max_shift + 1, WINDOW_STEP_FRAMES)
            if int(round((s + self.max_shift) * mel_per_frame)) + MEL_FRAMES <= mel.shape[1]
        ]  # fmt: skip
        if not starts:
            return {}
        faces = np.stack([lower_face(f, lm) for f, lm in zip(frames_bgr, landmarks, strict=True)])  # (N, 3, 128, 256)
        shifts = list(range(-self.max_shift, self.max_shift + 1))
        dist = np.zeros((len(starts), len(shifts)))
        for w, s in enumerate(starts):
            stack = faces[s : s + N_FRAMES].reshape(1, 3 * N_FRAMES, FACE_PX // 2, FACE_PX)
            vis = self.net.embed_faces(torch.from_numpy(stack).to(self.device))  # (1, D)
            # Video late by k frames: its frames s… match the audio that started k frames earlier.
            wins = [int(round((s - k) * mel_per_frame)) for k in shifts]
            audio = np.stack([mel[:, a : a + MEL_FRAMES] for a in wins])[:, None]  # (K, 1, 80, 52)
            aud = self.net.embed_audio(torch.from_numpy(audio).to(self.device))  # (K, D)
            dist[w] = torch.linalg.norm(aud - vis, dim=1).cpu().numpy()
        curve = dist.mean(axis=0)
        best = int(np.argmin(curve))
        return {
            "lse_d": round(float(curve[best]), 4),
            "lse_c": round(float(np.median(curve) - curve[best]), 4),
            "offset_frames": shifts[best],
            "windows": len(starts),
        }
