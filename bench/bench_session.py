"""How the cost of one /speak append grows with the session length (1, 10, 100 clips).

    python -m bench.bench_session [--clips 100] [--width 1280 --height 720] [--clip-s 3.0]

Appends `--clips` clips to one session with the real stitcher (musetalk/session) and times every
append; at 1, 10 and 100 clips it also times the seed's way made drift-free (concat
all clip videos with -c copy, concat all PCM, one AAC encode of the whole session), which redoes the
whole session on every append. Clips are encoded once with the real encoder (a photo moving a little
per frame, so the bitrate is like a talking head) and reused under new names. CPU only: no model runs.
Prints a table and writes JSON (default results/bench/bench_session.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np
from numpy.typing import NDArray

from musetalk.config import PROJECT_ROOT, EncodeConfig
from musetalk.pipeline.encode import write_clip
from musetalk.session.store import SessionStore
from musetalk.types import Audio, Clip
from musetalk.utils.ffmpeg import probe, run_ffmpeg

FPS = 25
CHECKPOINTS = (1, 10, 100)


def _photo(width: int, height: int) -> NDArray[np.uint8]:
    """A real photo (scikit-image's astronaut) as a BGR frame, or a textured gradient without it."""
    try:
        from skimage import data

        rgb = data.astronaut()
        img = cv2.resize(rgb[:, :, ::-1], (width, height), interpolation=cv2.INTER_AREA)
        return np.ascontiguousarray(img)
    except ImportError:
        yy, xx = np.mgrid[0:height, 0:width]
        return np.stack([(xx * 255 // width), (yy * 255 // height), ((xx + yy) % 256)], -1).astype(np.uint8)


def make_source_clips(folder: Path, n: int, width: int, height: int, clip_s: float, cfg: EncodeConfig) -> list[Clip]:
    """`n` distinct clips of `clip_s` seconds: the photo drifting a few px, with a speech-like tone."""
    photo = _photo(width, height)
    n_frames = round(clip_s * FPS)
    clips = []
    for k in range(n):
        frames: list[NDArray[np.uint8]] = []
        for i in range(n_frames):
            m = np.array([[1, 0, 3 * np.sin((i + 7 * k) / 9)], [0, 1, 2 * np.cos((i + 5 * k) / 11)]], np.float32)
            moved = cv2.warpAffine(photo, m, (width, height), borderMode=cv2.BORDER_REFLECT)
            frames.append(np.asarray(moved, dtype=np.uint8))  # (H, W, 3) uint8 BGR
        t = np.arange(int(clip_s * 16000)) / 16000
        tone = 0.3 * np.sin(2 * np.pi * (140 + 20 * k) * t) * np.sin(np.pi * t * 5) ** 2
        clips.append(write_clip(iter(frames), Audio(tone.astype(np.float32), 16000), folder / f"src{k}.mp4",
                                n_frames, FPS, cfg))  # fmt: skip
    return clips


def _copy_clip(src: Clip, dest: Path) -> Clip:
    shutil.copyfile(src.path, dest)
    assert src.audio_path is not None
    shutil.copyfile(src.audio_path, dest.with_suffix(".wav"))
    return Clip(path=dest, n_frames=src.n_frames, fps=src.fps, audio_path=dest.with_suffix(".wav"))


def seed_fix_a_rebuild(clips: list[Path], work: Path, cfg: EncodeConfig) -> float:
    """Seconds to rebuild a session from all its clips: concat video -c copy + PCM concat + one AAC encode."""
    t0 = time.perf_counter()
    vlist, alist = work / "v.txt", work / "a.txt"
    vlist.write_text("".join(f"file '{p}'\n" for p in clips))
    alist.write_text("".join(f"file '{p.with_suffix('.wav')}'\n" for p in clips))
    run_ffmpeg(["-f", "concat", "-safe", "0", "-i", str(vlist), "-an", "-c:v", "copy", str(work / "v.mp4")])
    run_ffmpeg(["-f", "concat", "-safe", "0", "-i", str(alist), "-c", "copy", str(work / "a.wav")])
    run_ffmpeg([
        "-i", str(work / "v.mp4"), "-i", str(work / "a.wav"), "-map", "0:v", "-map", "1:a", "-c:v", "copy",
        "-c:a", "aac", "-b:a", f"{cfg.audio_bitrate_kbps}k", "-movflags", "+faststart", str(work / "out.mp4"),
    ])  # fmt: skip
    return time.perf_counter() - t0


def main() -> None:
    """Run the benchmark, print the table, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=100)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--clip-s", type=float, default=3.0, help="seconds per clip (a sentence)")
    parser.add_argument("--sources", type=int, default=4, help="distinct clips encoded and reused")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "results" / "bench" / "bench_session.json")
    parser.add_argument("--workdir", type=Path, default=None, help="where the session is written (default: a temp dir)")
    args = parser.parse_args()

    cfg = EncodeConfig()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        (root / "src").mkdir()
        t0 = time.perf_counter()
        sources = make_source_clips(root / "src", args.sources, args.width, args.height, args.clip_s, cfg)
        encode_s = (time.perf_counter() - t0) / args.sources
        store = SessionStore(root / "results", "default", FPS, cfg)
        append_ms: list[float] = []
        stages: list[dict[str, float]] = []
        rebuild_ms: dict[int, float] = {}
        for i in range(args.clips):
            clip = _copy_clip(sources[i % len(sources)], store.new_clip_path("default"))
            t = time.perf_counter()
            result = store.append("default", clip, cursor=0, avatar_id="bench")
            append_ms.append((time.perf_counter() - t) * 1000)
            stages.append(result.timings_ms)
            n = i + 1
            if n in CHECKPOINTS:
                paths = store.paths("default")
                clips = [paths.clips_dir / c.name for c in result.state.clips]
                work = root / f"rebuild{n}"
                work.mkdir()
                rebuild_ms[n] = seed_fix_a_rebuild(clips, work, cfg) * 1000
                shutil.rmtree(work)
        video = store.paths("default").video
        info = probe(video)
        size_mb = video.stat().st_size / 1e6

    def around(values: list[float], n: int) -> float:
        """Median of the appends that made clips n-4 .. n (one append is noisy: page cache, writeback)."""
        return round(statistics.median(values[max(0, n - 5) : n]), 1)

    rows = []
    for n in CHECKPOINTS:
        if n > args.clips:
            continue
        row: dict[str, float] = {"clips": n, "session_s": round(n * args.clip_s, 1), "append_ms": around(append_ms, n)}
        for stage in ("append_read", "append_encode", "append_write", "append_rename"):
            row[stage.replace("append_", "") + "_ms"] = around([s[stage] for s in stages], n)
        row["seed_fix_a_rebuild_ms"] = round(rebuild_ms[n], 1)
        rows.append(row)
    report = {
        "bench": "bench_session",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": {"machine": platform.machine(), "python": platform.python_version(), "node": platform.node()},
        "frame": f"{args.width}x{args.height}",
        "clip_s": args.clip_s,
        "clip_encode_s": round(encode_s, 2),
        "final_session": {"clips": args.clips, "duration_s": info.duration_s, "size_mb": round(size_mb, 1),
                          "audio_minus_video_ms": round(1000 * ((info.audio_duration_s or 0)
                                                                - (info.video_duration_s or 0)), 1)},
        "rows": rows,
        "append_ms_all": [round(x, 1) for x in append_ms],
    }  # fmt: skip
    print(f"session append, {args.width}x{args.height}, {args.clip_s:g} s clips, encode.preset={cfg.preset}")
    cols = ["clips", "session_s", "append_ms", "read_ms", "encode_ms", "write_ms", "rename_ms", "seed_fix_a_rebuild_ms"]
    print(" ".join(f"{c:>{max(9, len(c))}}" for c in cols))
    for r in rows:
        print(" ".join(f"{r[c]:>{max(9, len(c))}}" for c in cols))
    print(f"final session: {report['final_session']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
