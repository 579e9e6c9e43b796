"""The VoiceEngine seam: text → mono float32 audio; engines are looked up by name and imported lazily."""

from __future__ import annotations

import importlib
from typing import Protocol

from musetalk.config import TTSConfig
from musetalk.errors import ConfigError
from musetalk.types import Audio

# Engine name → "module:Class". Importing happens only when the engine is chosen, so an optional
# dependency (edge-tts, piper-tts) never loads unless configured.
ENGINES: dict[str, str] = {
    "espeak": "musetalk.tts.espeak:EspeakTTS",
    "tone": "musetalk.tts.tone:ToneTTS",
    "edge": "musetalk.tts.edge:EdgeTTS",
    "piper": "musetalk.tts.piper:PiperTTS",
}


class VoiceEngine(Protocol):
    """A text-to-speech engine. Must be safe to call from several threads (lock inside if needed)."""

    name: str

    def synthesize(self, text: str, voice: str | None = None, rate: float | None = None) -> Audio:
        """Speak `text` (voice and speed multiplier default to the config) → mono float32 audio.

        Raises TTSFailed when the engine fails, InputError when `voice` is not available.
        """


def create_voice_engine(cfg: TTSConfig) -> VoiceEngine:
    """Build the configured engine; ConfigError names a missing optional package or setting."""
    spec = ENGINES.get(cfg.engine)
    if spec is None:
        raise ConfigError(f"tts.engine: unknown engine {cfg.engine!r}; choose from {sorted(ENGINES)}")
    module_name, class_name = spec.split(":")
    module = importlib.import_module(module_name)
    engine: VoiceEngine = getattr(module, class_name)(cfg)
    return engine
