"""Does the session video's encoding delay the live streams? An event loop's punctuality under x264 load.

A live stream's clock ticks every 40 ms on the server's event loop, and every tick's work (the frame and
audio for each viewer, aiortc's packets) runs on that one thread. The session videos are encoded by
libx264 at the same time, each encoder with ~1.5 threads per core; when several clips encode at once
their threads outnumber the cores many times over, and the kernel shares the CPU between all runnable
threads alike — the loop thread gets its share like any one of them and its ticks go late. The
encoders run at `encode.nice` (19 by default), which tells the kernel to run everything else first.

This runs `--encoders` clip encoders (`musetalk.pipeline.encode.write_clip`, the server's own, 1080p
swaying-photo frames, default preset) over and over while an asyncio loop ticks every 40 ms doing
`--tick-work-ms` of Python work per tick, once with the encoders at nice 0 and once at `encode.nice`,
and reports how late the ticks were (p50 / p95 / max) and the encoders' frames/s.

    python -m bench.bench_encoder_priority                        # 4 encoders, 8 s per setting
    python -m bench.bench_encoder_priority --encoders 8 --seconds 15 --json results/prio.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_presets import source_frames  # noqa: E402
from musetalk.config import EncodeConfig  # noqa: E402
from musetalk.pipeline.encode import write_clip  # noqa: E402
from musetalk.types import Audio  # noqa: E402

FPS = 25
TICK_S = 1 / FPS
CLIP_FRAMES = 50  # a 2-s utterance


def _encoders(
    n: int, nice: int, frames: list[Any], out: Path, stop: threading.Event, counts: list[int]
) -> list[threading.Thread]:
    """n threads, each encoding 2-s clips of `frames` until `stop`; counts[k] = frames encoded by thread k."""
    cfg = EncodeConfig(nice=nice)
    audio = Audio(np.zeros(2 * 16000, np.float32), 16000)

    def run(k: int) -> None:
        while not stop.is_set():
            clip = write_clip(iter(frames[:CLIP_FRAMES]), audio, out / f"c{k}.mp4", CLIP_FRAMES, FPS, cfg, "yuv420p")
            counts[k] += clip.n_frames

    return [threading.Thread(target=run, args=(k,), name=f"bench-encoder-{k}") for k in range(n)]


async def _ticks(seconds: float, work_ms: float) -> list[float]:
    """ms late of each 40-ms tick of this loop over `seconds`, each tick doing `work_ms` of Python work."""
    loop = asyncio.get_running_loop()
    late: list[float] = []
    t0 = loop.time()
    for k in range(round(seconds / TICK_S)):
        due = t0 + k * TICK_S
        now = loop.time()
        if now < due:
            await asyncio.sleep(due - now)
        late.append((loop.time() - due) * 1000)
        end = time.perf_counter() + work_ms / 1000
        while time.perf_counter() < end:  # Python work holding the GIL, as the stream's tick does
            sum(range(200))
    return late


def measure(encoders: int, nice: int, seconds: float, work_ms: float, frames: list[Any]) -> dict[str, Any]:
    """One setting: the loop's tick lateness and the encoders' frames/s while they run at `nice`."""
    stop, counts = threading.Event(), [0] * encoders
    with tempfile.TemporaryDirectory(prefix="bench-prio-") as tmp:
        threads = _encoders(encoders, nice, frames, Path(tmp), stop, counts)
        for t in threads:
            t.start()
        time.sleep(1.0)  # encoders at full speed before the clock starts
        start = sum(counts)
        t0 = time.perf_counter()
        late = asyncio.run(_ticks(seconds, work_ms))
        elapsed = time.perf_counter() - t0
        encoded = sum(counts) - start
        stop.set()
        for t in threads:
            t.join()
    late.sort()
    return {
        "nice": nice,
        "tick_late_p50_ms": late[len(late) // 2],
        "tick_late_p95_ms": late[min(len(late) - 1, int(0.95 * len(late)))],
        "tick_late_max_ms": late[-1],
        "encoder_fps": encoded / elapsed,  # counted in whole clips: coarse over short runs
    }


def main(argv: list[str] | None = None) -> int:
    """Run both settings; print a table; optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=8.0, help="per setting")
    parser.add_argument("--tick-work-ms", type=float, default=5.0)
    parser.add_argument("--nice", type=int, default=EncodeConfig().nice, help="the setting compared with 0")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    frames = source_frames(CLIP_FRAMES, grain=2.0)
    rows = [measure(args.encoders, nice, args.seconds, args.tick_work_ms, frames) for nice in (0, args.nice)]
    print(f"{args.encoders} clip encoders (1080p, {EncodeConfig().preset}) on {os.cpu_count()} cores, "
          f"a 40-ms tick doing {args.tick_work_ms:.0f} ms of Python work")  # fmt: skip
    print("encoder nice | tick late p50 | p95 | max | encoders' frames/s")
    for r in rows:
        print(f"{r['nice']:12d} | {r['tick_late_p50_ms']:10.1f} ms | {r['tick_late_p95_ms']:6.1f} ms | "
              f"{r['tick_late_max_ms']:6.1f} ms | {r['encoder_fps']:.1f}")  # fmt: skip
    if args.json is not None:
        meta = {
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "host": platform.node(), "cpus": os.cpu_count(), **vars(args) | {"json": str(args.json)},
        }  # fmt: skip
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
