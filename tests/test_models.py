"""Model loading through load_models on tiny checkpoints in the real on-disk formats."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from musetalk.config import AppConfig, load_config
from musetalk.errors import WeightsInvalid, WeightsMissing
from musetalk.models import load_models
from musetalk.models.bisenet import BiSeNet, load_bisenet
from musetalk.models.bundle import ALL_PARTS
from musetalk.models.checkpoint import read_state_dict
from musetalk.models.unet import PositionalEncoding, build_unet, read_unet_config
from musetalk.models.vae import rename_old_attention_keys
from musetalk.testing import REAL_UNET_CONFIG, write_bisenet, write_models


def _cfg(models_dir: Path, *extra: str) -> AppConfig:
    return load_config(overrides=[f"models.dir={models_dir}", "runtime.device=cpu", *extra])


def test_tiny_bundle_forward_shapes_match_the_real_pipeline(tiny_models_dir: Path) -> None:
    bundle = load_models(_cfg(tiny_models_dir), parts=ALL_PARTS)
    assert bundle.dtype == torch.float32 and bundle.vae_scale == pytest.approx(0.18215)
    assert bundle.unet is not None and bundle.vae is not None and bundle.whisper is not None
    assert bundle.pe is not None and bundle.feature_extractor is not None and bundle.face_parser is not None
    # Audio: 1 s of audio → one 30 s mel window → 5 stacked hidden states of width d_model.
    mel = bundle.feature_extractor(torch.zeros(16000).numpy(), sampling_rate=16000, return_tensors="pt")
    assert tuple(mel.input_features.shape) == (1, 80, 3000)
    states = bundle.whisper(mel.input_features, output_hidden_states=True).hidden_states
    assert len(states) == bundle.audio_layers == 5
    assert tuple(states[0].shape) == (1, 1500, bundle.audio_dim)
    # UNet: (B, 8, 32, 32) latents + (B, 50, C) audio tokens at t=0 → (B, 4, 32, 32).
    latents = torch.randn(3, 8, 32, 32)
    tokens = bundle.pe(torch.randn(3, 10 * bundle.audio_layers, bundle.audio_dim))
    assert tokens.shape[1] == 50
    out = bundle.unet(latents, torch.zeros(1), tokens)
    assert tuple(out.shape) == (3, 4, 32, 32)
    faces = bundle.vae.decode(out / bundle.vae_scale)
    assert tuple(faces.shape) == (3, 3, 256, 256)
    enc = bundle.vae.encode(faces)
    assert tuple(enc.shape) == (3, 4, 32, 32)
    logits = bundle.face_parser(torch.randn(1, 3, 512, 512))
    assert tuple(logits.shape) == (1, 19, 512, 512)


def test_loaded_weights_are_the_files_weights(tiny_models_dir: Path) -> None:
    bundle = load_models(_cfg(tiny_models_dir))
    assert bundle.unet is not None and bundle.vae is not None
    file_state = read_state_dict(tiny_models_dir / "musetalkV15" / "unet.pth")
    assert torch.equal(bundle.unet.state_dict()["conv_in.weight"], file_state["conv_in.weight"])
    vae_state = rename_old_attention_keys(read_state_dict(tiny_models_dir / "sd-vae" / "diffusion_pytorch_model.bin"))
    key = "decoder.mid_block.attentions.0.to_q.weight"
    assert torch.equal(bundle.vae.state_dict()[key], vae_state[key])


def test_v1_unet_is_selectable(tiny_models_dir: Path) -> None:
    v15 = load_models(_cfg(tiny_models_dir), parts={"unet"}).unet
    v1 = load_models(_cfg(tiny_models_dir, "models.version=v1"), parts={"unet"}).unet
    assert v15 is not None and v1 is not None
    assert not torch.equal(v15.conv_in.weight, v1.conv_in.weight)


def test_missing_files_are_listed_in_one_error(tiny_models_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "models"
    shutil.copytree(tiny_models_dir, broken)
    (broken / "musetalkV15" / "unet.pth").unlink()
    (broken / "whisper" / "preprocessor_config.json").unlink()
    shutil.rmtree(broken / "sd-vae")
    with pytest.raises(WeightsMissing) as err:
        load_models(_cfg(broken))
    text = str(err.value)
    assert len(err.value.missing) == 4
    for name in ("unet.pth", "preprocessor_config.json", "sd-vae/config.json", "diffusion_pytorch_model"):
        assert name in text
    assert "make weights" in text


def test_wrong_keys_fail_loudly(tiny_models_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "models"
    shutil.copytree(tiny_models_dir, broken)
    path = broken / "musetalkV15" / "unet.pth"
    state = torch.load(path, weights_only=True)
    state["module.conv_in.weight"] = state.pop("conv_in.weight")
    torch.save(state, path)
    with pytest.raises(WeightsInvalid, match="missing.*conv_in.weight"):
        load_models(_cfg(broken), parts={"unet"})


def test_unet_keys_equal_full_size_diffusers_model() -> None:
    config = {k: v for k, v in REAL_UNET_CONFIG.items() if not k.startswith("_")}
    ours = build_unet(config)
    with torch.device("meta"):
        reference = UNet2DConditionModel(**config)
    ours_state, ref_state = ours.state_dict(), reference.state_dict()
    assert list(ours_state) == list(ref_state) and len(ours_state) == 686
    assert sum(p.numel() for p in ours.parameters()) == 849_947_844
    assert tuple(ours_state["conv_in.weight"].shape) == (320, 8, 3, 3)
    assert tuple(ours_state["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"].shape) == (320, 384)
    assert tuple(ours_state["conv_out.weight"].shape) == (4, 320, 3, 3)


def test_unet_config_reader_drops_metadata(tmp_path: Path) -> None:
    path = tmp_path / "musetalk.json"
    path.write_text('{"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "in_channels": 8}')
    assert read_unet_config(path) == {"in_channels": 8}
    path.write_text('{"_class_name": "AutoencoderKL"}')
    with pytest.raises(WeightsInvalid):
        read_unet_config(path)


def test_bisenet_loads_upstream_named_legacy_checkpoint(tmp_path: Path) -> None:
    path = write_bisenet(tmp_path / "79999_iter.pth", seed=3)
    state = torch.load(path, weights_only=True)
    assert len(state) == 191
    assert sum(1 for k in state if k.endswith("num_batches_tracked")) == 31
    for key, shape in {
        "cp.resnet.conv1.weight": (64, 3, 7, 7),
        "cp.resnet.layer2.0.downsample.0.weight": (128, 64, 1, 1),
        "cp.arm16.conv_atten.weight": (128, 128, 1, 1),
        "ffm.convblk.conv.weight": (256, 256, 1, 1),
        "ffm.conv1.weight": (64, 256, 1, 1),
        "conv_out.conv_out.weight": (19, 256, 1, 1),
        "conv_out16.conv.conv.weight": (64, 128, 3, 3),
    }.items():
        assert tuple(state[key].shape) == shape, key
    net = load_bisenet(path)
    assert sum(p.numel() for p in net.parameters()) == 13_300_416
    assert torch.equal(net.state_dict()["cp.resnet.conv1.weight"], state["cp.resnet.conv1.weight"])
    assert not isinstance(net, type(None)) and isinstance(net, BiSeNet)


def test_positional_encoding_table() -> None:
    pe = PositionalEncoding(d_model=8)
    x = torch.zeros(1, 3, 8)
    out = pe(x)
    assert torch.allclose(out[0, 0], torch.tensor([0.0, 1, 0, 1, 0, 1, 0, 1]))
    assert out[0, 1, 0] == pytest.approx(torch.sin(torch.tensor(1.0)).item())
    assert out[0, 2, 1] == pytest.approx(torch.cos(torch.tensor(2.0)).item())


def test_write_models_layout(tmp_path: Path) -> None:
    root = write_models(tmp_path / "m", versions=("v15",))
    for rel in (
        "musetalkV15/musetalk.json",
        "musetalkV15/unet.pth",
        "sd-vae/config.json",
        "sd-vae/diffusion_pytorch_model.bin",
        "whisper/config.json",
        "whisper/pytorch_model.bin",
        "whisper/preprocessor_config.json",
        "face-parse-bisent/79999_iter.pth",
    ):
        assert (root / rel).is_file(), rel
    vae_keys = torch.load(root / "sd-vae" / "diffusion_pytorch_model.bin", weights_only=True)
    assert "decoder.mid_block.attentions.0.query.weight" in vae_keys  # pre-0.14 names, as the real file
    whisper_keys = torch.load(root / "whisper" / "pytorch_model.bin", weights_only=True)
    assert any(k.startswith("model.encoder.") for k in whisper_keys)
