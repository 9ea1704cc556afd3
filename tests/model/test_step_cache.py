"""First-block step caching: threshold 0 is the plain path exactly; a large threshold skips passes."""

from __future__ import annotations

import pytest
import torch

from featherflux.model.build import build_transformer
from featherflux.model.config import DiTConfig
from featherflux.sampling import StepCaches, denoise, get_schedule, image_ids, text_ids

TINY = DiTConfig(
    in_channels=8, context_in_dim=12, hidden_size=32, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=(4,) * 4
)


def run(threshold: float | None, negative: bool = False):
    dit = build_transformer(TINY, seed=3)
    g = torch.Generator().manual_seed(0)
    latents, ctx = torch.randn(1, 12, 8, generator=g), torch.randn(1, 5, 12, generator=g)
    caches = None if threshold is None else StepCaches(threshold)
    out = denoise(dit, latents, get_schedule(16, 12), x_ids=image_ids(3, 4), ctx=ctx, ctx_ids=text_ids(5),
                  negative_ctx=torch.randn(1, 3, 12, generator=g) if negative else None, cfg_scale=3.0,
                  caches=caches)
    return out, caches


@pytest.mark.parametrize("negative", [False, True])
def test_threshold_zero_runs_every_pass_and_equals_the_plain_path(negative):
    plain, _ = run(None, negative)
    cached, caches = run(0.0, negative)
    assert torch.equal(plain, cached)
    assert caches.dit_calls == 16 * (2 if negative else 1)  # different prompt lengths: CFG as two passes


def test_a_large_threshold_runs_fewer_passes_and_stays_close():
    plain, _ = run(None)
    cached, caches = run(1.0)  # a random tiny DiT changes fast; 1.0 skips about half
    assert 1 <= caches.dit_calls < 16
    assert (cached - plain).abs().mean() < 0.25 * plain.abs().mean()
