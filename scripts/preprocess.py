"""Prepare MuseTalk training data in upstream's layout.

    python -m scripts.preprocess --config configs/training/preprocess.yaml
    python -m scripts.preprocess --workers 2 --quiet

Per raw video in video_root_raw, in parallel over videos:
  1. re-encode at 25 fps (libx264, crf 15, yuv420p; audio kept) into video_root_25fps/<name>.mp4
  2. cut into clip_len_second clips (stream copy, cut at keyframes) → video_audio_clip_root/clip%03d_<name>.mp4
  3. a 16 kHz mono 16-bit wav next to each clip (clip%03d_<name>.wav)
  4. per clip, the face box and 68 landmarks of every frame → meta_root/clip%03d_<name>.json with
     mp4_path, wav_path, video_size [h, w], face_size [h, w] (first frame's box), frames, face_list
     ([x1, y1, x2, y2] per frame: the landmarks' extent), landmark_list (68 [x, y] per frame),
     isvalid (false, and the lists stop, at the first frame without a face, as upstream does)
Then video_file_list and the train/val lists (meta file names; val = names containing an id of
val_list_hdtf). Finished work is skipped on a re-run (each file is written to a temp name and renamed).
A video that fails is reported and the others continue. Exit codes: 0 all done, 1 some video failed,
2 bad config.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from musetalk.config import project_path

FPS = 25
AUDIO_RATE_HZ = 16000
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi")
PATH_KEYS = (
    "video_root_raw",
    "video_root_25fps",
    "video_file_list",
    "video_audio_clip_root",
    "meta_root",
    "video_clip_file_list_train",
    "video_clip_file_list_val",
)
DETECTORS = ("dlib", "face_alignment", "dwpose")


@dataclass(frozen=True)
class PreprocessConfig:
    """configs/training/preprocess.yaml: upstream's keys plus detector and workers."""

    clip_len_second: float
    val_list_hdtf: tuple[str, ...]
    paths: dict[str, Path]
    detector: str = "dlib"
    workers: int = 0

    def path(self, key: str) -> Path:
        """A configured path, resolved."""
        return self.paths[key]


@dataclass
class VideoReport:
    """What happened to one raw video."""

    name: str
    clips: int = 0
    new_clips: int = 0
    valid_metas: int = 0
    skipped_steps: list[str] = field(default_factory=list)
    error: str = ""


def load_preprocess_config(path: Path, overrides: dict[str, Any]) -> PreprocessConfig:
    """Read and check the YAML; raises ValueError naming the bad key."""
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level must be a mapping")
    data.update({k: v for k, v in overrides.items() if v is not None})
    known = {"clip_len_second", "val_list_hdtf", "detector", "workers", *PATH_KEYS}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}")
    missing = sorted({"clip_len_second", *PATH_KEYS} - set(data))
    if missing:
        raise ValueError(f"{path}: missing keys {missing}")
    clip_len = float(data["clip_len_second"])
    if clip_len <= 0:
        raise ValueError(f"{path}: clip_len_second must be > 0")
    detector = str(data.get("detector", "dlib"))
    if detector not in DETECTORS:
        raise ValueError(f"{path}: detector must be one of {DETECTORS}, got {detector!r}")
    return PreprocessConfig(
        clip_len_second=clip_len,
        val_list_hdtf=tuple(str(v) for v in data.get("val_list_hdtf") or ()),
        paths={k: project_path(str(data[k])) for k in PATH_KEYS},
        detector=detector,
        workers=int(data.get("workers") or 0),
    )


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")


def _to_25fps(raw: Path, dst: Path) -> None:
    from musetalk.utils.ffmpeg import run_ffmpeg

    tmp = _tmp(dst)
    try:
        run_ffmpeg(["-i", str(raw), "-r", str(FPS), "-c:v", "libx264", "-crf", "15", "-pix_fmt", "yuv420p",
                    "-c:a", "aac", str(tmp)])  # fmt: skip
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def _split(video: Path, clip_root: Path, clip_len_s: float) -> None:
    """Cut into clips in a temp folder, then move them into place (a crash leaves no partial set)."""
    from musetalk.utils.ffmpeg import run_ffmpeg

    staging = clip_root / f".split_{video.stem}.{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        run_ffmpeg(["-i", str(video), "-c", "copy", "-map", "0", "-f", "segment", "-segment_time", f"{clip_len_s:g}",
                    "-reset_timestamps", "1", str(staging / f"clip%03d_{video.stem}.mp4")])  # fmt: skip
        for clip in sorted(staging.glob("clip*.mp4")):
            os.replace(clip, clip_root / clip.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _wav(clip: Path, wav: Path) -> None:
    from musetalk.utils.ffmpeg import run_ffmpeg

    tmp = _tmp(wav)
    try:
        run_ffmpeg(["-i", str(clip), "-vn", "-ac", "1", "-ar", str(AUDIO_RATE_HZ), "-acodec", "pcm_s16le",
                    "-f", "wav", str(tmp)])  # fmt: skip
        os.replace(tmp, wav)
    finally:
        tmp.unlink(missing_ok=True)


def _meta(clip: Path, wav: Path, detector: Any) -> dict[str, Any]:
    """Upstream's meta record: boxes and 68 landmarks per frame until the first frame without a face."""
    import av
    import numpy as np

    faces: list[list[int]] = []
    landmarks: list[list[list[int]]] = []
    frames = 0
    valid = True
    size_hw = [0, 0]
    with av.open(str(clip)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            img = frame.to_ndarray(format="bgr24")
            size_hw = [int(img.shape[0]), int(img.shape[1])]
            frames += 1
            if not valid:
                continue
            lm = detector.detect(img)
            if lm is None:
                valid = False
                continue
            pts = np.asarray(lm).astype(np.int32)  # upstream truncates landmarks to int32
            x1, y1 = pts.min(axis=0)
            x2, y2 = pts.max(axis=0)
            faces.append([int(x1), int(y1), int(x2), int(y2)])
            landmarks.append(pts.tolist())
    if frames == 0:
        valid = False
    face_size = [faces[0][3] - faces[0][1], faces[0][2] - faces[0][0]] if faces else [0, 0]
    return {
        "mp4_path": str(clip),
        "wav_path": str(wav),
        "video_size": size_hw,
        "face_size": face_size,
        "frames": frames,
        "face_list": faces,
        "landmark_list": landmarks,
        "isvalid": valid,
    }


def make_detector(name: str) -> Any:
    """The named face detector plugin (the one place preprocess finds faces)."""
    from musetalk.config import load_config
    from musetalk.faces import make_detector as make

    return make(load_config(), name=name)


def process_video(raw: Path, cfg: PreprocessConfig) -> VideoReport:
    """Steps 1-4 for one raw video; every finished output is kept and skipped on a re-run."""
    report = VideoReport(raw.stem)
    try:
        video = cfg.path("video_root_25fps") / f"{raw.stem}.mp4"
        if video.is_file():
            report.skipped_steps.append("25fps")
        else:
            _to_25fps(raw, video)
        clip_root = cfg.path("video_audio_clip_root")
        clips = sorted(clip_root.glob(f"clip[0-9][0-9][0-9]_{raw.stem}.mp4"))
        if clips:
            report.skipped_steps.append("split")
        else:
            _split(video, clip_root, cfg.clip_len_second)
            clips = sorted(clip_root.glob(f"clip[0-9][0-9][0-9]_{raw.stem}.mp4"))
        report.clips = len(clips)
        detector = None
        for clip in clips:
            wav = clip.with_suffix(".wav")
            meta = cfg.path("meta_root") / f"{clip.stem}.json"
            if wav.is_file() and meta.is_file():
                report.valid_metas += bool(json.loads(meta.read_text(encoding="utf-8")).get("isvalid"))
                continue
            report.new_clips += 1
            if not wav.is_file():
                _wav(clip, wav)
            if detector is None:
                detector = make_detector(cfg.detector)
            record = _meta(clip, wav, detector)
            tmp = _tmp(meta)
            tmp.write_text(json.dumps(record), encoding="utf-8")
            os.replace(tmp, meta)
            report.valid_metas += bool(record["isvalid"])
    except Exception as exc:  # one bad video must not stop the others; the summary names it
        report.error = f"{type(exc).__name__}: {exc}".strip()
    return report


def write_lists(cfg: PreprocessConfig, videos: Sequence[Path]) -> tuple[int, int]:
    """video_file_list and the train/val lists of meta file names; returns (n_train, n_val)."""
    metas = sorted(p.name for p in cfg.path("meta_root").glob("*.json"))
    val = [m for m in metas if any(v in m for v in cfg.val_list_hdtf)]
    train = [m for m in metas if m not in val]
    for key, lines in (
        ("video_file_list", [str(v) for v in videos]),
        ("video_clip_file_list_train", train),
        ("video_clip_file_list_val", val),
    ):
        path = cfg.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp(path)
        tmp.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
        os.replace(tmp, path)
    return len(train), len(val)


def build_parser() -> argparse.ArgumentParser:
    """The preprocess.py argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m scripts.preprocess", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/training/preprocess.yaml", help="preprocess YAML")
    parser.add_argument("--workers", type=int, help="videos in parallel (default: config workers)")
    parser.add_argument("--detector", choices=DETECTORS, help="face detector (default: config detector)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        cfg = load_preprocess_config(project_path(args.config), {"workers": args.workers, "detector": args.detector})
    except (OSError, ValueError, yaml.YAMLError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    raw_root = cfg.path("video_root_raw")
    raws = sorted(p for p in raw_root.glob("*") if p.suffix.lower() in VIDEO_SUFFIXES) if raw_root.is_dir() else []
    if not raws:
        print(f"error: no videos ({', '.join(VIDEO_SUFFIXES)}) in {raw_root}", file=sys.stderr)
        return 2
    for key in ("video_root_25fps", "video_audio_clip_root", "meta_root"):
        cfg.path(key).mkdir(parents=True, exist_ok=True)
    workers = cfg.workers or min(4, os.cpu_count() or 1)
    t0 = time.perf_counter()
    reports: list[VideoReport] = []
    with (
        ProcessPoolExecutor(max_workers=min(workers, len(raws))) as pool,
        tqdm(total=len(raws), desc="preprocess", unit="video", disable=args.quiet, dynamic_ncols=True) as bar,
    ):
        futures = {pool.submit(process_video, raw, cfg): raw for raw in raws}
        for future in as_completed(futures):
            reports.append(future.result())
            bar.update(1)
    reports.sort(key=lambda r: r.name)
    ok = [r for r in reports if not r.error]
    videos = [cfg.path("video_root_25fps") / f"{r.name}.mp4" for r in ok]
    n_train, n_val = write_lists(cfg, videos)
    lines = [
        f"{len(ok)}/{len(reports)} videos done in {time.perf_counter() - t0:.1f} s "
        f"({workers} workers, detector {cfg.detector}): {sum(r.clips for r in ok)} clips "
        f"({sum(r.new_clips for r in ok)} new, {sum(r.clips - r.new_clips for r in ok)} already done), "
        f"{sum(r.valid_metas for r in ok)} with a face in every frame; train {n_train}, val {n_val}",
    ]
    lines += [f"  FAILED {r.name}: {r.error}" for r in reports if r.error]
    print("\n".join(lines))
    return 1 if len(ok) < len(reports) else 0


if __name__ == "__main__":
    sys.exit(main())
