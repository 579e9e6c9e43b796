"""x264 presets for session clips: encode speed per core, size and picture quality at the clip settings.

The server encodes every clip with libx264 at `encode.crf` (18), no B-frames and a fixed GOP (so that
clips join with -c copy); `encode.preset` trades CPU for bits. With many live sessions on one host the
encoders are the host's largest CPU cost, so a faster preset buys sessions — at what cost in size and
picture? This encodes the same 1080p talking-head-like clip with each preset through the clip encoder's
own options (`musetalk.pipeline.encode.video_options`), one x264 thread (frames/s per core), and
compares the decoded frames with the source (PSNR and SSIM of the luma). The veryfast..medium presets run
twice: with their own analysis and with `encode.fast_analysis` (diamond motion search, no P 8x8 partitions).

Two sources: the astronaut photo filling a 1920×1080 frame and swaying ("clean": an upscaled photo)
and the same with fresh Gaussian grain of σ = 2 grey levels on every frame ("grain": like a camera's
sensor noise, the hard case).

    python -m bench.bench_presets                       # 100 frames, presets ultrafast..faster, both analyses
    python -m bench.bench_presets --frames 50 --json results/bench_presets.json
    python -m bench.bench_presets --presets veryfast --analysis fast --gops 125 50 25 --frames 125   # GOP vs bytes
    python -m bench.bench_presets --presets veryfast --parallel 1 2 4 8 16   # encoders at once: threads 1 vs auto

`--parallel` runs N encoders with the default settings at once, as N sessions' clips do, with one x264 thread each and
with x264's automatic thread count, and reports the total frames/s (the grain source, 50 frames each).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from fractions import Fraction
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from musetalk.avatar.synthetic import astronaut_bgr, smooth_path  # noqa: E402
from musetalk.config import EncodeConfig  # noqa: E402
from musetalk.pipeline.encode import video_options  # noqa: E402
from musetalk.utils.yuv import i420_video_frame  # noqa: E402

PRESETS = ("ultrafast", "superfast", "veryfast", "faster")
SIZE_HW = (1080, 1920)
FPS = 25


def source_frames(n: int, grain: float, seed: int = 0) -> list[NDArray[np.uint8]]:
    """n (H·3/2, W) I420 frames of the swaying astronaut at 1080p, with per-frame grain of σ `grain`."""
    rng = np.random.default_rng(seed)
    h, w = SIZE_HW
    photo = cv2.resize(astronaut_bgr(), (w, w), interpolation=cv2.INTER_CUBIC)  # the person fills the frame
    offsets = smooth_path(n, FPS, (12.0, 6.0), (0.4, 0.25))
    frames: list[NDArray[np.uint8]] = []
    for i in range(n):
        dx, dy = offsets[i]
        shift = np.array([[1, 0, dx], [0, 1, dy - (w - h) / 3]], np.float32)  # sub-pixel sway, the face in view
        img = cv2.warpAffine(photo, shift, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        if grain > 0:
            img = np.clip(img + rng.normal(0.0, grain, img.shape), 0, 255)
        frames.append(np.asarray(cv2.cvtColor(img.astype(np.uint8), cv2.COLOR_BGR2YUV_I420), dtype=np.uint8))
    return frames


def encode(frames: list[NDArray[np.uint8]], cfg: EncodeConfig, threads: int = 1) -> tuple[list[bytes], float]:
    """(packets, encode seconds) of the frames with the clip encoder's options and `threads` x264 threads."""
    import av

    ctx = av.CodecContext.create("libx264", "w")
    ctx.width, ctx.height, ctx.pix_fmt = SIZE_HW[1], SIZE_HW[0], "yuv420p"
    ctx.time_base, ctx.framerate = Fraction(1, FPS), Fraction(FPS, 1)
    ctx.options = video_options(cfg)
    ctx.thread_count = threads  # 0 = x264's own choice (1.5 × the cores)
    packets: list[bytes] = []
    t0 = time.perf_counter()
    for i, frame in enumerate(frames):
        vf = i420_video_frame(frame)
        vf.pts = i
        packets.extend(bytes(p) for p in ctx.encode(vf))
    packets.extend(bytes(p) for p in ctx.encode(None))
    return packets, time.perf_counter() - t0


def decode(packets: list[bytes]) -> list[NDArray[np.uint8]]:
    """The luma planes (H, W) of the decoded stream."""
    import av

    ctx = av.CodecContext.create("h264", "r")
    out: list[NDArray[np.uint8]] = []
    for data in [*packets, None]:
        for frame in ctx.decode(av.Packet(data) if data is not None else None):
            out.append(np.asarray(frame.to_ndarray(format="yuv420p"), dtype=np.uint8)[: SIZE_HW[0]])
    return out


def psnr(a: NDArray[np.uint8], b: NDArray[np.uint8]) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def parallel_fps(frames: list[NDArray[np.uint8]], encoders: int, threads: int) -> float:
    """Total frames/s of `encoders` clip encoders running at once (as sessions' clips do), each `threads`."""
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.perf_counter()
    with ThreadPoolExecutor(encoders) as pool:
        list(pool.map(lambda _: encode(frames, EncodeConfig(), threads), range(encoders)))
    return encoders * len(frames) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    """Encode the two sources with each preset; print a table and write JSON."""
    from skimage.metrics import structural_similarity

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--crf", type=int, default=EncodeConfig().crf)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS))
    parser.add_argument("--analysis", nargs="+", choices=("preset", "fast"), default=["preset", "fast"],
                        help="x264 analysis: the preset's own, or encode.fast_analysis (veryfast..medium only)")
    parser.add_argument("--gops", type=int, nargs="+", default=[EncodeConfig().gop_frames],
                        help="encode.gop_frames values (keyframe interval; bytes grow as it shrinks)")
    parser.add_argument("--repeats", type=int, default=1, help="encode each this many times; the fastest counts")
    parser.add_argument("--ssim-every", type=int, default=10, help="SSIM on every k-th frame (it is slow)")
    parser.add_argument("--parallel", type=int, nargs="*", default=[],
                        help="also: total frames/s of N encoders at once, 1 thread vs auto")  # fmt: skip
    parser.add_argument("--json", type=Path, default=ROOT / "results" / "bench_presets.json")
    args = parser.parse_args(argv)

    result: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.processor() or platform.machine(),
        "command": " ".join(["python -m bench.bench_presets", *sys.argv[1:]]),
        "frames": args.frames,
        "crf": args.crf,
        "rows": [],
    }
    heads = ("source", "preset", "analysis", "GOP", "fps/core", "kbit/s", "PSNR-Y dB", "SSIM-Y")
    widths = ("6", "10", "8", ">4", ">8", ">8", ">9", ">7")
    print(" ".join(f"{h:{w}s}" for h, w in zip(heads, widths, strict=True)))
    for source, grain in (("clean", 0.0), ("grain", 2.0)):
        frames = source_frames(args.frames, grain)
        lumas = [f[: SIZE_HW[0]] for f in frames]
        for preset, analysis, gop in [(p, a, g) for p in args.presets for a in args.analysis for g in args.gops]:
            if analysis == "fast" and preset in ("ultrafast", "superfast"):
                continue  # these presets already search as little (fast_analysis leaves them as they are)
            cfg = EncodeConfig.model_validate(
                {"preset": preset, "crf": args.crf, "fast_analysis": analysis == "fast", "gop_frames": gop}
            )
            runs = [encode(frames, cfg) for _ in range(args.repeats)]
            packets, seconds = runs[0][0], min(r[1] for r in runs)
            decoded = decode(packets)
            if len(decoded) != len(frames):
                raise RuntimeError(f"{preset}: decoded {len(decoded)} of {len(frames)} frames")
            kbps = sum(map(len, packets)) * 8 / (len(frames) / FPS) / 1000
            ssim = [
                float(structural_similarity(lumas[i], decoded[i], data_range=255))
                for i in range(0, len(frames), args.ssim_every)
            ]
            row = {
                "source": source,
                "preset": preset,
                "analysis": analysis,
                "gop_frames": gop,
                "fps_per_core": len(frames) / seconds,
                "kbps": kbps,
                "psnr_y": float(np.mean([psnr(a, b) for a, b in zip(lumas, decoded, strict=True)])),
                "ssim_y": float(np.mean(ssim)),
            }
            result["rows"].append(row)
            print(f"{source:6s} {preset:10s} {analysis:8s} {gop:4d} {row['fps_per_core']:8.1f} {kbps:8.0f} "
                  f"{row['psnr_y']:9.2f} {row['ssim_y']:7.4f}", flush=True)  # fmt: skip
    result["parallel"] = []
    frames = source_frames(min(args.frames, 50), 2.0)
    for n in args.parallel:
        for threads in (1, 0):
            fps = parallel_fps(frames, n, threads)
            result["parallel"].append({"encoders": n, "threads": threads or "auto", "total_fps": fps})
            print(f"{n} encoders at once, x264 threads {threads or 'auto'}: {fps:.1f} frames/s in total", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
