"""Plain-torch Whisper encoder and log-mel front end (transformers' WhisperEncoder / WhisperFeatureExtractor math).

Encoder: two GELU convolutions (the second with stride 2) turn a (B, mels, 3000) log-mel window into 1500 positions,
the learned (in practice sinusoidal) `embed_positions` table is added, then pre-LayerNorm self-attention / GELU-MLP
layers and a final LayerNorm. `hidden_states` holds the embeddings and every layer's output, the last one after the
final LayerNorm: exactly the tuple transformers returns with output_hidden_states=True (the audio code stacks it).

Front end: `WhisperFeatures` has the attributes of transformers' extractor that the audio code reads (`mel_filters`,
`n_fft`, `hop_length`, `n_samples`, `sampling_rate`, `feature_size`), read from preprocessor_config.json, and
computes the same log-mel spectrogram as the extractor's torch path when called like it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import nn

from musetalk.errors import WeightsInvalid
from musetalk.models.nets_blocks import check_config, positive_int

# config.json keys of a transformers Whisper folder that the encoder's inference math depends on; the rest describe
# the decoder, generation or training (dropout, layer drop, SpecAugment) and are not read.
_ENCODER_FREE = (
    "num_mel_bins",
    "d_model",
    "encoder_layers",
    "encoder_attention_heads",
    "encoder_ffn_dim",
    "max_source_positions",
)
_ENCODER_FIXED: dict[str, Any] = {"activation_function": "gelu", "model_type": "whisper"}


@dataclass(frozen=True)
class WhisperEncoderConfig:
    """Encoder shape (transformers' WhisperConfig defaults = whisper-tiny for absent keys)."""

    num_mel_bins: int = 80
    d_model: int = 384
    encoder_layers: int = 4
    encoder_attention_heads: int = 6
    encoder_ffn_dim: int = 1536
    max_source_positions: int = 1500


def whisper_encoder_config(config: Mapping[str, Any], source: str = "Whisper config") -> WhisperEncoderConfig:
    """Validate a Whisper config.json dict → WhisperEncoderConfig, or raise WeightsInvalid."""
    for key, want in _ENCODER_FIXED.items():
        if key in config and config[key] != want:
            raise WeightsInvalid(
                f"{source}: {key}={config[key]!r} is not supported (the native encoder needs {want!r})"
            )
    d = WhisperEncoderConfig()
    spec = WhisperEncoderConfig(**{key: positive_int(source, config, key, getattr(d, key)) for key in _ENCODER_FREE})
    if spec.d_model % spec.encoder_attention_heads:
        raise WeightsInvalid(
            f"{source}: d_model {spec.d_model} is not divisible by {spec.encoder_attention_heads} heads"
        )
    return spec


def read_whisper_encoder_config(path: Path) -> WhisperEncoderConfig:
    """WhisperEncoderConfig from a Whisper folder's config.json."""
    return whisper_encoder_config(_read_json(path), str(path))


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """(length, channels) [sin ‖ cos] table Whisper's checkpoints store as embed_positions (for writing test models)."""
    increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-increment * torch.arange(channels // 2))  # (channels/2,)
    scaled = torch.arange(length).view(-1, 1) * inv_timescales.view(1, -1)  # (length, channels/2)
    return torch.cat([scaled.sin(), scaled.cos()], dim=1)


class WhisperAttention(nn.Module):
    """Multi-head self-attention; q is scaled before the product (as transformers does), k has no bias."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scaling = (dim // heads) ** -0.5
        # Registration order k, v, q, out matches transformers (state_dict() key order).
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) → (B, T, C)."""
        b, t, c = x.shape
        shape = (b, t, self.heads, c // self.heads)
        q = (self.q_proj(x) * self.scaling).view(shape).transpose(1, 2).contiguous()  # (B, h, T, d)
        k = self.k_proj(x).view(shape).transpose(1, 2).contiguous()
        v = self.v_proj(x).view(shape).transpose(1, 2).contiguous()
        # scale=1: q is already scaled (rounding then matches transformers, which scales q the same way).
        out = F.scaled_dot_product_attention(q, k, v, scale=1.0)  # (B, h, T, d)
        return self.out_proj(out.transpose(1, 2).contiguous().reshape(b, t, c))


class WhisperEncoderLayer(nn.Module):
    """x + attn(LN(x)), then + fc2(GELU(fc1(LN(·))))."""

    def __init__(self, dim: int, heads: int, ffn_dim: int) -> None:
        super().__init__()
        self.self_attn = WhisperAttention(dim, heads)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) → (B, T, C)."""
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        x = x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))
        if x.dtype == torch.float16:  # dtype, not values: transformers keeps fp16 activations finite this way
            limit = torch.finfo(torch.float16).max - 1000
            x = torch.clamp(x, min=-limit, max=limit)
        return x


class WhisperEncoderOutput(NamedTuple):
    """What the encoder returns: the final states and all hidden states (embeddings first, final LayerNorm last)."""

    last_hidden_state: torch.Tensor  # (B, T, C)
    hidden_states: tuple[torch.Tensor, ...]  # layers + 1 tensors of (B, T, C)


class WhisperEncoder(nn.Module):
    """(B, mels, 2·positions) log-mel → WhisperEncoderOutput; parameter names as transformers' WhisperEncoder."""

    def __init__(self, config: WhisperEncoderConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.d_model
        self.conv1 = nn.Conv1d(config.num_mel_bins, dim, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(dim, dim, kernel_size=3, stride=2, padding=1)
        # Given an (uninitialised) weight, nn.Embedding skips its random init: on the meta device that init
        # would import torch._dynamo (~1.5 s of start-up) only to be overwritten by the checkpoint.
        table = torch.empty(config.max_source_positions, dim)  # (P, C)
        self.embed_positions = nn.Embedding(config.max_source_positions, dim, _weight=table)
        self.embed_positions.requires_grad_(False)
        self.layers = nn.ModuleList(
            [
                WhisperEncoderLayer(dim, config.encoder_attention_heads, config.encoder_ffn_dim)
                for _ in range(config.encoder_layers)
            ]
        )
        self.layer_norm = nn.LayerNorm(dim)

    def forward(self, input_features: torch.Tensor, output_hidden_states: bool = True) -> WhisperEncoderOutput:
        """input_features: (B, mels, 2·positions) → all hidden states, each (B, positions, C).

        `output_hidden_states` is accepted for call compatibility with transformers; the hidden states are always
        returned (computing them costs nothing extra, and the audio code needs them).
        """
        expected = 2 * self.config.max_source_positions
        if input_features.shape[-1] != expected:  # a shape, static per call site
            raise ValueError(f"Whisper expects {expected} mel frames (a 30 s window), got {input_features.shape[-1]}")
        x = F.gelu(self.conv1(input_features))  # (B, C, 2P)
        x = F.gelu(self.conv2(x)).permute(0, 2, 1)  # (B, P, C)
        x = x + self.embed_positions.weight  # (P, C) broadcast over the batch
        states = [x]
        for layer in self.layers:
            x = layer(x)
            states.append(x)
        x = self.layer_norm(x)
        states[-1] = x  # transformers reports the last layer's output after the final LayerNorm
        return WhisperEncoderOutput(x, tuple(states))


def _hz_to_mel(freq: NDArray[np.float64]) -> NDArray[np.float64]:
    """Slaney mel scale: linear 3 mel / 200 Hz below 1 kHz, logarithmic (27 mel per ln 6.4) above."""
    mels = 3.0 * freq / 200.0
    above = freq >= 1000.0
    mels[above] = 15.0 + np.log(freq[above] / 1000.0) * (27.0 / np.log(6.4))
    return mels


def _mel_to_hz(mels: NDArray[np.float64]) -> NDArray[np.float64]:
    """Inverse of _hz_to_mel."""
    freq = 200.0 * mels / 3.0
    above = mels >= 15.0
    freq[above] = 1000.0 * np.exp((np.log(6.4) / 27.0) * (mels[above] - 15.0))
    return freq


def mel_filter_bank(
    n_freqs: int, n_mels: int, sampling_rate: int, f_min: float = 0.0, f_max: float = 8000.0
) -> NDArray[np.float64]:
    """(n_freqs, n_mels) float64 triangular filters, Slaney mel scale and Slaney (constant-area) normalisation.

    Whisper's filters are mel_filter_bank(n_fft // 2 + 1, feature_size, sampling_rate) (0-8 kHz); the same as
    transformers' `mel_filter_bank(..., norm="slaney", mel_scale="slaney")` and librosa's default `filters.mel`.
    """
    edges_mel = np.linspace(_hz_to_mel(np.array([f_min]))[0], _hz_to_mel(np.array([f_max]))[0], n_mels + 2)
    edges = _mel_to_hz(edges_mel)  # (n_mels + 2,) Hz: left edge, centre, right edge of each triangle
    bins = np.linspace(0, sampling_rate // 2, n_freqs)  # (n_freqs,) FFT bin frequencies
    widths = np.diff(edges)  # (n_mels + 1,)
    offsets = edges[None, :] - bins[:, None]  # (n_freqs, n_mels + 2)
    rising = -offsets[:, :-2] / widths[:-1]  # (n_freqs, n_mels): 0 at the left edge, 1 at the centre
    falling = offsets[:, 2:] / widths[1:]  # 1 at the centre, 0 at the right edge
    filters = np.maximum(np.zeros(1), np.minimum(rising, falling))
    area = 2.0 / (edges[2 : n_mels + 2] - edges[:n_mels])  # Slaney: each filter integrates to about the same energy
    return filters * area[None, :]


class MelFeatures(NamedTuple):
    """What calling WhisperFeatures returns (transformers' BatchFeature has the same attribute)."""

    input_features: torch.Tensor  # (B, feature_size, n_samples // hop_length) float32 on the CPU


_FEATURES_KNOWN = (
    "feature_size",
    "sampling_rate",
    "hop_length",
    "chunk_length",
    "n_fft",
    "dither",
    "padding_value",
    "feature_extractor_type",
    # derived by the extractor from the above, or about batching and the processor wrapper; not read
    "n_samples",
    "nb_max_frames",
    "padding_side",
    "return_attention_mask",
    "processor_class",
)


@dataclass(frozen=True, eq=False)
class WhisperFeatures:
    """Whisper's log-mel front end: parameters from preprocessor_config.json and the mel filter bank."""

    feature_size: int = 80
    sampling_rate: int = 16000
    hop_length: int = 160
    chunk_length: int = 30
    n_fft: int = 400
    mel_filters: NDArray[np.float64] = field(init=False, repr=False)  # (n_fft // 2 + 1, feature_size)

    def __post_init__(self) -> None:
        filters = mel_filter_bank(self.n_fft // 2 + 1, self.feature_size, self.sampling_rate)
        object.__setattr__(self, "mel_filters", filters)  # frozen: computed once here

    @property
    def n_samples(self) -> int:
        """Samples per window (30 s at 16 kHz = 480,000)."""
        return self.chunk_length * self.sampling_rate

    @property
    def nb_max_frames(self) -> int:
        """Mel frames per window (3000)."""
        return self.n_samples // self.hop_length

    @classmethod
    def from_config(cls, config: Mapping[str, Any], source: str = "Whisper preprocessor config") -> WhisperFeatures:
        """Validate a preprocessor_config.json dict → WhisperFeatures, or raise WeightsInvalid."""
        fixed = {"feature_extractor_type": "WhisperFeatureExtractor", "dither": 0.0, "padding_value": 0.0}
        check_config(source, config, fixed, free=_FEATURES_KNOWN)
        d = cls()
        names = ("feature_size", "sampling_rate", "hop_length", "chunk_length", "n_fft")
        return cls(**{name: positive_int(source, config, name, getattr(d, name)) for name in names})

    def log_mel(self, waveforms: torch.Tensor) -> torch.Tensor:
        """(B, n_samples) float32 → (B, feature_size, n_samples // hop_length) Whisper log-mel, on their device.

        Power STFT (periodic Hann, centred, reflect-padded; the last frame dropped) → mel → log10 (floor 1e-10) →
        floored at each window's maximum − 8 → (x + 4) / 4: the extractor's torch path, operation for operation.
        """
        window = torch.hann_window(self.n_fft, device=waveforms.device)
        stft = torch.stft(waveforms, self.n_fft, self.hop_length, window=window, return_complex=True)  # (B, F, N+1)
        power = (stft[..., :-1].abs() ** 2).contiguous()  # (B, F, N)
        filters = torch.from_numpy(self.mel_filters).to(waveforms.device, torch.float32)  # (F, M)
        log_spec = torch.clamp(filters.T @ power, min=1e-10).log10()  # (B, M, N)
        peak = log_spec.amax(dim=(1, 2), keepdim=True)  # (B, 1, 1)
        return (torch.maximum(log_spec, peak - 8.0) + 4.0) / 4.0

    def __call__(
        self,
        raw_speech: NDArray[np.floating[Any]] | Sequence[float],
        sampling_rate: int | None = None,
        return_tensors: str = "pt",
        device: str = "cpu",
    ) -> MelFeatures:
        """One mono clip → MelFeatures((1, feature_size, nb_max_frames)), zero-padded or cut to one 30 s window.

        The subset of transformers' extractor call the audio code uses (`extractor(x, sampling_rate=16000,
        return_tensors="pt", device=...)`); the spectrogram is computed on `device` and returned on the CPU.
        """
        if sampling_rate is not None and sampling_rate != self.sampling_rate:
            raise ValueError(
                f"audio at {sampling_rate} Hz given; the Whisper front end expects {self.sampling_rate} Hz"
            )
        if return_tensors != "pt":
            raise ValueError(f"return_tensors={return_tensors!r}: only 'pt' is supported")
        samples = np.asarray(raw_speech, dtype=np.float32)
        if samples.ndim != 1:
            raise ValueError(f"expected mono samples of shape (n,), got {samples.shape}")
        window = np.zeros(self.n_samples, dtype=np.float32)
        n = min(len(samples), self.n_samples)
        window[:n] = samples[:n]
        mel = self.log_mel(torch.from_numpy(window)[None].to(device))  # (1, M, N)
        return MelFeatures(mel.cpu())


def read_whisper_features(path: Path) -> WhisperFeatures:
    """WhisperFeatures from a Whisper folder's preprocessor_config.json."""
    return WhisperFeatures.from_config(_read_json(path), str(path))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise WeightsInvalid(f"{path}: cannot read: {exc}") from exc
    if not isinstance(raw, dict):
        raise WeightsInvalid(f"{path}: expected a JSON object")
    return raw
