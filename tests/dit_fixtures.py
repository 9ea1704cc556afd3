"""Tiny random diffusers FLUX.2 transformers and matching inputs, shared by the DiT and transformer-weights tests."""

from __future__ import annotations

import torch
from diffusers import Flux2Transformer2DModel

from featherflux.model.dit import Flux2
from featherflux.weights.io import materialize
from featherflux.weights.transformer import config_from_diffusers, diffusers_to_native

# diffusers constructor kwargs; in_channels 8 = 4 x 2 latent channels like tests/tiny.py
GUIDED = {
    "in_channels": 8,
    "num_layers": 1,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 24,
    "axes_dims_rope": (4, 4, 4, 4),
    "guidance_embeds": True,
}
UNGUIDED = {
    "in_channels": 8,
    "num_layers": 2,
    "num_single_layers": 3,
    "attention_head_dim": 8,
    "num_attention_heads": 4,
    "joint_attention_dim": 12,
    "axes_dims_rope": (2, 2, 2, 2),
    "guidance_embeds": False,
}


def diffusers_transformer(seed: int = 0, **kwargs) -> Flux2Transformer2DModel:
    """A random diffusers transformer whose norm scales are not all 1 and whose outputs are O(1)."""
    torch.manual_seed(seed)
    model = Flux2Transformer2DModel(patch_size=1, timestep_guidance_channels=256, **kwargs).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # QK RMSNorm weights
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
    return model


def ours_from(reference: Flux2Transformer2DModel) -> Flux2:
    with torch.device("meta"):
        model = Flux2(config_from_diffusers(dict(reference.config), "test"))
    return materialize(model, diffusers_to_native(dict(reference.state_dict())))


def grid_ids(batch: int, h: int, w: int, t: int = 0) -> torch.Tensor:
    ids = torch.cartesian_prod(torch.tensor([t]), torch.arange(h), torch.arange(w), torch.tensor([0]))
    return ids.expand(batch, -1, -1)


def text_ids(batch: int, length: int) -> torch.Tensor:
    ids = torch.cartesian_prod(torch.tensor([0]), torch.tensor([0]), torch.tensor([0]), torch.arange(length))
    return ids.expand(batch, -1, -1)


def inputs(reference, batch=2, h=3, w=5, txt=7, dtype=torch.float32, guidance=True, seed=1) -> dict:
    """Keyword inputs in our names: non-square grid, distinct timesteps per sample."""
    g = torch.Generator().manual_seed(seed)
    cfg = reference.config
    return {
        "x": torch.randn(batch, h * w, cfg.in_channels, generator=g).to(dtype),
        "x_ids": grid_ids(batch, h, w),
        "timesteps": torch.linspace(0.9, 0.2, batch),
        "ctx": torch.randn(batch, txt, cfg.joint_attention_dim, generator=g).to(dtype),
        "ctx_ids": text_ids(batch, txt),
        "guidance": torch.linspace(4.0, 2.5, batch) if guidance else None,
    }


def run_diffusers(reference, x, x_ids, timesteps, ctx, ctx_ids, guidance=None) -> torch.Tensor:
    with torch.no_grad():
        out = reference(
            hidden_states=x,
            encoder_hidden_states=ctx,
            timestep=timesteps,
            img_ids=x_ids,
            txt_ids=ctx_ids,
            guidance=guidance,
            return_dict=False,
        )
    return out[0]


def assert_close(ours: torch.Tensor, expected: torch.Tensor, rel: float):
    """Max abs difference within `rel` of the output's scale (its max abs value)."""
    assert ours.shape == expected.shape and ours.dtype == expected.dtype
    scale = expected.float().abs().max().item()
    diff = (ours.float() - expected.float()).abs().max().item()
    assert diff <= rel * scale, f"max diff {diff:.3g} > {rel} x scale {scale:.3g}"
