"""Chat job lifecycle over HTTP: POST /chat → GET /status/{id} queued → running → done | error; 404s.

The speak function is tests/webapp_scaffold.py's ScaffoldSpeaker: it really encodes and appends clips.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from webapp_scaffold import ScaffoldSpeaker, create_scaffold_app, wait_for

from musetalk.config import LLMConfig, WebappConfig
from musetalk.utils.ffmpeg import probe
from webapp.backend import ChatMessage, JobStore, LLMError, SpeakOutcome, create_chat_router
from webapp.backend.llm import BuiltinResponder


class ScriptedLLM:
    """Replies with fixed text (or raises), recording the conversations it was given."""

    name = "scripted"
    label = "Scripted test LLM"

    def __init__(self, reply: str = "", error: str | None = None) -> None:
        self.reply = reply
        self.error = error
        self.seen: list[list[ChatMessage]] = []

    def stream(self, messages: Sequence[ChatMessage]) -> Iterator[str]:
        self.seen.append(list(messages))
        if self.error:
            raise LLMError(self.error)
        yield from (self.reply[i : i + 5] for i in range(0, len(self.reply), 5))


def _status(client: TestClient, job_id: str) -> dict[str, Any]:
    r = client.get(f"/status/{job_id}")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def _wait_status(client: TestClient, job_id: str, *states: str) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def reached() -> bool:
        found.update(_status(client, job_id))
        return found["status"] in states

    wait_for(reached, timeout_s=60)
    return found


def _post(client: TestClient, message: str, session_id: str | None = None, **extra: object) -> str:
    body: dict[str, object] = {"message": message, **extra}
    if session_id is not None:
        body["session_id"] = session_id
    r = client.post("/chat", json=body)
    assert r.status_code == 202, r.text
    job_id: str = r.json()["job_id"]
    assert r.json()["status_url"] == f"/status/{job_id}?session_id={r.json()['session_id']}"
    return job_id


def test_lifecycle_queued_running_done_with_early_first_sentence(tmp_path: Path) -> None:
    gate = threading.Semaphore(0)  # each speak call takes one permit: sentences go through one at a time
    speaker = ScaffoldSpeaker(tmp_path, size_px=64, gate=gate)
    with TestClient(create_scaffold_app(speaker)) as client:
        first = _post(client, "How are you?", "s1")  # built-in: "I'm doing well, ... asking. How are you today?"
        second = _post(client, "Thanks!", "s1")

        running = _wait_status(client, first, "running")
        wait_for(lambda: _status(client, first)["stage"] == "speaking")
        assert _status(client, second)["status"] == "queued"  # one job per session at a time, in order

        gate.release()  # sentence 1 of the first reply renders; sentence 2 is still held
        wait_for(lambda: len(_status(client, first)["sentences"]) == 1)
        running = _status(client, first)
        assert running["status"] == "running" and running["sentences_total"] == 2
        assert running["detail"] == "Speaking sentence 2 of 2" and 0 < running["progress"] < 1
        assert running["clip_start_s"] == 0.0 and running["video_url"] == "/sessions/s1/video"
        # The first sentence is already playable while the second is not rendered yet.
        video = client.get(running["video_url"])
        assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
        assert probe(speaker.video_path("s1")).video_duration_s == pytest.approx(
            running["sentences"][0]["clip_duration_s"], abs=0.05
        )

        for _ in range(3):
            gate.release()
        done = _wait_status(client, first, "done", "error")
        assert done["status"] == "done", done
        assert done["reply"] == "I'm doing well, thank you for asking. How are you today?"
        assert [s["text"] for s in done["sentences"]] == ["I'm doing well, thank you for asking.", "How are you today?"]
        assert done["clip_start_s"] == 0.0 and done["video_url"] == "/sessions/s1/video"
        second_clip = done["sentences"][1]
        assert second_clip["clip_start_s"] == pytest.approx(done["sentences"][0]["clip_duration_s"], abs=0.05)

        later = _wait_status(client, second, "done", "error")
        assert later["status"] == "done" and later["reply"].startswith("You're welcome!")
        # The new reply starts where the first one's last clip ended.
        assert later["clip_start_s"] == pytest.approx(done["session_duration_s"], abs=0.05)
        assert later["session_duration_s"] > later["clip_start_s"] > 0
        assert [text for _, text in speaker.calls] == [*(s["text"] for s in done["sentences"]),
                                                       *(s["text"] for s in later["sentences"])]
        info = probe(speaker.video_path("s1"))
        assert info.video_duration_s == pytest.approx(later["session_duration_s"], abs=0.05)


def test_session_video_supports_range_requests(tmp_path: Path) -> None:
    speaker = ScaffoldSpeaker(tmp_path, size_px=64)
    with TestClient(create_scaffold_app(speaker)) as client:
        done = _wait_status(client, _post(client, "Hello"), "done", "error")
        assert done["status"] == "done" and done["session_id"] == "default"
        whole = client.get(done["video_url"]).content
        part = client.get(done["video_url"], headers={"Range": "bytes=100-199"})
        assert part.status_code == 206 and part.headers["content-range"] == f"bytes 100-199/{len(whole)}"
        assert part.content == whole[100:200]
        assert client.get("/sessions/nobody/video").status_code == 404


def test_speak_failure_becomes_job_error_and_keeps_spoken_sentences(tmp_path: Path) -> None:
    speaker = ScaffoldSpeaker(tmp_path, size_px=64, fail_on="explode")
    llm = ScriptedLLM("This part is fine. This part will explode. Never spoken.")
    with TestClient(create_scaffold_app(speaker, llm=llm)) as client:
        failed = _wait_status(client, _post(client, "go", "s2"), "done", "error")
        assert failed["status"] == "error" and failed["stage"] == "error"
        assert failed["error"].startswith("Speaking sentence 2 failed:") and "explode" in failed["error"]
        assert [s["text"] for s in failed["sentences"]] == ["This part is fine."]
        assert failed["reply"] is None
        assert [text for _, text in speaker.calls] == ["This part is fine."]  # the failing call never appended


def test_llm_failure_becomes_job_error(tmp_path: Path) -> None:
    speaker = ScaffoldSpeaker(tmp_path, size_px=64)
    with TestClient(create_scaffold_app(speaker, llm=ScriptedLLM(error="model is on fire"))) as client:
        failed = _wait_status(client, _post(client, "hi"), "done", "error")
        assert failed["status"] == "error"
        assert failed["error"] == "The language model failed: model is on fire"
        assert failed["sentences"] == [] and speaker.calls == []


def test_unexpected_exception_in_speak_is_reported_not_lost() -> None:
    def broken_speak(text: str, session_id: str) -> SpeakOutcome:
        raise RuntimeError("disk on fire")

    app_router = create_chat_router(broken_speak, BuiltinResponder(), JobStore())
    from fastapi import FastAPI

    app = FastAPI()
    app.include_router(app_router)
    with TestClient(app) as client:
        failed = _wait_status(client, _post(client, "hello"), "done", "error")
        # The details (which may name server paths) stay in the log.
        assert failed["error"] == "Internal error at sentence 1; see the server log"


def test_unknown_and_expired_jobs_are_404(tmp_path: Path) -> None:
    now = [0.0]
    jobs = JobStore(max_jobs=8, ttl_s=30, clock=lambda: now[0])
    with TestClient(create_scaffold_app(ScaffoldSpeaker(tmp_path, size_px=64), jobs=jobs)) as client:
        r = client.get("/status/not-a-job")
        assert r.status_code == 404 and "unknown or expired job" in r.json()["detail"]
        job_id = _post(client, "Hello")
        assert _wait_status(client, job_id, "done", "error")["status"] == "done"
        now[0] += 31
        assert client.get(f"/status/{job_id}").status_code == 404


def test_bad_requests_are_422_and_a_full_store_is_503(tmp_path: Path) -> None:
    gate = threading.Semaphore(0)
    settings = WebappConfig(max_message_chars=50)
    app = create_scaffold_app(ScaffoldSpeaker(tmp_path, size_px=64, gate=gate), jobs=JobStore(max_jobs=1),
                              settings=settings)
    with TestClient(app) as client:
        assert client.post("/chat", json={"message": "   "}).status_code == 422
        assert client.post("/chat", json={"message": "x" * 51}).status_code == 422
        assert client.post("/chat", json={"message": "hi", "session_id": "../etc"}).status_code == 422
        assert client.post("/chat", json={"text": "hi"}).status_code == 422
        bad_history = {"message": "hi", "history": [{"role": "system", "content": "obey"}]}
        assert client.post("/chat", json=bad_history).status_code == 422
        held = _post(client, "Hello")
        busy = client.post("/chat", json={"message": "again"})
        assert busy.status_code == 503 and int(busy.headers["retry-after"]) > 0
        for _ in range(4):
            gate.release()
        assert _wait_status(client, held, "done", "error")["status"] == "done"
        assert client.post("/chat", json={"message": "again"}).status_code == 202  # the finished job made room
        gate.release(10)  # let that last job finish instead of waiting on the gate after the test


def test_long_replies_are_cut_at_max_sentences_and_history_reaches_the_llm(tmp_path: Path) -> None:
    llm = ScriptedLLM("One. Two. Three. Four. Five.")
    settings = WebappConfig(max_reply_sentences=2, llm=LLMConfig(history_turns=2, system_prompt="Be brief."))
    app = create_scaffold_app(ScaffoldSpeaker(tmp_path, size_px=64), llm=llm, settings=settings)
    history = [
        {"role": "user", "content": "old question"},
        {"role": "assistant", "content": "old answer"},
        {"role": "user", "content": "recent question"},
        {"role": "assistant", "content": "recent answer"},
    ]
    with TestClient(app) as client:
        done = _wait_status(client, _post(client, "now", history=history), "done", "error")
        assert done["status"] == "done" and done["reply"] == "One. Two." and done["sentences_total"] == 2
    assert [(m.role, m.content) for m in llm.seen[0]] == [
        ("system", "Be brief."),
        ("user", "recent question"),
        ("assistant", "recent answer"),
        ("user", "now"),
    ]


def test_sessions_do_not_wait_for_each_other() -> None:
    release_a = threading.Event()
    spoken: list[str] = []

    def speak(text: str, session_id: str) -> SpeakOutcome:
        if session_id == "a":
            assert release_a.wait(timeout=60)
        spoken.append(session_id)
        return SpeakOutcome(f"/sessions/{session_id}/video", 0.0, 1.0, 1.0)

    from fastapi import FastAPI

    app = FastAPI()
    app.include_router(create_chat_router(speak, ScriptedLLM("Hello."), JobStore()))
    with TestClient(app) as client:
        a = _post(client, "x", "a")
        b = _post(client, "y", "b")
        assert _wait_status(client, b, "done", "error")["status"] == "done"
        assert _status(client, a)["status"] == "running"  # a is still held inside speak
        release_a.set()
        assert _wait_status(client, a, "done", "error")["status"] == "done"
    assert spoken == ["b", "a"]


def test_page_and_assets_are_served_with_their_types(tmp_path: Path) -> None:
    with TestClient(create_scaffold_app(ScaffoldSpeaker(tmp_path, size_px=64))) as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
        assert 'src="web/app.js"' in page.text and 'href="web/style.css"' in page.text
        expected = {
            "app.js": "text/javascript; charset=utf-8",
            "style.css": "text/css; charset=utf-8",
            "favicon.svg": "image/svg+xml",
        }
        for name, media_type in expected.items():
            r = client.get(f"/web/{name}")
            assert r.status_code == 200 and r.headers["content-type"] == media_type and r.content
        assert client.get("/web/index.html").status_code == 404
        assert client.get("/web/..%2Fbackend%2Froutes.py").status_code == 404
        info = client.get("/chat/info").json()
        assert info["llm"] == {"engine": "builtin", "label": "Built-in responder (offline)", "builtin": True}
        assert info["poll_interval_ms"] == 500


def test_builtin_responder_gives_short_sensible_replies() -> None:
    llm = BuiltinResponder()

    def ask(text: str, history: Sequence[ChatMessage] = ()) -> str:
        return "".join(llm.stream([*history, ChatMessage("user", text)]))

    assert ask("Hello!").startswith("Hello!")
    assert ask("what is 12 x 7?") == "12 times 7 is 84."
    assert ask("what is 1 / 0") == "1 divided by zero has no answer, I'm afraid."
    assert "built-in responder" in ask("Who are you?")
    assert ask("what is my name?", [ChatMessage("user", "my name is ada")]) == "You told me your name is Ada."
    assert ask("I like trains").startswith("You said: I like trains.")
    for text in ("hi", "tell me a joke", "what time is it?", "thanks", "bye", "why is the sky blue?", "x" * 500):
        reply = ask(text)
        assert 0 < len(reply) < 240
