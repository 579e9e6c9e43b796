"""Contact sheet of a session video: evenly spaced frames, tiled with their timestamps.

    python -m scripts.contact_sheet [--video results/full_session.mp4] [--out docs/demo-contact-sheet.png]
        [--first 0] [--last 300] [--cols 4] [--rows 3] [--tile-px 256]

Tiles are spread evenly over frames first…last (the whole video by default); with cols × rows at least
the number of frames in that range, every frame is shown, each labelled with its frame number.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import av
import cv2
import numpy as np

from musetalk.config import project_path


def contact_sheet(
    video: Path,
    out: Path,
    cols: int = 4,
    rows: int = 3,
    tile_px: int = 256,
    first: int = 0,
    last: int | None = None,
) -> Path:
    """Write a cols×rows grid of frames spread over frames first…last (default: all); returns `out`."""
    with av.open(str(video)) as container:
        frames = [f.to_ndarray(format="bgr24") for f in container.decode(video=0)]
        fps = float(container.streams.video[0].average_rate or 25)
    end = len(frames) - 1 if last is None else min(last, len(frames) - 1)
    if not 0 <= first <= end:
        raise ValueError(f"frames {first}…{last} are outside the video's {len(frames)} frames")
    n_range = end - first + 1
    if cols * rows >= n_range:
        picks = np.arange(first, end + 1)
    else:
        picks = np.linspace(first, end, cols * rows).round().astype(int)
    tiles = []
    scale = tile_px / 256
    for idx in picks:
        tile = cv2.resize(frames[idx], (tile_px, tile_px), interpolation=cv2.INTER_AREA)
        label = f"{idx / fps:5.2f} s" if last is None and first == 0 else f"#{idx}"
        cv2.putText(
            tile, label, (int(8 * scale), tile_px - int(10 * scale)), cv2.FONT_HERSHEY_SIMPLEX,
            0.55 * max(scale, 0.6), (255, 255, 255), max(1, int(2 * scale)),
        )  # fmt: skip
        tiles.append(tile)
    tiles += [np.zeros_like(tiles[0])] * (cols * rows - len(tiles))
    grid = np.vstack([np.hstack(tiles[r * cols : (r + 1) * cols]) for r in range(rows)])
    out.parent.mkdir(parents=True, exist_ok=True)
    # JPEG at quality 80 keeps a sheet of hundreds of frames small enough for a repository.
    params = [cv2.IMWRITE_JPEG_QUALITY, 80] if out.suffix.lower() in (".jpg", ".jpeg") else []
    cv2.imwrite(str(out), grid, params)
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", type=Path, default=Path("results/full_session.mp4"))
    parser.add_argument("--out", type=Path, default=Path("docs/demo-contact-sheet.png"))
    parser.add_argument("--first", type=int, default=0, help="first frame of the range")
    parser.add_argument("--last", type=int, help="last frame of the range (default: the video's last)")
    parser.add_argument("--cols", type=int, default=4)
    parser.add_argument("--rows", type=int, default=3)
    parser.add_argument("--tile-px", type=int, default=256)
    args = parser.parse_args(argv)
    video = project_path(args.video)
    if not video.is_file():
        print(f"error: {video} does not exist (run `make demo` first)", file=sys.stderr)
        return 2
    try:
        sheet = contact_sheet(video, project_path(args.out), args.cols, args.rows, args.tile_px, args.first, args.last)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(sheet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
