"""What a lone utterance pays after its last frame: the clip encoder's tail and the session append's parts.

    python -m bench.bench_clip_tail [--width 1920 --height 1080] [--clip-s 5] [--produce-fps 400] [--repeats 5]
                                    [--threads 0 4] [--gops 50 25] [--workers 0 8] [--clips 1 16]
                                    [--audio-ahead 0 1] [--fast-analysis 0 1]

No model runs: a producer hands the real clip encoder (`write_clip`, I420 frames as the GPU blend makes
them) one frame every 1/produce-fps s — the speed the GPU generates at — and the clip is then appended to
a session with the real stitcher (`SessionStore.append`). Per repeat: the encoder's tail (last frame
handed over → clip written), the append and its parts (read the clip back, encode the session audio,
write + fsync, commit), and the pieces of the read on their own (open the mp4, demux its packets, read
the PCM WAV), so that a slow part shows on the machine where it is slow. Each repeat is a new session
(a new session's first append, as `bench_concurrency`'s N = 1 round). With `--clips K`, K clips are
written and appended at once, each fed produce-fps / K frames per second (the GPU's frames shared by K
sessions that started together, as a round of `bench_concurrency` at N = K): every clip's figures are a
row, and the slowest clip's tail is reported beside the median. `--audio-ahead 1` (the default, as the
server does) encodes the session audio while the clip is written; 0 leaves it to the append.
`--fast-analysis` compares `encode.fast_analysis` off (0) and on (1, the default). Prints medians, writes JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
import soundfile as sf
from numpy.typing import NDArray

from bench.bench_session import _photo
from musetalk.config import PROJECT_ROOT, EncodeConfig
from musetalk.pipeline.encode import segment_workers, write_clip
from musetalk.session.stitcher import SessionAudio
from musetalk.session.store import SessionStore
from musetalk.types import Audio

FPS = 25


def i420_frames(width: int, height: int, n: int) -> list[NDArray[np.uint8]]:
    """n frames (H·3/2, W) I420 of a photo drifting a little per frame (a talking head's bitrate)."""
    photo = _photo(width + 64, height + 64)
    crops = (np.ascontiguousarray(photo[i % 32 : i % 32 + height, i % 48 : i % 48 + width]) for i in range(n))
    return [np.asarray(cv2.cvtColor(crop, cv2.COLOR_BGR2YUV_I420), np.uint8) for crop in crops]


def paced(frames: list[NDArray[np.uint8]], fps: float, marks: dict[str, float]) -> Iterator[NDArray[np.uint8]]:
    """The frames one every 1/fps s from the first; marks["last"] = when the last one was handed over."""
    t0 = time.perf_counter()
    for i, frame in enumerate(frames):
        delay = t0 + i / fps - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        yield frame
    marks["last"] = time.perf_counter()


def read_parts(clip_path: Path, wav_path: Path) -> dict[str, float]:
    """The clip read, piece by piece (ms): open the mp4 as a plain av.open does (decoding its first frame for
    stream info) and as the append does (no decoding), demux every video packet, read the WAV."""
    t0 = time.perf_counter()
    av.open(str(clip_path)).close()
    t_plain = time.perf_counter()
    no_decode = [{"skip_frame": "all", "threads": "1"}] * 2  # as the append opens a clip
    container = av.open(str(clip_path), stream_options=no_decode)  # type: ignore[arg-type]  # (PyAV's stub)
    t_open = time.perf_counter()
    stream = container.streams.video[0]
    n = sum(1 for packet in container.demux(stream) if packet.size)
    t_demux = time.perf_counter()
    container.close()
    t_close = time.perf_counter()
    pcm, _ = sf.read(str(wav_path), dtype="float32")
    t_wav = time.perf_counter()
    assert n > 0 and len(pcm) > 0
    return {
        "open_plain_ms": (t_plain - t0) * 1000,
        "open_ms": (t_open - t_plain) * 1000,
        "demux_ms": (t_demux - t_open) * 1000,
        "close_ms": (t_close - t_demux) * 1000,
        "wav_ms": (t_wav - t_close) * 1000,
    }


def one_clip(
    store: SessionStore,
    sid: str,
    frames: list[NDArray[np.uint8]],
    audio: Audio,
    fps: float,
    cfg: EncodeConfig,
    audio_ahead: bool = False,
) -> dict[str, float]:
    """Write one clip from `frames` handed over at `fps`, then append it to session `sid` → its timings (ms).
    With `audio_ahead` the session audio is encoded while the clip is written, as the server does."""
    n = len(frames)
    marks: dict[str, float] = {}
    ahead: list[Future[SessionAudio]] = []
    with ThreadPoolExecutor(1) as pool:
        on_audio = (lambda pcm: ahead.append(pool.submit(store.encode_audio_ahead, sid, pcm))) if audio_ahead else None
        t0 = time.perf_counter()
        clip = write_clip(paced(frames, fps, marks), audio, store.new_clip_path(sid), n, FPS, cfg, pix_fmt="yuv420p",
                          on_audio=on_audio)  # fmt: skip
        t_clip = time.perf_counter()
        assert clip.audio_path is not None
        parts = read_parts(clip.path, clip.audio_path)
        t1 = time.perf_counter()
        appended = store.append(sid, clip, 0, None, ahead[0].result() if ahead else None)
        t_append = time.perf_counter() - t1
    assert appended.audio_ahead is audio_ahead
    return {
        "produce_ms": (marks["last"] - t0) * 1000,
        "encode_tail_ms": (t_clip - marks["last"]) * 1000,  # last frame handed over → clip written
        "append_ms": t_append * 1000,
        **{k: v for k, v in appended.timings_ms.items() if k != "append_total"},
        **parts,
    }


def _line(row: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.0f}" for k, v in row.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--height", type=int, default=1080)
    parser.add_argument("--clip-s", type=float, default=5.0)
    parser.add_argument("--produce-fps", type=float, default=400.0, help="frames handed to the encoder per second")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--preset", default="veryfast")
    parser.add_argument("--threads", type=int, nargs="+", default=[0], help="encode.threads values to compare")
    parser.add_argument("--gops", type=int, nargs="+", default=[50], help="encode.gop_frames values to compare")
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[0], help="encode.segment_workers values to compare (0 = auto)"
    )
    parser.add_argument("--clips", type=int, nargs="+", default=[1], help="clips written at once (sessions per round)")
    parser.add_argument("--audio-ahead", type=int, nargs="+", default=[1], choices=[0, 1],
                        help="1: the session audio is encoded while the clip is written (the server)")  # fmt: skip
    parser.add_argument("--fast-analysis", type=int, nargs="+", default=[1], choices=[0, 1],
                        help="encode.fast_analysis values to compare")  # fmt: skip
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "results" / "bench" / "bench_clip_tail.json")
    args = parser.parse_args(argv)

    n = round(args.clip_s * FPS)
    frames = i420_frames(args.width, args.height, n)
    t = np.arange(int(args.clip_s * 16000)) / 16000
    audio = Audio((0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2).astype(np.float32), 16000)
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpus": os.cpu_count(),
            "python": platform.python_version(), "av": av.__version__, "size": f"{args.width}x{args.height}",
            "clip_s": args.clip_s, "produce_fps": args.produce_fps, "preset": args.preset}  # fmt: skip
    result: dict[str, Any] = {"meta": meta, "configs": []}
    with tempfile.TemporaryDirectory(prefix="bench-clip-tail-", dir=PROJECT_ROOT / "results") as tmp:
        for threads, gop, workers, clips, ahead, fast in itertools.product(
            args.threads, args.gops, args.workers, args.clips, args.audio_ahead, args.fast_analysis
        ):
            cfg = EncodeConfig(preset=args.preset, threads=threads, gop_frames=gop, segment_workers=workers,
                               fast_analysis=bool(fast))  # fmt: skip
            folder = f"t{threads}-g{gop}-w{workers}-c{clips}-a{ahead}-f{fast}"
            store = SessionStore(Path(tmp) / folder, "default", FPS, cfg)
            label = (f"threads={threads} gop={gop} workers={workers or segment_workers(cfg)} clips={clips} "
                     f"ahead={ahead} fast_analysis={fast}")  # fmt: skip
            rows = []
            with ThreadPoolExecutor(clips) as pool:
                for rep in range(args.repeats):
                    each_fps = args.produce_fps / clips
                    futures = [pool.submit(one_clip, store, f"r{rep}-c{c}", frames, audio, each_fps, cfg, bool(ahead))
                               for c in range(clips)]  # fmt: skip
                    rows += [f.result() for f in futures]
                    print(f"{label} #{rep}: {_line(rows[-1])}", flush=True)
            medians = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
            worst_tail = max(r["encode_tail_ms"] for r in rows)
            config = {"threads": threads, "gop_frames": gop, "segment_workers": workers or segment_workers(cfg),
                      "clips": clips, "audio_ahead": bool(ahead), "fast_analysis": bool(fast)}  # fmt: skip
            result["configs"].append({**config, "rows": rows, "median": medians, "worst_encode_tail_ms": worst_tail})
            print(f"{label} median: {_line(medians)} worst_tail={worst_tail:.0f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
