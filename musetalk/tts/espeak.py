"""espeak-ng, offline: libespeak-ng and its data from the `espeakng-loader` pip package, through ctypes.

Synchronous mode: `espeak_Synth` returns after the whole utterance has been handed to our callback on
the calling thread, as 16-bit mono PCM at the rate `espeak_Initialize` reports (22050 Hz).
"""

from __future__ import annotations

import ctypes
import re
import threading
from dataclasses import dataclass

import numpy as np

from musetalk.config import VOICE_PATTERN, TTSConfig
from musetalk.errors import InputError, TTSFailed
from musetalk.types import Audio
from musetalk.utils.text import speech_text_problem

DEFAULT_VOICE = "en-us"
NORMAL_RATE_WPM = 175  # espeak-ng's default speed; tts.rate multiplies it
MIN_RATE_WPM, MAX_RATE_WPM = 80, 450  # espeak-ng's accepted range

# espeak_lib.h constants.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_ESPEAK_RATE = 1
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_ENDPAUSE = 0x1000
_EE_OK = 0
_EE_NOT_FOUND = 2

_INITIALIZE_PHONEME_EVENTS = 1
_EVENT_LIST_TERMINATED = 0
_EVENT_PHONEME = 7


class _Event(ctypes.Structure):
    """espeak_EVENT; the trailing union {int number; const char *name; char string[8]} is 8 bytes."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),  # ms from the start of the utterance
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", ctypes.c_char * 8),  # for phoneme events: the mnemonic, NUL-terminated
    ]


# int callback(short *wav, int numsamples, espeak_EVENT *events): audio plus the phoneme timings
# that drive the preview renderer's mouth.
_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))

# libespeak-ng keeps one voice, one set of parameters and one callback per process: every call goes
# through this lock, and the library is initialised once.
_LOCK = threading.Lock()


@dataclass
class _Library:
    lib: ctypes.CDLL
    sample_rate: int
    callback: object  # keeps the ctypes callback alive for as long as the library may call it
    chunks: list[np.ndarray]
    phonemes: list[tuple[float, str]]


_loaded: list[_Library] = []  # at most one; filled on first use (never at import)


def _library() -> _Library:
    """Load and initialise libespeak-ng once per process (caller holds _LOCK)."""
    if _loaded:
        return _loaded[0]
    try:
        import espeakng_loader
    except ImportError as exc:
        raise TTSFailed("espeak-ng is not installed: pip install espeakng-loader==0.2.4") from exc
    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_Initialize.restype = ctypes.c_int
    lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetVoiceByName.restype = ctypes.c_int
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_SetParameter.restype = ctypes.c_int
    lib.espeak_Synth.argtypes = [
        ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
        ctypes.c_void_p, ctypes.c_void_p,
    ]  # fmt: skip
    lib.espeak_Synth.restype = ctypes.c_int
    lib.espeak_Synchronize.restype = ctypes.c_int
    data_path = espeakng_loader.get_data_path().encode()
    sample_rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path, _INITIALIZE_PHONEME_EVENTS)
    if sample_rate <= 0:
        raise TTSFailed(f"espeak_Initialize failed ({sample_rate}) with data at {data_path.decode()}")
    chunks: list[np.ndarray] = []
    phonemes: list[tuple[float, str]] = []

    def on_audio(wav: ctypes._Pointer[ctypes.c_short], n_samples: int, events: ctypes._Pointer[_Event]) -> int:
        if wav and n_samples > 0:
            chunks.append(np.ctypeslib.as_array(wav, shape=(n_samples,)).copy())  # (n,) int16
        if events:
            i = 0
            while events[i].type != _EVENT_LIST_TERMINATED:
                if events[i].type == _EVENT_PHONEME:
                    name = events[i].id.decode("ascii", "replace")
                    phonemes.append((events[i].audio_position / 1000.0, name))
                i += 1
        return 0  # 0 = continue

    callback = _SynthCallback(on_audio)
    lib.espeak_SetSynthCallback(callback)
    state = _Library(lib=lib, sample_rate=int(sample_rate), callback=callback, chunks=chunks, phonemes=phonemes)
    _loaded.append(state)
    return state


class EspeakTTS:
    """espeak-ng voices by name ("en-us", "de", "en+f3", ...); speed = 175 wpm x rate."""

    name = "espeak"

    def __init__(self, cfg: TTSConfig) -> None:
        self._voice = cfg.voice or DEFAULT_VOICE
        self._rate = cfg.rate
        with _LOCK:
            _library()  # fail at start-up, not on the first request

    def synthesize(self, text: str, voice: str | None = None, rate: float | None = None) -> Audio:
        """Speak `text` → float32 mono at 22050 Hz; InputError for an unknown voice, TTSFailed otherwise."""
        voice_name = voice or self._voice
        problem = speech_text_problem(text)
        if problem:
            raise InputError(f"text cannot be spoken: {problem}")
        if not re.fullmatch(VOICE_PATTERN, voice_name):
            raise InputError(f"espeak-ng has no voice {voice_name!r}")
        wpm = round(NORMAL_RATE_WPM * (rate if rate is not None else self._rate))
        wpm = min(max(wpm, MIN_RATE_WPM), MAX_RATE_WPM)
        encoded = text.encode("utf-8")
        buffer = ctypes.create_string_buffer(encoded)  # NUL-terminated copy the library may read
        with _LOCK:
            state = _library()
            err = state.lib.espeak_SetVoiceByName(voice_name.encode("utf-8"))
            if err == _EE_NOT_FOUND:
                raise InputError(f"espeak-ng has no voice {voice_name!r}")
            if err != _EE_OK:
                raise TTSFailed(f"espeak_SetVoiceByName({voice_name!r}) failed ({err})")
            state.lib.espeak_SetParameter(_ESPEAK_RATE, wpm, 0)
            state.chunks.clear()
            state.phonemes.clear()
            err = state.lib.espeak_Synth(
                buffer, len(encoded) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8 | _ENDPAUSE, None, None
            )
            if err == _EE_OK:
                err = state.lib.espeak_Synchronize()
            pcm = np.concatenate(state.chunks) if state.chunks else np.zeros(0, np.int16)  # (n,) int16
            phonemes = tuple(sorted(state.phonemes))
            state.chunks.clear()
            state.phonemes.clear()
        if err != _EE_OK:
            raise TTSFailed(f"espeak_Synth failed ({err})")
        if len(pcm) == 0:
            raise TTSFailed(f"espeak-ng produced no audio for {len(text)} characters")
        return Audio((pcm.astype(np.float32) / 32768.0), state.sample_rate, phonemes)
