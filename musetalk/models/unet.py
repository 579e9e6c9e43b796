"""MuseTalk UNet (native UNet2DCondition built from musetalk.json) and the audio positional encoding."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from musetalk.errors import WeightsInvalid
from musetalk.models.checkpoint import build_on_meta, load_strict, read_state_dict
from musetalk.models.nets_unet import UNet2DCondition, unet_spec


def read_unet_config(path: Path) -> dict[str, Any]:
    """Read musetalk.json; keys starting with '_' (class name, version) are metadata and dropped."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise WeightsInvalid(f"{path}: cannot read UNet config: {exc}") from exc
    if raw.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise WeightsInvalid(f"{path}: _class_name is {raw['_class_name']!r}, expected UNet2DConditionModel")
    return {k: v for k, v in raw.items() if not k.startswith("_")}


def build_unet(config: dict[str, Any], source: str = "UNet config") -> UNet2DCondition:
    """Build the UNet skeleton on the meta device (no memory, no random init); WeightsInvalid for other configs."""
    spec = unet_spec(config, source)
    return build_on_meta(lambda: UNet2DCondition(spec))


def load_unet(config_path: Path, weights_path: Path, dtype: torch.dtype = torch.float32) -> UNet2DCondition:
    """Build from musetalk.json and load the plain diffusers-named state dict strictly (on CPU)."""
    unet = build_unet(read_unet_config(config_path), str(config_path))
    load_strict(unet, read_state_dict(weights_path), weights_path, dtype)
    return unet.eval().requires_grad_(False)


class PositionalEncoding(nn.Module):
    """Sinusoidal table added to the audio tokens: sin on even, cos on odd channels."""

    pe: torch.Tensor

    def __init__(self, d_model: int, max_len: int = 5000) -> None:
        super().__init__()
        position = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)  # (L, 1)
        div_term = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
        table = torch.zeros(max_len, d_model)  # (L, C)
        table[:, 0::2] = torch.sin(position * div_term)
        table[:, 1::2] = torch.cos(position * div_term[: d_model // 2])
        self.register_buffer("pe", table.unsqueeze(0), persistent=False)  # (1, L, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, C) audio tokens → x + pe[:T]."""
        return x + self.pe[:, : x.shape[1]].to(dtype=x.dtype, device=x.device)
