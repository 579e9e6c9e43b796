"""Upstream MuseTalk task files, parsed and checked before anything runs.

- realtime (`configs/inference/realtime.yaml`): avatar id → {preparation, bbox_shift, video_path,
  audio_clips: {clip name → audio path}}; each clip becomes `<clip name>.mp4`.
- offline (`configs/inference/test.yaml`): task id → {video_path, audio_path, bbox_shift?, result_name?}.

Relative paths are taken from the project folder, as in every config of this project (upstream ran
from the repository root, so its files mean the same). Unknown keys are errors that name the key.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from musetalk.config import ID_PATTERN, is_valid_id, project_path
from musetalk.errors import ConfigError

_NOT_ID_CHARS = re.compile(r"[^A-Za-z0-9_-]+")
_STEM_CHARS = 40  # leaves room for the hash suffix inside the 64-character id limit


class _Entry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RealtimeAvatar(_Entry):
    """One avatar of realtime.yaml: its source, whether to (re)prepare it, and the clips to render."""

    preparation: bool = True  # false: use the existing cache as it is (still prepared when there is none)
    bbox_shift: int | None = None  # px; models.version v1 only — v1.5 ignores it, as upstream does
    video_path: Path
    audio_clips: dict[str, Path] = {}

    @field_validator("audio_clips")
    @classmethod
    def _check_clip_names(cls, v: dict[str, Path]) -> dict[str, Path]:
        # The clip name becomes a file name: keep it to the id alphabet.
        bad = [name for name in v if not is_valid_id(str(name))]
        if bad:
            raise ValueError(f"clip names {bad} must match {ID_PATTERN} (they become <name>.mp4)")
        return v

    def video(self) -> Path:
        """The source video, resolved."""
        return project_path(self.video_path)

    def clips(self) -> list[tuple[str, Path]]:
        """(clip name, resolved audio path) in file order."""
        return [(str(name), project_path(path)) for name, path in self.audio_clips.items()]


class OfflineTask(_Entry):
    """One task of test.yaml: a video and an audio file → one mp4."""

    video_path: Path
    audio_path: Path
    bbox_shift: int | None = None  # px; models.version v1 only
    result_name: str | None = None  # output file name (".mp4" added when missing)

    @field_validator("result_name")
    @classmethod
    def _check_result_name(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v.strip() or "/" in v or "\\" in v or v in (".", "..") or "\0" in v:
            raise ValueError("must be a plain file name (no folders)")
        return v

    def video(self) -> Path:
        """The source video, resolved."""
        return project_path(self.video_path)

    def audio(self) -> Path:
        """The audio file, resolved."""
        return project_path(self.audio_path)

    def output_name(self) -> str:
        """`result_name`, else upstream's `<video stem>_<audio stem>`; always ending in .mp4."""
        name = self.result_name or f"{self.video_path.stem}_{self.audio_path.stem}"
        return name if name.lower().endswith(".mp4") else f"{name}.mp4"

    def avatar_id(self, bbox_shift: int) -> str:
        """Cache id for this task's video: the sanitised stem + a hash of the resolved path and shift.

        The hash keeps two videos with the same file name (or the same video at two bbox shifts) in
        separate caches, and keeps tasks from rebuilding a hand-named avatar such as `demo`.
        """
        stem = _NOT_ID_CHARS.sub("_", self.video_path.stem).strip("_")[:_STEM_CHARS] or "video"
        digest = hashlib.sha1(f"{self.video()}|{bbox_shift}".encode()).hexdigest()[:8]
        return f"{stem}-{digest}"


E = TypeVar("E", bound=_Entry)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: no such task file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path.name}: not valid YAML: {exc}") from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{path.name}: expected a mapping of task ids to tasks, found {type(data).__name__}")
    return data


def _parse(path: Path, kind: type[E], ids_are_names: bool) -> dict[str, E]:
    data = _read_yaml(path)
    out: dict[str, E] = {}
    errors: list[str] = []
    for key, body in data.items():
        task_id = str(key)
        if ids_are_names and not is_valid_id(task_id):
            errors.append(f"{path.name}: {task_id}: id must match {ID_PATTERN}")
            continue
        if not isinstance(body, dict):
            errors.append(f"{path.name}: {task_id}: expected a mapping, found {type(body).__name__}")
            continue
        try:
            out[task_id] = kind.model_validate(body)
        except ValidationError as exc:
            for err in exc.errors():
                where = ".".join(str(p) for p in (task_id, *err["loc"]))
                msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
                errors.append(f"{path.name}: {where}: {msg}")
    if errors:
        raise ConfigError("\n".join(errors))
    return out


def load_realtime_tasks(path: Path | str) -> dict[str, RealtimeAvatar]:
    """Parse an upstream realtime.yaml: avatar id → RealtimeAvatar (ConfigError names the bad key)."""
    return _parse(Path(path), RealtimeAvatar, ids_are_names=True)  # the id names the cache folder


def load_offline_tasks(path: Path | str) -> dict[str, OfflineTask]:
    """Parse an upstream test.yaml: task id → OfflineTask (ConfigError names the bad key)."""
    return _parse(Path(path), OfflineTask, ids_are_names=False)
