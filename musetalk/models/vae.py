"""SD VAE (stabilityai/sd-vae-ft-mse, diffusers folder) loaded strictly into the native AutoencoderKL."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from musetalk.errors import WeightsInvalid
from musetalk.models.checkpoint import StateDict, build_on_meta, load_strict, read_state_dict
from musetalk.models.nets_vae import AutoencoderKL, vae_spec

VAE_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# diffusers <= 0.13 named the mid-block attention projections differently.
_OLD_ATTENTION_NAMES = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


def vae_weights_file(vae_dir: Path) -> Path | None:
    """The weights file present in a VAE folder (safetensors preferred), or None."""
    for name in VAE_WEIGHT_NAMES:
        if (vae_dir / name).is_file():
            return vae_dir / name
    return None


def rename_old_attention_keys(state: StateDict) -> StateDict:
    """Map pre-0.14 diffusers attention key names to the current ones; other keys are untouched."""
    renamed: StateDict = {}
    for key, value in state.items():
        new = key
        if ".attentions." in key:
            for old, cur in _OLD_ATTENTION_NAMES.items():
                new = new.replace(old, cur)
        renamed[new] = value
    return renamed


def load_vae(vae_dir: Path, dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """Build the native AutoencoderKL from config.json and load its weights strictly (on CPU)."""
    weights = vae_weights_file(vae_dir)
    if weights is None:
        raise WeightsInvalid(f"{vae_dir}: no {' or '.join(VAE_WEIGHT_NAMES)}")
    try:
        config = json.loads((vae_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise WeightsInvalid(f"{vae_dir}/config.json: {exc}") from exc
    if not isinstance(config, dict):
        raise WeightsInvalid(f"{vae_dir}/config.json: expected a JSON object")
    spec = vae_spec(config, str(vae_dir / "config.json"))
    vae = build_on_meta(lambda: AutoencoderKL(spec))
    load_strict(vae, rename_old_attention_keys(read_state_dict(weights)), weights, dtype)
    return vae.eval().requires_grad_(False)
