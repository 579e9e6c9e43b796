"""The list of weight files, where they go under models/, and how to fetch, repair and check them.

Runtime code never downloads: only `scripts/download_weights.py` (`make weights`) calls `fetch`.
"""

from __future__ import annotations

import logging
import os
import shutil
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from musetalk.utils.files import sha256_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightFile:
    """One file: its path under models/, its group, and where it comes from (a hub repo or a URL)."""

    dest: str
    group: str
    repo: str = ""
    repo_file: str = ""
    url: str = ""
    sha256_prefix: str = ""  # torch-hub style names embed the first hex digits of the SHA-256

    def source(self) -> str:
        """Human-readable origin."""
        return f"hf://{self.repo}/{self.repo_file}" if self.repo else self.url


_MT = "TMElyralab/MuseTalk"
_FAN = "https://www.adrianbulat.com/downloads/python-fan"
_FACEXLIB = "https://github.com/xinntao/facexlib/releases/download"
_VAE = "stabilityai/sd-vae-ft-mse"

# Groups: core = what the server and force_prep need; v1 = the MuseTalk 1.0 UNet; prep = the
# face-alignment and DWPose landmark models; enhance = GFPGAN; training = SyncNet (not fetched
# unless asked). The seed's list had core + v1 + dwpose + syncnet + resnet18 but forgot 79999_iter.pth,
# the S3FD/FAN files face-alignment fetches at run time, and GFPGAN.
WEIGHT_FILES: tuple[WeightFile, ...] = (
    WeightFile("musetalkV15/musetalk.json", "core", _MT, "musetalkV15/musetalk.json"),
    WeightFile("musetalkV15/unet.pth", "core", _MT, "musetalkV15/unet.pth"),
    WeightFile("sd-vae/config.json", "core", _VAE, "config.json"),
    WeightFile("sd-vae/diffusion_pytorch_model.bin", "core", _VAE, "diffusion_pytorch_model.bin"),
    WeightFile("whisper/config.json", "core", "openai/whisper-tiny", "config.json"),
    WeightFile("whisper/pytorch_model.bin", "core", "openai/whisper-tiny", "pytorch_model.bin"),
    WeightFile("whisper/preprocessor_config.json", "core", "openai/whisper-tiny", "preprocessor_config.json"),
    # Upstream fetches this from Google Drive (id 154JgKpzCPW82qINcVieuPH3fZ2e0P812); a hub mirror is resumable.
    WeightFile("face-parse-bisent/79999_iter.pth", "core", "camenduru/MuseTalk", "face-parse-bisent/79999_iter.pth"),
    WeightFile("musetalk/musetalk.json", "v1", _MT, "musetalk/musetalk.json"),
    WeightFile("musetalk/pytorch_model.bin", "v1", _MT, "musetalk/pytorch_model.bin"),
    WeightFile("face-alignment/checkpoints/s3fd-619a316812.pth", "prep", url=f"{_FAN}/s3fd-619a316812.pth",
               sha256_prefix="619a316812"),
    WeightFile("face-alignment/checkpoints/2DFAN4-cd938726ad.zip", "prep", url=f"{_FAN}/2DFAN4-cd938726ad.zip",
               sha256_prefix="cd938726ad"),
    WeightFile("dwpose/dw-ll_ucoco_384.pth", "prep", "yzd-v/DWPose", "dw-ll_ucoco_384.pth"),
    WeightFile("face-parse-bisent/resnet18-5c106cde.pth", "prep",
               url="https://download.pytorch.org/models/resnet18-5c106cde.pth", sha256_prefix="5c106cde"),
    WeightFile("gfpgan/GFPGANv1.4.pth", "enhance",
               url="https://github.com/TencentARC/GFPGAN/releases/download/v1.3.0/GFPGANv1.4.pth"),
    WeightFile("gfpgan/detection_Resnet50_Final.pth", "enhance",
               url=f"{_FACEXLIB}/v0.1.0/detection_Resnet50_Final.pth"),
    WeightFile("gfpgan/parsing_parsenet.pth", "enhance", url=f"{_FACEXLIB}/v0.2.2/parsing_parsenet.pth"),
    WeightFile("syncnet/latentsync_syncnet.pt", "training", "ByteDance/LatentSync", "latentsync_syncnet.pt"),
)
GROUPS = ("core", "v1", "prep", "enhance", "training")
DEFAULT_GROUPS = ("core", "v1", "prep", "enhance")


class Downloader(Protocol):
    """Fetches one file to an exact destination path (resuming where it can)."""

    def hub(self, repo: str, repo_file: str, dest: Path) -> None:
        """Download `repo_file` of hub repo `repo` to `dest`."""

    def url(self, url: str, dest: Path) -> None:
        """Download `url` to `dest`."""


class NetworkDownloader:
    """huggingface_hub for hub files (it resumes itself); HTTP Range requests for plain URLs."""

    def hub(self, repo: str, repo_file: str, dest: Path) -> None:
        """hf_hub_download into a staging dir next to dest, then move into place."""
        from huggingface_hub import hf_hub_download

        staging = dest.parent / ".hub-staging"
        got = Path(hf_hub_download(repo_id=repo, filename=repo_file, local_dir=str(staging)))
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(got, dest)
        shutil.rmtree(staging, ignore_errors=True)

    def url(self, url: str, dest: Path) -> None:
        """Stream to dest.part, resuming from its size; rename when complete."""
        part = dest.with_name(dest.name + ".part")
        dest.parent.mkdir(parents=True, exist_ok=True)
        start = part.stat().st_size if part.exists() else 0
        req = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
        with urllib.request.urlopen(req, timeout=60) as resp:
            mode = "ab" if start and resp.status == 206 else "wb"
            with part.open(mode) as fh:
                shutil.copyfileobj(resp, fh, length=1 << 20)
        os.replace(part, dest)


def select(groups: Iterable[str]) -> list[WeightFile]:
    """Files of the given groups, in list order."""
    wanted = set(groups)
    unknown = wanted - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown weight groups {sorted(unknown)}; choose from {list(GROUPS)}")
    return [f for f in WEIGHT_FILES if f.group in wanted]


def file_problem(root: Path, wf: WeightFile, verify_hash: bool = True) -> str | None:
    """Why `wf` is not usable under `root` ('missing', 'empty', 'bad checksum'), or None if fine."""
    path = root / wf.dest
    if not path.is_file():
        return "missing"
    if path.stat().st_size == 0:
        return "empty"
    if verify_hash and wf.sha256_prefix and not sha256_file(path).startswith(wf.sha256_prefix):
        return f"bad checksum (expected sha256 {wf.sha256_prefix}…)"
    return None


def repair_nested(root: Path) -> list[str]:
    """Undo `<root>/X/X/...` nesting (the seed's `--local-dir models/musetalkV15` bug); returns moves made."""
    moves: list[str] = []
    if not root.is_dir():
        return moves
    for outer in sorted(p for p in root.iterdir() if p.is_dir()):
        nested = outer / outer.name
        if not nested.is_dir():
            continue
        for item in sorted(nested.iterdir()):
            target = outer / item.name
            if target.exists():
                log.warning("not moving %s: %s already exists", item, target)
                continue
            os.replace(item, target)
            moves.append(f"{item.relative_to(root)} -> {target.relative_to(root)}")
        if not any(nested.iterdir()):
            nested.rmdir()
    return moves


def human_size(n_bytes: int) -> str:
    """1536 → '1.5 KB'."""
    size = float(n_bytes)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def check(root: Path, groups: Iterable[str], verify_hash: bool = True) -> list[tuple[WeightFile, str]]:
    """Offline check: (file, problem) for every selected file that is not usable."""
    return [(wf, p) for wf in select(groups) if (p := file_problem(root, wf, verify_hash)) is not None]


def fetch(
    root: Path,
    groups: Iterable[str],
    downloader: Downloader,
    report: Callable[[str], None] = log.info,
) -> list[tuple[WeightFile, str]]:
    """Repair nesting, download what is missing or broken, verify; returns files that still fail."""
    for move in repair_nested(root):
        report(f"repaired nested layout: {move}")
    failures: list[tuple[WeightFile, str]] = []
    for wf in select(groups):
        dest = root / wf.dest
        problem = file_problem(root, wf)
        if problem is None:
            report(f"ok       {wf.dest} ({human_size(dest.stat().st_size)}, already present)")
            continue
        if problem != "missing":
            dest.unlink()
        report(f"fetching {wf.dest} from {wf.source()}")
        try:
            if wf.repo:
                downloader.hub(wf.repo, wf.repo_file, dest)
            else:
                downloader.url(wf.url, dest)
        except Exception as exc:  # network errors of any library: record, keep going with the rest
            failures.append((wf, f"download failed: {type(exc).__name__}: {exc}"))
            report(f"FAILED   {wf.dest}: {exc}")
            continue
        problem = file_problem(root, wf)
        if problem is not None:
            failures.append((wf, problem))
            report(f"FAILED   {wf.dest}: {problem}")
        else:
            report(f"ok       {wf.dest} ({human_size(dest.stat().st_size)})")
    return failures
