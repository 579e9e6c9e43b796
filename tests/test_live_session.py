"""A session's live stream without WebRTC: the clock, idle frames, and the record holding exactly what was shown."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from musetalk.avatar import PrepResult, load_avatar
from musetalk.config import AppConfig
from musetalk.errors import Interrupted
from musetalk.pipeline.engine import Engine
from musetalk.render.preview import PreviewFaces
from musetalk.session.live import (
    AUDIO_RATE_HZ,
    QUEUED_SPEECH_MARGIN_S,
    SUBSCRIBER_TICKS,
    LiveSession,
    Tick,
    Viewer,
    scale_i420,
    stream_frames,
    stream_size,
    to_i420,
)
from musetalk.types import Audio
from musetalk.utils.ffmpeg import probe
from musetalk.utils.recent import RecentValues, quantile


def _voice(seconds: float) -> Audio:
    t = np.arange(round(seconds * 16000)) / 16000
    return Audio((0.3 * np.sin(2 * np.pi * 140 * t)).astype(np.float32), 16000)


def _watch(live: LiveSession, ticks: list[Tick]) -> asyncio.Task[None]:
    """A viewer of `live` whose video ticks are appended to `ticks` until the task is cancelled.

    Its video queue is unbounded: a real viewer that lags loses its oldest ticks (by design), and on a
    loaded machine the clock may put several ticks before this task runs — the tests count every tick."""
    viewer = live.add_viewer()
    viewer.video = asyncio.Queue()

    async def watch() -> None:
        while True:
            ticks.append(await viewer.video.get())

    return asyncio.create_task(watch())


def test_the_record_holds_exactly_the_frames_the_stream_showed_before_a_cut(
    prepared_avatar: tuple[AppConfig, PrepResult], tmp_path: Path
) -> None:
    cfg, _ = prepared_avatar
    cache = load_avatar(cfg, cfg.avatar_id)
    engine = Engine(cfg, PreviewFaces(cfg.fps, 4))

    async def run() -> tuple[list[Tick], int, int, int]:
        live = LiveSession("s", cfg.fps, lambda _: cache.frames, cfg.avatar_id, 0, buffer_frames=10, lead_frames=2)
        ticks: list[Tick] = []
        watcher = _watch(live, ticks)
        await asyncio.sleep(0.3)  # idle first
        utterance = live.new_utterance(1, cfg.avatar_id)
        render = asyncio.create_task(
            asyncio.to_thread(engine.render, _voice(4.0), cache, tmp_path / "c.mp4", utterance.cursor,
                              frame_tap=utterance.tap)
        )  # fmt: skip
        while utterance.played < 20:
            await asyncio.sleep(0.01)
        live.interrupt()
        result = await render
        await asyncio.sleep(0.2)
        watcher.cancel()
        live.close()
        return ticks, utterance.played, result.clip.n_frames, live.held_frames

    try:
        ticks, played, n_frames, held = asyncio.run(run())
    finally:
        engine.close()
    on_air = [t for t in ticks if t.utterance == 1]
    assert held == sum(1 for t in on_air if not t.pcm.any())  # every held tick is counted
    # A tick of the utterance with no audio holds its last frame (rendering fell behind); the others each
    # showed a new frame, with its audio (the test voice is never silent).
    spoken = [t for t in on_air if t.pcm.any()]
    assert all(np.array_equal(t.frame, on_air[i - 1].frame) for i, t in enumerate(on_air) if not t.pcm.any())
    assert 20 <= played < 100 and n_frames == played == len(spoken)  # the record = what was on air
    assert [t.index for t in ticks] == list(range(ticks[0].index, ticks[0].index + len(ticks)))  # no gaps
    idle_before = ticks[: ticks.index(on_air[0])]
    assert idle_before and all(t.utterance is None and not t.pcm.any() for t in idle_before)  # idle: silent
    assert np.array_equal(idle_before[0].frame, to_i420(cache.frames[0]))  # the avatar's own frame
    assert ticks[-1].utterance is None  # idle again after the cut
    assert all(len(t.pcm) == AUDIO_RATE_HZ // cfg.fps for t in ticks)
    info = probe(tmp_path / "c.mp4")
    assert info.n_video_frames == played
    pcm, rate = sf.read(tmp_path / "c.wav")
    assert len(pcm) == played * rate // cfg.fps  # audio cut at the same frame
    # The stream's audio of the utterance is the clip's audio, tick by tick.
    assert rate == AUDIO_RATE_HZ == cfg.encode.audio_rate
    stream_audio = np.concatenate([t.pcm for t in spoken]).astype(np.float64) / 32767
    assert np.abs(stream_audio - pcm).max() < 2e-3


def test_scale_i420_matches_scaling_the_picture_before_conversion() -> None:
    y, x = np.mgrid[0:1080, 0:1920]
    bgr = np.stack([x * 255 // 1919, y * 255 // 1079, (x + y) * 255 // 2998], axis=-1).astype(np.uint8)
    full = to_i420(bgr)
    scaled = scale_i420(full, 720)
    assert scaled.shape == to_i420(bgr, 720).shape == (1080, 1280)  # 720 rows of Y + 360 of chroma
    assert np.abs(scaled.astype(int) - to_i420(bgr, 720)).mean() < 1.5
    assert scale_i420(full, 0) is full and scale_i420(full, 1080) is full  # no cap, or not taller
    assert stream_size(1080, 1920, 540) == (540, 960) and stream_size(481, 641, 720) == (480, 640)


def test_a_capped_stream_shows_smaller_frames_while_the_record_keeps_the_avatars_size(
    prepared_avatar: tuple[AppConfig, PrepResult], tmp_path: Path
) -> None:
    cfg, _ = prepared_avatar
    cache = load_avatar(cfg, cfg.avatar_id)
    engine = Engine(cfg, PreviewFaces(cfg.fps, 4))
    height, width = cache.frames[0].shape[:2]
    cap = height // 2

    async def run() -> list[Tick]:
        live = LiveSession("s", cfg.fps, lambda _: cache.frames, cfg.avatar_id, 0, 10, 2, max_height=cap)
        ticks: list[Tick] = []
        watcher = _watch(live, ticks)
        await asyncio.sleep(0.2)
        utterance = live.new_utterance(1, cfg.avatar_id)
        await asyncio.to_thread(engine.render, _voice(0.6), cache, tmp_path / "c.mp4", utterance.cursor,
                                frame_tap=utterance.tap)  # fmt: skip
        await asyncio.sleep(0.3)
        watcher.cancel()
        live.close()
        return ticks

    try:
        ticks = asyncio.run(run())
    finally:
        engine.close()
    h, w = stream_size(height, width, cap)
    assert {t.frame.shape for t in ticks} == {(h * 3 // 2, w)}
    assert any(t.utterance == 1 for t in ticks) and any(t.utterance is None for t in ticks)
    info = probe(tmp_path / "c.mp4")
    assert (info.height, info.width) == (height - height % 2, width - width % 2)


def test_a_blocked_event_loop_shows_in_the_clocks_lateness(prepared_avatar: tuple[AppConfig, PrepResult]) -> None:
    cfg, _ = prepared_avatar
    cache = load_avatar(cfg, cfg.avatar_id)

    async def run() -> tuple[float, float]:
        live = LiveSession("s", cfg.fps, lambda _: cache.frames, cfg.avatar_id, 0, 10, 2)
        ticks: list[Tick] = []
        watcher = _watch(live, ticks)
        await asyncio.sleep(0.5)
        before = live.late_ms.quantile(1.0)
        time.sleep(0.15)  # blocks the loop (and so the clock) for almost four ticks
        await asyncio.sleep(0.2)
        after = live.late_ms.quantile(1.0)
        watcher.cancel()
        live.close()
        return before, after

    before, after = asyncio.run(run())
    assert after >= 100 and after > before


def test_recent_values_forget_what_is_older_than_their_window() -> None:
    recent = RecentValues(10.0)
    for t, value in enumerate([5.0, 1.0, 3.0, 2.0, 4.0]):
        recent.add(value, now=float(t))
    assert recent.quantile(0.5, now=4.0) == 3.0 and recent.quantile(1.0, now=4.0) == 5.0
    assert recent.values(now=12.5) == [2.0, 4.0] and recent.oldest_s == 3.0
    assert recent.quantile(0.95, now=100.0) == 0.0 and recent.oldest_s is None
    assert quantile([], 0.5) == 0.0 and quantile([7.0], 0.01) == 7.0


def test_the_idle_stream_keeps_time_while_the_default_thread_pool_is_busy(
    prepared_avatar: tuple[AppConfig, PrepResult],
) -> None:
    cfg, _ = prepared_avatar
    cache = load_avatar(cfg, cfg.avatar_id)

    async def run() -> tuple[list[Tick], float]:
        loop = asyncio.get_running_loop()
        live = LiveSession("s", cfg.fps, lambda _: cache.frames, cfg.avatar_id, 0, 10, 2)
        ticks: list[Tick] = []
        watcher = _watch(live, ticks)
        await asyncio.sleep(0.3)
        # Every thread of the loop's default pool busy for 1.5 s (session appends, uploads, video encoding).
        busy = [loop.run_in_executor(None, time.sleep, 1.5) for _ in range(64)]
        await asyncio.sleep(1.0)
        late = live.late_ms.quantile(1.0)
        watcher.cancel()
        live.close()
        await asyncio.gather(*busy)
        return ticks, late

    ticks, late = asyncio.run(run())
    during = [t for t in ticks if t.t_loop_s >= ticks[0].t_loop_s + 0.4]
    assert late < 150  # the clock never waited for the busy pool (a tick is 40 ms)
    assert len({t.frame.tobytes() for t in during}) > len(during) // 2  # and the idle avatar kept moving


def test_streams_that_fall_behind_are_logged_now_and_then(caplog: pytest.LogCaptureFixture) -> None:
    from musetalk.server.webrtc import BEHIND_WARN_EVERY_S, LiveHub

    cfg = AppConfig()
    frames = [np.zeros((16, 16, 3), np.uint8)] * 4
    hub = LiveHub(cfg, lambda _: frames, lambda _: ("a", 0))
    live = LiveSession("s", cfg.fps, lambda _: frames, "a", 0, 10, 2)
    hub._sessions["s"] = live
    live.late_ms.add(5.0)
    with caplog.at_level("WARNING"):
        assert not hub.warn_if_behind(1000.0)  # on time: nothing to say
        live.late_ms.add(400.0)
        live.late_ms.add(400.0)
        assert hub.warn_if_behind(1000.0)
        assert not hub.warn_if_behind(1000.0 + BEHIND_WARN_EVERY_S / 2)  # not again so soon
        assert hub.warn_if_behind(1000.0 + BEHIND_WARN_EVERY_S)
    warnings = [r.getMessage() for r in caplog.records if "falling behind" in r.getMessage()]
    assert len(warnings) == 2 and "tick_late_p95_ms=400" in warnings[0]


def test_a_video_track_behind_its_clock_sends_the_newest_tick_and_skips_the_older_ones() -> None:
    """A sender that fell behind catches up at its next frame instead of sending every later frame late."""
    async def run() -> tuple[list[int], int, list[int]]:
        viewer = Viewer()
        silence = np.zeros(1920, np.int16)
        frame = np.zeros((6, 4), np.uint8)
        for k in range(SUBSCRIBER_TICKS + 2):  # more than the queue holds: the oldest go first
            viewer.put(Tick(k, frame, silence, 0.0, None))
        first = (await viewer.newest_video()).index
        dropped = viewer.video_dropped
        viewer.put(Tick(99, frame, silence, 0.0, None))  # a sender that keeps up: nothing is skipped
        second = (await viewer.newest_video()).index
        audio = [viewer.audio.get_nowait().index for _ in range(viewer.audio.qsize())]
        return [first, second], dropped, audio

    indices, dropped, audio = asyncio.run(run())
    assert indices == [SUBSCRIBER_TICKS + 1, 99]
    assert dropped == SUBSCRIBER_TICKS - 1  # the queue held SUBSCRIBER_TICKS; all but the newest skipped
    assert audio == list(range(SUBSCRIBER_TICKS + 2)) + [99]  # audio keeps every tick (its track skips by time)


class _CountingFrames:
    """A frame store that counts how often each frame is read (a JPEG decode in a real avatar)."""

    def __init__(self, n: int) -> None:
        rng = np.random.default_rng(3)
        self.frames = [rng.integers(0, 255, (72, 128, 3), dtype=np.uint8) for _ in range(n)]
        self.reads = 0

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, index: int) -> np.ndarray:
        self.reads += 1
        return self.frames[index]


def test_idle_stream_frames_are_converted_once_up_to_the_budget_and_shared_by_the_avatar_s_streams() -> None:
    store = _CountingFrames(3)
    frame_bytes = to_i420(store.frames[0], 36).nbytes
    shown = stream_frames(store, 36, budget_bytes=2 * frame_bytes + 1)  # room for two frames
    for index in (0, 1, 2, 0, 1, 2, 2):
        assert np.array_equal(shown[index], to_i420(store.frames[index], 36))
    assert shown.kept == 2 and shown.capacity == 2
    assert store.reads == 3 + 2  # frames 0 and 1 once; frame 2 (over the budget) at every showing
    assert stream_frames(store, 36, 2 * frame_bytes + 1) is shown  # another stream of the avatar shares them
    assert stream_frames(store, 0, 2 * frame_bytes + 1) is not shown  # another stream height: its own frames
    assert stream_frames(_CountingFrames(3), 36, 2 * frame_bytes + 1) is not shown  # another avatar
    other = _CountingFrames(2)
    none_kept = stream_frames(other, 36, 0)
    assert none_kept[0] is not none_kept[0] and none_kept.kept == 0  # budget 0: converted at every showing


def test_stream_frames_take_an_array_store_and_are_dropped_with_it() -> None:
    """A store may be a numpy array (in-memory avatars: unhashable); the shared frames go when it goes."""
    import gc

    from musetalk.session import live

    store = np.random.default_rng(4).integers(0, 255, (3, 72, 128, 3), dtype=np.uint8)  # (N, H, W, 3)
    shown = stream_frames(store, 36, budget_bytes=1 << 20)
    assert np.array_equal(shown[1], to_i420(store[1], 36)) and shown.kept == 1
    assert stream_frames(store, 36, 1 << 20) is shown
    key = id(store)
    assert key in live._stream_frames
    del store
    gc.collect()
    assert key not in live._stream_frames  # the cache does not keep an avatar's frames alive
    with pytest.raises(RuntimeError, match="gone"):
        shown[2]  # nothing shows that avatar any more; a frame not kept cannot be made


class _SlowStream:
    """A frame stream (what the engine's frame tap sees) that renders one frame every `every_s` seconds."""

    def __init__(self, n_frames: int, every_s: float, size: tuple[int, int] = (48, 64)) -> None:
        self.n_frames, self.every_s = n_frames, every_s
        self.audio = _voice(n_frames / 25)
        self.plan = type("Plan", (), {"cursor": 0})()
        h, w = size
        self._frames = [np.full((h * 3 // 2, w), 16 + 8 * k, np.uint8) for k in range(n_frames)]

    def __iter__(self) -> Iterator[np.ndarray]:
        for frame in self._frames:
            time.sleep(self.every_s)
            yield frame


def test_a_render_slower_than_the_stream_holds_frames_and_says_so() -> None:
    frames = np.zeros((2, 48, 64, 3), np.uint8)

    async def run() -> tuple[list[Tick], int, int]:
        live = LiveSession("s", 25, lambda _: frames, "a", 0, buffer_frames=10, lead_frames=2)
        ticks: list[Tick] = []
        watcher = _watch(live, ticks)
        utterance = live.new_utterance(1, "a")
        # 12 frames, one every 100 ms: the 40-ms clock shows each new one once and holds it ~1.5 ticks more.
        stream = _SlowStream(12, 0.1)  # stands in for the engine's FrameStream (the attributes tap reads)
        shown = await asyncio.to_thread(lambda: list(utterance.tap(stream)))  # type: ignore[arg-type]
        await asyncio.sleep(0.1)
        watcher.cancel()
        live.close()
        return ticks, len(shown), live.held_frames

    ticks, n_shown, held = asyncio.run(run())
    on_air = [t for t in ticks if t.utterance == 1]
    assert n_shown == 12 and len({t.frame[0, 0] for t in on_air}) == 12
    assert held == len(on_air) - 12 >= 6  # ~1.5 held ticks per new frame; fewer if the loop runs late


def test_a_queued_sentence_tells_the_renderer_when_it_will_play() -> None:
    """The next sentence renders while the one before it plays: its stream hears how much speech is ahead of
    it (less a margin), so the scheduler can serve frames needed sooner first."""
    frames = np.zeros((2, 48, 64, 3), np.uint8)

    class Recording(_SlowStream):
        def __init__(self) -> None:
            super().__init__(3, 0.0)
            self.plays_in_s: list[float] = []

        def plays_in(self, seconds: float) -> None:
            self.plays_in_s.append(seconds)

    async def run() -> tuple[float, float, list[float]]:
        live = LiveSession("s", 25, lambda _: frames, "a", 0, buffer_frames=10, lead_frames=2)
        first, second = live.new_utterance(1, "a"), live.new_utterance(2, "a")
        first.n_frames, first.played = 100, 25  # 75 frames = 3 s still to play
        ahead = (live.speech_ahead_s(first), live.speech_ahead_s(second))
        stream = Recording()
        second.cut()  # only the tap's start matters here: it reports, then stops at the cut
        with pytest.raises(Interrupted):
            await asyncio.to_thread(lambda: list(second.tap(stream)))  # type: ignore[arg-type]
        return *ahead, stream.plays_in_s

    ahead_first, ahead_second, plays_in_s = asyncio.run(run())
    assert ahead_first == 0.0 and ahead_second == pytest.approx(3.0)
    assert plays_in_s == [pytest.approx(3.0 - QUEUED_SPEECH_MARGIN_S)]


def test_an_utterance_nobody_watches_is_rendered_as_a_clip_needed_whole(
    prepared_avatar: tuple[AppConfig, PrepResult], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from musetalk.pipeline.scheduler import FrameScheduler
    from musetalk.session.live import LiveUtterance

    cfg, _ = prepared_avatar
    cache = load_avatar(cfg, cfg.avatar_id)
    whole: list[int] = []
    monkeypatch.setattr(FrameScheduler, "needed_whole", lambda self, utt: whole.append(utt.uid))
    engine = Engine(cfg, PreviewFaces(cfg.fps, 4))

    async def run() -> int:
        unpaced = LiveUtterance(1, cfg.fps, 1, asyncio.get_running_loop())  # no viewer: only so it can be cut
        result = await asyncio.to_thread(engine.render, _voice(0.6), cache, tmp_path / "c.mp4", frame_tap=unpaced.tap)
        return result.clip.n_frames

    try:
        assert asyncio.run(run()) == 15
    finally:
        engine.close()
    assert len(whole) == 1  # its frames rank by the clip's end, as a clip rendered without a tap
