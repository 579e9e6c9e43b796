"""Objective realism figures of a talking-head video, printed as a table and written as JSON.

    python -m scripts.evaluate VIDEO [--audio WAV] [--avatar ID] [--clips concat_list.txt] [--json OUT]

VIDEO: any talking-head video (ours, upstream's, anyone's). --audio: the speech, when the video has no
audio track or another one. --avatar: use that prepared avatar's blend masks as the seam for
seam_flicker (default: MuseTalk's lower-face region). --clips: a session's concat_list.txt, for the pose
jump at each clip boundary. `syncnet` (LSE-C / LSE-D) is scored when models/syncnet/latentsync_syncnet.pt
exists (`make weights ARGS=--with-training`), else null. The keys and how to read them: docs/REALISM.md.
Exit codes: 0 done, 1 environment problem, 2 bad input.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from musetalk.cli import add_config_args, config_from_args, exit_code
from musetalk.errors import ConfigError, InputError, MuseTalkError


def _table(result: dict[str, Any]) -> str:
    lines = []
    for key, value in result.items():
        if key == "clip_joins" and isinstance(value, dict):
            text = f"{value['n']} join(s), largest jump {value['max_jump_px']:.2f} px"
        elif isinstance(value, dict):
            text = ", ".join(f"{k} {v}" for k, v in value.items())
        else:
            text = "n/a" if value is None else str(value)
        lines.append(f"{key:28s} {text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m scripts.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_args(parser)
    parser.add_argument("video", type=Path)
    parser.add_argument("--audio", type=Path, help="speech audio (default: the video's own audio track)")
    parser.add_argument("--avatar", help="prepared avatar id whose blend masks define the seam")
    parser.add_argument("--clips", type=Path, help="the session's concat_list.txt (clip boundaries)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from musetalk.avatar.store import load_avatar
    from musetalk.evaluation.report import avatar_blend_region, evaluate_media, read_clip_boundaries, read_media
    from musetalk.evaluation.sync import SyncNetScorer
    from musetalk.faces import make_detector
    from musetalk.models.bundle import load_models, missing_files

    try:
        for path in (args.video, args.audio, args.clips):
            if path is not None and not path.is_file():
                raise InputError(f"{path}: no such file")
        media = read_media(args.video, args.audio)
        region = avatar_blend_region(load_avatar(cfg, args.avatar, check=False)) if args.avatar else None
        bounds = read_clip_boundaries(args.clips) if args.clips else None
        sync = None
        if not missing_files(cfg.models, {"syncnet"}):
            net = load_models(cfg, parts={"syncnet"}).syncnet
            sync = SyncNetScorer(net) if net is not None else None
        result = evaluate_media(
            media,
            make_detector(cfg),
            clip_boundaries=bounds,
            blend_region=region,
            sync=sync,
            silence_db=cfg.audio.silence_threshold_db,
        )
    except MuseTalkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exit_code(exc)
    print(_table(result))
    if args.json is not None:
        from musetalk.avatar.store import write_json_atomic

        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.json, result)
        print(f"json: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
