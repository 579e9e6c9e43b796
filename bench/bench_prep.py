"""force_prep throughput per stage, and serve-time memory of the frame store.

    python -m bench.bench_prep                                  # CPU, tiny models, 720p, 50 frames
    python -m bench.bench_prep --device cuda --models full      # GPU host: full-size random weights
    python -m bench.bench_prep --models models --parser bisenet # real weights in models/
    python -m bench.bench_prep --memory --seconds 60 --size 1080p   # frame store of a 60 s 1080p avatar

Throughput: a synthetic face video (the astronaut photo moving with jitter, face ~22% of the frame
height like a talking-head shot) goes through `prepare_avatar`; the table lists frames/s per stage.
Memory: writes camera-like frames (the photo panning, with sensor noise) of the requested length to the
avatar frame store (JPEG per frame) and reports its size on disk and PSNR; then plays it in ping-pong
order the way the server reads it (one frame at a time, copied for blending): one reader on one core,
and 2 x cores sessions at once, with frames/s per core and RSS.
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


def _camera_frames(h: int, w: int, n_noise: int = 4) -> Any:
    """Camera-like frames: the astronaut photo at full size, panning slowly, with sensor noise (sigma 2)."""
    import cv2
    from skimage import data

    pan = 64
    base = cv2.resize(cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR), (w + pan, h), interpolation=cv2.INTER_CUBIC)
    rng = np.random.default_rng(0)
    noise = [rng.normal(0, 2, (h, w, 3)).astype(np.int16) for _ in range(n_noise)]

    def frame(k: int) -> Any:
        shift = k % pan
        return np.clip(base[:, shift : shift + w].astype(np.int16) + noise[k % n_noise], 0, 255).astype(np.uint8)

    return frame


def bench_memory(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Disk size, PSNR, decode speed and RSS of the avatar frame store (JPEG per frame) while the
    server-style reader plays it in ping-pong order, alone and with many sessions at once."""
    from concurrent.futures import ThreadPoolExecutor

    from musetalk.avatar.cache import cycle_index
    from musetalk.avatar.frames import JpegFrames, JpegFrameWriter

    h, w = _size(args.size)
    n = int(args.seconds * 25)
    source = _camera_frames(h, w)
    path = work / "frames.jpgs"
    out: dict[str, Any] = {"frames": n, "size_hw": [h, w]}
    if not (args.reuse and path.is_file()):
        t0, c0 = time.perf_counter(), time.process_time()
        writer = JpegFrameWriter(path)
        for k in range(n):
            writer.append(source(k))
        writer.close()
        out["prep_write_frames_per_s"] = n / (time.perf_counter() - t0)  # encode + decode back, one thread
        out["prep_write_frames_per_cpu_s"] = n / (time.process_time() - c0)
    size_bytes = path.stat().st_size
    print(f"{n} frames {w}x{h}: {size_bytes / 1e9:.2f} GB", file=sys.stderr)

    # One reader, no read-ahead: what one core decodes (pread + JPEG decode + the blender's copy). CPU time
    # is measured besides wall time: on a shared machine the wall-clock rate depends on the other jobs.
    store = JpegFrames(path, (h, w), readahead_workers=0)
    psnr_db = []
    for k in range(0, n, 25):
        src = source(k)
        mse = float(np.mean((src.astype(np.float64) - store[k]) ** 2))
        psnr_db.append(10 * np.log10(255**2 / mse))
    out.update(
        file_gb=size_bytes / 1e9,
        raw_gb=n * h * w * 3 / 1e9,
        gb_per_minute_25fps=size_bytes / n * 1500 / 1e9,
        mb_per_frame=size_bytes / n / 1e6,
        psnr_db_min=min(psnr_db),
        psnr_db_mean=float(np.mean(psnr_db)),
    )
    base = _status_kib()
    peak_anon = 0
    reads = min(2 * n, 600)
    t0, c0 = time.perf_counter(), time.process_time()
    for pos in range(reads):  # ping-pong order
        canvas = store[cycle_index(pos, n)].copy()
        canvas[0, 0] ^= 1
        if pos % 50 == 0:
            peak_anon = max(peak_anon, _status_kib()["RssAnon"])
    one_wall = reads / (time.perf_counter() - t0)
    one_cpu = reads / (time.process_time() - c0)
    store.close()
    out["one_reader"] = {
        "frames_per_s_wall": one_wall,
        "frames_per_cpu_s": one_cpu,
        "rss_anon_mib_start": base["RssAnon"] / 1024,
        "rss_anon_mib_peak": peak_anon / 1024,
    }

    # Many sessions at once on this machine's cores (default reader: read-ahead and shared LRU).
    cores = os.cpu_count() or 1
    sessions = max(2, 2 * cores)
    per_session = min(2 * n, 200)
    store = JpegFrames(path, (h, w))

    def play(start: int) -> None:
        for pos in range(start, start + per_session):
            canvas = store[cycle_index(pos, n)].copy()
            canvas[0, 0] ^= 1

    t0, c0 = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(sessions) as pool:
        list(pool.map(play, [k * (2 * n) // sessions for k in range(sessions)]))
    frames_read = sessions * per_session
    wall_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    peak = _status_kib()
    store.close()
    out["sessions"] = {
        "sessions": sessions,
        "cores": cores,
        "frames_per_s_wall_total": frames_read / wall_s,
        "frames_per_cpu_s": frames_read / cpu_s,
        "rss_anon_mib": peak["RssAnon"] / 1024,
    }
    # 16 sessions at 25 fps need 400 frames/s: the cores that takes at the measured CPU cost per frame.
    out["cores_for_16_sessions_at_25fps"] = 400 / min(one_cpu, frames_read / cpu_s)
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
    parser.add_argument("--reuse", action="store_true", help="--memory: reuse the frame store in --workdir")
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
            r1, rs = report["one_reader"], report["sessions"]
            print(
                f"\nframe store (JPEG q95 4:4:4 per frame), {report['frames']} frames "
                f"{report['size_hw'][1]}x{report['size_hw'][0]}: {report['file_gb']:.2f} GB on disk "
                f"(raw {report['raw_gb']:.1f} GB), {report['gb_per_minute_25fps']:.2f} GB per minute at 25 fps, "
                f"PSNR min {report['psnr_db_min']:.1f} dB mean {report['psnr_db_mean']:.1f} dB"
            )
            print(
                f"one reader: {r1['frames_per_cpu_s']:.0f} frames per CPU-second "
                f"({r1['frames_per_s_wall']:.0f} frames/s wall), anon RSS {r1['rss_anon_mib_start']:.0f} → "
                f"{r1['rss_anon_mib_peak']:.0f} MiB"
            )
            print(
                f"{rs['sessions']} sessions on {rs['cores']} cores: {rs['frames_per_cpu_s']:.0f} frames per "
                f"CPU-second ({rs['frames_per_s_wall_total']:.0f} frames/s wall), anon RSS {rs['rss_anon_mib']:.0f} MiB"
            )
            print(
                f"16 sessions x 25 fps = 400 frames/s need {report['cores_for_16_sessions_at_25fps']:.1f} "
                "cores for frame decoding"
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
