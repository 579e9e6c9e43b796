"""Config loading: defaults, overrides, and errors that name the dotted key."""

from __future__ import annotations

from pathlib import Path

import pytest

from musetalk.config import DEFAULT_CONFIG, PROJECT_ROOT, load_config, project_path, with_overrides
from musetalk.errors import ConfigError


def test_default_config_loads_with_seed_keys() -> None:
    cfg = load_config()
    assert cfg.avatar_id == "demo" and cfg.fps == 25 and cfg.batch_size >= 1
    assert cfg.blend.blend_mode == "feather" and cfg.stabilize.scale_lock_enabled
    assert cfg.stabilize.one_euro.min_cutoff > 0
    assert cfg.models.unet_files()[1] == PROJECT_ROOT / "models" / "musetalkV15" / "unet.pth"


def test_overrides_are_typed_and_nested() -> None:
    cfg = load_config(
        DEFAULT_CONFIG,
        ["blend.blend_mode=poisson", "batch_size=4", "stabilize.one_euro.beta=0.5", "models.version=v1"],
    )
    assert cfg.blend.blend_mode == "poisson"
    assert cfg.batch_size == 4 and isinstance(cfg.batch_size, int)
    assert cfg.stabilize.one_euro.beta == 0.5
    assert cfg.models.unet_files()[1].name == "pytorch_model.bin"


def test_config_is_frozen() -> None:
    cfg = load_config()
    with pytest.raises(Exception, match="frozen"):
        cfg.blend.blend_mode = "poisson"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("blend.blend_mode=sharp", "blend.blend_mode"),
        ("stabilize.one_euro.min_cutoff=-1", "stabilize.one_euro.min_cutoff"),
        ("batch_size=zero", "batch_size"),
        ("runtime.device=tpu", "runtime.device"),
        ("avatar_id=../etc", "avatar_id"),
        ("blend.no_such_key=1", "blend.no_such_key"),
        ("nonsense=1", "nonsense"),
    ],
)
def test_bad_values_and_unknown_keys_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(DEFAULT_CONFIG, [override])
    assert f": {key}:" in str(err.value)


def test_unknown_key_in_yaml_file_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("fps: 25\nprep:\n  extra_margin: 10\n  cheeks: 3\n")
    with pytest.raises(ConfigError, match=r"prep\.cheeks: unknown key"):
        load_config(path)


def test_bad_yaml_and_bad_override_syntax(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("fps: [25\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(DEFAULT_CONFIG, ["blend.blend_mode"])
    with pytest.raises(ConfigError, match="not a section"):
        load_config(DEFAULT_CONFIG, ["fps.x=1"])
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")


def test_with_overrides_and_paths() -> None:
    cfg = with_overrides(load_config(), ["runtime.device=cpu"])
    assert cfg.runtime.device == "cpu"
    assert project_path("/abs/x") == Path("/abs/x")
    assert project_path("models") == PROJECT_ROOT / "models"
