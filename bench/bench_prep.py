"""force_prep throughput per stage, and serve-time memory of the frame store.

    python -m bench.bench_prep                                  # CPU, tiny models, 720p, 50 frames
    python -m bench.bench_prep --device cuda --models full      # GPU host: full-size random weights
    python -m bench.bench_prep --models models --parser bisenet # real weights in models/
    python -m bench.bench_prep --memory --seconds 60 --size 1080p   # RSS of a 60 s 1080p avatar

Throughput: a synthetic face video (the astronaut photo moving with jitter, face ~22% of the frame
height like a talking-head shot) goes through `prepare_avatar`; the table lists frames/s per stage.
Memory: writes an (N, H, W, 3) frames.npy of the requested length, then plays it back twice in
ping-pong order the way the server reads it (one frame at a time, copied for blending) and reports
the process RSS split into anonymous memory and file-backed pages, for pread and for mmap.
Prints a table and writes JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

SIZES = {"360p": (360, 640), "720p": (720, 1280), "1080p": (1080, 1920)}


def _size(text: str) -> tuple[int, int]:
    if text in SIZES:
        return SIZES[text]
    w, h = (int(v) for v in text.lower().split("x"))
    return h, w


def _status_kib() -> dict[str, int]:
    out = {}
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in {"VmRSS", "VmHWM", "RssAnon", "RssFile"}:
                out[key] = int(value.split()[0])
    return out


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"
    )


def bench_throughput(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Run prepare_avatar on a synthetic video; per-stage seconds and frames/s."""
    from musetalk.avatar.prep import STAGES, prepare_avatar
    from musetalk.avatar.synthetic import write_face_video
    from musetalk.config import load_config

    h, w = _size(args.size)
    scale = h / 360 * 0.9  # astronaut face ≈ 80 px per 360 px of frame height
    video = work / "face.mp4"
    t0 = time.perf_counter()
    write_face_video(video, n_frames=args.frames, size_hw=(h, w), scale=scale, amplitude_px=(12 * scale, 6 * scale))
    print(f"synthetic video {w}x{h}, {args.frames} frames: {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    if args.models in ("tiny", "full"):
        from musetalk.testing import write_models

        t0 = time.perf_counter()
        models = write_models(work / "models", args.models, versions=())
        print(f"{args.models} random-weight models: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    else:
        models = Path(args.models).resolve()
    overrides = [
        f"models.dir={models}",
        f"runtime.device={args.device}",
        f"prep.cache_dir={work / 'avatars'}",
        f"prep.parser={args.parser}",
        f"prep.detector={args.detector}",
        f"prep.batch_size={args.batch}",
    ]
    if args.dtype:
        overrides.append(f"runtime.dtype={args.dtype}")
    cfg = load_config(overrides=overrides)
    result = prepare_avatar(cfg, "bench", video, force=True, progress=not args.quiet)
    stages = {
        s: {"seconds": result.seconds[s], "frames_per_s": result.frames_per_s(s)} for s in STAGES if s in result.seconds
    }
    total = sum(result.seconds.values())
    return {
        "frames": result.n_frames,
        "size_hw": [h, w],
        "models": args.models,
        "detector": result.detector,
        "parser": result.parser,
        "latents": result.latents,
        "batch": args.batch,
        "stages": stages,
        "total_seconds": total,
        "total_frames_per_s": result.n_frames / total,
        "cache_bytes": result.cache_bytes,
    }


def bench_memory(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """RSS while the server-style reader plays a long high-resolution frames.npy."""
    from musetalk.avatar.cache import cycle_index
    from musetalk.avatar.frames import NpyAppendWriter, NpyFrames

    h, w = _size(args.size)
    n = int(args.seconds * 25)
    path = work / "frames.npy"
    t0 = time.perf_counter()
    writer = NpyAppendWriter(path, (h, w, 3))
    rng = np.random.default_rng(0)
    tile = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    for k in range(n):
        tile[0, 0, 0] = k % 256
        writer.append(tile)
    writer.close()
    gib = path.stat().st_size / 2**30
    print(f"wrote {n} frames {w}x{h} ({gib:.1f} GiB) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    out: dict[str, Any] = {"frames": n, "size_hw": [h, w], "file_gib": gib}
    for mode in ("pread", "mmap"):
        store = NpyFrames(path, mmap=mode == "mmap")
        base = _status_kib()
        peak_anon = peak_file = 0
        t0 = time.perf_counter()
        for pos in range(2 * 2 * n):  # two full ping-pong cycles
            frame = store[cycle_index(pos, n)]
            canvas = frame.copy()  # what the blender does before pasting a face
            canvas[0, 0] ^= 1
            if pos % 50 == 0:
                st = _status_kib()
                peak_anon, peak_file = max(peak_anon, st["RssAnon"]), max(peak_file, st["RssFile"])
        elapsed = time.perf_counter() - t0
        store.close()
        out[mode] = {
            "frames_per_s": 4 * n / elapsed,
            "rss_anon_mib_start": base["RssAnon"] / 1024,
            "rss_anon_mib_peak": peak_anon / 1024,
            "rss_file_mib_peak": peak_file / 1024,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="", help="runtime.dtype override (default auto: fp16 on CUDA)")
    parser.add_argument(
        "--models", default="tiny", help="tiny | full (random weights written to a temp dir) | a models/ folder"
    )
    parser.add_argument("--size", default="720p", help="360p | 720p | 1080p | WxH")
    parser.add_argument("--frames", type=int, default=50)
    parser.add_argument("--batch", type=int, default=8, help="prep.batch_size")
    parser.add_argument("--parser", default="landmarks", choices=["landmarks", "bisenet", "auto"])
    parser.add_argument("--detector", default="dlib", choices=["dlib", "face_alignment", "dwpose", "auto"])
    parser.add_argument("--memory", action="store_true", help="measure serve-time RSS of the frame store instead")
    parser.add_argument("--seconds", type=float, default=60.0, help="--memory: avatar length")
    parser.add_argument("--workdir", default="", help="keep files here instead of a temp dir")
    parser.add_argument("--json", default="", help="write results here")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_prep_"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "bench": "prep-memory" if args.memory else "prep",
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": _device_name(args.device),
        "command": "python -m bench.bench_prep " + " ".join(argv if argv is not None else sys.argv[1:]),
        "load_average_start": os.getloadavg()[0],  # other jobs on the machine slow the figures down
    }
    try:
        if args.memory:
            report.update(bench_memory(args, work))
            print(
                f"\nframe store, {report['frames']} frames {report['size_hw'][1]}x{report['size_hw'][0]} "
                f"({report['file_gib']:.1f} GiB on disk), two ping-pong cycles, one copy per frame"
            )
            print(
                f"{'mode':6s} {'frames/s':>9s} {'anon MiB start':>15s} {'anon MiB peak':>14s} "
                f"{'file-backed MiB peak':>21s}"
            )
            for mode in ("pread", "mmap"):
                r = report[mode]
                print(
                    f"{mode:6s} {r['frames_per_s']:9.0f} {r['rss_anon_mib_start']:15.0f} "
                    f"{r['rss_anon_mib_peak']:14.0f} {r['rss_file_mib_peak']:21.0f}"
                )
        else:
            report.update(bench_throughput(args, work))
            print(
                f"\nforce_prep, {report['frames']} frames {report['size_hw'][1]}x{report['size_hw'][0]}, "
                f"models {report['models']}, detector {report['detector']}, parser {report['parser']}, "
                f"batch {report['batch']}, on {report['device']}"
            )
            print(f"{'stage':8s} {'seconds':>8s} {'frames/s':>9s}")
            for stage, r in report["stages"].items():
                print(f"{stage:8s} {r['seconds']:8.2f} {r['frames_per_s']:9.1f}")
            print(f"{'total':8s} {report['total_seconds']:8.2f} {report['total_frames_per_s']:9.1f}")
    finally:
        report["load_average_end"] = os.getloadavg()[0]
        print(f"load average (1 min) {report['load_average_start']:.1f} → {report['load_average_end']:.1f}")
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
