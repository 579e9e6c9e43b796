"""piper (local neural voices): optional plugin, needs `pip install piper-tts` and a voice file on disk.

Nothing is downloaded: `tts.piper_voice_path` names a `.onnx` voice (its `.onnx.json` beside it) or a
folder of them, in which case a request's `voice` picks `<folder>/<voice>.onnx`.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from musetalk.config import TTSConfig, project_path
from musetalk.errors import ConfigError, InputError, TTSFailed
from musetalk.types import Audio


class PiperTTS:
    """Loads each voice once (on first use; the configured default at start) and synthesises with it."""

    name = "piper"

    def __init__(self, cfg: TTSConfig) -> None:
        if cfg.piper_voice_path is None:
            raise ConfigError(
                "tts.engine=piper needs tts.piper_voice_path: a local .onnx voice or a folder of voices"
            )
        try:
            import piper
        except ImportError as exc:
            raise ConfigError("tts.engine=piper needs the piper-tts package: pip install piper-tts") from exc
        self._piper: Any = piper
        path = project_path(cfg.piper_voice_path)
        if path.is_dir():
            self._folder: Path | None = path
            default = path / f"{cfg.voice}.onnx" if cfg.voice else next(iter(sorted(path.glob("*.onnx"))), None)
        else:
            self._folder, default = None, path
        if default is None or not default.is_file() or not Path(f"{default}.json").is_file():
            raise ConfigError(f"tts.piper_voice_path: no piper voice (.onnx + .onnx.json) at {default or path}")
        self._default = default
        self._rate = cfg.rate
        self._voices: dict[Path, Any] = {}
        self._lock = threading.Lock()  # onnxruntime sessions are thread-safe, loading and the cache are not
        self._voice(default)

    def _voice(self, path: Path) -> Any:
        with self._lock:
            if path not in self._voices:
                try:
                    self._voices[path] = self._piper.PiperVoice.load(str(path))
                except Exception as exc:
                    raise TTSFailed(f"cannot load piper voice {path}: {exc}") from exc
            return self._voices[path]

    def _path_for(self, voice: str | None) -> Path:
        if voice is None:
            return self._default
        if self._folder is None:
            if voice == self._default.stem:
                return self._default
            raise InputError(f"piper voice {voice!r} is not available (configured: {self._default.stem!r})")
        path = self._folder / f"{voice}.onnx"
        if not path.is_file():
            raise InputError(f"piper voice {voice!r} is not in {self._folder}")
        return path

    def synthesize(self, text: str, voice: str | None = None, rate: float | None = None) -> Audio:
        """Speak `text` with the chosen local voice → float32 mono at the voice's sample rate."""
        model = self._voice(self._path_for(voice))
        speed = rate if rate is not None else self._rate
        try:
            syn_config = self._piper.SynthesisConfig(length_scale=1.0 / speed)
            chunks = list(model.synthesize(text, syn_config=syn_config))
        except Exception as exc:
            raise TTSFailed(f"piper failed: {type(exc).__name__}: {exc}") from exc
        if not chunks:
            raise TTSFailed("piper produced no audio")
        pcm = np.concatenate([np.frombuffer(c.audio_int16_bytes, dtype=np.int16) for c in chunks])  # (n,) int16
        return Audio(pcm.astype(np.float32) / 32768.0, int(chunks[0].sample_rate))
