"""Weight quantization as Linear swaps: each `nn.Linear` becomes a module holding quantized buffers and a plain
`forward` that dequantises to the activation dtype and runs an ordinary matmul (bf16 compute).

Notable features:
- `Int8Linear`: symmetric per-output-channel int8 (our own, gpt-fast style): y = (x @ W_q^T) * scale.
- `Float8Linear`: float8_e4m3fn weight with one fp32 scale per output row (BFL's "fp8r" layout, so their fp8
  checkpoints load straight into it). On devices with fp8 tensor cores (sm_89+) it can run `torch._scaled_mm`
  with per-row activation scales instead of dequantising; by default each call decides from its input's device.
- `NF4Linear`: bitsandbytes NF4 codes (works on CPU in bitsandbytes >= 0.45); the absmax and code tables are
  buffers, so `.to(device)` and block streaming move them like any weight. Its QuantState is kept between calls,
  and a one-row input (batch-1 modulation) goes through bitsandbytes' 4-bit GEMV.
- GGUF block formats live in `memory.gguf` (`GGUFLinear`) and follow the same pattern.
State-dict names stay those of the Linear (`weight`, plus `scale`/`absmax`), there are no tensor subclasses or
hooks, and a quantized model still moves with `.to()`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from featherflux.errors import MissingExtraError, UserError
from featherflux.model.swap import replace_module

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max
NF4_BLOCK = 64
# Latent in/out projections of the DiT: tiny, and every error there lands directly in the image.
KEEP_FULL_PRECISION = ("img_in", "final_layer.linear")


class Int8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype=torch.bfloat16, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(out_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.dtype, w.device)
        q.weight.copy_((w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        q.scale.copy_(scale)
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.detach())
        return q

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype) + (0 if self.bias is None else self.bias)


class Float8Linear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        dtype=torch.bfloat16,
        device=None,
        scaled_mm: bool | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features, self.scaled_mm = in_features, out_features, scaled_mm
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, scaled_mm: bool | None = None) -> Float8Linear:
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)
        q = cls(
            linear.in_features, linear.out_features, linear.bias is not None, linear.weight.dtype, w.device, scaled_mm
        )
        q.weight.copy_((w / scale[:, None]).to(torch.float8_e4m3fn))
        q.weight_scale.copy_(scale)
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.detach())
        return q

    def forward(self, x: Tensor) -> Tensor:
        # None: decided by where the input is now, so weights quantized on the host and moved later still use fp8
        use_scaled_mm = fp8_matmul_available(x.device) if self.scaled_mm is None else self.scaled_mm
        if use_scaled_mm:
            return self._scaled_mm(x)
        y = F.linear(x, self.weight.to(x.dtype)) * self.weight_scale.to(x.dtype)
        return y if self.bias is None else y + self.bias

    def _scaled_mm(self, x: Tensor) -> Tensor:
        """fp8 x fp8 on the tensor cores, activations scaled per row so outliers in one token cost nothing elsewhere."""
        rows = x.reshape(-1, self.in_features)
        x_scale = (rows.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)
        x_fp8 = (rows / x_scale).to(torch.float8_e4m3fn)
        y = torch._scaled_mm(
            x_fp8,
            self.weight.t(),
            scale_a=x_scale,
            scale_b=self.weight_scale[None, :],
            bias=self.bias,
            out_dtype=x.dtype,
        )
        return y.reshape(*x.shape[:-1], self.out_features)


class NF4Linear(nn.Module):
    """bitsandbytes NF4: 4-bit codes for a normal-distribution quantile table, one fp32 absmax per 64 weights."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype=torch.bfloat16, device=None):
        super().__init__()
        n = in_features * out_features
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        self.register_buffer("weight", torch.empty((n + 1) // 2, 1, dtype=torch.uint8, device=device))
        self.register_buffer("absmax", torch.empty(-(-n // NF4_BLOCK), dtype=torch.float32, device=device))
        self.register_buffer("code", torch.empty(16, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
        self._state = None  # bitsandbytes' QuantState, built once per (absmax tensor, dtype): see quant_state

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> NF4Linear:
        bnb = _bitsandbytes()
        w = linear.weight.detach()
        packed, state = bnb.functional.quantize_4bit(w, blocksize=NF4_BLOCK, quant_type="nf4")
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, w.dtype, w.device)
        q.weight.copy_(packed)
        q.absmax.copy_(state.absmax)
        q.code.copy_(state.code)
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.detach())
        return q

    def quant_state(self, dtype: torch.dtype):
        """The QuantState of this weight for `dtype`; rebuilt only when the buffers moved (`.to()` replaces them) or
        the dtype changed, not on every call."""
        state = self._state
        if state is None or state.absmax is not self.absmax or state.code is not self.code or state.dtype != dtype:
            state = _bitsandbytes().functional.QuantState(
                absmax=self.absmax,
                shape=torch.Size((self.out_features, self.in_features)),
                code=self.code,
                blocksize=NF4_BLOCK,
                quant_type="nf4",
                dtype=dtype,
            )
            self._state = state
        return state

    def dequantize(self, dtype: torch.dtype) -> Tensor:
        return _bitsandbytes().functional.dequantize_4bit(self.weight, self.quant_state(dtype))

    def forward(self, x: Tensor) -> Tensor:
        if x.numel() == self.in_features:
            # One row (the DiT's modulation Linears at batch 1): bitsandbytes' 4-bit GEMV reads the codes directly
            # instead of writing a dequantised weight first; same result, less memory traffic.
            return _bitsandbytes().matmul_4bit(x, self.weight.t(), quant_state=self.quant_state(x.dtype), bias=self.bias)
        return F.linear(x, self.dequantize(x.dtype), self.bias)


def _bitsandbytes():
    try:
        import bitsandbytes  # an optional extra (featherflux[quant]), imported only for NF4
    except ImportError:
        raise MissingExtraError("NF4 quantization", "quant") from None
    return bitsandbytes


def nf4_available() -> bool:
    try:
        import bitsandbytes.functional  # noqa: F401 -- optional, and it may fail to load on a broken CUDA setup
    except Exception:  # noqa: BLE001 -- a broken CUDA setup raises RuntimeError/OSError from inside bitsandbytes
        return False
    return True


_FP8_TENSOR_CORES: dict[torch.device, bool] = {}  # per device: Float8Linear asks on every call


@torch.compiler.assume_constant_result  # a compiled block asks once, when it is traced
def fp8_matmul_available(device: torch.device | str) -> bool:
    """fp8 tensor cores: CUDA compute capability 8.9 (Ada) or newer."""
    device = torch.device(device)
    if device not in _FP8_TENSOR_CORES:
        _FP8_TENSOR_CORES[device] = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)
    return _FP8_TENSOR_CORES[device]


def default_predicate(name: str, module: nn.Linear) -> bool:
    return not name.endswith(KEEP_FULL_PRECISION) and module.in_features % NF4_BLOCK == 0


def quantize(
    model: nn.Module,
    mode: str,
    predicate: Callable[[str, nn.Linear], bool] = default_predicate,
    fp8_matmul: bool | None = None,
) -> nn.Module:
    """Replace, in place, every `nn.Linear` for which `predicate(qualified_name, linear)` holds. Returns the model.

    `mode`: "int8", "fp8" or "nf4". `fp8_matmul` (fp8 only): run `torch._scaled_mm` instead of dequantising;
    None = decided at each call by the input's device (fp8 tensor cores there, or the dequantising fallback).
    """
    if mode not in ("int8", "fp8", "nf4"):
        raise UserError(f"unknown quantization {mode!r}; use int8, fp8 or nf4")
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and predicate(n, m)]
    for name, linear in targets:
        if mode == "int8":
            q = Int8Linear.from_linear(linear)
        elif mode == "nf4":
            q = NF4Linear.from_linear(linear)
        else:
            q = Float8Linear.from_linear(linear, scaled_mm=fp8_matmul)
        replace_module(model, name, q)
    return model
