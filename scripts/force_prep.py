"""Prepare an avatar once: frames, landmarks, stabilised boxes, VAE latents, blend masks.

    python -m scripts.force_prep --avatar-id demo --video data/video/demo.mp4
    python -m scripts.force_prep --avatar-id me --video me.jpg --bbox-shift -5 --force
    python -m scripts.force_prep --set prep.detector=dlib --set runtime.device=cuda

Any video container and frame rate (resampled to the configured fps), or a single photo (a still
avatar). The cache goes to results/avatars/<id>/ (prep.cache_dir). A re-run with the same source,
bbox shift, config and models reuses the cache; --force rebuilds it. A --video other than the config's
video_path for the config's avatar id (default "demo") is refused unless --force: use --avatar-id.
Exit codes: 0 done, 1 environment problem (missing weights/plugin), 2 bad input or config.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from musetalk.cli import add_config_args, config_from_args, exit_code
from musetalk.config import AppConfig, project_path, with_overrides
from musetalk.errors import ConfigError, MuseTalkError
from musetalk.weights import human_size


def build_parser() -> argparse.ArgumentParser:
    """The force_prep argument parser (defaults come from the config)."""
    parser = argparse.ArgumentParser(
        prog="python -m scripts.force_prep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_args(parser)
    parser.add_argument("--avatar-id", help="cache name: results/avatars/<id>/ (default: config avatar_id)")
    parser.add_argument("--video", help="source video or photo (default: config video_path)")
    parser.add_argument(
        "--bbox-shift", type=int, help="px to move the mask boundary, + = down (default: config bbox_shift)"
    )
    parser.add_argument(
        "--face", help="whom to track when several faces show: largest, center or N (N-th from the left, 0-based)"
    )
    parser.add_argument(
        "--allow-gaps", action="store_true", help="accept a video where over 20 %% of the frames have no trackable face"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even when an up-to-date cache exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each step decides")
    return parser


def _summary(result: object) -> str:
    from musetalk.avatar.prep import STAGES, PrepResult

    assert isinstance(result, PrepResult)
    if result.reused:
        return (
            f"avatar {result.avatar_id}: cache up to date, reused ({result.n_frames} frames, "
            f"{human_size(result.cache_bytes)}) at {result.root}\n(use --force to rebuild)"
        )
    lines = [
        f"avatar {result.avatar_id}: {result.n_frames} frames at {result.fps} fps, "
        f"{result.size_hw[1]}x{result.size_hw[0]}, detector {result.detector}, parser {result.parser}"
        + ("" if result.latents else ", PREVIEW ONLY (no VAE latents)"),
    ]
    t = result.tracking
    if t:
        lines.append(
            f"  face track: {t['n_detected']} frame(s) detected, {t['n_rejected']} rejected, "
            f"{t['n_interpolated']} interpolated; largest jump {100 * t['max_jump_ratio']:.1f} % of the face width "
            f"(stabilised box: {100 * t['max_box_jump_ratio']:.1f} %); {t['n_faces']} face(s) seen"
        )
    for stage in STAGES:
        if stage in result.seconds:
            s = result.seconds[stage]
            lines.append(f"  {stage:8s} {s:7.2f} s  {result.frames_per_s(stage):8.1f} frames/s")
    lines.append(f"  total    {sum(result.seconds.values()):7.2f} s")
    lines.append(f"cache: {human_size(result.cache_bytes)} at {result.root}")
    return "\n".join(lines)


def _source_mismatch(configured: AppConfig, avatar_id: str, video: Path | None) -> str | None:
    """Why preparing `avatar_id` from `video` would contradict the config's video_path for that id, or None."""
    if video is None or avatar_id != configured.avatar_id:
        return None  # only the configured avatar id has a configured source
    expected = project_path(configured.video_path).resolve()
    if video == expected:
        return None
    return (
        f"avatar {avatar_id!r} is configured with video_path {configured.video_path} but --video is {video}; "
        f"pass --avatar-id NEW_NAME to prepare another avatar, or --force to replace {avatar_id!r} anyway "
        "(the server will then warn that its cache does not come from video_path)"
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    overrides = list(args.overrides)
    if args.bbox_shift is not None:
        overrides.append(f"bbox_shift={args.bbox_shift}")
    if args.face is not None:
        overrides.append(f"prep.face={args.face}")
    try:
        configured = config_from_args(argparse.Namespace(config=args.config, overrides=overrides))
        cfg = with_overrides(configured, [f"avatar_id={args.avatar_id}"]) if args.avatar_id else configured
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # A --video on the command line is relative to where the user is, not to the project.
    video = Path(args.video).expanduser().resolve() if args.video else None
    mismatch = _source_mismatch(configured, cfg.avatar_id, video)
    if mismatch and not args.force:
        print(f"error: {mismatch}", file=sys.stderr)
        return 2

    from musetalk.avatar.prep import prepare_avatar

    try:
        result = prepare_avatar(cfg, video=video, force=args.force, progress=not args.quiet, allow_gaps=args.allow_gaps)
    except MuseTalkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exit_code(exc)
    print(_summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
