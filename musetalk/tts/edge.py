"""edge-tts (Microsoft Edge online voices): optional plugin, needs `pip install edge-tts` and network access."""

from __future__ import annotations

import asyncio
from typing import Any

from musetalk.config import TTSConfig
from musetalk.errors import ConfigError, InputError, TTSFailed
from musetalk.types import Audio
from musetalk.utils.audio_io import decode_audio_bytes

DEFAULT_VOICE = "en-US-AriaNeural"
MAX_AUDIO_S = 600.0  # decoder guard; the server limits utterance length separately


class EdgeTTS:
    """Streams MP3 from the edge-tts service and decodes it with PyAV."""

    name = "edge"

    def __init__(self, cfg: TTSConfig) -> None:
        try:
            import edge_tts
        except ImportError as exc:
            raise ConfigError("tts.engine=edge needs the edge-tts package: pip install edge-tts") from exc
        self._edge: Any = edge_tts
        self._voice = cfg.voice or DEFAULT_VOICE
        self._rate = cfg.rate

    async def _fetch(self, text: str, voice: str, rate_pct: int) -> bytes:
        communicate = self._edge.Communicate(text, voice, rate=f"{rate_pct:+d}%")
        data = bytearray()
        async for chunk in communicate.stream():
            if chunk.get("type") == "audio":
                data += chunk["data"]
        return bytes(data)

    def synthesize(self, text: str, voice: str | None = None, rate: float | None = None) -> Audio:
        """Speak `text` through the online service (runs its own event loop on the calling thread)."""
        rate_pct = round(((rate if rate is not None else self._rate) - 1.0) * 100)
        try:
            data = asyncio.run(self._fetch(text, voice or self._voice, rate_pct))
        except Exception as exc:  # network, service or voice errors all surface as a TTS failure
            raise TTSFailed(f"edge-tts failed: {type(exc).__name__}: {exc}") from exc
        if not data:
            raise TTSFailed("edge-tts returned no audio")
        try:
            return decode_audio_bytes(data, MAX_AUDIO_S)
        except InputError as exc:
            raise TTSFailed(f"edge-tts returned undecodable audio: {exc}") from exc
