"""OpenAI-compatible client against a real local HTTP server (127.0.0.1) that speaks chat-completions SSE."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from webapp_scaffold import ScaffoldSpeaker, create_scaffold_app, wait_for

from musetalk.config import LLMConfig
from musetalk.errors import ConfigError
from webapp.backend.llm import BuiltinResponder, ChatMessage, LLMError, OpenAIChatClient, build_llm

Behaviour = Callable[[BaseHTTPRequestHandler], None]
MESSAGES = [ChatMessage("system", "Be brief."), ChatMessage("user", "Hi there")]


def _chunk(text: str | None = None, role: str | None = None) -> bytes:
    delta: dict[str, str] = {}
    if role:
        delta["role"] = role
    if text is not None:
        delta["content"] = text
    event = {"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta}]}
    return f"data: {json.dumps(event)}\n\n".encode()


def _start_sse(h: BaseHTTPRequestHandler) -> None:
    h.send_response(200)
    h.send_header("Content-Type", "text/event-stream")
    h.send_header("Cache-Control", "no-cache")
    h.end_headers()


def _write(h: BaseHTTPRequestHandler, data: bytes) -> None:
    h.wfile.write(data)
    h.wfile.flush()


def _json(h: BaseHTTPRequestHandler, status: int, body: object) -> None:
    data = json.dumps(body).encode()
    h.send_response(status)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(data)))
    h.end_headers()
    h.wfile.write(data)


def _sse(*events: bytes) -> Behaviour:
    """A behaviour that answers with these raw SSE bytes."""

    def answer(h: BaseHTTPRequestHandler) -> None:
        _start_sse(h)
        for event in events:
            _write(h, event)

    return answer


def streams_reply(h: BaseHTTPRequestHandler) -> None:
    _start_sse(h)
    _write(h, _chunk(role="assistant"))  # role-only delta: no text
    _write(h, b": keep-alive comment\n\n")
    for piece in ["Hello", " there! ", "Nice to", " meet you."]:
        _write(h, _chunk(piece))
    _write(h, b"data: [DONE]\n\n")


class FakeLLMServer:
    """A ThreadingHTTPServer on 127.0.0.1; `behaviour` answers POST /v1/chat/completions; requests are recorded."""

    def __init__(self) -> None:
        self.behaviour: Behaviour = streams_reply
        self.requests: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                outer.requests.append(
                    {"path": self.path, "headers": dict(self.headers), "json": json.loads(body or b"null")}
                )
                if self.path != "/v1/chat/completions":
                    _json(self, 404, {"error": {"message": f"no route {self.path}"}})
                    return
                outer.behaviour(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            block_on_close = False

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # clients that time out hang up on purpose

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def client(self, timeout_s: float = 5.0, api_key: str | None = "sk-test") -> OpenAIChatClient:
        return OpenAIChatClient(self.url, "tiny-model", api_key, timeout_s=timeout_s, max_tokens=64, temperature=0.2)


@pytest.fixture
def fake_llm() -> Iterator[FakeLLMServer]:
    server = FakeLLMServer()
    server.thread.start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


def test_streams_text_and_sends_a_chat_completions_request(fake_llm: FakeLLMServer) -> None:
    chunks = list(fake_llm.client().stream(MESSAGES))
    assert "".join(chunks) == "Hello there! Nice to meet you." and len(chunks) == 4
    (req,) = fake_llm.requests
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == "Bearer sk-test"
    assert req["json"] == {
        "model": "tiny-model",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
        "stream": True,
        "max_tokens": 64,
        "temperature": 0.2,
    }


def test_no_key_sends_no_authorization_and_non_streaming_answers_work(fake_llm: FakeLLMServer) -> None:
    fake_llm.behaviour = lambda h: _json(
        h, 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": "Whole reply."}}]}
    )
    assert list(fake_llm.client(api_key=None).stream(MESSAGES)) == ["Whole reply."]
    assert "Authorization" not in fake_llm.requests[0]["headers"]


@pytest.mark.parametrize(
    ("behaviour", "message"),
    [
        (lambda h: _json(h, 401, {"error": {"message": "Invalid API key"}}), "HTTP 401: Invalid API key"),
        (lambda h: _json(h, 500, "boom"), "HTTP 500"),
        (_sse(b"data: {not json\n\n"), "malformed stream event"),
        (_sse(b'data: {"error": {"message": "overloaded"}}\n\n'), "overloaded"),
        (_sse(_chunk(role="assistant"), b"data: [DONE]\n\n"), "empty reply"),
    ],
)
def test_server_errors_raise_llm_error(fake_llm: FakeLLMServer, behaviour: Behaviour, message: str) -> None:
    fake_llm.behaviour = behaviour
    with pytest.raises(LLMError, match=message):
        list(fake_llm.client().stream(MESSAGES))


def test_a_server_that_never_answers_times_out(fake_llm: FakeLLMServer) -> None:
    fake_llm.behaviour = lambda h: time.sleep(3)
    with pytest.raises(LLMError, match="did not answer within 0.3 s"):
        list(fake_llm.client(timeout_s=0.3).stream(MESSAGES))


def test_a_trickling_stream_hits_the_overall_deadline(fake_llm: FakeLLMServer) -> None:
    def trickle(h: BaseHTTPRequestHandler) -> None:
        _start_sse(h)
        for _ in range(40):  # each chunk comes well within the read timeout, the whole takes 4 s
            _write(h, _chunk("word "))
            time.sleep(0.1)

    fake_llm.behaviour = trickle
    with pytest.raises(LLMError, match="did not finish within 0.6 s"):
        list(fake_llm.client(timeout_s=0.6).stream(MESSAGES))


def test_nothing_listening_is_an_llm_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    client = OpenAIChatClient(f"http://127.0.0.1:{port}/v1", "m", timeout_s=2)
    with pytest.raises(LLMError, match="cannot reach the LLM"):
        list(client.stream(MESSAGES))


def test_chat_job_through_the_openai_client(fake_llm: FakeLLMServer, tmp_path: Path) -> None:
    app = create_scaffold_app(ScaffoldSpeaker(tmp_path, size_px=64), llm=fake_llm.client())
    with TestClient(app) as client:
        assert client.get("/chat/info").json()["llm"]["builtin"] is False
        ok = client.post("/chat", json={"message": "Hi there"}).json()["job_id"]
        wait_for(lambda: client.get(f"/status/{ok}").json()["status"] in ("done", "error"))
        done = client.get(f"/status/{ok}").json()
        assert done["status"] == "done" and done["reply"] == "Hello there! Nice to meet you."
        assert [s["text"] for s in done["sentences"]] == ["Hello there!", "Nice to meet you."]

        fake_llm.behaviour = lambda h: _json(h, 401, {"error": {"message": "Invalid API key"}})
        bad = client.post("/chat", json={"message": "Hi again"}).json()["job_id"]
        wait_for(lambda: client.get(f"/status/{bad}").json()["status"] in ("done", "error"))
        failed = client.get(f"/status/{bad}").json()
        assert failed["status"] == "error"
        assert failed["error"] == "The language model failed: the LLM server answered HTTP 401: Invalid API key"


def test_build_llm_reads_engine_and_env() -> None:
    assert isinstance(build_llm(LLMConfig(), {}), BuiltinResponder)
    cfg = LLMConfig(engine="openai", timeout_s=7)
    local = build_llm(cfg, {"OPENAI_BASE_URL": "http://127.0.0.1:8080/v1/", "OPENAI_MODEL": "llama"})
    assert isinstance(local, OpenAIChatClient)
    assert local.url == "http://127.0.0.1:8080/v1/chat/completions" and local.timeout_s == 7 and local.api_key is None
    assert local.label == "llama via 127.0.0.1:8080"
    hosted = build_llm(cfg, {"OPENAI_MODEL": "gpt-x", "OPENAI_API_KEY": "sk-1"})
    assert isinstance(hosted, OpenAIChatClient) and hosted.url == "https://api.openai.com/v1/chat/completions"
    with pytest.raises(ConfigError, match="OPENAI_MODEL"):
        build_llm(cfg, {"OPENAI_BASE_URL": "http://127.0.0.1:1/v1"})
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        build_llm(cfg, {"OPENAI_MODEL": "gpt-x"})
    with pytest.raises(ConfigError, match="http"):
        build_llm(cfg, {"OPENAI_MODEL": "m", "OPENAI_BASE_URL": "ftp://x"})
