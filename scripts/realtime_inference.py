"""Upstream-style real-time inference: prepare each avatar of a task file once, then render its audio clips.

    python -m scripts.realtime_inference                          # configs/inference/realtime.yaml
    python -m scripts.realtime_inference --inference_config my.yaml --result_dir out/ --force
    python -m scripts.realtime_inference --set runtime.device=cpu --version v1

The task file has upstream's format (configs/inference/realtime.yaml): avatar ids, each with
`preparation`, `bbox_shift` (v1 only; v1.5 ignores it, as upstream), `video_path` and `audio_clips`
(clip name → audio file). Each clip is written to `<result_dir>/<avatar_id>/vid_output/<clip>.mp4`;
the default result_dir is the avatar cache folder (prep.cache_dir, results/avatars/), so clips land
next to their cache, as upstream's did. Rebuilding a cache (--force, or a changed source) drops the
vid_output/ inside it, as upstream's re-create did.

Differences from upstream: no interactive prompts — an up-to-date cache is reused, a changed one is
rebuilt, --force always rebuilds; `preparation: false` uses the cache as it is (and prepares one only
when there is none); the avatar keeps moving across the clips of one avatar (each clip starts where
the previous one stopped, no head jump); the last frame is not dropped; models load once for all avatars.
Exit codes: 0 every clip written, 1 some avatar or clip failed or weights are missing, 2 bad arguments,
config or task file (nothing ran).
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from musetalk.avatar import AvatarCache, load_avatar, prepare_avatar
from musetalk.avatar.store import cache_root
from musetalk.cli import add_config_args, config_from_args
from musetalk.config import AppConfig, project_path
from musetalk.errors import AvatarCacheStale, AvatarNotPrepared, ConfigError, InputError, MuseTalkError
from musetalk.models import ModelBundle, load_models
from musetalk.tasklists import RealtimeAvatar, load_realtime_tasks
from scripts.warm_api import RealTimeInference

log = logging.getLogger("scripts.realtime_inference")

DEFAULT_TASKS = "configs/inference/realtime.yaml"


@dataclass(frozen=True)
class Rendered:
    """One written clip and the avatar cycle positions it covered."""

    task: str
    name: str
    path: Path
    n_frames: int
    duration_s: float
    cursor: int  # cycle position of the clip's first frame
    next_cursor: int  # where the next clip of the same avatar starts


def add_upstream_args(parser: argparse.ArgumentParser, default_tasks: str, result_help: str) -> None:
    """The options both upstream-style scripts share (upstream spellings, and dashed aliases)."""
    add_config_args(parser)
    parser.add_argument(
        "--inference_config",
        "--inference-config",
        dest="inference_config",
        default=None,
        help=f"upstream task file (default: {default_tasks}); paths inside it are relative to the project folder",
    )
    parser.add_argument("--result_dir", "--result-dir", dest="result_dir", default=None, help=result_help)
    parser.add_argument(
        "--version", choices=("v15", "v1"), default=None, help="MuseTalk UNet version (= --set models.version=...)"
    )
    parser.add_argument("--force", action="store_true", help="rebuild the avatar caches even when up to date")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each step decides")


def setup(args: argparse.Namespace) -> AppConfig:
    """Logging and the app config from --config/--set/--version (ConfigError on bad values)."""
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    overrides = list(args.overrides)
    if args.version is not None:
        overrides.append(f"models.version={args.version}")
    return config_from_args(argparse.Namespace(config=args.config, overrides=overrides))


def task_file(args: argparse.Namespace, default_tasks: str) -> Path:
    """The --inference_config path: the default is the project's, a given one is relative to the cwd."""
    if args.inference_config is None:
        return project_path(default_tasks)
    return Path(args.inference_config).expanduser().resolve()


def effective_bbox_shift(cfg: AppConfig, task_shift: int | None, where: str) -> int:
    """The task's bbox_shift for v1; v1.5 ignores it, as upstream does (cfg.bbox_shift still applies)."""
    if task_shift is None:
        return cfg.bbox_shift
    if cfg.models.version == "v1":
        return task_shift
    if task_shift != cfg.bbox_shift:
        log.warning(
            "%s: bbox_shift %d ignored with MuseTalk v1.5 (as upstream); --set bbox_shift=N applies one anyway",
            where,
            task_shift,
        )
    return cfg.bbox_shift


def prepare_or_load(
    cfg: AppConfig,
    bundle: ModelBundle,
    avatar_id: str,
    video: Path,
    bbox_shift: int,
    *,
    preparation: bool = True,
    force: bool = False,
    progress: bool = False,
) -> tuple[AvatarCache, str]:
    """The avatar's cache, built first when asked or missing; returns (cache, what happened)."""
    if not preparation and not force:
        try:
            return load_avatar(cfg, avatar_id), "loaded from its cache (preparation: false)"
        except AvatarCacheStale as exc:
            raise AvatarCacheStale(f"{exc} — or set preparation: true in the task file, or pass --force") from exc
        except AvatarNotPrepared:
            log.info("avatar %s: no cache yet, preparing it although preparation is false", avatar_id)
    result = prepare_avatar(
        cfg, avatar_id, video, bbox_shift=bbox_shift, force=force, progress=progress, vae_bundle=bundle
    )
    if result.reused:
        note = f"cache up to date, reused ({result.n_frames} frames)"
    else:
        note = f"prepared ({result.n_frames} frames in {sum(result.seconds.values()):.1f} s)"
    return load_avatar(cfg, avatar_id), note


def render_clip(
    rti: RealTimeInference, cache: AvatarCache, audio: Path, out_path: Path, cursor: int, task: str, name: str
) -> Rendered:
    """Render one audio file as `out_path` starting at `cursor`; only the mp4 is kept."""
    wav_path = out_path.with_suffix(".wav")  # the engine writes the clip's PCM audio beside it
    if wav_path.resolve() == audio.resolve():
        raise InputError(f"output {out_path} would overwrite its own input audio {audio}; choose another result_dir")
    clip, next_cursor = rti.run(audio, avatar=cache, out_path=out_path, cursor=cursor)
    if clip.audio_path is not None:
        clip.audio_path.unlink(missing_ok=True)  # used for session stitching; upstream outputs are mp4 only
    return Rendered(task, name, clip.path, clip.n_frames, clip.duration_s, cursor, next_cursor)


def open_engine(cfg: AppConfig) -> tuple[ModelBundle, RealTimeInference]:
    """Load the models once (WeightsMissing lists what is absent) and warm the engine up."""
    bundle = load_models(cfg)
    return bundle, RealTimeInference.from_config(cfg, bundle=bundle)


def report_error(what: str, exc: BaseException) -> None:
    """One `error:` block on stderr for a failed task or clip."""
    print(f"error: {what}: {exc}", file=sys.stderr)


def run_realtime(
    args: argparse.Namespace, cfg: AppConfig, tasks: dict[str, RealtimeAvatar]
) -> tuple[list[Rendered], list[str]]:
    """Prepare every avatar and render its clips; returns (written clips, failed avatar/clip names)."""
    out_root = Path(args.result_dir).expanduser().resolve() if args.result_dir else cache_root(cfg)
    done: list[Rendered] = []
    failed: list[str] = []
    bundle, rti = open_engine(cfg)
    try:
        for avatar_id, task in tasks.items():
            shift = effective_bbox_shift(cfg, task.bbox_shift, avatar_id)
            try:
                cache, note = prepare_or_load(
                    cfg, bundle, avatar_id, task.video(), shift,
                    preparation=task.preparation, force=args.force, progress=not args.quiet,
                )  # fmt: skip
            except MuseTalkError as exc:
                report_error(f"avatar {avatar_id}", exc)
                failed.extend(f"{avatar_id}/{name}" for name, _ in task.clips())
                continue
            print(f"avatar {avatar_id}: {note}", flush=True)
            cursor = 0  # each avatar starts its cycle at the first frame; its clips continue from there
            for name, audio in task.clips():
                out_path = out_root / avatar_id / "vid_output" / f"{name}.mp4"
                try:
                    clip = render_clip(rti, cache, audio, out_path, cursor, avatar_id, name)
                except (MuseTalkError, OSError) as exc:
                    report_error(f"{avatar_id}/{name}", exc)
                    failed.append(f"{avatar_id}/{name}")
                    continue
                done.append(clip)
                cursor = clip.next_cursor
                print(
                    f"  {name}: {clip.path}  ({clip.n_frames} frames, {clip.duration_s:.2f} s; "
                    f"cursor {clip.cursor} -> {clip.next_cursor})",
                    flush=True,
                )
    finally:
        rti.close()
    return done, failed


def build_parser() -> argparse.ArgumentParser:
    """The realtime_inference argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m scripts.realtime_inference",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_upstream_args(
        parser,
        DEFAULT_TASKS,
        "clips go to <result_dir>/<avatar_id>/vid_output/<clip>.mp4 (default: prep.cache_dir, results/avatars)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        cfg = setup(args)
        tasks = load_realtime_tasks(task_file(args, DEFAULT_TASKS))  # a bad task file fails before models load
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        done, failed = run_realtime(args, cfg, tasks)
    except MuseTalkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{len(done)} clip(s) written" + (f", {len(failed)} failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
