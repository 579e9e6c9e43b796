"""The README and docs/ only point at things that exist: relative links and the repo files they name."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from musetalk.config import PROJECT_ROOT

DOCS = [PROJECT_ROOT / "README.md", *sorted((PROJECT_ROOT / "docs").glob("*.md"))]
# Files the docs name that the code writes at run time (outputs, caches, logs) or the user supplies.
GENERATED_PREFIXES = ("results/", "logs/", "data/", "models/", "tests/artifacts/", "/", "~", ".venv/")
# Code, docs, configs and images; not .txt/.json/.mp4, which the docs mostly name as outputs the code writes.
CHECKED_SUFFIXES = (".py", ".md", ".yaml", ".sh", ".js", ".css", ".html", ".png", ".toml")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_CODE = re.compile(r"`([^`\s]+)`")


def _repo_files() -> set[str]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return set(out.stdout.split())


def _named_files(text: str) -> list[str]:
    names = []
    for token in _CODE.findall(text):
        token = token.split("::", 1)[0].rstrip(".,:;")  # tests/test_x.py::test_y
        if token.startswith(GENERATED_PREFIXES) or any(c in token for c in "<>*{}$=|"):
            continue
        if token.endswith(CHECKED_SUFFIXES) and re.fullmatch(r"[\w./-]+", token):
            names.append(token)
    return names


def test_relative_links_resolve() -> None:
    broken = []
    for doc in DOCS:
        for target in _LINK.findall(doc.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = (doc.parent / target.split("#", 1)[0]).resolve()
            if not path.exists():
                broken.append(f"{doc.name}: {target}")
    assert not broken, broken


def test_named_repo_files_exist() -> None:
    files = _repo_files()
    basenames = {Path(f).name for f in files}
    missing = []
    for doc in DOCS:
        for name in _named_files(doc.read_text(encoding="utf-8")):
            # a repo path, a folder, or a path inside the package ("pipeline/audio.py" for musetalk/pipeline/...)
            exists = name in files or any(f.startswith(name + "/") or f.endswith("/" + name) for f in files)
            if "/" not in name:
                exists = exists or name in basenames
            elif not exists:  # relative to the doc's own folder (docs/...)
                rel = (doc.parent / name).resolve()
                exists = rel.exists()
            if not exists:
                missing.append(f"{doc.relative_to(PROJECT_ROOT)}: {name}")
    assert not missing, missing
