"""Attention backends: chosen once, every block calls the chosen kernel, and each one this machine has equals SDPA."""

from __future__ import annotations

import pytest
import torch

from featherflux.model import attention
from featherflux.model.attention import BACKENDS, Backend, select, why_not
from featherflux.model.build import build_transformer
from featherflux.model.config import DiTConfig

TINY = DiTConfig(
    in_channels=8, context_in_dim=12, hidden_size=32, num_heads=2, depth=2, depth_single_blocks=3, axes_dim=(4,) * 4
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


def test_auto_on_cpu_is_sdpa():
    assert select("auto", "cpu", torch.float32).name == "sdpa"
    assert select("auto", "cpu", torch.bfloat16).name == "sdpa"


def test_unknown_backend_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown attention backend 'xformers'.*sdpa, cudnn, flash, flash3, sage"):
        select("xformers", "cpu", torch.float32)


def test_a_backend_that_cannot_run_says_why_and_what_can():
    with pytest.raises(ValueError, match="'flash' cannot run here: needs a CUDA device.*available: sdpa"):
        select("flash", "cpu", torch.bfloat16)


def test_a_missing_package_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(attention, "_package_version", lambda module: None)
    assert why_not("flash3", "cuda", torch.bfloat16) == "the flash_attn_interface package is not installed"
    assert why_not("sage", "cuda", torch.bfloat16) == "the sageattention package is not installed"
    assert why_not("flash", "cuda", torch.float32) == "needs bf16 or fp16 weights (these are float32)"


@pytest.mark.parametrize("name", BACKENDS)
def test_each_available_backend_equals_sdpa(name):
    reason = why_not(name, DEVICE, DTYPE)
    if reason is not None:
        pytest.skip(f"{name}: {reason}")
    q, k, v = (
        torch.randn(2, 3, 40, 16, generator=torch.Generator().manual_seed(i)).to(DEVICE, DTYPE) for i in range(3)
    )
    tolerance = 1e-6 if DTYPE == torch.float32 else 2e-2 if name != "sage" else 6e-2
    torch.testing.assert_close(
        select(name, DEVICE, DTYPE).attend(q, k, v), attention.sdpa(q, k, v), atol=tolerance, rtol=tolerance
    )


def test_every_block_and_the_reference_kv_path_call_the_chosen_kernel():
    calls = []

    def counting(q, k, v):
        calls.append(k.shape[2])
        return attention.sdpa(q, k, v)

    dit = build_transformer(TINY)
    dit.set_attention(Backend("counting", counting))
    assert dit.attention_backend == "counting"
    x, ctx = torch.randn(1, 6, 8), torch.randn(1, 5, 12)
    ids = torch.zeros(1, 6, 4, dtype=torch.long)
    ctx_ids = torch.zeros(1, 5, 4, dtype=torch.long)
    t = torch.full((1,), 0.5)
    dit(x, ids, t, ctx, ctx_ids)
    assert calls == [11] * 5  # 2 double + 3 single blocks over 5 text + 6 image tokens
    calls.clear()
    dit.forward_kv_extract(x, ids, t, ctx, ctx_ids, num_ref=2)
    assert calls == [2] * 5 + [11] * 5  # the references alone, then text + 4 noisy tokens + 2 cached references
