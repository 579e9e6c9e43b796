"""Fetch MuseTalk weights into models/ (`make weights`), or check them offline (`--check`).

    python -m scripts.download_weights                 # core + v1 + prep + enhance
    python -m scripts.download_weights --groups core   # only what the server needs
    python -m scripts.download_weights --check         # offline: exit 1 listing what is missing

Idempotent (present files are kept), resumable (partial downloads continue), and it repairs the
nested `models/musetalkV15/musetalkV15/` layout older download scripts produced.
"""

from __future__ import annotations

import argparse
import sys

from musetalk.cli import add_config_args, config_from_args
from musetalk.errors import ConfigError
from musetalk.weights import DEFAULT_GROUPS, GROUPS, NetworkDownloader, check, fetch, human_size, select


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--groups", nargs="+", choices=GROUPS, default=list(DEFAULT_GROUPS))
    parser.add_argument("--with-training", action="store_true", help="also fetch SyncNet (training, evaluate)")
    parser.add_argument("--check", action="store_true", help="verify offline; exit 1 if anything is missing")
    parser.add_argument("--no-hash", action="store_true", help="with --check: skip checksum verification")
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    root = cfg.models.root()
    groups = list(args.groups) + (["training"] if args.with_training else [])

    if args.check:
        problems = check(root, groups, verify_hash=not args.no_hash)
        for wf in select(groups):
            path = root / wf.dest
            if path.is_file():
                print(f"  {wf.dest:55s} {human_size(path.stat().st_size):>9s}")
        if problems:
            print(f"\n{len(problems)} weight file(s) not usable under {root}:", file=sys.stderr)
            for wf, why in problems:
                print(f"  - {wf.dest}: {why}", file=sys.stderr)
            print("Fetch them with: make weights", file=sys.stderr)
            return 1
        print(f"all {len(select(groups))} files present under {root}")
        return 0

    failures = fetch(root, groups, NetworkDownloader(), report=print)
    if failures:
        print(f"\n{len(failures)} file(s) could not be fetched:", file=sys.stderr)
        for wf, why in failures:
            print(f"  - {wf.dest} ({wf.source()}): {why}", file=sys.stderr)
        print("Re-run `make weights` to resume.", file=sys.stderr)
        return 1
    print(f"done: {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
