"""musetalk.utils.gil_probe: a thread that holds the GIL shows up as the probe's wait."""

from __future__ import annotations

import threading
import time

from musetalk.utils.gil_probe import GilProbe


def _hold_the_gil(stop: threading.Event) -> None:
    while not stop.is_set():
        sum(range(3_000_000))  # one C call: the GIL is held for all of it (~30-100 ms), no switch interval


def test_the_probe_measures_how_long_a_gil_holder_keeps_it_waiting() -> None:
    probe = GilProbe(window_s=30.0).start()
    stop = threading.Event()
    hog = threading.Thread(target=_hold_the_gil, args=(stop,), daemon=True)
    try:
        time.sleep(0.3)
        quiet = probe.stats()
        hog.start()
        time.sleep(1.5)
        busy = probe.stats()
    finally:
        stop.set()
        hog.join()
        probe.stop()
    assert quiet["probes"] >= 5 and busy["probes"] > quiet["probes"]
    assert busy["wait_max_ms"] >= 15.0, busy  # a probe waited for (most of) one sum() call
    assert busy["wait_p95_ms"] >= 5.0, busy
    assert not probe._thread.is_alive()


def test_stats_cover_only_the_window() -> None:
    probe = GilProbe(window_s=0.2).start()
    try:
        time.sleep(0.5)
        assert 0 < probe.stats()["probes"] <= 0.2 / 0.01 + 2
    finally:
        probe.stop()
