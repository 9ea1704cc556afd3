"""The fused QK-norm + RoPE against the plain path: RMSNorm, then a rotation written with complex numbers."""

import pytest
import torch

from featherflux.model.rope import norm_rope, rope

EPS = 1e-6


def plain(x, scale, pe, dtype):
    normed = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype) * scale
    pairs = torch.view_as_complex(normed.to(dtype).float().unflatten(-1, (-1, 2)).contiguous())
    turn = torch.view_as_complex(pe.contiguous())  # (cos, sin) -> e^{i angle}
    return torch.view_as_real(pairs * turn).flatten(-2).to(dtype)


def inputs(dtype):
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, 10, 4))
    pe = rope(ids, (8, 8, 8, 8), 2000)
    x = (torch.randn(2, 3, 10, 32) * 3).to(dtype)
    scale = (1 + 0.3 * torch.randn(32)).to(dtype)
    return x, scale, pe


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_norm_rope_matches_the_plain_path(dtype, atol):
    x, scale, pe = inputs(dtype)
    out = norm_rope(x, scale, pe, EPS, dtype)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out.float(), plain(x, scale, pe, dtype).float(), atol=atol, rtol=0)


def test_compiled_norm_rope_matches_eager():
    x, scale, pe = inputs(torch.float32)
    compiled = torch.compile(norm_rope, fullgraph=True)
    torch.testing.assert_close(compiled(x, scale, pe, EPS, torch.float32), norm_rope(x, scale, pe, EPS, torch.float32))
