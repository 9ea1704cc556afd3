"""FLUX.2 position and timestep encodings.

- RoPE over 4 position axes (t, h, w, l), `axes_dim` channels each, theta 2000. Angles are computed in float64
  (float32 where the device has no float64) and the rotation is applied in float32, then cast back, so bf16
  models rotate exactly like the reference. Pairs are interleaved: channels (2i, 2i+1) rotate together.
- `pe` is one tensor, (B, 1, S, head_dim/2, 2) holding (cos, sin), built once per forward and shared by all blocks.
- QK RMSNorm and RoPE are one function, `norm_rope`: unfused they are about eight elementwise kernels for each of q
  and k, each with an fp32 copy; written as one function the compiler makes one kernel of it, with the same math.
- Sinusoidal timestep embedding: [cos, sin] of t * 10000^(-i/half), computed in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def rope(ids: Tensor, axes_dim: tuple[int, ...], theta: int) -> Tensor:
    """Position ids (B, S, n_axes) -> pe (B, 1, S, sum(axes_dim)/2, 2) float32 [cos, sin]."""
    angle_dtype = torch.float32 if ids.device.type == "mps" else torch.float64
    pos = ids.float()
    angles = []
    for axis, dim in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=angle_dtype, device=ids.device) / dim)
        angles.append(pos[..., axis, None].to(angle_dtype) * omega)  # (B, S, dim/2)
    angle = torch.cat(angles, dim=-1)
    return torch.stack([angle.cos(), angle.sin()], dim=-1).float().unsqueeze(1)


def norm_rope(x: Tensor, scale: Tensor, pe: Tensor, eps: float, dtype: torch.dtype) -> Tensor:
    """Per-head RMSNorm of (B, H, S, D) queries or keys with `scale`, rounded to `dtype` (where the reference rounds),
    then rotated by pe (B, 1, S, D/2, 2) in float32 and cast back to `dtype`."""
    x = F.rms_norm(x, scale.shape, scale, eps).to(dtype)
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = pe.unbind(-1)
    rotated = [torch.addcmul(x0 * cos, x1, sin, value=-1), torch.addcmul(x1 * cos, x0, sin)]
    return torch.stack(rotated, dim=-1).flatten(-2).type_as(x)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """(B,) timesteps already scaled to [0, 1000] -> (B, dim) [cos, sin] embedding in t's dtype."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(t.dtype)
