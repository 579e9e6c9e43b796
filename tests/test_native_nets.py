"""The native UNet / VAE / Whisper encoder / log-mel front end against diffusers and transformers (test-only deps).

Each reference model is built from the same config, its random initialisation copied into the native module
(strictly: the key names, order and shapes must be identical), and outputs compared in float32 on the CPU.
Serving never imports diffusers or transformers: the last test checks that in a fresh interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as ReferenceVAE
from diffusers import UNet2DConditionModel
from torch import nn
from transformers import WhisperConfig, WhisperFeatureExtractor
from transformers.audio_utils import mel_filter_bank as reference_mel_filter_bank
from transformers.models.whisper.modeling_whisper import WhisperEncoder as ReferenceWhisperEncoder

from musetalk.config import load_config
from musetalk.errors import WeightsInvalid
from musetalk.models import load_models
from musetalk.models.nets_unet import UNet2DCondition, unet_spec
from musetalk.models.nets_vae import AutoencoderKL, vae_spec
from musetalk.models.nets_whisper import (
    WhisperEncoder,
    WhisperFeatures,
    mel_filter_bank,
    read_whisper_features,
    whisper_encoder_config,
)
from musetalk.models.unet import load_unet
from musetalk.models.vae import load_vae, rename_old_attention_keys
from musetalk.models.whisper import encoder_state, load_whisper_encoder
from musetalk.testing import (
    REAL_UNET_CONFIG,
    REAL_VAE_CONFIG,
    TINY_UNET_CONFIG,
    TINY_VAE_CONFIG,
    Size,
    whisper_config,
)

ROOT = Path(__file__).resolve().parents[1]
REL_TOL = 1e-5  # max |native − reference| ≤ REL_TOL · max |reference|: float32 agreement (in practice bit-equal)

# The real structures (4 blocks, 2 layers per block, 8 heads, 384-wide audio tokens; 4 VAE blocks) at a width
# that runs in a fraction of a second on a CPU.
NARROW_UNET_CONFIG = {**REAL_UNET_CONFIG, "block_out_channels": [32, 32, 64, 64]}
NARROW_VAE_CONFIG = {**REAL_VAE_CONFIG, "block_out_channels": [32, 32, 64, 64]}


def _plain(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _copy_strict(reference: nn.Module, native: nn.Module) -> None:
    """Copy the reference's weights into the native module; names, their order and shapes must all agree."""
    ref_state, own_state = reference.state_dict(), native.state_dict()
    assert list(own_state) == list(ref_state)
    assert all(own_state[k].shape == ref_state[k].shape for k in ref_state)
    native.load_state_dict(ref_state, strict=True)


def _assert_close(native: torch.Tensor, reference: torch.Tensor) -> float:
    """Same shape and max abs difference within REL_TOL of the reference's scale; returns the difference."""
    assert native.shape == reference.shape and native.dtype == reference.dtype
    diff = (native - reference).abs().max().item()
    assert diff <= REL_TOL * reference.abs().max().item(), diff
    return diff


@pytest.mark.parametrize(
    ("config", "size"),
    [(TINY_UNET_CONFIG, 32), (NARROW_UNET_CONFIG, 32), (NARROW_UNET_CONFIG, 20)],
    ids=["tiny", "real-structure-narrow", "size-not-a-multiple-of-8"],
)
def test_unet_matches_diffusers(config: dict[str, Any], size: int) -> None:
    torch.manual_seed(0)
    reference = UNet2DConditionModel.from_config(_plain(config)).eval()
    native = UNet2DCondition(unet_spec(_plain(config))).eval()
    _copy_strict(reference, native)
    latents = torch.randn(3, config["in_channels"], size, size)
    tokens = torch.randn(3, 50, config["cross_attention_dim"])
    with torch.inference_mode():
        for timestep in (torch.zeros(1, dtype=torch.long), torch.tensor(37.0), torch.tensor([0, 500, 999])):
            want = reference(latents, timestep, encoder_hidden_states=tokens).sample
            _assert_close(native(latents, timestep, tokens), want)


def test_unet_and_vae_initialise_like_diffusers() -> None:
    """Same random weights for the same seed: musetalk.testing writes the files diffusers would have written."""
    for make_ref, make_native in (
        (
            lambda: UNet2DConditionModel.from_config(_plain(TINY_UNET_CONFIG)),
            lambda: UNet2DCondition(unet_spec(_plain(TINY_UNET_CONFIG))),
        ),
        (lambda: ReferenceVAE.from_config(_plain(TINY_VAE_CONFIG)), lambda: AutoencoderKL(vae_spec(TINY_VAE_CONFIG))),
    ):
        torch.manual_seed(7)
        ref_state = make_ref().state_dict()
        torch.manual_seed(7)
        own_state = make_native().state_dict()
        assert list(own_state) == list(ref_state)
        assert all(torch.equal(own_state[k], ref_state[k]) for k in ref_state)


@pytest.mark.parametrize(
    ("config", "size"), [(TINY_VAE_CONFIG, 256), (NARROW_VAE_CONFIG, 64)], ids=["tiny", "real-structure-narrow"]
)
def test_vae_matches_diffusers(config: dict[str, Any], size: int) -> None:
    torch.manual_seed(0)
    reference = ReferenceVAE.from_config(_plain(config)).eval()
    native = AutoencoderKL(vae_spec(config)).eval()
    _copy_strict(reference, native)
    # The sd-vae-ft-mse file's pre-0.14 attention names load after renaming, as load_vae does.
    back = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    old = {}
    for key, value in reference.state_dict().items():
        for cur, prev in back.items():
            key = key.replace(cur, prev) if ".attentions." in key else key
        old[key] = value
    native.load_state_dict(rename_old_attention_keys(old), strict=True)
    images = torch.rand(2, 3, size, size) * 2 - 1
    with torch.inference_mode():
        mean = reference.encode(images).latent_dist.mean
        _assert_close(native.encode(images), mean)
        latents = torch.randn_like(mean) / native.scaling_factor
        _assert_close(native.decode(latents), reference.decode(latents).sample)
    assert native.scaling_factor == pytest.approx(0.18215)


@pytest.mark.parametrize("size", ["tiny", "full"], ids=["tiny", "whisper-tiny"])
def test_whisper_encoder_hidden_states_match_transformers(size: Size) -> None:
    cfg = whisper_config(size)  # "full": openai/whisper-tiny's architecture, random weights
    ref_cfg = WhisperConfig(**{k: v for k, v in cfg.items() if k != "transformers_version"})
    ref_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    reference = ReferenceWhisperEncoder(ref_cfg).eval()
    native = WhisperEncoder(whisper_encoder_config(cfg)).eval()
    _copy_strict(reference, native)
    mel = torch.randn(2, 80, 3000)
    with torch.inference_mode():
        want = reference(mel, output_hidden_states=True)
        got = native(mel, output_hidden_states=True)
    # Embeddings, each layer's output, the last one after the final LayerNorm: what the audio code stacks.
    assert len(got.hidden_states) == len(want.hidden_states) == cfg["encoder_layers"] + 1
    for mine, theirs in zip(got.hidden_states, want.hidden_states, strict=True):
        _assert_close(mine, theirs)
    _assert_close(got.last_hidden_state, want.last_hidden_state)
    with pytest.raises(ValueError, match="3000 mel frames"):
        native(mel[..., :2999])


def test_mel_filter_bank_matches_transformers(tmp_path: Path) -> None:
    assert np.array_equal(WhisperFeatures().mel_filters, WhisperFeatureExtractor().mel_filters)
    assert WhisperFeatures().mel_filters.shape == (201, 80)
    # From a saved preprocessor_config.json, and with another mel count (large-v3 uses 128).
    for feature_size in (80, 128):
        WhisperFeatureExtractor(feature_size=feature_size).save_pretrained(str(tmp_path / str(feature_size)))
        mine = read_whisper_features(tmp_path / str(feature_size) / "preprocessor_config.json")
        theirs = WhisperFeatureExtractor.from_pretrained(str(tmp_path / str(feature_size)))
        assert np.array_equal(mine.mel_filters, theirs.mel_filters)
        for name in ("n_fft", "hop_length", "n_samples", "sampling_rate", "feature_size", "nb_max_frames"):
            assert getattr(mine, name) == getattr(theirs, name), name
    # SyncNet's front end (musetalk/evaluation/sync.py): 401 bins, 55-7600 Hz.
    want = reference_mel_filter_bank(
        num_frequency_bins=401,
        num_mel_filters=80,
        min_frequency=55.0,
        max_frequency=7600.0,
        sampling_rate=16000,
        norm="slaney",
        mel_scale="slaney",
    )
    assert np.array_equal(mel_filter_bank(401, 80, 16000, f_min=55.0, f_max=7600.0), want)


def test_log_mel_matches_the_feature_extractor() -> None:
    ours, theirs = WhisperFeatures(), WhisperFeatureExtractor()
    rng = np.random.default_rng(0)
    for n in (100, 16_000, 480_000, 600_000):  # shorter, equal to and longer than one 30 s window
        samples = (0.1 * rng.standard_normal(n)).astype(np.float32)
        want = theirs(samples, sampling_rate=16000, return_tensors="pt").input_features
        _assert_close(ours(samples, sampling_rate=16000, return_tensors="pt").input_features, want)
    with pytest.raises(ValueError, match="16000 Hz"):
        ours(np.zeros(10, np.float32), sampling_rate=8000)


def test_loaded_tiny_models_match_the_reference_libraries(tiny_models_dir: Path) -> None:
    """The files musetalk.testing writes, loaded by load_models, against diffusers / transformers reading them."""
    cfg = load_config(overrides=[f"models.dir={tiny_models_dir}", "runtime.device=cpu"])
    bundle = load_models(cfg)
    assert bundle.unet is not None and bundle.vae is not None and bundle.whisper is not None
    assert bundle.feature_extractor is not None

    unet_dir, vae_dir, whisper_dir = (
        tiny_models_dir / "musetalkV15",
        tiny_models_dir / "sd-vae",
        tiny_models_dir / "whisper",
    )
    ref_unet = UNet2DConditionModel.from_config(_plain(json.loads((unet_dir / "musetalk.json").read_text()))).eval()
    ref_unet.load_state_dict(torch.load(unet_dir / "unet.pth", weights_only=True), strict=True)
    ref_vae = ReferenceVAE.from_config(_plain(json.loads((vae_dir / "config.json").read_text()))).eval()
    vae_state = torch.load(vae_dir / "diffusion_pytorch_model.bin", weights_only=True)
    ref_vae.load_state_dict(rename_old_attention_keys(vae_state), strict=True)
    ref_cfg = WhisperConfig.from_pretrained(str(whisper_dir))
    ref_cfg._attn_implementation = "sdpa"
    ref_whisper = ReferenceWhisperEncoder(ref_cfg).eval()
    ref_whisper.load_state_dict(
        encoder_state(torch.load(whisper_dir / "pytorch_model.bin", weights_only=True)), strict=True
    )
    ref_extractor = WhisperFeatureExtractor.from_pretrained(str(whisper_dir))

    samples = (0.1 * np.random.default_rng(1).standard_normal(16_000)).astype(np.float32)
    with torch.inference_mode():
        mel = ref_extractor(samples, sampling_rate=16000, return_tensors="pt").input_features
        _assert_close(bundle.feature_extractor(samples, sampling_rate=16000).input_features, mel)
        want_states = ref_whisper(mel, output_hidden_states=True).hidden_states
        for mine, theirs in zip(bundle.whisper(mel).hidden_states, want_states, strict=True):
            _assert_close(mine, theirs)
        latents, tokens = torch.randn(2, 8, 32, 32), torch.randn(2, 50, bundle.audio_dim)
        t = torch.zeros(1, dtype=torch.long)
        pred = ref_unet(latents, t, encoder_hidden_states=tokens).sample
        _assert_close(bundle.unet(latents, t, tokens), pred)
        _assert_close(bundle.vae.decode(pred / bundle.vae_scale), ref_vae.decode(pred / bundle.vae_scale).sample)
        images = torch.rand(2, 3, 256, 256) * 2 - 1
        _assert_close(bundle.vae.encode(images), ref_vae.encode(images).latent_dist.mean)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"use_linear_projection": True}, "use_linear_projection"),
        ({"upcast_attention": True}, "upcast_attention"),
        ({"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}, "mid_block_type"),
        ({"transformer_layers_per_block": 2}, "transformer_layers_per_block"),
        ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
        ({"flip_sin_to_cos": False}, "flip_sin_to_cos"),
        ({"freq_shift": 1}, "freq_shift"),
        ({"act_fn": "gelu"}, "act_fn"),
        ({"attention_head_dim": [8, 8, 8, 8]}, "attention_head_dim"),
        ({"down_block_types": ["CrossAttnDownBlock2D"] * 4}, "down_block_types"),
        ({"class_embed_type": "timestep"}, "class_embed_type"),
        ({"some_future_key": 1}, "some_future_key"),
        ({"block_out_channels": [320, 640, 1280, 1281]}, "divisible"),
    ],
)
def test_unsupported_unet_config_fails_loudly(change: dict[str, Any], match: str) -> None:
    with pytest.raises(WeightsInvalid, match=match):
        unet_spec({**_plain(REAL_UNET_CONFIG), **change})


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"mid_block_add_attention": False}, "mid_block_add_attention"),
        ({"use_quant_conv": False}, "use_quant_conv"),
        ({"shift_factor": 0.1159}, "shift_factor"),
        ({"down_block_types": ["AttnDownEncoderBlock2D"] * 4}, "down_block_types"),
        ({"_class_name": "AutoencoderTiny"}, "AutoencoderTiny"),
    ],
)
def test_unsupported_vae_config_fails_loudly(change: dict[str, Any], match: str) -> None:
    with pytest.raises(WeightsInvalid, match=match):
        vae_spec({**REAL_VAE_CONFIG, **change})


def test_unsupported_whisper_configs_fail_loudly() -> None:
    with pytest.raises(WeightsInvalid, match="activation_function"):
        whisper_encoder_config({**whisper_config("full"), "activation_function": "relu"})
    with pytest.raises(WeightsInvalid, match="dither"):
        WhisperFeatures.from_config({"feature_extractor_type": "WhisperFeatureExtractor", "dither": 0.1})
    with pytest.raises(WeightsInvalid, match="feature_extractor_type"):
        WhisperFeatures.from_config({"feature_extractor_type": "Wav2Vec2FeatureExtractor"})


def test_loaders_reject_an_unsupported_checkpoint(tiny_models_dir: Path, tmp_path: Path) -> None:
    unet_dir = tiny_models_dir / "musetalkV15"
    config = json.loads((unet_dir / "musetalk.json").read_text())
    (tmp_path / "musetalk.json").write_text(json.dumps({**config, "use_linear_projection": True}))
    with pytest.raises(WeightsInvalid, match=r"musetalk\.json: use_linear_projection=True is not supported"):
        load_unet(tmp_path / "musetalk.json", unet_dir / "unet.pth")
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text(json.dumps({**REAL_VAE_CONFIG, "mid_block_add_attention": False}))
    (vae / "diffusion_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(WeightsInvalid, match="mid_block_add_attention"):
        load_vae(vae)
    whisper = tmp_path / "whisper"
    whisper.mkdir()
    for name in ("config.json", "pytorch_model.bin"):
        (whisper / name).write_bytes((tiny_models_dir / "whisper" / name).read_bytes())
    extractor = json.loads((tiny_models_dir / "whisper" / "preprocessor_config.json").read_text())
    (whisper / "preprocessor_config.json").write_text(json.dumps({**extractor, "feature_size": 128}))
    with pytest.raises(WeightsInvalid, match="128 mel bins"):
        load_whisper_encoder(whisper)


def test_serving_imports_neither_diffusers_nor_transformers() -> None:
    code = (
        "import sys\n"
        "import musetalk.server.app, musetalk.models.bundle, musetalk.pipeline.generate\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'diffusers', 'transformers'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_loading_the_models_imports_neither_them_nor_torch_dynamo(tiny_models_dir: Path) -> None:
    # torch._dynamo costs ~1.5 s of start-up; random init of a module built on the meta device would import it.
    code = (
        "import sys\n"
        "from musetalk.config import load_config\n"
        "from musetalk.models import load_models\n"
        f"load_models(load_config(overrides=['models.dir={tiny_models_dir}', 'runtime.device=cpu']))\n"
        "print(sorted({m for m in sys.modules} & {'diffusers', 'transformers', 'torch._dynamo'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
