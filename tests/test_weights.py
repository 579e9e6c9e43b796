"""Weights fetcher: layout, idempotence, nested-layout repair and the offline --check, with a fake downloader."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from musetalk.weights import WEIGHT_FILES, WeightFile, check, fetch, repair_nested, select
from scripts import download_weights


class FakeDownloader:
    """Writes small files instead of downloading; records calls; can fail chosen files."""

    def __init__(self, fail: set[str] | None = None) -> None:
        self.calls: list[str] = []
        self.fail = fail or set()

    def _write(self, key: str, dest: Path) -> None:
        self.calls.append(key)
        if key in self.fail:
            raise ConnectionError("no route to host")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(_payload(key))

    def hub(self, repo: str, repo_file: str, dest: Path) -> None:
        self._write(f"{repo}/{repo_file}", dest)

    def url(self, url: str, dest: Path) -> None:
        self._write(url, dest)


def _payload(key: str) -> bytes:
    return f"weights of {key}".encode()


@pytest.fixture
def hashless(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake payloads cannot match real checksums: drop the prefixes for layout tests."""
    files = tuple(WeightFile(**{**wf.__dict__, "sha256_prefix": ""}) for wf in WEIGHT_FILES)
    monkeypatch.setattr("musetalk.weights.WEIGHT_FILES", files)


def test_fetch_writes_the_facts_layout_and_is_idempotent(tmp_path: Path, hashless: None) -> None:
    fake = FakeDownloader()
    assert fetch(tmp_path, ["core", "v1"], fake, report=lambda _: None) == []
    for rel in (
        "musetalkV15/unet.pth",
        "musetalkV15/musetalk.json",
        "musetalk/pytorch_model.bin",
        "sd-vae/diffusion_pytorch_model.bin",
        "whisper/preprocessor_config.json",
        "face-parse-bisent/79999_iter.pth",
    ):
        assert (tmp_path / rel).is_file(), rel
    assert not (tmp_path / "musetalkV15" / "musetalkV15").exists()
    assert "TMElyralab/MuseTalk/musetalkV15/unet.pth" in fake.calls
    again = FakeDownloader()
    assert fetch(tmp_path, ["core", "v1"], again, report=lambda _: None) == []
    assert again.calls == []  # nothing re-downloaded


def test_seed_omissions_are_in_the_list() -> None:
    dests = {wf.dest for wf in select(["core", "prep", "enhance"])}
    assert "face-parse-bisent/79999_iter.pth" in dests
    assert "face-alignment/checkpoints/s3fd-619a316812.pth" in dests
    assert "face-alignment/checkpoints/2DFAN4-cd938726ad.zip" in dests
    assert "gfpgan/GFPGANv1.4.pth" in dests
    assert all(wf.group != "training" for wf in select(["core", "v1", "prep", "enhance"]))


def test_nested_layout_is_repaired(tmp_path: Path, hashless: None) -> None:
    nested = tmp_path / "musetalkV15" / "musetalkV15"
    nested.mkdir(parents=True)
    (nested / "unet.pth").write_bytes(b"real weights")
    (nested / "musetalk.json").write_text("{}")
    fake = FakeDownloader()
    fetch(tmp_path, ["core"], fake, report=lambda _: None)
    assert (tmp_path / "musetalkV15" / "unet.pth").read_bytes() == b"real weights"
    assert not nested.exists()
    assert not any("musetalkV15/" in c for c in fake.calls)  # repaired files are not fetched again
    assert repair_nested(tmp_path) == []


def test_failures_are_reported_and_the_rest_continues(tmp_path: Path, hashless: None) -> None:
    fake = FakeDownloader(fail={"openai/whisper-tiny/pytorch_model.bin"})
    failures = fetch(tmp_path, ["core"], fake, report=lambda _: None)
    assert [wf.dest for wf, _ in failures] == ["whisper/pytorch_model.bin"]
    assert (tmp_path / "face-parse-bisent" / "79999_iter.pth").is_file()


def test_checksum_mismatch_is_detected_and_refetched(tmp_path: Path) -> None:
    wf = next(w for w in WEIGHT_FILES if w.sha256_prefix)
    (tmp_path / wf.dest).parent.mkdir(parents=True)
    (tmp_path / wf.dest).write_bytes(b"truncated")
    problems = dict((w.dest, p) for w, p in check(tmp_path, [wf.group]))
    assert "bad checksum" in problems[wf.dest]
    fake = FakeDownloader()
    fetch(tmp_path, [wf.group], fake, report=lambda _: None)
    assert wf.url in fake.calls
    assert not hashlib.sha256(_payload(wf.url)).hexdigest().startswith(wf.sha256_prefix)


def test_check_cli_exit_codes(tmp_path: Path, hashless: None, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--set", f"models.dir={tmp_path}", "--groups", "core", "--check"]
    assert download_weights.main(args) == 1
    err = capsys.readouterr().err
    assert "musetalkV15/unet.pth" in err and "whisper/pytorch_model.bin" in err and "make weights" in err
    fetch(tmp_path, ["core"], FakeDownloader(), report=lambda _: None)
    assert download_weights.main(args) == 0
    assert "all 8 files present" in capsys.readouterr().out


def test_every_missing_file_named_is_one_make_weights_fetches(tmp_path: Path) -> None:
    from musetalk.config import load_config
    from musetalk.models.bundle import ALL_PARTS, missing_files

    cfg = load_config(overrides=[f"models.dir={tmp_path}"])
    named = {p.relative_to(tmp_path).as_posix() for p in missing_files(cfg.models, ALL_PARTS)}
    fetched = {wf.dest for wf in WEIGHT_FILES}  # make weights (default groups) or download_weights --groups
    assert named and named <= fetched, named - fetched
