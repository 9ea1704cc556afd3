"""AutoEncoder parity with diffusers' AutoencoderKLFlux2 (+ the pipeline's patchify/BN code), same random weights."""

import pytest
import torch

from featherflux.errors import UserError
from featherflux.model.autoencoder import AutoEncoder
from featherflux.model.config import AutoEncoderConfig
from featherflux.weights.autoencoder import config_from_diffusers, native_from_diffusers
from featherflux.weights.io import LazyTensor

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKLFlux2
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline

from tests.autoencoder_fixtures import TINY, randomized_vae

# (diffusers kwargs, image size (H, W)); the first is diffusers' own pipeline-test VAE.
CONFIGS = {
    "diffusers-tiny": (TINY, (6, 10)),
    "two-levels": (
        {
            "block_out_channels": (8, 16),
            "down_block_types": ("DownEncoderBlock2D",) * 2,
            "up_block_types": ("UpDecoderBlock2D",) * 2,
            "layers_per_block": 2,
            "latent_channels": 4,
            "norm_num_groups": 4,
        },
        (8, 16),
    ),
    "three-levels-no-attention": (
        {
            "block_out_channels": (8, 16, 16),
            "down_block_types": ("DownEncoderBlock2D",) * 3,
            "up_block_types": ("UpDecoderBlock2D",) * 3,
            "layers_per_block": 1,
            "latent_channels": 2,
            "norm_num_groups": 2,
            "mid_block_add_attention": False,
        },
        (16, 8),
    ),
}


def ours_from(vae: AutoencoderKLFlux2) -> AutoEncoder:
    config = config_from_diffusers(dict(vae.config))
    lazy = {k: LazyTensor(tuple(v.shape), v.dtype, lambda v=v: v) for k, v in vae.state_dict().items()}
    ae = AutoEncoder(config).eval()
    ae.load_state_dict({k: t.load() for k, t in native_from_diffusers(lazy, len(config.channels)).items()})
    return ae.to(vae.dtype)


def assert_close(ours: torch.Tensor, ref: torch.Tensor, rel: float):
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    scale = ref.float().abs().max().item()
    err = (ours.float() - ref.float()).abs().max().item()
    assert err <= rel * scale, f"max error {err:.3g} > {rel} x output scale {scale:.3g}"


def reference_normalize(vae, z):
    x = Flux2Pipeline._patchify_latents(z)
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(x.device, x.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(x.device, x.dtype)
    return (x - mean) / std


def reference_denormalize(vae, latents):
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents.device, latents.dtype)
    return Flux2Pipeline._unpatchify_latents(latents * std + mean)


# fp32: within 1e-5 of the output scale. bf16: both sides run the same ops in the same order (on CPU today the
# results are bit-identical), but bf16 keeps 8 mantissa bits, so allow 1e-2 of the output scale for other kernels.
@pytest.mark.parametrize("dtype,rel", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(CONFIGS))
@torch.no_grad()
def test_parity_with_diffusers(name, dtype, rel):
    kwargs, (H, W) = CONFIGS[name]
    vae = randomized_vae(**kwargs).to(dtype)
    ae = ours_from(vae)
    images = (torch.rand(2, 3, H, W) * 2 - 1).to(dtype)

    z_ref = vae.encode(images).latent_dist.mode()
    z = ae.encode(images)
    f = ae.config.downsample_factor
    assert z.shape == (2, ae.config.z_channels, H // f, W // f)
    assert_close(z, z_ref, rel)

    assert_close(ae.normalize(z_ref), reference_normalize(vae, z_ref), rel)
    latents = torch.randn(2, ae.config.latent_channels, H // f // 2, W // f // 2).to(dtype)
    assert_close(ae.denormalize(latents), reference_denormalize(vae, latents), rel)

    z_in = torch.randn_like(z_ref)
    assert_close(ae.decode(z_in), vae.decode(z_in).sample, rel)


@torch.no_grad()
def test_normalize_denormalize_are_inverse():
    vae = randomized_vae(**CONFIGS["two-levels"][0])
    ae = ours_from(vae)
    z = torch.randn(2, 4, 6, 10)
    latents = ae.normalize(z)
    assert latents.shape == (2, 16, 3, 5)
    torch.testing.assert_close(ae.denormalize(latents), z, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ae.normalize(ae.denormalize(latents)), latents, rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_patchify_channel_order():
    # With identity statistics, channel c*4 + dy*2 + dx of the output is pixel (2i+dy, 2j+dx) of channel c.
    ae = AutoEncoder(AutoEncoderConfig(channels=(4,), num_res_blocks=1, z_channels=2, norm_groups=1, bn_eps=0.0))
    ae.bn.running_mean.zero_()
    ae.bn.running_var.fill_(1.0)
    z = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(1, 2, 4, 6)
    out = ae.normalize(z)
    for c in range(2):
        for dy in range(2):
            for dx in range(2):
                torch.testing.assert_close(out[0, c * 4 + dy * 2 + dx], z[0, c, dy::2, dx::2], rtol=0, atol=0)


def test_real_size_on_meta():
    with torch.device("meta"):
        ae = AutoEncoder(AutoEncoderConfig())
    assert sum(p.numel() for p in ae.parameters()) == 84_046_115
    assert ae.bn.running_mean.shape == (128,)
    with torch.device("meta"):
        z = ae.encode(torch.empty(1, 3, 64, 96))
        assert z.shape == (1, 32, 8, 12)
        assert ae.normalize(z).shape == (1, 128, 4, 6)
        assert ae.decode(z).shape == (1, 3, 64, 96)


def test_bad_shapes_raise_user_errors():
    ae = AutoEncoder(AutoEncoderConfig(channels=(4, 4), num_res_blocks=1, z_channels=2, norm_groups=1))
    with pytest.raises(UserError, match="multiples of 2"):
        ae.encode(torch.zeros(1, 3, 5, 8))
    with pytest.raises(UserError, match=r"\(B, 3, H, W\)"):
        ae.encode(torch.zeros(1, 4, 8, 8))
    with pytest.raises(UserError, match="denormalize"):
        ae.decode(torch.zeros(1, 8, 4, 4))
    with pytest.raises(UserError, match="multiples of 2"):
        ae.normalize(torch.zeros(1, 2, 3, 4))
    with pytest.raises(UserError, match=r"\(B, 8, h, w\)"):
        ae.denormalize(torch.zeros(1, 2, 3, 4))


# Several tiles each way, the last one narrower than the rest: 80x48 pixels in 32-pixel tiles with a stride of 24.
TILED = dict(CONFIGS["two-levels"][0], sample_size=32)


@torch.no_grad()
def test_tiled_encode_and_decode_equal_diffusers():
    vae = randomized_vae(**TILED)
    ae = ours_from(vae)
    assert ae.config.sample_size == 32
    vae.enable_tiling()
    ae.enable_tiling()
    images = torch.rand(2, 3, 80, 48) * 2 - 1
    assert_close(ae.encode(images), vae.encode(images).latent_dist.mode(), 1e-4)
    z = torch.randn(2, ae.config.z_channels, 40, 24)
    tiled = ae.decode(z)
    assert_close(tiled, vae.decode(z).sample, 1e-4)
    ae.disable_tiling()
    assert (ae.decode(z) - tiled).abs().max() > 1e-3  # the tiles really were blended, not decoded whole


@torch.no_grad()
def test_tiling_leaves_small_images_and_slicing_leaves_batches_unchanged():
    ae = ours_from(randomized_vae(**TILED))
    z = torch.randn(3, ae.config.z_channels, 16, 12)  # one tile: 32x24 pixels
    whole = ae.decode(z)
    ae.enable_tiling()
    assert torch.equal(ae.decode(z), whole)
    ae.enable_slicing()
    torch.testing.assert_close(ae.decode(z), whole, atol=1e-5, rtol=0)
    images = torch.rand(3, 3, 80, 48) * 2 - 1
    ae.disable_slicing()
    batched = ae.encode(images)
    ae.enable_slicing()
    torch.testing.assert_close(ae.encode(images), batched, atol=1e-5, rtol=0)


def test_bad_tile_size_names_the_rule():
    ae = AutoEncoder(AutoEncoderConfig(channels=(4, 4), num_res_blocks=1, z_channels=2, norm_groups=1))
    with pytest.raises(UserError, match="multiple of 8 pixels"):
        ae.enable_tiling(20)
    assert not ae.use_tiling
