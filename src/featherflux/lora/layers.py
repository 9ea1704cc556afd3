"""LoRA and LoKr as a module swap: `LoRALinear` wraps a Linear and adds named adapter side branches.

Design choices:
- The wrapped `base` is any module with `in_features`, `out_features` and `forward(x)`: a plain `nn.Linear` or a
  quantized Linear from `featherflux.memory.quant`. Adapters never touch its weights, so a quantized or streamed
  base keeps working; only `fuse()` needs a float `weight`.
- Several adapters live side by side, each with a user scale that can change between calls (no re-fusing).
- Every LoRA on one module is a single (down, up) pair. A file that splits a fused projection into parts (diffusers'
  to_q/to_k/to_v on our fused `qkv`) becomes one pair with `down = cat(down_q, down_k, down_v)` and a block-diagonal
  `up`, which is exactly the same map.
- LoKr keeps its Kronecker factors and applies them as `w1 @ X @ w2^T` on reshaped inputs, never building the full
  delta; parts that cover only some output rows are padded into place.
- `fuse()` keeps the original weight tensor and `unfuse()` puts it back, so unfusing is exact, not a subtraction.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from featherflux.errors import UserError


class LoRAAdapter(nn.Module):
    """delta(x) = scale * up(down(x)); down (rank, in), up (out, rank)."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, scale: float, trainable: bool = False):
        super().__init__()
        self.down = nn.Parameter(down, requires_grad=trainable)
        self.up = nn.Parameter(up, requires_grad=trainable)
        self.scale = float(scale)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x.to(self.down.dtype), self.down), self.up) * self.scale

    def delta_weight(self) -> torch.Tensor:
        return (self.up.float() @ self.down.float()) * self.scale


class KroneckerPart(nn.Module):
    """Kronecker delta kron(w1, w2) * scale on output rows [row_start, row_start + out) of the wrapped Linear.

    Each factor is a full matrix or a low-rank pair (`w1_a @ w1_b`), as LyCORIS stores them.
    """

    def __init__(self, w1: torch.Tensor | tuple, w2: torch.Tensor | tuple, scale: float, row_start: int):
        super().__init__()
        self.w1 = nn.ParameterList([nn.Parameter(t, requires_grad=False) for t in _factors(w1)])
        self.w2 = nn.ParameterList([nn.Parameter(t, requires_grad=False) for t in _factors(w2)])
        self.scale = float(scale)
        self.row_start = row_start

    def factor(self, which: nn.ParameterList) -> torch.Tensor:
        return which[0] if len(which) == 1 else which[0] @ which[1]

    @property
    def shape(self) -> tuple[int, int]:
        w1, w2 = self.factor(self.w1), self.factor(self.w2)
        return w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w1, w2 = self.factor(self.w1), self.factor(self.w2)
        # kron(w1, w2) @ vec(X) == vec(w1 @ X @ w2^T) with X = x reshaped to (in_1, in_2)
        xs = x.to(w1.dtype).unflatten(-1, (w1.shape[1], w2.shape[1]))
        y = torch.matmul(torch.matmul(w1, xs), w2.T)  # (..., out_1, out_2)
        return y.flatten(-2) * self.scale

    def delta_weight(self) -> torch.Tensor:
        return torch.kron(self.factor(self.w1).float(), self.factor(self.w2).float()) * self.scale


def _factors(w) -> list[torch.Tensor]:
    return list(w) if isinstance(w, (tuple, list)) else [w]


class LoKrAdapter(nn.Module):
    def __init__(self, parts: list[KroneckerPart], out_features: int):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = 0
        for part in self.parts:
            y = part(x)
            out = out + F.pad(y, (part.row_start, self.out_features - part.row_start - y.shape[-1]))
        return out

    def delta_weight(self) -> torch.Tensor:
        out = 0
        for part in self.parts:
            d = part.delta_weight()
            out = out + F.pad(d, (0, 0, part.row_start, self.out_features - part.row_start - d.shape[0]))
        return out


class LoRALinear(nn.Module):
    """A Linear (or quantized Linear) plus named adapters: y = base(x) + sum_a user_scale[a] * adapter_a(x)."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.adapters = nn.ModuleDict()
        self.user_scales: dict[str, float] = {}
        self.active: list[tuple[nn.Module, float]] = []  # (adapter, scale) with scale != 0, kept by _refresh
        self.original_weight: torch.Tensor | None = None  # set while fused

    @property
    def fused(self) -> bool:
        return self.original_weight is not None

    @property
    def names(self) -> list[str]:
        return list(self.user_scales)

    def adapter(self, name: str) -> nn.Module:
        return self.adapters[_key(name)]

    def add_adapter(self, name: str, adapter: nn.Module, scale: float = 1.0) -> None:
        if self.fused:
            raise UserError("cannot add a LoRA while LoRAs are fused; call unfuse_lora() first")
        if _key(name) in self.adapters:
            raise UserError(f"a LoRA named {name!r} is already loaded; pass another name or unload it first")
        self.adapters[_key(name)] = adapter
        self.user_scales[name] = float(scale)
        self._refresh()

    def remove_adapter(self, name: str) -> None:
        if self.fused:
            raise UserError("cannot unload a LoRA while LoRAs are fused; call unfuse_lora() first")
        del self.adapters[_key(name)]
        del self.user_scales[name]
        self._refresh()

    def set_scale(self, name: str, scale: float) -> None:
        if self.fused:
            raise UserError("cannot change a LoRA scale while LoRAs are fused; call unfuse_lora() first")
        self.user_scales[name] = float(scale)
        self._refresh()

    def _refresh(self) -> None:
        # the forward pass reads this list: no name mangling or dict lookups per call
        self.active = [(self.adapters[_key(n)], s) for n, s in self.user_scales.items() if s != 0.0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.fused:
            return out
        for adapter, scale in self.active:
            out = out + (adapter(x) * scale).to(out.dtype)
        return out

    def delta_weight(self) -> torch.Tensor:
        """The sum of the active adapters' weight deltas (out, in) in float32."""
        delta = torch.zeros(self.out_features, self.in_features)
        for name, scale in self.user_scales.items():
            adapter = self.adapters[_key(name)]
            delta = delta.to(adapter_device(adapter)) + adapter.delta_weight() * scale
        return delta

    def fuse(self) -> None:
        """Add the adapters into the base weight; the original tensor is kept so that unfuse() is exact."""
        if self.fused or not self.adapters:
            return
        weight = getattr(self.base, "weight", None)
        if not isinstance(self.base, nn.Linear) or weight is None or not weight.is_floating_point():
            raise UserError(
                "cannot fuse a LoRA into quantized weights; keep it unfused (it runs as a side branch) "
                "or load the model without quantization"
            )
        self.original_weight = weight.data
        weight.data = (weight.data.float() + self.delta_weight().to(weight.device)).to(weight.dtype)

    def unfuse(self) -> None:
        if not self.fused:
            return
        self.base.weight.data = self.original_weight
        self.original_weight = None


def _key(name: str) -> str:
    """Adapter names are free text (file names); module keys may not contain dots or shadow nn.Module methods."""
    return "lora_" + re.sub(r"[^0-9A-Za-z_]", "_", name)


def adapter_device(adapter: nn.Module) -> torch.device:
    return next(adapter.parameters()).device
