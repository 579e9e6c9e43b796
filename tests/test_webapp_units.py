"""Web app backend pieces on their own: job store (bounds, expiry, threads) and sentence splitting."""

from __future__ import annotations

import ast
import random
import threading
from pathlib import Path

import pytest

from musetalk.errors import Busy
from webapp.backend.jobs import JobNotFound, JobState, JobStore, SentenceResult
from webapp.backend.sentences import SentenceSplitter, clean_for_speech, split_sentences


class FakeClock:
    """Seconds that only move when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _result(i: int) -> SentenceResult:
    return SentenceResult(i, f"s{i}", clip_start_s=i - 1.0, clip_duration_s=1.0, session_video_url="/v",
                          session_duration_s=float(i))


def test_job_moves_through_states_and_serialises() -> None:
    store = JobStore()
    job = store.create("s1", "hello")
    assert job.state is JobState.QUEUED and store.get(job.job_id).to_json()["status"] == "queued"
    store.start(job.job_id, "thinking", "Thinking…", 0.05)
    store.note_reply(job.job_id, "One.", None)
    store.add_sentence(job.job_id, _result(1))
    running = store.get(job.job_id).to_json()
    assert running["status"] == "running" and running["reply_so_far"] == "One."
    assert running["clip_start_s"] == 0.0 and running["video_url"] == "/v" and running["reply"] is None
    store.add_sentence(job.job_id, _result(2))
    store.finish(job.job_id, "One. Two.")
    done = store.get(job.job_id).to_json()
    assert done["status"] == "done" and done["reply"] == "One. Two." and done["progress"] == 1.0
    assert done["clip_start_s"] == 0.0 and done["clip_duration_s"] == 2.0 and done["session_duration_s"] == 2.0
    with pytest.raises(ValueError, match="already finished"):
        store.fail(job.job_id, "late")


def test_finished_jobs_expire_after_ttl_but_running_ones_do_not() -> None:
    clock = FakeClock()
    store = JobStore(max_jobs=10, ttl_s=60, clock=clock)
    done, running = store.create("a", "x"), store.create("b", "y")
    store.start(running.job_id, "thinking", "…")
    store.fail(done.job_id, "nope")
    clock.now += 59
    assert store.get(done.job_id).error == "nope"
    clock.now += 2
    with pytest.raises(JobNotFound):
        store.get(done.job_id)
    clock.now += 10_000
    assert store.get(running.job_id).state is JobState.RUNNING
    assert len(store) == 1


def test_store_is_bounded_evicting_finished_jobs_first() -> None:
    store = JobStore(max_jobs=3, ttl_s=1e6)
    a, b, c = (store.create("s", m) for m in "abc")
    store.finish(b.job_id, "B")
    d = store.create("s", "d")  # full: evicts b, the only finished job
    with pytest.raises(JobNotFound):
        store.get(b.job_id)
    assert {store.get(j.job_id).message for j in (a, c, d)} == {"a", "c", "d"}
    with pytest.raises(Busy) as info:
        store.create("s", "e")  # full of jobs still in progress
    assert info.value.retry_after_s > 0
    with pytest.raises(JobNotFound):
        store.get("no-such-job")


def test_store_survives_concurrent_writers() -> None:
    store = JobStore(max_jobs=10_000)
    ids: list[str] = []
    lock = threading.Lock()

    def work() -> None:
        for _ in range(200):
            job = store.create("s", "m")
            store.start(job.job_id, "thinking", "…")
            store.add_sentence(job.job_id, _result(1))
            store.finish(job.job_id, "r")
            with lock:
                ids.append(job.job_id)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 1600 and len(store) == 1600
    assert all(store.get(i).state is JobState.DONE and len(store.get(i).sentences) == 1 for i in ids)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Hello there! How are you? I am fine.", ["Hello there!", "How are you?", "I am fine."]),
        ("Dr. Smith paid 3.50 euros. Then he left... Really?", ["Dr. Smith paid 3.50 euros.", "Then he left...",
                                                               "Really?"]),
        ('He said "Stop." Then he ran.', ['He said "Stop."', "Then he ran."]),
        ("Use e.g. a cup. Or i.e. this one.", ["Use e.g. a cup.", "Or i.e. this one."]),
        ("1. First **bold** point.\n2. Second [link](http://x.y) point\n- third", ["First bold point.",
                                                                                  "Second link point", "third"]),
        ("Version 2.0 is out. Yes", ["Version 2.0 is out.", "Yes"]),
        ("你好。我很好！谢谢", ["你好。", "我很好！", "谢谢"]),
        ("The answer is no. But ask again.", ["The answer is no.", "But ask again."]),
        ("  ...  ", []),
        ("no punctuation at all", ["no punctuation at all"]),
    ],
)
def test_split_sentences(text: str, expected: list[str]) -> None:
    assert split_sentences(text) == expected


def test_long_sentences_are_wrapped_at_commas_then_spaces() -> None:
    text = "This part is quite long, and this second part is long too, and here is a third part to finish it."
    pieces = split_sentences(text, max_chars=40)
    assert all(len(p) <= 40 for p in pieces) and len(pieces) >= 3
    assert pieces[0].endswith(",")
    assert " ".join(pieces) == text
    words = split_sentences("word " * 100, max_chars=50)
    assert all(len(p) <= 50 for p in words) and " ".join(words).split() == ["word"] * 100


def test_streamed_chunks_split_like_the_whole_text() -> None:
    text = ("Hi! I'm Dr. Who, a time traveller. It costs 4.99 today... Amazing? "
            'She said "yes." Then:\n1. go home\n2. sleep well. Done')
    whole = split_sentences(text)
    rng = random.Random(3)
    for _ in range(30):
        splitter, got, i = SentenceSplitter(), [], 0
        while i < len(text):
            step = rng.randint(1, 7)
            got += splitter.feed(text[i : i + step])
            i += step
        assert got + splitter.flush() == whole


def test_first_sentence_is_released_before_the_stream_ends() -> None:
    splitter = SentenceSplitter()
    assert splitter.feed("Hello there") == []
    assert splitter.feed("! How") == ["Hello there!"]
    assert splitter.feed(" are you?") == []  # the end of the text might still be followed by more
    assert splitter.flush() == ["How are you?"]


def test_clean_for_speech_removes_markdown() -> None:
    assert clean_for_speech("## **Big** `code` _x_ [site](https://a.b)\n  more") == "Big code x site more"


def test_webapp_uses_only_the_bottom_layers_and_the_library_never_imports_it() -> None:
    root = Path(__file__).resolve().parent.parent
    allowed = {"musetalk.config", "musetalk.errors", "musetalk.types", "musetalk.utils"}

    def imports(path: Path) -> set[str]:
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
        return found

    for path in (root / "webapp").rglob("*.py"):
        bad = {m for m in imports(path) if m.startswith("musetalk") and not any(m.startswith(a) for a in allowed)}
        assert not bad, f"{path}: {bad}"
    for path in (root / "musetalk").rglob("*.py"):
        assert not any(m.startswith("webapp") for m in imports(path)), path
