"""How long a thread waits for Python's GIL in this process: a probe thread that sleeps 1 ms at a time.

Every thread that leaves Python for a moment — the event loop after each socket send, a thread-pool task
after each PyAV call — must take the GIL back before it goes on, and waits while another thread holds it
(up to the 5-ms switch interval for Python code, for the whole call in C code that keeps it). The probe
measures that wait as its sleeps' overrun: ~0.1 ms on an idle host, milliseconds when other threads hold
the GIL. High figures while the stream clocks run late, with cores free, mean the process, not the
machine, is the limit.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from musetalk.utils.recent import quantile

STATS_WINDOW_S = 10.0  # /health covers this much recent time
_SLEEP_S = 0.001
_PERIOD_S = 0.01  # one probe every 10 ms: ~100 wake-ups a second, nothing measurable in CPU


class GilProbe:
    """A daemon thread measuring how long it waits to take the GIL back after each 1-ms sleep."""

    def __init__(self, window_s: float = STATS_WINDOW_S) -> None:
        self.window_s = window_s
        # (time.perf_counter(), ms of overrun); deque append and list() are single C calls: no lock needed.
        self._waits: deque[tuple[float, float]] = deque(maxlen=int(window_s / _PERIOD_S) + 16)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gil-probe", daemon=True)

    def start(self) -> GilProbe:
        """Start probing; returns self."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop probing and wait for the thread."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(_PERIOD_S):
            t0 = time.perf_counter()
            time.sleep(_SLEEP_S)  # releases the GIL; returning needs it back
            t1 = time.perf_counter()
            self._waits.append((t1, max(0.0, (t1 - t0 - _SLEEP_S) * 1000)))

    def stats(self) -> dict[str, float]:
        """Over the last window: probes taken, p95 and longest wait for the GIL (ms; includes the OS's wake-up)."""
        since = time.perf_counter() - self.window_s
        waits = [ms for t, ms in list(self._waits) if t >= since]
        return {
            "probes": len(waits),
            "wait_p95_ms": round(quantile(waits, 0.95), 2),
            "wait_max_ms": round(max(waits, default=0.0), 2),
        }
