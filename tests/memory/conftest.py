import pytest
import torch

from featherflux.model.config import DiTConfig
from featherflux.model.dit import Flux2

# Small enough to run in milliseconds, wide enough (multiples of 64) for every quantization format.
SMALL_DIT = DiTConfig(
    in_channels=16,
    context_in_dim=64,
    hidden_size=128,
    num_heads=2,
    depth=2,
    depth_single_blocks=3,
    axes_dim=(16, 16, 16, 16),
    guidance_embed=True,
)


def dit_inputs(config: DiTConfig, dtype=torch.bfloat16, batch=1, n=16, l=8):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, n, config.in_channels, generator=g).to(dtype)
    ctx = torch.randn(batch, l, config.context_in_dim, generator=g).to(dtype)
    x_ids = (
        torch.stack(
            torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(n / 4), torch.zeros(1), indexing="ij"), -1
        )
        .reshape(1, n, 4)
        .expand(batch, -1, -1)
    )
    ctx_ids = torch.zeros(batch, l, 4)
    ctx_ids[..., 3] = torch.arange(l)
    return x, x_ids, torch.full((batch,), 0.7), ctx, ctx_ids, torch.full((batch,), 4.0)


@pytest.fixture
def small_dit():
    torch.manual_seed(0)
    model = Flux2(SMALL_DIT).to(torch.bfloat16).eval()
    return model
