"""Whisper encoder + log-mel front end from a transformers folder (openai/whisper-tiny layout), natively.

Only the encoder is used, so only its weights are loaded; decoder keys are skipped. config.json and
preprocessor_config.json are read as plain JSON (musetalk/models/nets_whisper.py): transformers is not imported.
"""

from __future__ import annotations

from pathlib import Path

import torch

from musetalk.errors import WeightsInvalid
from musetalk.models.checkpoint import StateDict, build_on_meta, load_strict, read_state_dict
from musetalk.models.nets_whisper import (
    WhisperEncoder,
    WhisperFeatures,
    read_whisper_encoder_config,
    read_whisper_features,
)

WHISPER_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")
WHISPER_FILES = ("config.json", "preprocessor_config.json")


def whisper_weights_file(whisper_dir: Path) -> Path | None:
    """The weights file present in a Whisper folder (safetensors preferred), or None."""
    for name in WHISPER_WEIGHT_NAMES:
        if (whisper_dir / name).is_file():
            return whisper_dir / name
    return None


def encoder_state(state: StateDict) -> StateDict:
    """Keep the encoder's entries, whatever the wrapper: 'model.encoder.x', 'encoder.x' → 'x'."""
    out: StateDict = {}
    for key, value in state.items():
        name = key.removeprefix("model.")
        if name.startswith("encoder."):
            out[name.removeprefix("encoder.")] = value
    return out


def load_whisper_encoder(
    whisper_dir: Path, dtype: torch.dtype = torch.float32
) -> tuple[WhisperEncoder, WhisperFeatures]:
    """Load the encoder strictly (on CPU) and the log-mel front end's parameters."""
    weights = whisper_weights_file(whisper_dir)
    if weights is None:
        raise WeightsInvalid(f"{whisper_dir}: no {' or '.join(WHISPER_WEIGHT_NAMES)}")
    config = read_whisper_encoder_config(whisper_dir / "config.json")
    features = read_whisper_features(whisper_dir / "preprocessor_config.json")
    if features.feature_size != config.num_mel_bins:
        raise WeightsInvalid(
            f"{whisper_dir}: preprocessor_config.json makes {features.feature_size} mel bins, "
            f"config.json's encoder takes {config.num_mel_bins}"
        )
    encoder = build_on_meta(lambda: WhisperEncoder(config))
    state = encoder_state(read_state_dict(weights))
    if not state:
        raise WeightsInvalid(f"{weights}: no encoder weights ('model.encoder.*' or 'encoder.*') found")
    load_strict(encoder, state, weights, dtype)
    return encoder.eval().requires_grad_(False), features
