"""Python's garbage collector in a long-running server: its pauses measured, the long-lived heap frozen.

A collection of the oldest generation walks every object the collector tracks, and every thread of the
process — the live streams' event loop too — waits while it runs. Once the models, the avatars and
torch.compile's caches are loaded that is hundreds of thousands to millions of objects that will live as
long as the server: `freeze()` moves everything alive at that moment to the permanent generation, which
later collections skip, so they only walk what requests created since.
"""

from __future__ import annotations

import gc
import heapq
import logging
import time
from collections import Counter, deque
from typing import Any, NamedTuple

from musetalk.utils.logs import kv
from musetalk.utils.recent import quantile

log = logging.getLogger(__name__)

STATS_WINDOW_S = 10.0  # /health covers this much recent time
_KEPT = 4096  # collections remembered (a busy server runs a few hundred young ones a second)

# (time.perf_counter() at its end, ms, generation, objects it freed) of recent collections. A deque's append
# and list() are single C calls under the GIL, so the callback (any thread) and /health (the event loop) need
# no lock — and a lock would be wrong here: a collection can start inside code that holds it.
_pauses: deque[tuple[float, float, int, int]] = deque(maxlen=_KEPT)
_started: float | None = None
_freezing = False  # freeze()'s own collection is logged by it, not counted among the pauses
# Objects frozen by the last freeze(), counted then: gc.get_freeze_count() walks them all (a million objects
# take ~0.1 s, every thread waiting), far too slow for every /health.
_frozen = 0


def _callback(phase: str, info: dict[str, Any]) -> None:
    global _started
    if phase == "start":
        _started = None if _freezing else time.perf_counter()
    elif _started is not None:
        now = time.perf_counter()
        freed = int(info.get("collected", 0))
        _pauses.append((now, (now - _started) * 1000, int(info.get("generation", -1)), freed))
        _started = None


def install() -> None:
    """Start timing every collection of this process (idempotent)."""
    if _callback not in gc.callbacks:
        gc.callbacks.append(_callback)


def uninstall() -> None:
    """Stop timing collections."""
    if _callback in gc.callbacks:
        gc.callbacks.remove(_callback)


def stats(window_s: float = STATS_WINDOW_S) -> dict[str, float]:
    """Collections in the last `window_s`: how many, their p95 and longest pause (ms), the longest of the
    oldest generation and how many objects it freed (many: the pause went on freeing garbage; few: it went
    on walking live objects that are not frozen), and how many objects are frozen (skipped by every
    collection)."""
    since = time.perf_counter() - window_s
    recent = [(ms, gen, freed) for t, ms, gen, freed in list(_pauses) if t >= since]
    full = max(((ms, freed) for ms, gen, freed in recent if gen == 2), default=(0.0, 0))
    return {
        "collections": len(recent),
        "pause_p95_ms": round(quantile((ms for ms, _, _ in recent), 0.95), 2),
        "pause_max_ms": round(max((ms for ms, _, _ in recent), default=0.0), 2),
        "full_pause_max_ms": round(full[0], 2),
        "full_pause_max_freed": full[1],
        "frozen_objects": _frozen,
    }


def freeze(why: str) -> int:
    """Collect once, then freeze every object alive now (it is never walked again); returns how many.

    Costs one full collection now (a pause as long as the ones it prevents), so call it at moments the
    process is quiet or about to change anyway: after start-up, after compiling."""
    global _freezing, _frozen
    t0 = time.perf_counter()
    _freezing = True
    try:
        gc.collect()
    finally:
        _freezing = False
    collect_ms = (time.perf_counter() - t0) * 1000
    gc.freeze()
    _frozen = gc.get_freeze_count()
    log.info("heap frozen %s", kv(why=why, objects=_frozen, collect_ms=round(collect_ms, 1)))
    return _frozen


class Census(NamedTuple):
    """What a full collection walks: the objects, their commonest types, and the largest containers."""

    objects: int
    types: list[tuple[str, int]]  # (type name, count), commonest first
    largest: list[tuple[str, int]]  # (type name, len), longest first: one huge list or dict is walked item by item


def census(top: int = 12) -> Census:
    """Objects the collector tracks and walks (the frozen ones left out): how many, of which types, and the
    longest lists, dicts, sets and tuples among them.

    When a full collection pauses long while freeing little, this says what it walked. It visits every such
    object (a second or so for millions, every thread waiting), so call it once, at stop."""
    objects = gc.get_objects()  # generations 0-2; the permanent (frozen) one is not included
    counts = Counter(type(o).__qualname__ for o in objects)
    containers = ((type(o).__qualname__, len(o)) for o in objects if isinstance(o, (list, dict, set, tuple)))
    largest = heapq.nlargest(5, containers, key=lambda item: item[1])
    n = len(objects)
    del objects
    return Census(n, counts.most_common(top), largest)


def thaw() -> None:
    """Undo freeze(): the frozen objects are collectable again (at shutdown, so that an app started later in
    the same process, as in tests, starts from a normal heap)."""
    global _frozen
    gc.unfreeze()
    _frozen = 0
