"""Preview renderer: the mouth follows the loudness, silence leaves the avatar untouched."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from musetalk.avatar import PrepResult, load_avatar, prepare_avatar
from musetalk.avatar.synthetic import astronaut_bgr, write_video
from musetalk.config import AppConfig, load_config, with_overrides
from musetalk.faces.dlib_detector import DlibDetector
from musetalk.faces.tracking import mouth_opening, track_faces
from musetalk.pipeline.engine import Engine
from musetalk.render.preview import TALKING_RANGE, MouthBank, PreviewFaces, mouth_openings, open_mouth
from musetalk.types import Audio

RATE = 16000


def _speechlike(seconds: float, seed: int = 0) -> Audio:
    """Noise shaped by a syllable-like envelope (3.5 Hz bursts with pauses) — loudness varies frame to frame."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    envelope = np.clip(np.sin(2 * np.pi * 3.5 * t), 0, None) ** 1.5 * (0.3 + 0.7 * (np.sin(2 * np.pi * 0.4 * t) > -0.3))
    tone = np.sin(2 * np.pi * 180 * t) + 0.5 * np.sin(2 * np.pi * 360 * t)
    return Audio((0.25 * envelope * (0.7 * tone + 0.3 * rng.standard_normal(len(t)))).astype(np.float32), RATE)


def _frame_rms(audio: Audio, n: int, fps: int) -> np.ndarray:
    hop = audio.sample_rate // fps
    return np.array([np.sqrt(np.mean(audio.samples[i * hop : (i + 1) * hop] ** 2)) for i in range(n)])


def _render(cfg: AppConfig, audio: Audio) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    cache = load_avatar(cfg, cfg.avatar_id)
    engine = Engine(cfg, PreviewFaces(cfg.fps, cfg.batch_size))
    try:
        with engine.frames(audio, cache) as stream:
            out = list(stream)
            ids = stream.plan.source_ids
    finally:
        engine.close()
    sources = [np.asarray(cache.frames[int(i)]) for i in ids]
    landmarks = [cache.landmarks[int(i)] for i in ids]
    return out, sources, landmarks


def test_mouth_change_follows_the_audio_envelope(prepared_avatar: tuple[AppConfig, PrepResult]) -> None:
    cfg = with_overrides(prepared_avatar[0], ["audio.silence_enabled=false"])
    audio = _speechlike(3.0)
    frames, sources, landmarks = _render(cfg, audio)
    change = []
    for out, src, lm in zip(frames, sources, landmarks, strict=True):
        x1, y1 = np.floor(lm[48:68].min(0) - 6).astype(int)
        x2, y2 = np.ceil(lm[48:68].max(0) + 10).astype(int)
        region = (slice(max(y1, 0), y2), slice(max(x1, 0), x2))
        change.append(np.abs(out[region].astype(np.float32) - src[region].astype(np.float32)).mean())
    rms = _frame_rms(audio, len(frames), cfg.fps)
    r = np.corrcoef(np.asarray(change), rms)[0, 1]
    print(f"preview mouth change vs RMS: Pearson r = {r:.3f}")
    assert r >= 0.6, f"Pearson r = {r:.2f}"
    assert max(change) > 5.0  # the mouth visibly opens


def test_silent_audio_leaves_every_frame_identical(prepared_avatar: tuple[AppConfig, PrepResult]) -> None:
    cfg = prepared_avatar[0]
    frames, sources, _ = _render(cfg, Audio(np.zeros(RATE, np.float32), RATE))
    assert len(frames) == cfg.fps
    for out, src in zip(frames, sources, strict=True):
        assert np.array_equal(out, src)


def test_openings_range_and_closed_mouth_is_identity() -> None:
    openings = mouth_openings(_speechlike(2.0), 50, 25)
    assert openings.min() == 0.0 and 0.5 < openings.max() <= 1.0
    assert np.all(mouth_openings(Audio(np.zeros(RATE, np.float32), RATE), 25, 25) == 0)
    face = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    lm = np.zeros((68, 2), np.float32)
    lm[:, 0], lm[:, 1] = np.linspace(60, 196, 68), 170
    assert np.array_equal(open_mouth(face, lm, 0.0), face)


@pytest.mark.parametrize("opening", [0.3, 1.0])
def test_open_mouth_changes_only_the_lower_face(opening: float) -> None:
    from musetalk.avatar.synthetic import astronaut_bgr
    from musetalk.faces.dlib_detector import DlibDetector

    photo = astronaut_bgr()
    lm = DlibDetector().detect(photo)
    assert lm is not None
    out = open_mouth(photo, lm, opening)
    diff = np.abs(out.astype(int) - photo.astype(int)).sum(axis=2)
    eyes_y = int(lm[36:48, 1].max()) + 2
    assert diff[:eyes_y].max() == 0  # nothing above the eyes moves
    assert diff[int(lm[62, 1]) : int(lm[8, 1])].mean() > 1.0


def test_espeak_reports_phoneme_timings_in_order() -> None:
    from musetalk.config import TTSConfig
    from musetalk.tts.espeak import EspeakTTS

    audio = EspeakTTS(TTSConfig()).synthesize("My mama baked a pie.")
    times = [t for t, _ in audio.phonemes]
    names = [n.lstrip("',") for _, n in audio.phonemes]
    assert times == sorted(times) and times[0] >= 0 and times[-1] <= audio.duration_s + 0.05
    assert names.count("m") >= 3 and "b" in names and "p" in names


def test_bilabials_close_the_mouth_and_vowels_open_it() -> None:
    fps = 25
    # "ma-pa": 0.3 s of /a/, 0.06 s /p/, 0.3 s /a/, with a loud, steady voice throughout.
    phonemes = ((0.0, "m"), (0.06, "'a"), (0.40, "p"), (0.46, "a"), (0.80, "_"))
    t = np.arange(int(0.8 * RATE)) / RATE
    audio = Audio((0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), RATE, phonemes)
    openings = mouth_openings(audio, 20, fps)
    assert openings[0] == 0.0  # /m/
    assert openings[5] > 0.8 and openings[15] > 0.8  # inside the vowels
    assert openings[10] == 0.0  # /p/ at 0.40-0.46 s covers frame 10 (0.40-0.44 s)
    # Without phonemes the same steady voice keeps the mouth open.
    assert mouth_openings(Audio(audio.samples, RATE), 20, fps)[10] > 0.8


@pytest.mark.slow
def test_a_talking_avatar_reuses_its_own_mouth_shapes(tmp_path: Path) -> None:
    """Source video where the person talks → output mouths are real source mouths, opened as the audio asks."""
    photo = astronaut_bgr()
    lm = DlibDetector().detect(photo)
    assert lm is not None
    n_src = 50
    src_open = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_src) / 12.5)  # the person opens and closes the mouth
    video = tmp_path / "talking.mp4"
    write_video(video, [open_mouth(photo, lm, float(o)) for o in src_open], 25)
    cfg = load_config(
        overrides=[
            "runtime.device=cpu", "models.dir=/nonexistent-models", f"prep.cache_dir={tmp_path / 'cache'}",
            "prep.detector=dlib", "prep.parser=landmarks", "avatar_id=talker", "audio.silence_enabled=false",
        ]
    )  # fmt: skip
    prepare_avatar(cfg, video=video)
    cache = load_avatar(cfg, "talker")
    assert cache.raw_landmarks is not None
    assert not MouthBank(cache.landmarks).usable  # smoothing flattens the lips' motion: measure the raw ones
    bank = MouthBank(cache.raw_landmarks)
    assert bank.usable and bank.high - bank.low > TALKING_RANGE
    audio = _speechlike(3.0, seed=3)
    frames, sources, _ = _render(cfg, audio)
    wanted = mouth_openings(audio, len(frames), cfg.fps)
    detector = DlibDetector()
    tracked = track_faces([detector.detect_faces(f) for f in frames], frames[0].shape[:2], cfg.fps)
    assert tracked.detected.all()  # the suit's patch is a face to a memoryless detector: track the real one
    measured = mouth_opening(tracked.landmarks)
    for out, src, got in zip(frames, sources, tracked.landmarks, strict=True):
        changed = np.abs(out.astype(int) - src.astype(int)).max(axis=2) > 3
        assert not changed[: int(got[29, 1]) - 4].any()  # nothing above the nose changes
    r = np.corrcoef(measured, wanted)[0, 1]
    assert r > 0.7, f"Pearson r = {r:.2f}"


def test_still_and_idle_avatars_fall_back_to_the_warp(prepared_avatar: tuple[AppConfig, PrepResult]) -> None:
    cache = load_avatar(prepared_avatar[0], prepared_avatar[0].avatar_id)
    assert cache.raw_landmarks is not None
    assert not MouthBank(cache.raw_landmarks).usable  # the synthetic face video never moves its mouth
