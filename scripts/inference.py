"""Upstream-style offline inference: for each task of a task file, a video and an audio file → one mp4.

    python -m scripts.inference                                   # configs/inference/test.yaml
    python -m scripts.inference --inference_config my.yaml --result_dir out/ --set runtime.device=cpu

The task file has upstream's format (configs/inference/test.yaml): task ids, each with `video_path`,
`audio_path`, optional `bbox_shift` (v1 only; v1.5 ignores it, as upstream) and optional
`result_name`. Output: `<result_dir>/<version>/<result_name or videostem_audiostem>.mp4`
(result_dir default: results/, version: models.version).

Unlike upstream, the video is prepared once into an avatar cache (prep.cache_dir, id = the video's
sanitised stem + a short hash, e.g. `yongen-1a2b3c4d`) and reused by later tasks and runs with the
same video; --force rebuilds it. Frames are resampled to the configured fps (25). A failing task is
reported and the next one runs.
Exit codes: 0 every task written, 1 some task failed or weights are missing, 2 bad arguments, config
or task file (nothing ran).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from musetalk.config import AppConfig, project_path
from musetalk.errors import ConfigError, MuseTalkError
from musetalk.tasklists import OfflineTask, load_offline_tasks
from scripts.realtime_inference import (
    Rendered,
    add_upstream_args,
    effective_bbox_shift,
    open_engine,
    prepare_or_load,
    render_clip,
    report_error,
    setup,
    task_file,
)

DEFAULT_TASKS = "configs/inference/test.yaml"
DEFAULT_RESULT_DIR = "results"


def run_offline(
    args: argparse.Namespace, cfg: AppConfig, tasks: dict[str, OfflineTask]
) -> tuple[list[Rendered], list[str]]:
    """Prepare and render every task; returns (written clips, failed task ids)."""
    result_dir = Path(args.result_dir).expanduser().resolve() if args.result_dir else project_path(DEFAULT_RESULT_DIR)
    out_dir = result_dir / cfg.models.version
    done: list[Rendered] = []
    failed: list[str] = []
    bundle, rti = open_engine(cfg)
    try:
        for task_id, task in tasks.items():
            shift = effective_bbox_shift(cfg, task.bbox_shift, task_id)
            avatar_id = task.avatar_id(shift)
            try:
                cache, note = prepare_or_load(
                    cfg, bundle, avatar_id, task.video(), shift, force=args.force, progress=not args.quiet
                )
                print(f"{task_id}: avatar {avatar_id} {note}", flush=True)
                clip = render_clip(rti, cache, task.audio(), out_dir / task.output_name(), 0, task_id, task_id)
            except (MuseTalkError, OSError) as exc:
                report_error(f"task {task_id}", exc)
                failed.append(task_id)
                continue
            done.append(clip)
            print(f"{task_id}: {clip.path}  ({clip.n_frames} frames, {clip.duration_s:.2f} s)", flush=True)
    finally:
        rti.close()
    return done, failed


def build_parser() -> argparse.ArgumentParser:
    """The inference argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m scripts.inference", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_upstream_args(
        parser, DEFAULT_TASKS, f"outputs go to <result_dir>/<version>/<name>.mp4 (default: {DEFAULT_RESULT_DIR})"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        cfg = setup(args)
        tasks = load_offline_tasks(task_file(args, DEFAULT_TASKS))  # a bad task file fails before models load
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        done, failed = run_offline(args, cfg, tasks)
    except MuseTalkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{len(done)} of {len(tasks)} task(s) written" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
