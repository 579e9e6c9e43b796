"""Audio decoding and the per-frame Whisper windows of MuseTalk v1.5."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from upstream import upstream_whisper_chunks

from musetalk.config import load_config
from musetalk.errors import InputError
from musetalk.models import load_models
from musetalk.pipeline.audio import (
    WHISPER_BATCH_SHAPES,
    WindowSpec,
    audio_tokens,
    audio_tokens_many,
    feature_length,
    frame_windows,
    load_audio,
    log_mel_windows,
    num_frames,
    resample,
    whisper_batch_shape,
    whisper_hidden_states,
)
from musetalk.types import Audio


def _row_coded(rows: int, layers: int = 5, dim: int = 3) -> torch.Tensor:
    """(rows, layers, dim) where every value of row r, layer l is 1000·(r + 1) + l: zeros mark padding."""
    r = torch.arange(rows, dtype=torch.float32)[:, None, None]
    layer = torch.arange(layers, dtype=torch.float32)[None, :, None]
    return (1000 * (r + 1) + layer).expand(rows, layers, dim).clone()


def test_window_rows_match_facts_for_first_middle_and_last_frame() -> None:
    # Facts §4.4 example: 3.0 s → 48,000 samples → 75 frames, 150 feature rows, 166 padded rows,
    # frame f reads padded rows [2f, 2f + 10) = original rows 2f − 4 … 2f + 5 (zeros outside).
    n = 48_000
    spec = WindowSpec(fps=25)
    assert (num_frames(n, 25), feature_length(n)) == (75, 150)
    assert (spec.rows_per_frame, spec.pad_front, spec.pad_back) == (10, 4, 12)
    assert spec.pad_front + 150 + spec.pad_back == 166
    hidden = _row_coded(1500)  # a whole 30 s window; rows past 150 must be dropped
    windows = frame_windows(hidden, n, spec)
    assert tuple(windows.shape) == (75, 50, 3)

    def rows_read(frame: int) -> list[int]:
        tokens = windows[frame, :, 0].reshape(10, 5)  # (time, layer)
        assert torch.equal(tokens[:, 1] - tokens[:, 0], torch.where(tokens[:, 0] > 0, 1.0, 0.0))  # layer-minor
        return [int(v) // 1000 - 1 for v in tokens[:, 0]]  # −1 = zero padding

    assert rows_read(0) == [-1, -1, -1, -1, 0, 1, 2, 3, 4, 5]
    assert rows_read(37) == list(range(70, 80))
    assert spec.start_row(74) == 148  # padded rows 148..157
    assert rows_read(74) == list(range(144, 150)) + [-1] * 4  # original 144..153, past 149 is padding
    assert torch.equal(windows, upstream_whisper_chunks(hidden[None], n))


@pytest.mark.parametrize(("seconds", "frames"), [(0.5, 12), (1.0, 25), (3.3, 82)])
def test_frame_count_is_floor_of_duration_times_fps(seconds: float, frames: int) -> None:
    n = round(seconds * 16000)
    assert num_frames(n, 25) == frames
    assert math.floor(n / 16000 * 25) == frames  # same as upstream away from float boundaries


def test_float_boundary_uses_exact_integers_on_purpose() -> None:
    # Upstream's float math lands just below an integer here; we keep the exact count.
    assert math.floor(36_800 / 16000 * 50) == 114 and feature_length(36_800) == 115  # 2.3 s
    assert math.floor(18_560 / 16000 * 25) == 28 and num_frames(18_560, 25) == 29  # 1.16 s = 29 × 40 ms
    hidden = _row_coded(1500)
    ours = frame_windows(hidden, 36_800, WindowSpec(25))
    theirs = upstream_whisper_chunks(hidden[None], 36_800)
    assert ours.shape == theirs.shape  # 57 frames either way
    # The last frame's window reaches row 114: real audio for us, upstream's accidental zero row.
    last_rows = ours[-1, :, 0].reshape(10, 5)[:, 0]
    assert 115_000 in last_rows.tolist() and 115_000 not in theirs[-1, :, 0].tolist()
    assert torch.equal(ours[:-2], theirs[:-2])


def test_other_frame_rates_follow_the_same_formula() -> None:
    spec = WindowSpec(fps=30)
    assert spec.padding_unit == 2 and spec.start_row(3) == 5  # floor(3 · 50 / 30)
    hidden = _row_coded(1500)
    assert torch.equal(frame_windows(hidden, 48_000, spec), upstream_whisper_chunks(hidden[None], 48_000, fps=30))


def test_tokens_from_tiny_whisper_equal_upstream_chunks_plus_pe(tiny_models_dir: Path) -> None:
    cfg = load_config(overrides=[f"models.dir={tiny_models_dir}", "runtime.device=cpu"])
    bundle = load_models(cfg, parts={"whisper"})
    assert bundle.whisper is not None and bundle.feature_extractor is not None and bundle.pe is not None
    rng = np.random.default_rng(1)
    samples = (0.1 * rng.standard_normal(48_000)).astype(np.float32)
    tokens = audio_tokens(samples, WindowSpec(25), bundle.whisper, bundle.feature_extractor, bundle.pe)
    assert tuple(tokens.shape) == (75, 10 * bundle.audio_layers, bundle.audio_dim)
    # Upstream: extractor per 30 s segment → encoder hidden states stacked on dim 2 → chunks → pe.
    mel = bundle.feature_extractor(samples, sampling_rate=16000, return_tensors="pt").input_features
    with torch.inference_mode():
        states = bundle.whisper(mel, output_hidden_states=True).hidden_states
        reference = bundle.pe(upstream_whisper_chunks(torch.stack(states, dim=2), len(samples)))
    assert torch.equal(tokens, reference)


def test_batched_log_mel_equals_the_feature_extractor_on_each_window() -> None:
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor()
    rng = np.random.default_rng(3)
    segments = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (100, 16_000, 80_000, 30 * 16_000)]
    segments[1] *= 50  # a loud window next to quiet ones: the max − 8 floor is per window
    mel = log_mel_windows(segments, extractor, torch.device("cpu"))
    assert tuple(mel.shape) == (4, 80, 3000)
    for segment, mine in zip(segments, mel, strict=True):
        reference = extractor(segment, sampling_rate=16000, return_tensors="pt").input_features[0]
        torch.testing.assert_close(mine, reference, rtol=0, atol=1e-5)


def test_whisper_runs_only_its_fixed_batch_shapes() -> None:
    assert [whisper_batch_shape(n) for n in range(1, 17)] == [1, 2, 4, 4, 8, 8, 8, 8] + [16] * 8
    assert WHISPER_BATCH_SHAPES[-1] == 16


def test_audio_longer_than_one_whisper_window(tiny_models_dir: Path) -> None:
    cfg = load_config(overrides=[f"models.dir={tiny_models_dir}", "runtime.device=cpu"])
    bundle = load_models(cfg, parts={"whisper"})
    assert bundle.whisper is not None and bundle.feature_extractor is not None
    samples = np.zeros(31 * 16000, dtype=np.float32)
    hidden = whisper_hidden_states(samples, bundle.whisper, bundle.feature_extractor)
    assert tuple(hidden.shape) == (3000, bundle.audio_layers, bundle.audio_dim)
    assert frame_windows(hidden, len(samples), WindowSpec(25)).shape[0] == 31 * 25


def test_utterances_encoded_together_get_the_tokens_they_get_alone(tiny_models_dir: Path) -> None:
    cfg = load_config(overrides=[f"models.dir={tiny_models_dir}", "runtime.device=cpu"])
    bundle = load_models(cfg, parts={"whisper"})
    assert bundle.whisper is not None and bundle.feature_extractor is not None and bundle.pe is not None
    models = (bundle.whisper, bundle.feature_extractor, bundle.pe)
    rng = np.random.default_rng(2)
    # 6 windows in all (the 2nd clip has 2): the encoder runs them padded to its fixed batch of 8.
    lengths = (8_000, 31 * 16_000, 20_000, 3_000, 16_000)
    clips = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in lengths]
    together = audio_tokens_many(clips, WindowSpec(25), *models)
    for clip, tokens in zip(clips, together, strict=True):
        alone = audio_tokens(clip, WindowSpec(25), *models)
        assert tokens.shape == alone.shape == (num_frames(len(clip), 25), 10 * bundle.audio_layers, bundle.audio_dim)
        torch.testing.assert_close(tokens, alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("fmt", "subtype", "suffix"), [("WAV", "PCM_16", ".wav"), ("OGG", "VORBIS", ".ogg"),
                                                        ("MP3", "MPEG_LAYER_III", ".mp3"), ("FLAC", "PCM_16", ".flac")])
def test_any_container_and_rate_becomes_mono_16k(tmp_path: Path, fmt: str, subtype: str, suffix: str) -> None:
    rate = 44_100
    t = np.arange(rate) / rate
    stereo = np.stack([0.5 * np.sin(2 * np.pi * 440 * t), 0.5 * np.sin(2 * np.pi * 440 * t)], axis=1)
    path = tmp_path / f"a{suffix}"
    sf.write(str(path), stereo, rate, format=fmt, subtype=subtype)
    audio = load_audio(path)
    assert audio.sample_rate == rate and audio.samples.ndim == 1
    assert abs(len(audio.samples) - rate) <= 2048  # lossy codecs pad a frame or so
    samples_16k = resample(audio)
    assert abs(len(samples_16k) - 16000) <= 800
    rms = float(np.sqrt(np.mean(samples_16k[2000:14000] ** 2)))
    assert rms == pytest.approx(0.5 / math.sqrt(2), rel=0.1)  # both channels averaged, not summed
    assert load_audio(path.read_bytes()).sample_rate == rate


def test_audio_objects_are_normalised() -> None:
    ints = Audio(np.array([0, 16384, -32768], dtype=np.int16), 8000)
    out = load_audio(ints)
    assert out.samples.dtype == np.float32 and out.samples.tolist() == [0.0, 0.5, -1.0]
    assert len(resample(Audio(np.zeros(8000, np.float32), 8000))) == 16000


def test_undecodable_input_is_an_input_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF not really a wave file" * 10)
    with pytest.raises(InputError):
        load_audio(junk)
    with pytest.raises(InputError):
        load_audio(tmp_path / "missing.mp3")
    with pytest.raises(InputError):
        load_audio(b"\x00\x01garbage")
    with pytest.raises(InputError):
        load_audio(Audio(np.array([0.0, np.nan], np.float32), 16000))
