"""The frame scheduler: frames of concurrent utterances never mix, shared batches, back-pressure, cancel, errors."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import numpy as np
import pytest
import torch

from musetalk.avatar.cache import AvatarCache
from musetalk.errors import GpuOutOfMemory
from musetalk.pipeline.generate import FaceRequest, PendingFaces, PrepareItem
from musetalk.pipeline.scheduler import FrameScheduler, Utterance
from musetalk.pipeline.synthetic import synthetic_avatar


class _Done:
    def __init__(self, faces: np.ndarray) -> None:
        self._faces = faces

    def wait(self) -> np.ndarray:
        return self._faces


class Tagged:
    """A FaceSource whose every face says whose it is: pixel (0,0) = utterance tag, (0,1) = frame id."""

    name = "tagged"
    composites = False

    def __init__(self, first: int = 2, size: int = 4, poison: int | None = None) -> None:
        self.first_batch_size, self.batch_size = first, size
        self.poison = poison  # batches holding a frame of this tag fail with CUDA out-of-memory
        self.batches: list[list[tuple[int, int]]] = []  # (tag, frame_id) per batch
        self.lock = threading.Lock()

    def prepare(self, cache: AvatarCache, samples_16k: np.ndarray, n_frames: int, phonemes: object = ()) -> int:
        return int(samples_16k[0])  # the test puts the utterance's tag in its first sample

    def submit(self, requests: Sequence[FaceRequest]) -> PendingFaces:
        with self.lock:
            self.batches.append([(r.cond, r.frame_id) for r in requests])
        if self.poison is not None and any(r.cond == self.poison for r in requests):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        faces = np.zeros((len(requests), 256, 256, 3), np.uint8)
        for k, r in enumerate(requests):
            faces[k, 0, 0, 0] = r.cond
            faces[k, 0, 1, 0] = r.frame_id % 256
        return _Done(faces)

    def accelerated(self) -> dict[int, str]:
        return {}


@pytest.fixture(scope="module")
def avatar() -> AvatarCache:
    return synthetic_avatar(n_frames=4, height=48, width=64)


def _submit(sched: FrameScheduler, avatar: AvatarCache, tag: int, n: int) -> Utterance:
    samples = np.full(16000, tag, np.float32)
    frames = np.arange(n, dtype=np.int64)
    return sched.submit(avatar, samples, n, frames, frames % avatar.n_frames)


def _hold(sched: FrameScheduler) -> threading.Event:
    """Keep the scheduler's thread busy until the returned gate is set (so several submits queue up)."""
    gate, entered = threading.Event(), threading.Event()

    def block() -> None:
        entered.set()
        gate.wait(20)

    threading.Thread(target=sched.call, args=(block,), daemon=True).start()
    assert entered.wait(10)
    return gate


def _drain(utt: Utterance) -> list[tuple[int, int]]:
    out = []
    for _ in range(utt.n_needed):
        face = utt.next_face(timeout_s=10)
        out.append((int(face[0, 0, 0]), int(face[0, 1, 0])))
    return out


def test_concurrent_utterances_get_exactly_their_own_faces_in_order(avatar: AvatarCache) -> None:
    source = Tagged(first=2, size=4)
    sched = FrameScheduler(source, fps=25, queue_frames=8, start_budget_s=0.1)
    try:
        utts = {tag: _submit(sched, avatar, tag, n) for tag, n in ((1, 23), (2, 9), (3, 31), (4, 1))}
        got: dict[int, list[tuple[int, int]]] = {}
        threads = [threading.Thread(target=lambda t=t, u=u: got.__setitem__(t, _drain(u))) for t, u in utts.items()]
        for th in threads:
            th.start()
        for th in threads:
            th.join(20)
    finally:
        sched.close()
    for tag, utt in utts.items():
        assert got[tag] == [(tag, i % 256) for i in range(utt.n_needed)]
    # Frames of different utterances shared batches, and no batch was larger than the source's batch size.
    assert any(len({t for t, _ in b}) > 1 for b in source.batches)
    assert all(len(b) <= 4 for b in source.batches)


def test_new_utterances_share_a_small_first_batch(avatar: AvatarCache) -> None:
    source = Tagged(first=4, size=8)
    sched = FrameScheduler(source, fps=25, queue_frames=64, start_budget_s=0.1)
    gate = _hold(sched)  # all four are queued before the scheduler looks
    try:
        utts = [_submit(sched, avatar, tag, 20) for tag in (1, 2, 3, 4)]
    finally:
        gate.set()
    try:
        for u in utts:
            _drain(u)
    finally:
        sched.close()
    first = source.batches[0]
    # Four new utterances, batch of 8: each gets two frames in the very first batch.
    assert sorted(first) == [(t, i) for t in (1, 2, 3, 4) for i in (0, 1)]


def test_a_consumer_that_stops_reading_does_not_stall_the_others(avatar: AvatarCache) -> None:
    source = Tagged(first=2, size=4)
    sched = FrameScheduler(source, fps=25, queue_frames=6, start_budget_s=0.1)
    try:
        stalled = _submit(sched, avatar, 1, 200)
        stalled.next_face(timeout_s=10)  # takes one face, then never reads again
        busy = _submit(sched, avatar, 2, 150)
        assert _drain(busy) == [(2, i) for i in range(150)]
        # The stalled one was generated only up to its queue limit, not to the end.
        made_for_stalled = sum(1 for b in source.batches for t, _ in b if t == 1)
        assert made_for_stalled <= 1 + 6 + 4
        assert sched.stats()["live_utterances"] == 1
    finally:
        sched.close()


def test_cancelling_frees_the_utterance_frames(avatar: AvatarCache) -> None:
    source = Tagged(first=1, size=2)
    sched = FrameScheduler(source, fps=25, queue_frames=4, start_budget_s=0.1)
    try:
        utt = _submit(sched, avatar, 7, 500)
        utt.next_face(timeout_s=10)
        sched.cancel(utt)
        made = sum(len(b) for b in source.batches)
        other = _submit(sched, avatar, 8, 10)
        assert _drain(other) == [(8, i) for i in range(10)]
        assert sum(1 for b in source.batches for t, _ in b if t == 7) <= made  # nothing more was made for it
        assert sched.stats()["live_utterances"] == 0
    finally:
        sched.close()


def test_out_of_memory_fails_only_the_utterances_in_that_batch(avatar: AvatarCache) -> None:
    source = Tagged(first=2, size=2, poison=1)
    sched = FrameScheduler(source, fps=25, queue_frames=64, start_budget_s=0.1)
    gate = _hold(sched)
    try:
        a, b, c = (_submit(sched, avatar, tag, 6) for tag in (1, 2, 3))
    finally:
        gate.set()
    try:
        # Batch of 2, three new utterances: the first batch holds one frame of a (poisoned) and one of b.
        with pytest.raises(GpuOutOfMemory):
            a.next_face(timeout_s=10)
        with pytest.raises(GpuOutOfMemory):
            _drain(b)
        assert _drain(c) == [(3, i) for i in range(6)]
    finally:
        sched.close()


@pytest.mark.parametrize(("behind", "timed"), [(False, True), (True, True), (True, False)])
def test_stats_report_frames_per_second_and_lateness(avatar: AvatarCache, behind: bool, timed: bool) -> None:
    # 4 frames per batch: 10 ms a batch is 400 frames/s (ahead of 25 fps), 400 ms a batch 10 frames/s (behind:
    # frame 16 comes ~1.0 s after its deadline). An untimed utterance (the server's warm-up clip) is left out.
    sched = FrameScheduler(SlowGpu(batch_s=0.4 if behind else 0.01), fps=25, queue_frames=64, start_budget_s=0.0)
    try:
        frames = np.arange(20, dtype=np.int64)
        utt = sched.submit(avatar, np.full(16000, 1, np.float32), 20, frames, frames % avatar.n_frames, timed=timed)
        _drain(utt)
        time.sleep(0.01)
        stats = sched.stats()
    finally:
        sched.close()
    assert stats["frames_per_s"] > 0 and stats["live_utterances"] == 0
    if behind and timed:
        assert stats["lateness_p95_ms"] > 500
    else:
        assert stats["lateness_p95_ms"] < 100


class BatchTagged(Tagged):
    """Tagged with `prepare_many`: records the groups it prepared; a negative tag fails its preparation."""

    def __init__(self) -> None:
        super().__init__(first=2, size=4)
        self.groups: list[list[int]] = []

    def prepare(self, cache: AvatarCache, samples_16k: np.ndarray, n_frames: int, phonemes: object = ()) -> int:
        if samples_16k[0] < 0:
            raise ValueError("undecodable")
        return super().prepare(cache, samples_16k, n_frames, phonemes)

    def prepare_many(self, items: Sequence[PrepareItem]) -> list[int]:
        self.groups.append([int(i.samples_16k[0]) for i in items])
        return [self.prepare(*i) for i in items]


def test_utterances_arriving_together_are_prepared_in_one_call_and_a_bad_one_fails_alone(avatar: AvatarCache) -> None:
    source = BatchTagged()
    sched = FrameScheduler(source, fps=25, queue_frames=8, start_budget_s=0.1)
    try:
        gate = _hold(sched)
        together = {tag: _submit(sched, avatar, tag, 5) for tag in (1, 2, 3)}
        gate.set()
        assert {tag: _drain(u) for tag, u in together.items()} == {t: [(t, i) for i in range(5)] for t in (1, 2, 3)}
        assert source.groups == [[1, 2, 3]]  # one batched preparation for the three

        gate = _hold(sched)
        good, bad = _submit(sched, avatar, 7, 3), _submit(sched, avatar, -1, 3)
        gate.set()
        assert _drain(good) == [(7, i) for i in range(3)]
        with pytest.raises(ValueError, match="undecodable"):
            bad.next_face(timeout_s=10)
        assert source.groups[-1] == [7, -1]  # tried together, then one by one
    finally:
        sched.close()


class SlowPrepare(Tagged):
    """Tagged whose preparation takes a while and says when it started (so a test can submit during it)."""

    def __init__(self) -> None:
        super().__init__(first=4, size=8)
        self.preparing = threading.Event()

    def prepare(self, cache: AvatarCache, samples_16k: np.ndarray, n_frames: int, phonemes: object = ()) -> int:
        self.preparing.set()
        time.sleep(0.2)
        return super().prepare(cache, samples_16k, n_frames, phonemes)


def test_an_utterance_arriving_while_another_is_prepared_joins_its_first_batch(avatar: AvatarCache) -> None:
    source = SlowPrepare()
    sched = FrameScheduler(source, fps=25, queue_frames=64, start_budget_s=0.1)
    try:
        early = _submit(sched, avatar, 1, 10)
        assert source.preparing.wait(10)
        late = _submit(sched, avatar, 2, 10)  # while the first one is still being prepared
        assert _drain(early) == [(1, i) for i in range(10)]
        assert _drain(late) == [(2, i) for i in range(10)]
    finally:
        sched.close()
    # Both went out in the very first batch, sharing it (4 frames each of a batch of 8).
    assert sorted(source.batches[0]) == [(t, i) for t in (1, 2) for i in range(4)]


class SlowGpu(Tagged):
    """Tagged faces that take `batch_s` each, one batch after another (like one CUDA stream): notes how many
    batches were queued at once."""

    def __init__(self, batch_s: float) -> None:
        super().__init__(first=2, size=4)
        self.batch_s, self.queued, self.most_queued = batch_s, 0, 0
        self.free_at = 0.0

    def submit(self, requests: Sequence[FaceRequest]) -> PendingFaces:
        done = super().submit(requests)
        with self.lock:
            self.queued += 1
            self.most_queued = max(self.most_queued, self.queued)
            self.free_at = max(self.free_at, time.monotonic()) + self.batch_s
            ready_at = self.free_at
        source = self

        class Pending:
            def wait(self) -> np.ndarray:
                time.sleep(max(0.0, ready_at - time.monotonic()))
                with source.lock:
                    source.queued -= 1
                return np.asarray(done.wait())

        return Pending()


@pytest.mark.parametrize(("start_budget_s", "pipelined"), [(5.0, False), (0.0, True)])
def test_work_far_ahead_of_its_deadline_keeps_one_batch_on_the_gpu(
    avatar: AvatarCache, start_budget_s: float, pipelined: bool
) -> None:
    # Frames due seconds from now (a live utterance rendered ahead of its stream) go one batch at a time, so a
    # new utterance's first batch never waits behind two; frames due now keep the GPU fed with two in flight.
    source = SlowGpu(batch_s=0.02)
    sched = FrameScheduler(source, fps=25, queue_frames=64, start_budget_s=start_budget_s)
    try:
        assert _drain(_submit(sched, avatar, 1, 24)) == [(1, i) for i in range(24)]
    finally:
        sched.close()
    assert source.most_queued == (2 if pipelined else 1)


def test_an_utterance_that_plays_later_waits_for_the_frames_needed_sooner(avatar: AvatarCache) -> None:
    # B is a live session's next sentence, queued behind 10 s of speech: A's frames (all due within 2 s) come
    # first, B's first frames do not jump the queue; without plays_in, B would share A's first batch.
    source = SlowGpu(batch_s=0.02)
    sched = FrameScheduler(source, fps=25, queue_frames=64, start_budget_s=0.0)
    try:
        gate = _hold(sched)
        a, b = _submit(sched, avatar, 1, 40), _submit(sched, avatar, 2, 8)
        sched.plays_in(b, 10.0)
        gate.set()
        assert _drain(a) == [(1, i) for i in range(40)] and _drain(b) == [(2, i) for i in range(8)]
    finally:
        sched.close()
    order = [tag for batch in source.batches for tag, _ in batch]
    assert order.index(2) > len(order) - 1 - order[::-1].index(1)  # every face of A before any of B
    assert b.plays_at_s > a.plays_at_s + 9


@pytest.mark.parametrize("whole", [True, False])
def test_clips_needed_whole_are_finished_in_turn(avatar: AvatarCache, whole: bool) -> None:
    # Three clips that nobody watches arrive together: after the shared first batch, the first to arrive gets
    # every batch until it is done, then the second... (frame deadlines alone would interleave all three and
    # finish them together, at the end).
    source = Tagged(first=3, size=4)
    sched = FrameScheduler(source, fps=25, queue_frames=64, start_budget_s=0.1)
    gate = _hold(sched)
    try:
        utts = [_submit(sched, avatar, tag, 20) for tag in (1, 2, 3)]
        if whole:
            for u in utts:
                sched.needed_whole(u)
    finally:
        gate.set()
    try:
        assert [_drain(u) for u in utts] == [[(tag, i) for i in range(20)] for tag in (1, 2, 3)]
    finally:
        sched.close()
    assert sorted(source.batches[0]) == [(1, 0), (2, 0), (3, 0)]  # first frames first, either way
    later = [tag for batch in source.batches[1:] for tag, _ in batch]
    assert (later == sorted(later)) is whole


def test_a_clip_needed_whole_gives_way_to_frames_shown_sooner(avatar: AvatarCache) -> None:
    # A 4-s clip nobody watches (needed when its last frame is due) and a 1.6-s utterance played as it renders:
    # every frame of the played one is due before the clip is needed, so none of it waits for the clip.
    source = Tagged(first=2, size=4)
    sched = FrameScheduler(source, fps=25, queue_frames=128, start_budget_s=0.1)
    gate = _hold(sched)
    try:
        clip, played = _submit(sched, avatar, 1, 100), _submit(sched, avatar, 2, 40)
        sched.needed_whole(clip)
    finally:
        gate.set()
    try:
        assert _drain(played) == [(2, i) for i in range(40)] and _drain(clip) == [(1, i) for i in range(100)]
    finally:
        sched.close()
    later = [tag for batch in source.batches[1:] for tag, _ in batch]
    assert later.index(1) > len(later) - 1 - later[::-1].index(2)  # all of the played one's frames first
