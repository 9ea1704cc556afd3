"""Autoencoder checkpoints written to disk in the real layouts and loaded back through `load_autoencoder`."""

import json

import pytest
import torch
from safetensors.torch import save_file

from featherflux.errors import WeightsError
from featherflux.model.autoencoder import AutoEncoder
from featherflux.model.config import AutoEncoderConfig
from featherflux.weights import load_autoencoder, save_autoencoder
from featherflux.weights.autoencoder import (
    config_from_diffusers,
    config_to_diffusers,
    diffusers_name,
    diffusers_state_dict,
    native_name,
)

pytest.importorskip("diffusers")
from diffusers import AutoencoderKLFlux2

from tests.autoencoder_fixtures import TINY, randomized_vae

GROUPS32 = {  # widths divisible by 32, so a single file's config can be read off its shapes alone
    "block_out_channels": (32, 64),
    "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2,
    "layers_per_block": 1,
    "latent_channels": 2,
    "norm_num_groups": 32,
}


def bfl_state_dict(vae: AutoencoderKLFlux2) -> dict[str, torch.Tensor]:
    """The inverse map: diffusers weights under BFL's names and shapes (attention Linears as 1x1 convs)."""
    levels = len(vae.config.block_out_channels)
    out = {}
    for k, v in vae.state_dict().items():
        name = native_name(k, levels)
        out[name] = v[:, :, None, None] if ".attn_1." in name and name.endswith("weight") and v.ndim == 2 else v
        out[name] = out[name].contiguous()
    return out


@torch.no_grad()
def assert_same_outputs(ae: AutoEncoder, vae: AutoencoderKLFlux2, size=(8, 16)):
    images = torch.rand(2, 3, *size) * 2 - 1
    z_ref = vae.encode(images).latent_dist.mode()
    torch.testing.assert_close(ae.encode(images), z_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ae.decode(z_ref), vae.decode(z_ref).sample, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ae.bn.running_var, vae.bn.running_var, rtol=0, atol=0)


def test_key_map_matches_diffusers_real_size():
    with torch.device("meta"):
        vae = AutoencoderKLFlux2()
        ae = AutoEncoder(AutoEncoderConfig())
    ours = diffusers_state_dict(ae)
    theirs = vae.state_dict()
    assert set(ours) == set(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in theirs)
    assert {native_name(k, 4) for k in theirs} == set(ae.state_dict())
    assert (
        diffusers_name("decoder.up.3.block.2.nin_shortcut.weight", 4)
        == "decoder.up_blocks.0.resnets.2.conv_shortcut.weight"
    )
    assert diffusers_name("encoder.mid.attn_1.proj_out.bias", 4) == "encoder.mid_block.attentions.0.to_out.0.bias"
    assert diffusers_name("encoder.quant_conv.weight", 4) == "quant_conv.weight"


@pytest.mark.parametrize("kwargs", [{}, TINY, GROUPS32, dict(TINY, mid_block_add_attention=False)])
def test_config_translation_round_trips(kwargs):
    with torch.device("meta"):
        vae = AutoencoderKLFlux2(**kwargs)
    config = config_from_diffusers(dict(vae.config))
    assert config_from_diffusers(config_to_diffusers(config)) == config
    with torch.device("meta"):
        rebuilt = AutoencoderKLFlux2(**{k: v for k, v in config_to_diffusers(config).items() if not k.startswith("_")})
        ae = AutoEncoder(config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in diffusers_state_dict(ae).items()
    }


@pytest.mark.parametrize("kwargs", [TINY, GROUPS32], ids=["tiny", "groups32"])
def test_load_diffusers_save_pretrained(tmp_path, kwargs):
    vae = randomized_vae(**kwargs)
    vae.save_pretrained(tmp_path / "pipe" / "vae")
    ae = load_autoencoder(tmp_path / "pipe" / "vae")
    assert ae.config == config_from_diffusers(dict(vae.config))
    assert_same_outputs(ae, vae)
    # A pipeline folder finds its `vae` subfolder.
    assert load_autoencoder(tmp_path / "pipe").config == ae.config


def test_load_sharded_folder_and_dtype(tmp_path):
    vae = randomized_vae(**GROUPS32)
    vae.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert_same_outputs(load_autoencoder(tmp_path), vae)
    ae = load_autoencoder(tmp_path, dtype=torch.bfloat16)
    assert ae.dtype == torch.bfloat16 and ae.bn.running_mean.dtype == torch.bfloat16
    assert ae.bn.num_batches_tracked.dtype == torch.int64


def test_load_bfl_single_file_with_prefix(tmp_path):
    vae = randomized_vae(**GROUPS32)
    sd = bfl_state_dict(vae)
    assert "encoder.mid.attn_1.q.weight" in sd and sd["encoder.mid.attn_1.q.weight"].ndim == 4
    plain = tmp_path / "ae.safetensors"
    save_file(sd, plain)
    assert_same_outputs(load_autoencoder(plain), vae)
    assert_same_outputs(load_autoencoder(tmp_path), vae)  # a folder holding ae.safetensors
    # Under a prefix, next to other models' tensors, and without the BN counter (diffusers' converter drops it).
    prefixed = {f"vae.{k}": v for k, v in sd.items() if k != "bn.num_batches_tracked"}
    prefixed["model.diffusion_model.img_in.weight"] = torch.zeros(4, 4)
    save_file(prefixed, tmp_path / "combined.safetensors")
    ae = load_autoencoder(tmp_path / "combined.safetensors")
    assert_same_outputs(ae, vae)
    assert ae.bn.num_batches_tracked.item() == 0


def test_load_single_file_needing_config(tmp_path):
    vae = randomized_vae(**TINY)
    save_file(bfl_state_dict(vae), tmp_path / "ae.safetensors")
    with pytest.raises(WeightsError, match="config=AutoEncoderConfig"):
        load_autoencoder(tmp_path / "ae.safetensors")
    config = config_from_diffusers(dict(vae.config))
    assert_same_outputs(load_autoencoder(tmp_path / "ae.safetensors", config=config), vae)


def test_load_diffusers_keyed_single_file(tmp_path):
    vae = randomized_vae(**GROUPS32)
    vae.save_pretrained(tmp_path)
    assert_same_outputs(load_autoencoder(tmp_path / "diffusion_pytorch_model.safetensors"), vae)


def test_saved_folder_opens_in_diffusers(tmp_path):
    vae = randomized_vae(**GROUPS32)
    save_file(bfl_state_dict(vae), tmp_path / "ae.safetensors")
    ae = load_autoencoder(tmp_path / "ae.safetensors")
    out = save_autoencoder(ae, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["_class_name"] == "AutoencoderKLFlux2"
    reopened = AutoencoderKLFlux2.from_pretrained(out).eval()
    for k, v in vae.state_dict().items():
        torch.testing.assert_close(reopened.state_dict()[k], v, rtol=0, atol=0)
    assert_same_outputs(ae, reopened)
    again = load_autoencoder(out)
    for k, v in ae.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v, rtol=0, atol=0)


def test_errors(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_autoencoder(tmp_path / "nowhere")

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    with pytest.raises(WeightsError, match="config.json.*ae.safetensors"):
        load_autoencoder(tmp_path / "empty")

    vae = randomized_vae(**GROUPS32)
    sd = bfl_state_dict(vae)
    save_file(sd, tmp_path / "ae.safetensors")
    data = (tmp_path / "ae.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated.safetensors"):
        load_autoencoder(tmp_path / "truncated.safetensors")

    bad = dict(sd)
    bad["decoder.conv_out.bias"] = torch.zeros(5)
    del bad["encoder.norm_out.bias"]
    save_file(bad, tmp_path / "misshaped.safetensors")
    with pytest.raises(
        WeightsError, match=r"(?s)missing keys.*encoder\.norm_out\.bias.*mis-shaped.*decoder\.conv_out\.bias"
    ):
        load_autoencoder(tmp_path / "misshaped.safetensors")

    no_bn = {k: v for k, v in sd.items() if not k.startswith("bn.")}
    save_file(no_bn, tmp_path / "flux1.safetensors")
    with pytest.raises(WeightsError, match="not a FLUX.2 autoencoder"):
        load_autoencoder(tmp_path / "flux1.safetensors")

    save_file({"img_in.weight": torch.zeros(2, 2)}, tmp_path / "dit.safetensors")
    with pytest.raises(WeightsError, match="exactly one autoencoder"):
        load_autoencoder(tmp_path / "dit.safetensors")

    (tmp_path / "sdvae").mkdir()
    (tmp_path / "sdvae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(WeightsError, match="AutoencoderKL, not a FLUX.2 autoencoder"):
        load_autoencoder(tmp_path / "sdvae")

    with pytest.raises(WeightsError, match="act_fn"):
        config_from_diffusers({"_class_name": "AutoencoderKLFlux2", "act_fn": "gelu"})
