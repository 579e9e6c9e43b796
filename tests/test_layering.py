"""Imports point down only: server → session → pipeline → avatar → models → config/errors/utils."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "musetalk"

# Lower number = lower layer. Plugins (tts, faces, enhance) sit beside models: leaves for the layers above.
RANKS = {
    "config": 0, "errors": 0, "types": 0, "utils": 0, "cli": 0, "weights": 0, "tasklists": 0,
    "models": 1, "testing": 1, "tts": 1, "faces": 1, "enhance": 1,
    "audio": 2, "avatar": 2,
    "pipeline": 3, "render": 3, "evaluation": 3,
    "session": 4,
    "server": 5,
}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_top_level_module_has_a_rank() -> None:
    names = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir() if not p.name.startswith("__")}
    names = {n for n in names if (PACKAGE / n).is_dir() or (PACKAGE / f"{n}.py").is_file()}
    assert names <= set(RANKS), f"give these a rank: {sorted(names - set(RANKS))}"


def test_no_upward_imports() -> None:
    bad = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        own = _layer(".".join(rel.parts))
        if own not in RANKS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("musetalk."):
                targets = [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("musetalk.")]
            else:
                continue
            for target in targets:
                layer = _layer(target)
                if layer in RANKS and RANKS[layer] > RANKS[own]:
                    bad.append(f"{rel}: imports {target}")
    assert not bad, "upward imports:\n" + "\n".join(bad)
