"""Tiny random diffusers FLUX.2 autoencoders, shared by the autoencoder model and weights tests."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLFlux2

TINY = {  # diffusers' own pipeline-test VAE: one level, no quant convs, 1 group
    "block_out_channels": (4,),
    "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",),
    "layers_per_block": 1,
    "latent_channels": 1,
    "norm_num_groups": 1,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}


def randomized_vae(**kwargs) -> AutoencoderKLFlux2:
    """A diffusers VAE whose norms and BN statistics are random too (defaults 1/0 would hide mistakes)."""
    vae = AutoencoderKLFlux2(**kwargs).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
        vae.bn.running_mean.copy_(0.5 * torch.randn_like(vae.bn.running_mean))
        vae.bn.running_var.copy_(0.5 + torch.rand_like(vae.bn.running_var))
    return vae
