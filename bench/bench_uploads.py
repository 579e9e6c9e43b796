"""Peak memory of a real server process under hostile and maximal /speak_audio uploads.

    python -m bench.bench_uploads [--json results/bench/bench_uploads.json]

Each scenario starts a fresh `server_fast.py` on 127.0.0.1 (the 64-px test renderer and the tone voice,
so the figures are the upload path's and the encoder's, not a model's), sends one warm-up upload, then
samples the server's RSS from /proc/<pid>/status every 5 ms while the scenario runs. Reported: the
peak RSS above the warmed-up baseline (sampled), and how far VmHWM (the kernel's exact peak) rose.
Scenarios, with the default limits (20 MB per upload, 120 s of audio, 4 uploads read at once):
  flac-655k      one 1 MB FLAC at 655,350 Hz x 119 s (refused from its header)
  max-single     one valid upload as large as the limits allow (88.2 kHz mono 16-bit WAV, 113 s, 19.9 MB)
  long-x50       50 simultaneous 10-minute 16 kHz WAVs (19.2 MB each; too long)
  max-x50        50 simultaneous copies of the max-single file
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import soundfile as sf

from musetalk.config import PROJECT_ROOT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _status_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in {"VmRSS", "VmHWM"}:
            out[key] = int(value.split()[0])
    return out


def _audio(seconds: float, rate: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    t = np.arange(int(seconds * rate)) / rate
    pcm = (0.2 * np.sin(2 * np.pi * 220 * t) * 32767).astype(np.int16) if fmt == "WAV" else np.zeros(len(t), np.int16)
    sf.write(buf, pcm, rate, format=fmt, subtype="PCM_16")
    return buf.getvalue()


class _Server:
    """server_fast.py in a subprocess on a free loopback port."""

    def __init__(self, work: Path) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT / "tests"), str(PROJECT_ROOT)])}
        cmd = [sys.executable, str(PROJECT_ROOT / "server_fast.py"), "--port", str(self.port)]
        for item in (
            f"server.results_dir={work / 'results'}",
            f"server.log_dir={work / 'logs'}",
            "server.renderer=doubles:make_test_renderer",
            "tts.engine=tone",
            "encode.preset=ultrafast",
            "server.log_level=WARNING",
        ):
            cmd += ["--set", item]
        self.log = (work / "server.out").open("wb")
        self.proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{self.base}/health", timeout=1).json().get("ready"):
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start; see {work / 'server.out'}")
            time.sleep(0.2)

    def stop(self) -> None:
        """Stop the server process."""
        self.proc.terminate()
        self.proc.wait(timeout=60)
        self.log.close()


def _post(base: str, name: str, data: bytes) -> int:
    try:
        r = httpx.post(f"{base}/speak_audio", files={"file": (name, data)}, timeout=600)
        return r.status_code
    except httpx.HTTPError:
        return -1  # connection closed by the server (e.g. refused before the body was read)


def _scenario(work: Path, run: Callable[[str], list[int]]) -> dict[str, Any]:
    server = _Server(work)
    try:
        assert _post(server.base, "warm.wav", _audio(1.0, 16000, "WAV")) == 200
        base = _status_kib(server.proc.pid)
        peak = base["VmRSS"]
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, _status_kib(server.proc.pid)["VmRSS"])
                time.sleep(0.005)

        sampler = threading.Thread(target=sample)
        sampler.start()
        t0 = time.perf_counter()
        try:
            codes = run(server.base)
        finally:
            stop.set()
            sampler.join()
        seconds = time.perf_counter() - t0
        end = _status_kib(server.proc.pid)
    finally:
        server.stop()
    counts = {str(c): codes.count(c) for c in sorted(set(codes))}
    return {
        "statuses": counts,
        "seconds": seconds,
        "baseline_rss_mib": base["VmRSS"] / 1024,
        "peak_rss_above_baseline_mib": (peak - base["VmRSS"]) / 1024,
        "vmhwm_rise_mib": (end["VmHWM"] - base["VmHWM"]) / 1024,
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=str(PROJECT_ROOT / "results" / "bench" / "bench_uploads.json"))
    parser.add_argument("--only", default="", help="comma-separated scenario names")
    args = parser.parse_args(argv)

    flac = _audio(119.0, 655_350, "FLAC")
    max_wav = _audio(113.0, 88_200, "WAV")
    long_wav = _audio(600.0, 16_000, "WAV")
    print(f"files: flac {len(flac) / 1e6:.1f} MB, max {len(max_wav) / 1e6:.1f} MB, long {len(long_wav) / 1e6:.1f} MB")

    def many(data: bytes, name: str) -> Callable[[str], list[int]]:
        def run(base: str) -> list[int]:
            with ThreadPoolExecutor(50) as pool:
                return list(pool.map(lambda _: _post(base, name, data), range(50)))

        return run

    scenarios: dict[str, Callable[[str], list[int]]] = {
        "flac-655k": lambda base: [_post(base, "x.flac", flac)],
        "max-single": lambda base: [_post(base, "max.wav", max_wav)],
        "long-x50": many(long_wav, "long.wav"),
        "max-x50": many(max_wav, "max.wav"),
    }
    wanted = [s for s in args.only.split(",") if s] or list(scenarios)
    report: dict[str, Any] = {
        "bench": "uploads",
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "command": "python -m bench.bench_uploads " + " ".join(argv if argv is not None else sys.argv[1:]),
        "load_average_start": os.getloadavg()[0],
        "scenarios": {},
    }
    print(f"{'scenario':12s} {'statuses':28s} {'s':>6s} {'peak RSS +MiB':>14s} {'VmHWM +MiB':>11s}")
    for name in wanted:
        with tempfile.TemporaryDirectory(prefix="bench_uploads_") as tmp:
            r = _scenario(Path(tmp), scenarios[name])
        report["scenarios"][name] = r
        print(
            f"{name:12s} {json.dumps(r['statuses']):28s} {r['seconds']:6.1f} "
            f"{r['peak_rss_above_baseline_mib']:14.0f} {r['vmhwm_rise_mib']:11.0f}"
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
