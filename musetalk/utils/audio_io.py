"""Decode caller-supplied audio bytes (wav, mp3, ogg, flac, webm) to mono float32 with PyAV.

The container format is chosen from the file's magic bytes and passed to the demuxer explicitly:
letting FFmpeg probe arbitrary uploads could pick demuxers that open other files or URLs (hls, concat).
"""

from __future__ import annotations

import io

import numpy as np

from musetalk.errors import InputError
from musetalk.types import Audio


def sniff_audio_format(head: bytes) -> str | None:
    """FFmpeg demuxer name for wav/mp3/ogg/flac/webm bytes, from their first bytes; None if unknown."""
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"  # webm/mka from a browser's MediaRecorder
    if head[:3] == b"ID3" or (len(head) >= 2 and head[0] == 0xFF and (head[1] & 0xE0) == 0xE0):
        return "mp3"  # ID3 tag, or an MPEG audio frame sync word
    return None


def decode_audio_bytes(data: bytes, max_duration_s: float) -> Audio:
    """Decode an audio file held in memory → mono float32 at its own sample rate; InputError if unusable."""
    import av

    fmt = sniff_audio_format(data[:16])
    if fmt is None:
        raise InputError("unsupported audio: expected a wav, mp3, ogg, flac or webm file")
    chunks: list[np.ndarray] = []
    n_samples = 0
    try:
        with av.open(io.BytesIO(data), mode="r", format=fmt) as container:
            if not container.streams.audio:
                raise InputError("the file holds no audio stream")
            stream = container.streams.audio[0]
            rate = int(stream.codec_context.sample_rate or 0)
            if rate <= 0:
                raise InputError("the audio stream has no sample rate")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
            max_samples = int(max_duration_s * rate)
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunk = out.to_ndarray().reshape(-1).astype(np.float32)  # (n,) float32
                    chunks.append(chunk)
                    n_samples += len(chunk)
                if n_samples > max_samples:
                    raise InputError(f"audio longer than the limit of {max_duration_s:g} s")
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1).astype(np.float32))
    except av.FFmpegError as exc:
        raise InputError(f"cannot decode the audio ({fmt}): {exc}") from exc
    samples = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)  # (n,) float32
    if len(samples) == 0:
        raise InputError("the audio holds no samples")
    if not np.all(np.isfinite(samples)):
        raise InputError("the audio holds non-finite samples")
    return Audio(np.clip(samples, -1.0, 1.0), rate)
