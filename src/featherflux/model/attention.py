"""Attention backends of the DiT: picked once when a pipeline loads, then a plain function every block calls.

- "sdpa": PyTorch's `scaled_dot_product_attention` (it picks its own kernel; the only backend on CPU).
- "cudnn": the same call held to cuDNN's fused attention (CUDA, bf16/fp16).
- "flash": FlashAttention 2 (`flash_attn` package; CUDA compute capability 8.0+, bf16/fp16).
- "flash3": FlashAttention 3 (`flash_attn_interface`, built from the flash-attention repo's hopper/; sm_90).
- "sage": SageAttention (`sageattention` package; CUDA, bf16/fp16; 8-bit QK, so not bit-exact).
"auto" takes the fastest that is installed and fits the device and dtype: flash3 on Hopper, then cuDNN, then SDPA.
Every backend takes and returns (B, H, S, D) tensors, so the K/V-reference path and reference tokens use the same
call.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from featherflux.errors import UserError

BACKENDS = ("sdpa", "cudnn", "flash", "flash3", "sage")
AUTO_ORDER = ("flash3", "cudnn", "sdpa")
PACKAGES = {"flash": "flash_attn", "flash3": "flash_attn_interface", "sage": "sageattention"}
HALF = (torch.bfloat16, torch.float16)


def sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def cudnn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)


def _flash(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    from flash_attn import flash_attn_func  # an optional package, imported once the backend is chosen

    return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _flash3(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    from flash_attn_interface import flash_attn_func  # an optional package, imported once the backend is chosen

    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    out = out[0] if isinstance(out, tuple) else out  # some releases also return the log-sum-exp
    return out.transpose(1, 2)


def _sage(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    from sageattention import sageattn  # an optional package, imported once the backend is chosen

    return sageattn(q, k, v, tensor_layout="HND")


FUNCTIONS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "sdpa": sdpa,
    "cudnn": cudnn,
    "flash": _flash,
    "flash3": _flash3,
    "sage": _sage,
}


@dataclass(frozen=True)
class Backend:
    name: str
    attend: Callable[[Tensor, Tensor, Tensor], Tensor]  # (B, H, S, D) q, k, v -> (B, H, S, D)


def _package_version(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    for dist in (module, module.replace("_", "-")):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "installed"


def why_not(name: str, device: torch.device | str, dtype: torch.dtype) -> str | None:
    """None when backend `name` can run on `device` in `dtype`, else the reason it cannot."""
    device = torch.device(device)
    if name == "sdpa":
        return None
    if device.type != "cuda":
        return f"needs a CUDA device (this is {device.type})"
    if not torch.cuda.is_available():
        return "PyTorch sees no CUDA device"
    if dtype not in HALF:
        return f"needs bf16 or fp16 weights (these are {str(dtype).removeprefix('torch.')})"
    capability = torch.cuda.get_device_capability(device)
    if name == "cudnn":
        return None if torch.backends.cudnn.is_available() else "PyTorch sees no cuDNN"
    package = PACKAGES[name]
    if _package_version(package) is None:
        return f"the {package} package is not installed"
    if name == "flash" and capability < (8, 0):
        return f"needs compute capability 8.0+ (this GPU is {capability[0]}.{capability[1]})"
    if name == "flash3" and capability[0] != 9:
        return f"needs a Hopper GPU, compute capability 9.x (this one is {capability[0]}.{capability[1]})"
    return None


def check_name(name: str) -> None:
    if name != "auto" and name not in BACKENDS:
        raise UserError(f"unknown attention backend {name!r}; use auto or one of {', '.join(BACKENDS)}")


def select(name: str, device: torch.device | str, dtype: torch.dtype) -> Backend:
    """The backend `name` ("auto" or one of BACKENDS) for `device` and `dtype`, or a UserError that lists the ones
    this machine can run."""
    check_name(name)
    usable = [b for b in BACKENDS if why_not(b, device, dtype) is None]
    if name == "auto":
        name = next(b for b in AUTO_ORDER if b in usable)
    elif name not in usable:
        raise UserError(
            f"attention backend {name!r} cannot run here: {why_not(name, device, dtype)}; available: "
            f"{', '.join(usable)}"
        )
    return Backend(name, FUNCTIONS[name])


def report(device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """One line per backend: usable or why not, with its package and version (for `featherflux info --backends`)."""
    lines = []
    for name in BACKENDS:
        package = PACKAGES.get(name, "torch")
        version = torch.__version__ if package == "torch" else _package_version(package)
        reason = why_not(name, device, dtype)
        where = f"{package} {version}" if version else f"{package} not installed"
        lines.append(f"{name:7} {'yes' if reason is None else 'no':3}  {where}" + (f"  ({reason})" if reason else ""))
    return lines
