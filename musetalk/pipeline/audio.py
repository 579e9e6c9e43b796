"""Audio in, per-frame Whisper tokens out: exactly the MuseTalk v1.5 math, in integers.

Input of any rate, channel count or container is first turned into mono float32 (PyAV decode, soxr
resample to 16 kHz). Whisper-tiny hidden states are computed per 30 s window, all encoder layers stacked,
trimmed to the real audio length, zero-padded and cut into one window per video frame:

    frame f (fps F) reads padded rows [f·50 // F, f·50 // F + 2·(left + right + 1))
    padded = ceil(50 / F)·left zero rows ‖ features[: n·50 // 16000] ‖ ceil(50 / F)·3·right zero rows

Frame and feature counts use exact integer arithmetic. Upstream computes them in floating point
(`floor(n / 16000 · 25)`), which at some lengths lands just below an integer: for
36,800 samples (2.3 s) upstream keeps 114 feature rows instead of 115 and zero-pads the last real
one; for 18,560 samples (1.16 s) it makes 28 frames instead of 29. We deliberately use the exact
values: they agree with upstream everywhere else and are what its formula means.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import soxr
import torch
from numpy.typing import NDArray

from musetalk.errors import InputError
from musetalk.types import Audio

if TYPE_CHECKING:
    from musetalk.models.nets_whisper import WhisperEncoder, WhisperFeatures
    from musetalk.models.unet import PositionalEncoding

WHISPER_RATE_HZ = 16000  # Whisper's input rate
WHISPER_FRAMES_PER_S = 50  # encoder positions per second (20 ms each)
WINDOW_S = 30  # Whisper always encodes 30 s windows
WINDOW_SAMPLES = WINDOW_S * WHISPER_RATE_HZ

AudioSource = Audio | Path | str | bytes


def _mono_float(samples: NDArray[np.generic]) -> NDArray[np.float32]:
    """(n,) or (channels, n) of any numeric dtype → (n,) float32 in [-1, 1] (channel mean)."""
    arr = np.asarray(samples)
    if np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(arr.dtype)
        arr = arr.astype(np.float32) / float(max(abs(info.min), info.max))
    arr = arr.astype(np.float32, copy=False)
    if arr.ndim == 2:
        arr = arr.mean(axis=0, dtype=np.float32)
    if arr.ndim != 1:
        raise InputError(f"audio must be mono or (channels, samples), got shape {arr.shape}")
    return arr


def decode_audio(source: Path | str | bytes) -> Audio:
    """Decode any container/codec PyAV knows (wav, mp3, ogg, flac, m4a, …) to mono float32 at its own rate."""
    import av

    where = source if isinstance(source, bytes) else str(source)
    label = "audio bytes" if isinstance(source, bytes) else str(source)
    if not isinstance(source, bytes) and not Path(source).is_file():
        raise InputError(f"audio file not found: {source}")
    chunks: list[NDArray[np.float32]] = []
    rate = 0
    try:
        with av.open(io.BytesIO(where) if isinstance(where, bytes) else where, mode="r") as container:
            if not container.streams.audio:
                raise InputError(f"{label}: no audio stream")
            stream = container.streams.audio[0]
            for frame in container.decode(stream):
                rate = frame.sample_rate
                data = frame.to_ndarray()  # planar: (channels, n); packed: (1, n·channels)
                if not frame.format.is_planar and len(frame.layout.channels) > 1:
                    data = data.reshape(-1, len(frame.layout.channels)).T
                chunks.append(_mono_float(data))
    except InputError:
        raise
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise InputError(f"{label}: cannot decode audio ({type(exc).__name__}: {exc})") from exc
    if not chunks or rate <= 0:
        raise InputError(f"{label}: no audio samples decoded")
    return Audio(np.concatenate(chunks).astype(np.float32, copy=False), int(rate))


def load_audio(source: AudioSource) -> Audio:
    """An `Audio` (mono float32, own rate) from an Audio, a file path or encoded bytes."""
    if isinstance(source, Audio):
        if source.sample_rate <= 0:
            raise InputError(f"invalid sample rate {source.sample_rate}")
        audio = Audio(_mono_float(source.samples), source.sample_rate, source.phonemes)
    else:
        audio = decode_audio(source)
    if not np.all(np.isfinite(audio.samples)):
        raise InputError("audio contains NaN or infinite samples")
    return audio


def resample(audio: Audio, rate_hz: int = WHISPER_RATE_HZ) -> NDArray[np.float32]:
    """Samples at `rate_hz` (soxr, high quality) → (m,) float32."""
    if audio.sample_rate == rate_hz or not len(audio.samples):
        return audio.samples.astype(np.float32, copy=False)
    return np.asarray(soxr.resample(audio.samples, audio.sample_rate, rate_hz), dtype=np.float32)


def num_frames(n_samples: int, fps: int, rate_hz: int = WHISPER_RATE_HZ) -> int:
    """Video frames for `n_samples` of audio: floor(duration · fps), exactly (see module doc)."""
    return n_samples * fps // rate_hz


def feature_length(n_samples: int, rate_hz: int = WHISPER_RATE_HZ) -> int:
    """Whisper encoder rows covering the real audio: floor(duration · 50), exactly."""
    return n_samples * WHISPER_FRAMES_PER_S // rate_hz


@dataclass(frozen=True)
class WindowSpec:
    """Per-frame audio window geometry, in Whisper encoder rows."""

    fps: int
    pad_left: int = 2
    pad_right: int = 2

    @property
    def rows_per_frame(self) -> int:
        """Encoder rows per video frame: 2·(left + right + 1) (= 10 by default)."""
        return 2 * (self.pad_left + self.pad_right + 1)

    @property
    def padding_unit(self) -> int:
        """ceil(50 / fps): rows per padding step (2 at 25 fps)."""
        return -(-WHISPER_FRAMES_PER_S // self.fps)

    @property
    def pad_front(self) -> int:
        """Zero rows prepended (4 by default)."""
        return self.padding_unit * self.pad_left

    @property
    def pad_back(self) -> int:
        """Zero rows appended (12 by default: upstream's generous out-of-bounds guard)."""
        return self.padding_unit * 3 * self.pad_right

    def start_row(self, frame: int) -> int:
        """First padded row of frame `frame`'s window: floor(frame · 50 / fps)."""
        return frame * WHISPER_FRAMES_PER_S // self.fps


def frame_windows(hidden: torch.Tensor, n_samples: int, spec: WindowSpec) -> torch.Tensor:
    """Stacked encoder states (R, L, C) → per-frame tokens (T, rows_per_frame·L, C), time-major, no PE.

    R may include the zero tail of the last 30 s window; rows past the real audio are dropped first.
    """
    n_frames = num_frames(n_samples, spec.fps)
    length = feature_length(n_samples)
    if hidden.ndim != 3 or hidden.shape[0] < length:
        raise ValueError(f"expected (≥{length}, layers, dim) hidden states, got {tuple(hidden.shape)}")
    feats = hidden[:length]  # (length, L, C)
    _, n_layers, dim = feats.shape
    front = feats.new_zeros(spec.pad_front, n_layers, dim)
    back = feats.new_zeros(spec.pad_back, n_layers, dim)
    padded = torch.cat([front, feats, back], dim=0)  # (pad_front + length + pad_back, L, C)
    width = spec.rows_per_frame
    starts = torch.tensor([spec.start_row(f) for f in range(n_frames)], dtype=torch.long)
    if n_frames and int(starts[-1]) + width > padded.shape[0]:
        raise ValueError(f"window of the last frame ends past the padded features ({padded.shape[0]} rows)")
    rows = (starts[:, None] + torch.arange(width)[None, :]).to(padded.device)  # (T, width)
    windows = padded[rows]  # (T, width, L, C)
    # Token index = row·L + layer ("b c h w -> b (c h) w" upstream): time-major, layer-minor.
    return windows.reshape(n_frames, width * n_layers, dim)


# Batch sizes of the Whisper encoder: a call with another number of windows is padded up to the next one, so
# only these few shapes ever run (cuDNN autotunes once per shape; an unseen shape would stall its batch).
WHISPER_BATCH_SHAPES = (1, 2, 4, 8, 16)


def whisper_batch_shape(n_windows: int) -> int:
    """The encoder batch size that carries `n_windows` windows (1 ≤ n ≤ the largest shape)."""
    return next(size for size in WHISPER_BATCH_SHAPES if size >= n_windows)


def log_mel_windows(
    segments: Sequence[NDArray[np.float32]], extractor: WhisperFeatures, device: torch.device
) -> torch.Tensor:
    """Whisper's log-mel input of each ≤ 30 s segment (zero-padded to 30 s), all at once on `device`.

    → (W, n_mels, frames) float32. The same math as the feature extractor applied to each segment alone
    (Hann STFT, power, mel filters, log10, floor at the window's max − 8, (x + 4) / 4), but one batched
    pass on the GPU instead of a round trip through NumPy per window.
    """
    n_samples = int(extractor.n_samples)
    waves = torch.zeros(len(segments), n_samples, dtype=torch.float32, device=device)  # (W, 480000)
    for i, segment in enumerate(segments):
        n = min(len(segment), n_samples)
        waves[i, :n] = torch.from_numpy(np.ascontiguousarray(segment[:n], dtype=np.float32)).to(device)
    n_fft, hop = int(extractor.n_fft), int(extractor.hop_length)
    window = torch.hann_window(n_fft, device=device)
    spectrum = torch.stft(waves, n_fft, hop, window=window, return_complex=True)  # (W, n_fft/2+1, frames+1)
    power = spectrum[..., :-1].abs() ** 2  # (W, 201, 3000): the last STFT frame is not used
    filters = torch.as_tensor(np.asarray(extractor.mel_filters), dtype=torch.float32, device=device)  # (201, 80)
    log_spec = (filters.T @ power).clamp(min=1e-10).log10()  # (W, 80, 3000)
    peak = log_spec.amax(dim=(1, 2), keepdim=True)  # per window, as when each is extracted alone
    return (torch.maximum(log_spec, peak - 8.0) + 4.0) / 4.0


@torch.inference_mode()
def whisper_hidden_states_many(
    clips_16k: Sequence[NDArray[np.float32]],
    encoder: WhisperEncoder,
    extractor: WhisperFeatures,
) -> list[torch.Tensor]:
    """whisper_hidden_states of several clips, their 30 s windows encoded together in a few large batches.

    The encoder sees each window alone (no cross-window attention), so batching changes nothing but speed:
    sixteen utterances arriving at once cost about one encoder call instead of sixteen.
    """
    param = next(encoder.parameters())
    device, dtype = param.device, param.dtype
    segments: list[NDArray[np.float32]] = []
    counts: list[int] = []
    for samples_16k in clips_16k:
        n_windows = max(1, math.ceil(len(samples_16k) / WINDOW_SAMPLES))
        segments.extend(samples_16k[i * WINDOW_SAMPLES : (i + 1) * WINDOW_SAMPLES] for i in range(n_windows))
        counts.append(n_windows)
    mel = log_mel_windows(segments, extractor, device).to(dtype)  # (ΣW, 80, 3000)
    parts = []
    largest = WHISPER_BATCH_SHAPES[-1]
    for start in range(0, mel.shape[0], largest):
        chunk = mel[start : start + largest]  # (w, 80, 3000)
        size = whisper_batch_shape(chunk.shape[0])
        if size > chunk.shape[0]:  # pad to a fixed shape; the padding windows' states are dropped
            chunk = torch.cat([chunk, chunk.new_zeros(size - chunk.shape[0], *chunk.shape[1:])])
        states = encoder(chunk, output_hidden_states=True).hidden_states
        parts.append(torch.stack(states, dim=2)[: min(largest, mel.shape[0] - start)])  # (w, 1500, layers+1, C)
    stacked = torch.cat(parts, dim=0)  # (ΣW, 1500, layers+1, C)
    out, pos = [], 0
    for n_windows in counts:
        clip = stacked[pos : pos + n_windows]
        out.append(clip.reshape(-1, clip.shape[2], clip.shape[3]))
        pos += n_windows
    return out


def whisper_hidden_states(
    samples_16k: NDArray[np.float32],
    encoder: WhisperEncoder,
    extractor: WhisperFeatures,
) -> torch.Tensor:
    """All encoder hidden states of every 30 s window, stacked → (1500·windows, layers + 1, C) on the encoder."""
    return whisper_hidden_states_many([samples_16k], encoder, extractor)[0]


def audio_tokens_many(
    clips_16k: Sequence[NDArray[np.float32]],
    spec: WindowSpec,
    encoder: WhisperEncoder,
    extractor: WhisperFeatures,
    pe: PositionalEncoding,
) -> list[torch.Tensor]:
    """audio_tokens of several clips with their Whisper passes batched → one (T_i, rows·L, C) per clip."""
    hidden = whisper_hidden_states_many(clips_16k, encoder, extractor)
    with torch.inference_mode():
        return [pe(frame_windows(h, len(s), spec)) for h, s in zip(hidden, clips_16k, strict=True)]


def audio_tokens(
    samples_16k: NDArray[np.float32],
    spec: WindowSpec,
    encoder: WhisperEncoder,
    extractor: WhisperFeatures,
    pe: PositionalEncoding,
) -> torch.Tensor:
    """UNet conditioning for every frame: (T, rows_per_frame·layers, C) with the positional encoding added."""
    return audio_tokens_many([samples_16k], spec, encoder, extractor, pe)[0]


CONTEXT_MAX_S = 2.0  # left context kept when sentences are rendered one by one


def context_samples(
    left_context_16k: NDArray[np.float32] | None, fps: int, max_s: float = CONTEXT_MAX_S
) -> NDArray[np.float32]:
    """The trailing whole video frames (at most max_s) of the audio that preceded a clip → (k·16000/fps,) float32.

    Whole frames keep the clip's first frame on a frame boundary of the joined audio, so its windows line up
    exactly with the ones it would have in one long rendering.
    """
    if left_context_16k is None or len(left_context_16k) == 0:
        return np.zeros(0, dtype=np.float32)
    per_frame = WHISPER_RATE_HZ // fps
    if per_frame * fps != WHISPER_RATE_HZ:
        raise ValueError(f"left context needs a whole number of 16 kHz samples per frame; {fps} fps has none")
    n_frames = min(len(left_context_16k) // per_frame, int(max_s * fps))
    return np.ascontiguousarray(left_context_16k[len(left_context_16k) - n_frames * per_frame :], dtype=np.float32)


def audio_tokens_with_context(
    samples_16k: NDArray[np.float32],
    left_context_16k: NDArray[np.float32] | None,
    spec: WindowSpec,
    encoder: WhisperEncoder,
    extractor: WhisperFeatures,
    pe: PositionalEncoding,
) -> torch.Tensor:
    """audio_tokens of a clip whose preceding audio (the previous sentence) Whisper also hears → (T, rows·L, C).

    Rendered alone, a sentence's first frames see zero padding and a Whisper encoder that has heard nothing
    before; with the context, they get the tokens one long rendering of both sentences would give them.
    """
    ctx = context_samples(left_context_16k, spec.fps)
    joined = np.concatenate([ctx, np.asarray(samples_16k, dtype=np.float32)])
    k = num_frames(len(ctx), spec.fps)
    tokens = audio_tokens(joined, spec, encoder, extractor, pe)
    return tokens[k : k + num_frames(len(samples_16k), spec.fps)]
