"""The cluster's routing policy as plain functions: which session a request belongs to, which replica takes it.

A request belongs to the session it names, wherever it names it — the `x-session-id` header (Ray Serve's
own session header), the `session_id` query parameter, a `/sessions/{id}/...` path, or a `session_id`
field of a JSON or form body — and, when it names none, to the default session (that is the session the
server speaks into when a request names none). No route is listed here: a route added later that carries
a session id the same way is pinned too.

A session stays on the replica that owns it: the one this router pinned it to, or the one that reports
holding its lock (another router's pin, or a pin from before this router started). A session nobody owns
goes to the replica with the fewest live sessions; ties are broken by rendezvous hashing of the session
and replica ids, so that two routers that see the same loads choose the same replica.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from musetalk.config import is_valid_id

SESSION_HEADER = b"x-session-id"
SESSION_FIELD = "session_id"
_SESSION_PATH = re.compile(r"^/sessions/([^/]+)(?:/|$)")
JSON_TYPES = ("application/json",)
URLENCODED_TYPE = "application/x-www-form-urlencoded"


def session_from_head(path: str, query_string: bytes, headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The session a request names in its header, query or path (None if none, or not a valid id)."""
    for name, value in headers:
        if name.lower() == SESSION_HEADER:
            return valid_session(value.decode("latin-1").strip())
    query = parse_qs(query_string.decode("latin-1"))
    if SESSION_FIELD in query:
        return valid_session(query[SESSION_FIELD][0])
    match = _SESSION_PATH.match(path)
    return valid_session(match.group(1)) if match else None


def session_from_body(content_type: str, body: bytes) -> str | None:
    """The `session_id` field of a JSON object or URL-encoded form body (None if absent or not a valid id).

    Multipart forms are read by the caller (they need a streaming parser)."""
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind in JSON_TYPES:
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return None  # the replica answers the same 422 as server_fast.py
        value = data.get(SESSION_FIELD) if isinstance(data, dict) else None
        return valid_session(value) if isinstance(value, str) else None
    if kind == URLENCODED_TYPE:
        values = parse_qs(body.decode("latin-1")).get(SESSION_FIELD)
        return valid_session(values[0]) if values else None
    return None


def valid_session(value: str) -> str | None:
    """`value` if it is a valid session id, else None."""
    return value if is_valid_id(value) else None


@dataclass(frozen=True)
class ReplicaLoad:
    """What a router knows about one replica: its id and what it last reported."""

    replica: str
    owned: frozenset[str] = frozenset()  # sessions whose lock it holds
    live: frozenset[str] = frozenset()  # sessions with a request in progress


@dataclass
class _Pin:
    replica: str
    used_s: float


@dataclass
class SessionTable:
    """One router's pins (session → replica), each with the last time a request used it."""

    idle_s: float = 300.0  # a pin unused this long no longer counts as a live session of its replica
    forget_s: float = 3600.0  # and is dropped (the owner's report still routes the session)
    pins: dict[str, _Pin] = field(default_factory=dict)

    def choose(self, session: str, replicas: Sequence[ReplicaLoad], now_s: float) -> str | None:
        """The replica for `session` (pinned from now on; "" = no session: the least loaded, not pinned);
        None when there is no replica."""
        if not replicas:
            return None
        alive = {r.replica for r in replicas}
        self.pins = {
            s: p for s, p in self.pins.items() if p.replica in alive and now_s - p.used_s < self.forget_s
        }
        if not session:
            return self._least_loaded(session, replicas, now_s)
        pin = self.pins.get(session)
        if pin is None:
            owner = next((r.replica for r in replicas if session in r.owned), None)
            pin = _Pin(owner or self._least_loaded(session, replicas, now_s), now_s)
            self.pins[session] = pin
        pin.used_s = now_s
        return pin.replica

    def _least_loaded(self, session: str, replicas: Sequence[ReplicaLoad], now_s: float) -> str:
        live: dict[str, set[str]] = {r.replica: set(r.live) for r in replicas}
        for s, p in self.pins.items():
            if now_s - p.used_s < self.idle_s:
                live[p.replica].add(s)
        return min(replicas, key=lambda r: (len(live[r.replica]), _rendezvous(session, r.replica))).replica


def _rendezvous(session: str, replica: str) -> bytes:
    """A per-(session, replica) score, the same in every process."""
    return hashlib.blake2b(f"{session}\0{replica}".encode(), digest_size=8).digest()


class ReportBoard:
    """The replicas' latest reports as this process's routers last saw them, by replica id; thread-safe."""

    def __init__(self) -> None:
        self._reports: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def replace(self, reports: dict[str, dict[str, Any]]) -> None:
        """The live replicas' reports (replicas not listed are gone)."""
        with self._lock:
            self._reports = {k: dict(v) for k, v in reports.items()}

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """A copy of every live replica's report."""
        with self._lock:
            return {k: dict(v) for k, v in self._reports.items()}


REPORTS = ReportBoard()  # filled by the routers (router.SessionAffinityRouter), read by the gateway's /health
