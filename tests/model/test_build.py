"""build_transformer: real-size DiTs without a checkpoint, for benchmarks and tests."""

from __future__ import annotations

import pytest
import torch

from featherflux.memory.sizes import dit_weights
from featherflux.model.build import build_transformer
from featherflux.model.config import FAMILIES, DiTConfig

TINY = DiTConfig(
    in_channels=8, context_in_dim=12, hidden_size=32, num_heads=2, depth=1, depth_single_blocks=2, axes_dim=(4,) * 4
)


def test_same_seed_same_weights_and_the_global_rng_is_untouched():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b = build_transformer(TINY, seed=1), build_transformer(TINY, seed=1)
    c = build_transformer(TINY, seed=2)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.img_in.weight, c.img_in.weight)
    assert not any(p.requires_grad for p in a.parameters()) and not a.training


def test_dtype_and_empty_init():
    model = build_transformer(TINY, dtype=torch.bfloat16, init="empty")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32


@pytest.mark.parametrize("family", ["flux.2-dev", "klein-4b", "klein-9b"])
def test_a_real_family_on_meta_uses_no_memory(family):
    model = build_transformer(family, device="meta", dtype=torch.bfloat16)
    assert next(model.parameters()).is_meta
    assert sum(p.numel() for p in model.parameters()) == dit_weights(FAMILIES[family].dit).total.params


def test_bad_names_are_user_errors():
    with pytest.raises(ValueError, match="unknown model family 'flux.3'"):
        build_transformer("flux.3")
    with pytest.raises(ValueError, match="unknown init 'zeros'; use one of random, empty"):
        build_transformer(TINY, init="zeros")
