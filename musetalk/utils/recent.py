"""Figures over the last few seconds (for /health): values kept with their time, older ones forgotten."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable


def quantile(values: Iterable[float], q: float) -> float:
    """The q-quantile (nearest rank) of values; 0 when there are none."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class RecentValues:
    """Values seen in the last `window_s` seconds; not thread-safe (the owner holds its own lock)."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._items: deque[tuple[float, float]] = deque()  # (perf_counter time, value), oldest first

    def add(self, value: float, now: float | None = None) -> None:
        """Note a value seen now."""
        now = time.perf_counter() if now is None else now
        self._items.append((now, value))
        self._prune(now)

    def values(self, now: float | None = None) -> list[float]:
        """The values of the window, oldest first."""
        self._prune(time.perf_counter() if now is None else now)
        return [v for _, v in self._items]

    @property
    def oldest_s(self) -> float | None:
        """Time of the oldest value kept (None when empty); call values() first to forget the stale ones."""
        return self._items[0][0] if self._items else None

    def quantile(self, q: float, now: float | None = None) -> float:
        """The q-quantile (nearest rank) of the window's values; 0 when there are none."""
        return quantile(self.values(now), q)

    def _prune(self, now: float) -> None:
        while self._items and now - self._items[0][0] > self.window_s:
            self._items.popleft()
