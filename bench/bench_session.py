"""What one /speak append costs as the session grows: time and bytes written, at 1 to 5,000 clips.

    python -m bench.bench_session [--checkpoints 1,100,1000,5000] [--width 1280 --height 720] [--clip-s 3.0]
                                  [--aac-coder fast|twoloop]

Appends clips to one session with the real stitcher (musetalk/session) and, for every append, measures
its wall time and the bytes the process wrote (`write_bytes` of /proc/self/io, around the append only).
At each checkpoint n it reports the median of the 5 appends that made clips n .. n+4, next to the
previous algorithm, copy-and-rename (`copy_and_rename_append` below: copy the committed bytes of the
last version into a new file with copy_file_range, add the new bytes, fsync, rename over the old
version), timed 3 times on a copy of the same session in the same run. Clips are encoded once with the
real encoder (a photo moving a little per frame, so the bitrate is like a talking head, with a
speech-like tone) and hard-linked under new names. CPU only: no model runs.

Also times opening the final session in a new store (a restarted server's first request on it: read
the record boxes, cut the provisional tail), and measures the audio quality at the joins
(`--snr-clips`, a separate short session of espeak-ng sentences): the SNR of the session's decoded
audio against the source PCM in a window around each join, next to one AAC encode of the whole
session's PCM.
Prints tables and writes JSON (default results/bench/bench_session.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import av
import cv2
import numpy as np
import soundfile as sf
from numpy.typing import NDArray

from musetalk.config import PROJECT_ROOT, EncodeConfig
from musetalk.pipeline.encode import write_clip
from musetalk.session.stitcher import SessionPaths, SessionState, clip_pcm
from musetalk.session.store import SessionStore
from musetalk.types import Audio, Clip
from musetalk.utils.ffmpeg import run_ffmpeg

FPS = 25
WINDOW = 5  # appends per checkpoint: the ones that made clips n .. n+4
LEGACY_REPEATS = 3
SNR_BEFORE_S, SNR_AFTER_S = 0.25, 0.5  # window around each join: the splice sits ~70 ms before it


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


SPEECH = (
    "Hello, and welcome back to our conversation.",
    "I looked into the question you asked yesterday.",
    "The short answer is yes, but there are a few details.",
    "First, the numbers depend on how long the session runs.",
    "Second, every sentence is added at the end of the video.",
    "Nothing that was already written is ever changed again.",
    "So a long talk costs the same as a short one, per sentence.",
    "Does that answer your question, or shall I go on?",
)


def make_speech_clips(folder: Path, n: int, cfg: EncodeConfig) -> list[Clip]:
    """`n` clips of real speech (espeak-ng, the server's default voice) on small blank frames."""
    from musetalk.config import TTSConfig
    from musetalk.tts.base import create_voice_engine

    voice = create_voice_engine(TTSConfig(engine="espeak"))
    clips = []
    for k in range(n):
        audio = voice.synthesize(SPEECH[k % len(SPEECH)])
        n_frames = max(1, round(len(audio.samples) / audio.sample_rate * FPS))
        frames = (np.full((64, 64, 3), 128, np.uint8) for _ in range(n_frames))
        clips.append(write_clip(frames, audio, folder / f"speech{k}.mp4", n_frames, FPS, cfg))
    return clips


def _link_clip(src: Clip, dest: Path) -> Clip:
    """The pre-encoded clip under the session's next clip name (a hard link: no bytes written)."""
    assert src.audio_path is not None
    for a, b in ((src.path, dest), (src.audio_path, dest.with_suffix(".wav"))):
        try:
            os.link(a, b)
        except OSError:
            shutil.copyfile(a, b)
    return Clip(path=dest, n_frames=src.n_frames, fps=src.fps, audio_path=dest.with_suffix(".wav"))


def write_bytes() -> int:
    """Bytes this process has caused to be written to storage so far (/proc/self/io)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise RuntimeError("no write_bytes in /proc/self/io")


def filesystem_of(path: Path) -> str:
    """The filesystem type and device that `path` lives on (from /proc/self/mountinfo, like `df -T`)."""
    path = path.resolve()
    best, fs = "", "unknown"
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        mount_point = left.split()[4]
        fs_type, source = right.split()[:2]
        inside = path == Path(mount_point) or Path(mount_point) in path.parents
        if inside and len(mount_point) >= len(best):
            best, fs = mount_point, f"{fs_type} ({source} on {mount_point})"
    return fs


def copy_and_rename_append(video: Path, committed_bytes: int, new_bytes: bytes) -> None:
    """The previous append algorithm's file work: a new version = the committed bytes of the last version
    (copy_file_range: a block clone on copy-on-write filesystems, a real copy on ext4) + the new bytes,
    fsync, renamed over the last version (which frees its blocks)."""
    tmp = video.with_name(f".{video.name}.tmp")
    with video.open("rb") as src, tmp.open("wb") as dst:
        copied = 0
        while copied < committed_bytes:
            n = os.copy_file_range(src.fileno(), dst.fileno(), committed_bytes - copied, copied, copied)
            if n == 0:
                raise RuntimeError("source shorter than its committed length")
            copied += n
        dst.seek(committed_bytes)
        dst.write(new_bytes)
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(tmp, video)


def _decode_mono(path: Path) -> NDArray[np.float32]:
    with av.open(str(path)) as c:
        return np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)]).astype(np.float32)


def join_snr_db(paths: SessionPaths, state: SessionState, cfg: EncodeConfig) -> dict[str, list[float]]:
    """SNR (dB) against the source PCM of the session's decoded audio and of one AAC encode (FFmpeg, same
    bitrate and coder) of the whole session's PCM: in a window around each join ("join", "join_one_pass") and, as a
    control, in a window of the same length in the middle of each clip ("mid", "mid_one_pass")."""
    rate = state.audio_rate
    parts = []
    for entry in state.clips:
        clip = Clip(paths.clips_dir / entry.name, entry.n_frames, state.fps,
                    audio_path=(paths.clips_dir / entry.name).with_suffix(".wav"))  # fmt: skip
        parts.append(clip_pcm(clip, rate))
    source = np.concatenate(parts)  # (n,) float32
    with tempfile.TemporaryDirectory() as tmp:
        wav, m4a = Path(tmp) / "all.wav", Path(tmp) / "all.m4a"
        sf.write(str(wav), source, rate)
        run_ffmpeg(["-i", str(wav), "-c:a", "aac", "-aac_coder", cfg.aac_coder, "-b:a", f"{cfg.audio_bitrate_kbps}k",
                    str(m4a)])  # fmt: skip
        one_pass = _decode_mono(m4a)
    session = _decode_mono(paths.video)

    def snr(decoded: NDArray[np.float32], a: int, b: int) -> float:
        ref = source[a:b]
        err = ref - decoded[a:b]
        return round(float(10 * np.log10(np.sum(ref**2) / max(float(np.sum(err**2)), 1e-20))), 2)

    bounds = np.cumsum([0, *(c.n_frames for c in state.clips)]) * rate // state.fps
    before, after = int(SNR_BEFORE_S * rate), int(SNR_AFTER_S * rate)
    joins = [(int(j) - before, int(j) + after) for j in bounds[1:-1]]
    mids = [(int(a + b) // 2 - (before + after) // 2, int(a + b) // 2 + (before + after) // 2)
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)]  # fmt: skip
    return {
        "join": [snr(session, a, b) for a, b in joins],
        "join_one_pass": [snr(one_pass, a, b) for a, b in joins],
        "mid": [snr(session, a, b) for a, b in mids],
        "mid_one_pass": [snr(one_pass, a, b) for a, b in mids],
    }


def main() -> None:
    """Run the benchmark, print the tables, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", default="1,100,1000,5000", help="session lengths (clips) to report")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--clip-s", type=float, default=3.0, help="seconds per clip (a sentence)")
    parser.add_argument("--sources", type=int, default=4, help="distinct clips encoded and reused")
    parser.add_argument("--snr-clips", type=int, default=24, help="spoken sentences in the join-SNR session")
    parser.add_argument(
        "--aac-coder",
        choices=["fast", "twoloop"],
        default=EncodeConfig().aac_coder,
        help="encode.aac_coder of the clips and the session",
    )
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "results" / "bench" / "bench_session.json")
    parser.add_argument("--workdir", type=Path, default=None, help="where the session is written (default: a temp dir)")
    args = parser.parse_args()
    checkpoints = [int(x) for x in args.checkpoints.split(",")]
    n_appends = max(checkpoints) + WINDOW - 1

    cfg = EncodeConfig(aac_coder=args.aac_coder)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        fs = filesystem_of(root)
        (root / "src").mkdir()
        t0 = time.perf_counter()
        sources = make_source_clips(root / "src", args.sources, args.width, args.height, args.clip_s, cfg)
        encode_s = (time.perf_counter() - t0) / args.sources

        speech = make_speech_clips(root / "src", args.snr_clips, cfg)
        snr_store = SessionStore(root / "snr", "default", FPS, cfg)
        speech_aac_ms = []  # the appends' AAC encode of spoken sentences (its speed depends on the signal)
        for clip in speech:
            done = snr_store.append("default", _link_clip(clip, snr_store.new_clip_path("default")), 0, "bench")
            speech_aac_ms.append(done.timings_ms["append_encode"] / clip.duration_s)
        snr_db = join_snr_db(snr_store.paths("default"), snr_store.state("default"), cfg)
        snr_store.close()
        shutil.rmtree(root / "snr")

        store = SessionStore(root / "results", "default", FPS, cfg)
        video = store.paths("default").video
        append_ms: list[float] = []
        written: list[int] = []
        stages: list[dict[str, float]] = []
        legacy: dict[int, dict[str, float]] = {}
        t_run = time.perf_counter()
        for i in range(n_appends):
            clip = _link_clip(sources[i % len(sources)], store.new_clip_path("default"))
            before_state = store.state("default")
            w0, t = write_bytes(), time.perf_counter()
            result = store.append("default", clip, cursor=0, avatar_id="bench")
            append_ms.append((time.perf_counter() - t) * 1000)
            written.append(write_bytes() - w0)
            stages.append(result.timings_ms)
            n = i + 1
            if n in checkpoints:  # the old algorithm on a copy of this session, adding the same bytes
                start = before_state.layout.committed_bytes if before_state.layout else 0
                assert result.state.layout is not None
                end = result.state.layout.committed_bytes
                with video.open("rb") as f:
                    f.seek(start)
                    new_bytes = f.read(end - start)
                old = root / "legacy.mp4"
                shutil.copyfile(video, old)  # the last version, as the old algorithm had it (untimed)
                os.truncate(old, start)
                os.sync()
                ms, nbytes = [], []
                for _ in range(LEGACY_REPEATS):
                    w0, t = write_bytes(), time.perf_counter()
                    copy_and_rename_append(old, start, new_bytes)
                    ms.append((time.perf_counter() - t) * 1000)
                    nbytes.append(write_bytes() - w0)
                old.unlink()
                legacy[n] = {"file_ms": statistics.median(ms), "bytes": statistics.median(nbytes)}
                print(f"  {n} clips: {(time.perf_counter() - t_run):.0f} s into the run", flush=True)
        size_mb = video.stat().st_size / 1e6
        store.close()
        t = time.perf_counter()  # a restarted server's first touch: read the records, cut the tail
        reopened = SessionStore(root / "results", "default", FPS, cfg)
        assert len(reopened.state("default").clips) == n_appends
        open_ms = (time.perf_counter() - t) * 1000
        reopened.close()

    rows = []
    for n in checkpoints:
        window = slice(n - 1, n - 1 + WINDOW)
        read_encode = statistics.median(s["append_read"] + s["append_encode"] for s in stages[window])
        rows.append({
            "clips": n,
            "session_min": round(n * args.clip_s / 60, 1),
            "append_ms": round(statistics.median(append_ms[window]), 1),
            "write_ms": round(statistics.median(s["append_write"] for s in stages[window]), 1),
            "commit_ms": round(statistics.median(s["append_commit"] for s in stages[window]), 1),
            "written_kb": round(statistics.median(written[window]) / 1000, 1),
            "old_append_ms": round(read_encode + legacy[n]["file_ms"], 1),
            "old_file_ms": round(legacy[n]["file_ms"], 1),
            "old_written_kb": round(legacy[n]["bytes"] / 1000, 1),
        })  # fmt: skip
    first, last = rows[0], rows[-1]
    report = {
        "bench": "bench_session",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": {"machine": platform.machine(), "python": platform.python_version(), "node": platform.node(),
                 "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)},
        "filesystem": fs,
        "frame": f"{args.width}x{args.height}",
        "clip_s": args.clip_s,
        "aac_coder": cfg.aac_coder,
        "clip_encode_s": round(encode_s, 2),
        "final_session": {"clips": n_appends, "size_mb": round(size_mb, 1), "open_ms": round(open_ms, 1)},
        "rows": rows,
        "ratio_last_to_first": {"time": round(last["append_ms"] / first["append_ms"], 2),
                                "bytes": round(last["written_kb"] / first["written_kb"], 3)},
        "snr_db": snr_db,
        "speech_append_aac_ms_per_s": round(statistics.median(speech_aac_ms), 2),
        "append_ms_all": [round(x, 1) for x in append_ms],
        "written_bytes_all": written,
    }  # fmt: skip
    print(f"session append, {args.width}x{args.height}, {args.clip_s:g} s clips, encode.preset={cfg.preset}, {fs}")
    cols = list(rows[0])
    print(" ".join(f"{c:>{max(9, len(c))}}" for c in cols))
    for r in rows:
        print(" ".join(f"{r[c]:>{max(9, len(c))}}" for c in cols))
    print(f"last / first checkpoint: {report['ratio_last_to_first']}; final session: {report['final_session']}")
    print(
        f"AAC encode in the appends of spoken sentences: {report['speech_append_aac_ms_per_s']} ms per s of audio"
        f" (median, encode.aac_coder={cfg.aac_coder})"
    )
    for where in ("join", "mid"):
        own, one = np.array(snr_db[where]), np.array(snr_db[f"{where}_one_pass"])
        d = own - one
        print(f"SNR vs source PCM, {where} windows ({len(d)}): session {own.min():.1f}-{own.max():.1f} dB,"
              f" one AAC encode {one.min():.1f}-{one.max():.1f} dB,"
              f" session minus one encode {d.min():+.2f} .. {d.max():+.2f} dB (mean {d.mean():+.2f})")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
