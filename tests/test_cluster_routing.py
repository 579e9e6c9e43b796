"""The cluster's routing policy without Ray: which session a request names, which replica takes it."""

from __future__ import annotations

import json
import os
from collections import Counter

from musetalk.server.cluster.routing import ReplicaLoad, ReportBoard, SessionTable, session_from_body, session_from_head


def test_the_session_is_found_in_header_query_or_path() -> None:
    assert session_from_head("/speak", b"", [(b"x-session-id", b"s1")]) == "s1"
    assert session_from_head("/reset", b"session_id=s2&x=1", []) == "s2"
    assert session_from_head("/status/abc", b"session_id=s3", []) == "s3"
    assert session_from_head("/sessions/s4/video", b"v=3", []) == "s4"
    assert session_from_head("/sessions/s5/offer", b"", []) == "s5"  # any route under /sessions/{id}/
    assert session_from_head("/sessions/s6", b"", []) == "s6"
    assert session_from_head("/speak", b"", []) is None
    assert session_from_head("/health", b"", [(b"host", b"localhost")]) is None
    # The header wins over the query, the query over the path.
    assert session_from_head("/sessions/p/video", b"session_id=q", [(b"X-Session-Id", b"h")]) == "h"
    assert session_from_head("/sessions/p/video", b"session_id=q", []) == "q"


def test_invalid_ids_name_no_session() -> None:
    assert session_from_head("/sessions/../etc/video", b"", []) is None
    assert session_from_head("/speak", b"session_id=a%2Fb", []) is None
    assert session_from_head("/speak", b"session_id=" + b"x" * 65, []) is None
    assert session_from_body("application/json", json.dumps({"session_id": "no/slash"}).encode()) is None


def test_the_session_is_found_in_a_json_or_urlencoded_body() -> None:
    body = json.dumps({"text": "hi", "session_id": "abc"}).encode()
    assert session_from_body("application/json", body) == "abc"
    assert session_from_body("application/json; charset=utf-8", body) == "abc"
    assert session_from_body("application/x-www-form-urlencoded", b"text=hi&session_id=xyz") == "xyz"
    assert session_from_body("application/json", b'{"text": "hi"}') is None
    assert session_from_body("application/json", b'{"session_id": 5}') is None
    assert session_from_body("application/json", b"[1, 2]") is None
    assert session_from_body("application/json", b"{not json") is None
    assert session_from_body("text/plain", body) is None


def test_a_session_stays_on_its_replica() -> None:
    table = SessionTable()
    replicas = [ReplicaLoad("r1"), ReplicaLoad("r2")]
    first = {s: table.choose(s, replicas, 0.0) for s in ("a", "b", "c", "d")}
    for t in range(1, 20):
        assert all(table.choose(s, replicas, float(t)) == r for s, r in first.items())


def test_new_sessions_go_to_the_least_loaded_replica() -> None:
    table = SessionTable()
    replicas = [ReplicaLoad("r1"), ReplicaLoad("r2"), ReplicaLoad("r3")]
    counts = Counter(table.choose(f"s{i}", replicas, 0.0) for i in range(9))
    assert counts == {"r1": 3, "r2": 3, "r3": 3}
    # Sessions another router placed count too (a replica reports them live).
    busy = [ReplicaLoad("r1", live=frozenset({"x", "y", "z"})), ReplicaLoad("r2")]
    assert SessionTable().choose("new", busy, 0.0) == "r2"
    # A pinned session idle for longer than idle_s no longer counts as load.
    table = SessionTable(idle_s=10.0)
    two = [ReplicaLoad("r1"), ReplicaLoad("r2")]
    old = table.choose("old", two, 0.0)
    other = "r2" if old == "r1" else "r1"
    assert table.choose("fresh", two, 5.0) == other
    # Both pins idle now: the choice is what an empty table makes.
    assert table.choose("later", two, 100.0) == SessionTable().choose("later", two, 0.0)


def test_a_session_another_router_placed_goes_to_its_owner() -> None:
    replicas = [ReplicaLoad("r1"), ReplicaLoad("r2", owned=frozenset({"s"}))]
    assert SessionTable().choose("s", replicas, 0.0) == "r2"


def test_two_routers_that_see_the_same_loads_agree() -> None:
    replicas = [ReplicaLoad(f"r{i}") for i in range(4)]
    a, b = SessionTable(), SessionTable()
    sessions = [f"s{i}" for i in range(12)]
    assert [a.choose(s, replicas, 0.0) for s in sessions] == [b.choose(s, replicas, 0.0) for s in sessions]


def test_sessions_of_a_dead_replica_move_and_stay() -> None:
    table = SessionTable()
    both = [ReplicaLoad("r1"), ReplicaLoad("r2")]
    placed = {s: table.choose(s, both, 0.0) for s in ("a", "b", "c", "d")}
    survivor = [ReplicaLoad("r2")]
    assert all(table.choose(s, survivor, 1.0) == "r2" for s in placed)
    # The replacement replica comes up: moved sessions stay where they are now.
    replaced = [ReplicaLoad("r2"), ReplicaLoad("r3")]
    assert all(table.choose(s, replaced, 2.0) == "r2" for s in placed)
    assert table.choose("new", replaced, 2.0) == "r3"


def test_no_session_is_never_pinned_and_no_replica_is_none() -> None:
    table = SessionTable()
    replicas = [ReplicaLoad("r1"), ReplicaLoad("r2")]
    assert table.choose("", replicas, 0.0) in {"r1", "r2"}
    assert "" not in table.pins
    assert table.choose("a", [], 0.0) is None


def test_report_board_keeps_only_live_replicas() -> None:
    board = ReportBoard()
    board.replace({"r1": {"pid": 1}, "r2": {"pid": 2}})
    board.replace({"r2": {"pid": 2}})
    snapshot = board.snapshot()
    assert snapshot == {"r2": {"pid": 2}}
    snapshot["r2"]["pid"] = 99
    assert board.snapshot()["r2"]["pid"] == 2


def test_replicas_keep_the_drivers_python_path_after_the_project_root() -> None:
    from musetalk.config import PROJECT_ROOT
    from musetalk.server.cluster.deployment import replica_python_path

    root = str(PROJECT_ROOT)
    assert replica_python_path("") == root
    inherited = os.pathsep.join(["/opt/site", root, "/x"])
    assert replica_python_path(inherited) == os.pathsep.join([root, "/opt/site", "/x"])
