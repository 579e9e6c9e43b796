"""Where chat replies come from: an offline built-in responder, or any OpenAI-compatible server.

Both stream text chunks, so the job runner can start speaking the first sentence before the reply is
complete. Failures raise LLMError, which the job runner turns into a job error shown on the page.
"""

from __future__ import annotations

import ast
import json
import logging
import operator
import random
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol
from urllib.parse import urlsplit

import httpx

from musetalk.config import LLMConfig
from musetalk.errors import ConfigError, MuseTalkError

log = logging.getLogger(__name__)

ENV_BASE_URL = "OPENAI_BASE_URL"
ENV_MODEL = "OPENAI_MODEL"
ENV_API_KEY = "OPENAI_API_KEY"
DEFAULT_BASE_URL = "https://api.openai.com/v1"
ERROR_BODY_CHARS = 300

Role = Literal["system", "user", "assistant"]


class LLMError(MuseTalkError):
    """The language model could not produce a reply (unreachable, HTTP error, timeout, bad stream)."""


@dataclass(frozen=True)
class ChatMessage:
    """One message of a chat-completions conversation."""

    role: Role
    content: str


class LLM(Protocol):
    """A chat model: streams the reply to a conversation as text chunks."""

    name: str  # engine id: "builtin" | "openai"
    label: str  # shown on the page, e.g. "Built-in responder (offline)"

    def stream(self, messages: Sequence[ChatMessage]) -> Iterator[str]:
        """Yield the reply to the last user message in `messages`, chunk by chunk."""
        ...


# --- the offline built-in responder ----------------------------------------------------------------

_JOKES = (
    "Why did the scarecrow win an award? Because he was outstanding in his field.",
    "I told my computer I needed a break. It said it would go to sleep.",
    "Why do programmers prefer dark mode? Because light attracts bugs.",
    "What do you call a fake noodle? An impasta.",
)
_OPS: dict[type[ast.operator], tuple[Callable[[float, float], float], str]] = {
    ast.Add: (operator.add, "plus"),
    ast.Sub: (operator.sub, "minus"),
    ast.Mult: (operator.mul, "times"),
    ast.Div: (operator.truediv, "divided by"),
}
_ARITHMETIC = re.compile(r"(-?\d+(?:\.\d+)?)\s*([-+*/x×÷])\s*(-?\d+(?:\.\d+)?)")


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z']+", text.lower()))


def _number(value: float) -> str:
    return f"{value:g}" if abs(value) < 1e15 else f"{value:.3e}"


def _arithmetic(text: str) -> str | None:
    """'what is 12 x 7' → '12 times 7 is 84.' (one binary operation, parsed with ast, never eval)."""
    m = _ARITHMETIC.search(text)
    if not m:
        return None
    a, op, b = m.group(1), {"x": "*", "×": "*", "÷": "/"}.get(m.group(2), m.group(2)), m.group(3)
    node = ast.parse(f"({a}) {op} ({b})", mode="eval").body
    if not isinstance(node, ast.BinOp) or type(node.op) not in _OPS:
        return None
    fn, spoken = _OPS[type(node.op)]
    x, y = float(a), float(b)
    if isinstance(node.op, ast.Div) and y == 0:
        return f"{a} divided by zero has no answer, I'm afraid."
    return f"{a} {spoken} {b} is {_number(fn(x, y))}."


class BuiltinResponder:
    """Short, sensible canned replies with no network and no model: the offline default."""

    name = "builtin"
    label = "Built-in responder (offline)"

    def __init__(self, now: Callable[[], datetime] = datetime.now, seed: int = 0) -> None:
        """`now` gives the local time for "what time is it"; `seed` picks jokes reproducibly."""
        self._now = now
        self._rng = random.Random(seed)

    def reply(self, messages: Sequence[ChatMessage]) -> str:
        """The whole reply to the last user message."""
        user = next((m.content for m in reversed(messages) if m.role == "user"), "").strip()
        history = [m.content for m in messages[:-1] if m.role == "user"]
        words = _words(user)
        lower = user.lower()
        name = re.search(r"\bmy name is ([A-Za-z][\w'-]{0,30})", user, re.IGNORECASE)
        if name:
            return f"Nice to meet you, {name.group(1).capitalize()}! What would you like to talk about?"
        if "my name" in lower and "?" in user:
            for earlier in reversed(history):
                found = re.search(r"\bmy name is ([A-Za-z][\w'-]{0,30})", earlier, re.IGNORECASE)
                if found:
                    return f"You told me your name is {found.group(1).capitalize()}."
            return "You haven't told me your name yet. What is it?"
        maths = _arithmetic(user)
        if maths:
            return maths
        if words & {"joke", "funny", "laugh"}:
            return self._rng.choice(_JOKES)
        if words & {"time"} and ("what" in words or "?" in user):
            return f"It is {self._now().strftime('%H:%M')} here."
        if words & {"date", "today", "day"} and ("what" in words or "?" in user):
            return f"Today is {self._now().strftime('%A, %B %d').replace(' 0', ' ')}."
        if words & {"weather", "rain", "sunny", "temperature"}:
            return "I can't look outside or check the internet, so I don't know the weather. I hope it's nice."
        if "how are you" in lower or "how's it going" in lower or "how do you do" in lower:
            return "I'm doing well, thank you for asking. How are you today?"
        if words & {"thanks", "thank", "thx"}:
            return "You're welcome! Is there anything else you'd like to say?"
        if words & {"bye", "goodbye", "farewell"} or "see you" in lower:
            return "Goodbye! It was nice talking with you."
        if "who are you" in lower or "your name" in lower or "what are you" in lower:
            return (
                "I'm a talking avatar, rendered live on this server. "
                "My words come from the built-in responder, which works offline."
            )
        if "what can you do" in lower or words & {"help"}:
            return (
                "Type a message and I will answer out loud with a moving face. "
                "I'm using the simple built-in responder now. "
                "Connect a language model through the OpenAI settings for real conversation."
            )
        if words & {"hi", "hello", "hey", "hiya", "greetings"} or lower.startswith("good "):
            return "Hello! It's nice to meet you. What would you like to talk about?"
        if user.endswith("?"):
            return (
                "That's a good question. I'm the built-in responder, so I can only give simple answers. "
                "Connect a language model for a real one."
            )
        echo = re.sub(r"\s+", " ", user).strip().rstrip(".!?")
        if len(echo) > 120:
            echo = echo[:117].rsplit(" ", 1)[0] + "..."
        return f"You said: {echo}. I'm the built-in responder, so I keep my answers short."

    def stream(self, messages: Sequence[ChatMessage]) -> Iterator[str]:
        """Yield the reply word by word, like a streaming model."""
        yield from re.findall(r"\S+\s*", self.reply(messages))


# --- OpenAI-compatible chat completions --------------------------------------------------------------


def _error_message(body: bytes) -> str:
    """The human part of an error body: `{"error": {"message": ...}}` if present, else the text, shortened."""
    text = body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return text[:ERROR_BODY_CHARS]
    if isinstance(data, dict):
        err = data.get("error", data.get("detail"))
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])[:ERROR_BODY_CHARS]
        if isinstance(err, str):
            return err[:ERROR_BODY_CHARS]
    return text[:ERROR_BODY_CHARS]


def _delta_text(event: str) -> str:
    """The text in one SSE `data:` payload of a chat-completions stream ('' for role-only deltas)."""
    try:
        data = json.loads(event)
    except ValueError as exc:
        raise LLMError(f"the LLM sent a malformed stream event: {event[:80]!r}") from exc
    if not isinstance(data, dict):
        raise LLMError(f"the LLM sent an unexpected stream event: {event[:80]!r}")
    if "error" in data:
        err = data["error"]
        msg = err.get("message") if isinstance(err, dict) else err
        raise LLMError(f"the LLM reported an error: {msg}")
    choices = data.get("choices") or []
    if not choices:
        return ""
    delta = choices[0].get("delta") or choices[0].get("message") or {}
    content = delta.get("content")
    return content if isinstance(content, str) else ""


class OpenAIChatClient:
    """Streams replies from an OpenAI-compatible `POST {base_url}/chat/completions` (SSE)."""

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        max_tokens: int = 200,
        temperature: float = 0.7,
    ) -> None:
        """`timeout_s` bounds the whole request: connecting, waiting, and reading every chunk."""
        if not urlsplit(base_url).scheme.startswith("http"):
            raise ConfigError(f"{ENV_BASE_URL} must be an http(s) URL, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.label = f"{model} via {urlsplit(self.base_url).netloc}"

    @property
    def url(self) -> str:
        """The chat-completions endpoint."""
        return f"{self.base_url}/chat/completions"

    def stream(self, messages: Sequence[ChatMessage]) -> Iterator[str]:
        """Yield reply text as the server streams it; raise LLMError on any failure or timeout."""
        body = {
            "model": self.model,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "stream": True,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        headers = {"Accept": "text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        deadline = time.monotonic() + self.timeout_s
        got_text = False
        try:
            with (
                httpx.Client(timeout=httpx.Timeout(self.timeout_s), trust_env=False) as client,
                client.stream("POST", self.url, json=body, headers=headers) as resp,
            ):
                if resp.status_code >= 400:
                    detail = _error_message(resp.read())
                    raise LLMError(f"the LLM server answered HTTP {resp.status_code}: {detail}")
                if "text/event-stream" not in resp.headers.get("content-type", ""):
                    # The server ignored "stream": answer with the whole completion at once.
                    text = _delta_text(resp.read().decode("utf-8", "replace"))
                    if text.strip():
                        got_text = True
                        yield text
                else:
                    for text in self._events(resp, deadline):
                        got_text = got_text or bool(text.strip())
                        yield text
        except httpx.TimeoutException as exc:
            raise LLMError(f"the LLM did not answer within {self.timeout_s:g} s ({self.url})") from exc
        except httpx.HTTPError as exc:
            raise LLMError(f"cannot reach the LLM at {self.url}: {exc}") from exc
        if not got_text:
            raise LLMError("the LLM returned an empty reply")

    def _events(self, resp: httpx.Response, deadline: float) -> Iterator[str]:
        """Parse SSE: `data:` lines, blank line ends an event, `[DONE]` ends the stream."""
        data: list[str] = []
        for line in resp.iter_lines():
            if time.monotonic() > deadline:
                raise LLMError(f"the LLM did not finish within {self.timeout_s:g} s ({self.url})")
            if line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
                continue
            if line.strip() or not data:
                continue  # comments (": ping"), other fields, or a blank line with no event
            event, data = "\n".join(data), []
            if event.strip() == "[DONE]":
                return
            text = _delta_text(event)
            if text:
                yield text
        if data and "\n".join(data).strip() != "[DONE]":
            text = _delta_text("\n".join(data))
            if text:
                yield text


def build_llm(cfg: LLMConfig, env: Mapping[str, str]) -> LLM:
    """The configured engine; the OpenAI-compatible one reads its base URL, model and key from `env`."""
    if cfg.engine == "builtin":
        return BuiltinResponder()
    base_url = env.get(ENV_BASE_URL, "").strip() or DEFAULT_BASE_URL
    model = env.get(ENV_MODEL, "").strip()
    api_key = env.get(ENV_API_KEY, "").strip() or None
    if not model:
        raise ConfigError(f"webapp.llm.engine: openai needs the model name in ${ENV_MODEL}")
    if api_key is None and base_url == DEFAULT_BASE_URL:
        raise ConfigError(f"webapp.llm.engine: openai at {DEFAULT_BASE_URL} needs ${ENV_API_KEY}")
    log.info("chat replies from %s at %s", model, base_url)
    return OpenAIChatClient(
        base_url, model, api_key, timeout_s=cfg.timeout_s, max_tokens=cfg.max_tokens, temperature=cfg.temperature
    )
