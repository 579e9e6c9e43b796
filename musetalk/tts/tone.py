"""Test voice: a deterministic, dependency-free "speech-like" tone whose length grows with the text."""

from __future__ import annotations

import zlib

import numpy as np

from musetalk.config import TTSConfig
from musetalk.errors import InputError
from musetalk.types import Audio

SAMPLE_RATE = 16000
SECONDS_PER_CHAR = 0.05  # ~ 12 characters per second, about normal speech
SYLLABLE_S = 0.2  # the amplitude envelope pulses at about a syllable rate


class ToneTTS:
    """Each text maps to a fixed tone (pitch from a hash of the text) with a syllable-rate envelope."""

    name = "tone"

    def __init__(self, cfg: TTSConfig) -> None:
        self._rate = cfg.rate

    def synthesize(self, text: str, voice: str | None = None, rate: float | None = None) -> Audio:
        """Duration = len(text) x 50 ms / rate (at least one syllable); same text → same samples."""
        if voice is not None and voice != "tone":
            raise InputError(f"voice {voice!r} is not available in the tone engine (only 'tone')")
        speed = rate if rate is not None else self._rate
        n = max(int(len(text.strip()) * SECONDS_PER_CHAR / speed * SAMPLE_RATE), int(SYLLABLE_S * SAMPLE_RATE))
        t = np.arange(n, dtype=np.float64) / SAMPLE_RATE  # (n,) s
        pitch_hz = 120.0 + zlib.crc32(text.encode("utf-8")) % 120
        envelope = np.sin(np.pi * (t % SYLLABLE_S) / SYLLABLE_S) ** 2
        wave = 0.4 * envelope * (np.sin(2 * np.pi * pitch_hz * t) + 0.3 * np.sin(2 * np.pi * 3 * pitch_hz * t))
        return Audio(wave.astype(np.float32), SAMPLE_RATE)
