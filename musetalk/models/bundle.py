"""`load_models(cfg)`: the one door to the weights. Checks every file first, then loads once."""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch

from musetalk.config import AppConfig, ModelsConfig
from musetalk.errors import ConfigError, WeightsMissing
from musetalk.models.bisenet import BiSeNet, load_bisenet
from musetalk.models.gfpgan import GFPGANv1Clean, load_gfpgan
from musetalk.models.nets_unet import UNet2DCondition
from musetalk.models.nets_vae import AutoencoderKL
from musetalk.models.nets_whisper import WhisperEncoder, WhisperFeatures
from musetalk.models.syncnet import SyncNet, load_syncnet
from musetalk.models.unet import PositionalEncoding, load_unet
from musetalk.models.vae import VAE_WEIGHT_NAMES, load_vae, vae_weights_file
from musetalk.models.whisper import WHISPER_FILES, WHISPER_WEIGHT_NAMES, load_whisper_encoder, whisper_weights_file
from musetalk.weights import WEIGHT_FILES

log = logging.getLogger(__name__)

SERVE_PARTS = frozenset({"unet", "vae", "whisper"})
ALL_PARTS = frozenset({"unet", "vae", "whisper", "face_parser", "gfpgan", "syncnet"})


@dataclass(frozen=True)
class ModelBundle:
    """Loaded, read-only models on one device and dtype; absent parts are None."""

    device: torch.device
    dtype: torch.dtype
    unet: UNet2DCondition | None
    vae: AutoencoderKL | None
    whisper: WhisperEncoder | None
    feature_extractor: WhisperFeatures | None
    pe: PositionalEncoding | None
    face_parser: BiSeNet | None
    version: str
    gfpgan: GFPGANv1Clean | None = None  # face restoration (enhance.py, the optional enhance stage)
    syncnet: SyncNet | None = None  # lip-sync scorer for the evaluator (float32, never on the serving path)

    @property
    def vae_scale(self) -> float:
        """Latent scaling factor from the VAE config (0.18215 for sd-vae-ft-mse)."""
        assert self.vae is not None
        return self.vae.scaling_factor

    @property
    def audio_layers(self) -> int:
        """Hidden states stacked per encoder frame: encoder layers + the embedding output."""
        assert self.whisper is not None
        return self.whisper.config.encoder_layers + 1

    @property
    def audio_dim(self) -> int:
        """Audio token width (Whisper d_model; 384 for whisper-tiny)."""
        assert self.whisper is not None
        return self.whisper.config.d_model


def resolve_device(name: str) -> torch.device:
    """'auto' → cuda when available, else cpu; an explicit cuda without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"runtime.device: {name!r} requested but no CUDA GPU is available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' → float16 on CUDA, float32 on CPU (CPU half precision is slow and inexact)."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def required_files(models: ModelsConfig, parts: Collection[str] = SERVE_PARTS) -> list[tuple[Path, ...]]:
    """Each entry is a set of alternatives; at least one file of each must exist."""
    root = models.root()
    need: list[tuple[Path, ...]] = []
    if "unet" in parts:
        need += [(p,) for p in models.unet_files()]
    if "vae" in parts:
        vae = root / models.vae
        need += [(vae / "config.json",), tuple(vae / n for n in VAE_WEIGHT_NAMES)]
    if "whisper" in parts:
        wsp = root / models.whisper
        need += [(wsp / n,) for n in WHISPER_FILES] + [tuple(wsp / n for n in WHISPER_WEIGHT_NAMES)]
    if "face_parser" in parts:
        need.append((root / models.face_parser,))
    if "gfpgan" in parts:
        need.append((root / models.gfpgan,))
    if "syncnet" in parts:
        need.append((root / models.syncnet,))
    return need


def missing_files(models: ModelsConfig, parts: Collection[str] = SERVE_PARTS) -> list[Path]:
    """Files that are absent for the requested parts; of alternatives, the one `make weights` fetches."""
    root = models.root()
    fetched = {root / wf.dest for wf in WEIGHT_FILES}
    missing = []
    for alts in required_files(models, parts):
        if not any(p.is_file() for p in alts):
            missing.append(next((p for p in alts if p in fetched), alts[0]))
    return missing


def load_models(cfg: AppConfig, parts: Collection[str] = SERVE_PARTS) -> ModelBundle:
    """Load the requested parts (unet, vae, whisper, face_parser, gfpgan, syncnet) onto the configured device/dtype."""
    unknown = set(parts) - ALL_PARTS
    if unknown:
        raise ValueError(f"unknown model parts {sorted(unknown)}; choose from {sorted(ALL_PARTS)}")
    missing = missing_files(cfg.models, parts)
    if missing:
        raise WeightsMissing(missing)
    device = resolve_device(cfg.runtime.device)
    dtype = resolve_dtype(cfg.runtime.dtype, device)
    root = cfg.models.root()

    unet = vae = whisper = extractor = pe = parser = gfpgan = syncnet = None
    if "unet" in parts:
        unet = load_unet(*cfg.models.unet_files(), dtype=dtype).to(device)
    if "vae" in parts:
        vae = load_vae(root / cfg.models.vae, dtype).to(device)
    if "whisper" in parts:
        encoder, extractor = load_whisper_encoder(root / cfg.models.whisper, dtype)
        whisper = encoder.to(device)
        pe = PositionalEncoding(d_model=encoder.config.d_model).to(device)
    if "face_parser" in parts:
        # Parsing runs once per avatar at prep time; float32 keeps argmax labels stable.
        parser = load_bisenet(root / cfg.models.face_parser).to(device=device)
    if "gfpgan" in parts:
        gfpgan = load_gfpgan(root / cfg.models.gfpgan, dtype).to(device)
    if "syncnet" in parts:
        # Scores are cosine distances between unit vectors: float32 keeps them comparable across devices.
        syncnet = load_syncnet(root / cfg.models.syncnet).to(device=device)
    log.info("models loaded: parts=%s device=%s dtype=%s", sorted(parts), device, dtype)
    return ModelBundle(
        device=device,
        dtype=dtype,
        unet=unet,
        vae=vae,
        whisper=whisper,
        feature_extractor=extractor,
        pe=pe,
        face_parser=parser,
        version=cfg.models.version,
        gfpgan=gfpgan,
        syncnet=syncnet,
    )


def weights_present(cfg: AppConfig, parts: Collection[str] = SERVE_PARTS) -> bool:
    """True when every file needed for `parts` exists (used to pick renderers/parsers in `auto`)."""
    return not missing_files(cfg.models, parts)


__all__ = [
    "ALL_PARTS",
    "SERVE_PARTS",
    "ModelBundle",
    "load_models",
    "missing_files",
    "required_files",
    "resolve_device",
    "resolve_dtype",
    "vae_weights_file",
    "weights_present",
    "whisper_weights_file",
]
