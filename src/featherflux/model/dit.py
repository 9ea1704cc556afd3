"""The FLUX.2 diffusion transformer, with BFL's checkpoint names as its parameter names.

Notable features:
- Double-stream blocks (separate image and text weights, joint attention over [txt, img]) followed by fused
  parallel single-stream blocks over the concatenated [txt, img] sequence. Text tokens always come first.
- Fused projections: one `qkv` per stream in double blocks; `linear1` = qkv + SwiGLU input and `linear2` =
  attention output + MLP output in single blocks. No biases anywhere.
- Modulation (shift, scale, gate) is computed once per forward from the timestep (+ guidance) vector and shared
  by every block of a kind.
- Per-head QK RMSNorm then RoPE, per stream, in one function the compiler fuses; 4-axis interleaved RoPE (see
  `rope.py`); SwiGLU with the gate in the first half.
- Timestep and guidance are cast to the model dtype before the x1000 scaling, like the reference pipelines.
- Blocks are plain modules in `double_blocks` / `single_blocks` ModuleLists, called with positional tensors only:
  `DoubleStreamBlock(img, txt, pe, mod_img, mod_txt[, ref_kv]) -> (img, txt)` and
  `SingleStreamBlock(x, pe, mod[, ref_kv]) -> x`, so block wrappers (weight streaming, LoRA) pass them through.
- Reference-token K/V cache (klein-9b-kv): reference tokens attend only to themselves and are modulated at a
  fixed timestep, so their keys and values do not depend on the step or the prompt. `extract_ref_kv` runs them
  alone once and stores every block's K/V; `forward_kv_cached` lets the text and image tokens attend to them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from featherflux.model.attention import Backend, sdpa
from featherflux.model.config import DiTConfig
from featherflux.model.rope import norm_rope, rope, timestep_embedding

EPS = 1e-6


@dataclass
class RefKV:
    """One block's reference-token keys and values, (B, H, R, head_dim) after QK norm and RoPE.

    Passed empty to a block, the block fills it from the tokens it runs on (extraction); passed full, the block's
    tokens also attend to these keys and values.
    """

    k: Tensor | None = None
    v: Tensor | None = None


@dataclass
class FirstBlockCache:
    """Step caching across the denoising steps of one run (the FLUX community's "first-block cache").

    Every step runs the first double block. When the image stream's residual through it changed by less than
    `threshold` (mean absolute change over mean magnitude) since the last step that ran in full, the rest of the DiT
    is skipped and the remainder residual of that step (final hidden state minus first-block output) is reused.
    Deciding needs one number from the device per step, so with `threshold` > 0 the loop syncs once a step; at 0 it
    never skips and never reads. One cache per stream of calls (the conditional and unconditional CFG passes differ).
    A DiT split across processes sets `rows` (which image rows of its slice are real tokens) and `reduce` (sums the
    two totals over the ranks), so that every rank takes the decision one process would take.
    """

    threshold: float = 0.0
    full_passes: int = 0  # DiT passes that ran every block
    first_residual: Tensor | None = None
    remainder: Tensor | None = None
    rows: Tensor | None = None  # (1, N, 1) 1 for real image rows, 0 for padding
    reduce: Callable[[Tensor], Tensor] | None = None

    def reusable(self, first_residual: Tensor) -> bool:
        if self.threshold <= 0 or self.first_residual is None or self.first_residual.shape != first_residual.shape:
            return False
        change, size = (first_residual - self.first_residual).abs(), self.first_residual.abs()
        if self.rows is not None:
            change, size = change * self.rows, size * self.rows
        totals = torch.stack([change.sum(), size.sum()])
        if self.reduce is not None:
            totals = self.reduce(totals)
        return (totals[0] / totals[1]).item() < self.threshold  # the one host read of a step

    def store(self, entry: Tensor, first: Tensor, last: Tensor) -> None:
        """After a full pass: the image tokens entering the first block, leaving it, and leaving the last one."""
        self.full_passes += 1
        if self.threshold > 0:
            self.first_residual, self.remainder = first - entry, last - first


@dataclass
class RefKVCache:
    """Reference-token K/V for every block; made by `Flux2.extract_ref_kv`."""

    double: list[RefKV] = field(default_factory=list)
    single: list[RefKV] = field(default_factory=list)
    num_ref: int = 0


def attention(q: Tensor, k: Tensor, v: Tensor, attend=sdpa, ref_kv: RefKV | None = None) -> Tensor:
    """(B, H, S, D) normalised and rotated queries and keys, values -> (B, S, H*D). `attend` is the backend's kernel
    (`featherflux.model.attention`)."""
    if ref_kv is not None:
        if ref_kv.k is None:
            ref_kv.k, ref_kv.v = k, v.contiguous()  # contiguous: don't keep the whole fused projection alive
        else:
            k = torch.cat([k, ref_kv.k], dim=2)
            v = torch.cat([v, ref_kv.v], dim=2)
    x = attend(q, k, v)
    return x.transpose(1, 2).flatten(2)


def split_heads(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B, L, 3*H*D) -> q, k, v views of shape (B, H, L, D)."""
    q, k, v = qkv.unflatten(-1, (3, num_heads, -1)).permute(2, 0, 3, 1, 4)
    return q, k, v


def _batched(ids: Tensor) -> Tensor:
    """Position ids may come as (S, n_axes), shared by the batch, or (B, S, n_axes)."""
    return ids if ids.ndim == 3 else ids[None]


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    # addcmul: one fused pass over the activations instead of a multiply and an add (and no temporary)
    return torch.addcmul(shift, F.layer_norm(x, x.shape[-1:], eps=EPS), 1 + scale)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate).mul_(up)  # in place: the SiLU output is a fresh tensor, no second temporary


class SwiGLU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return swiglu(*x.chunk(2, dim=-1))


class RMSNorm(nn.Module):
    """The scale of a per-head RMSNorm; applied by `norm_rope`, fused with RoPE."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))


class QKNorm(nn.Module):
    """Per-head RMSNorm of queries and keys, followed by RoPE (fused in `norm_rope`)."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm = RMSNorm(head_dim)
        self.key_norm = RMSNorm(head_dim)

    def forward(self, q: Tensor, k: Tensor, pe: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        return norm_rope(q, self.query_norm.scale, pe, EPS, dtype), norm_rope(k, self.key_norm.scale, pe, EPS, dtype)


class SelfAttention(nn.Module):
    """The weights of one stream's attention in a double block (the attention itself is joint)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim, bias=False)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, dim, bias=False)
        self.out_layer = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class Modulation(nn.Module):
    """vec (B, D) -> (B, 1, sets * 3 * D): `sets` (shift, scale, gate) triples, shared by all blocks of a kind."""

    def __init__(self, dim: int, sets: int):
        super().__init__()
        self.lin = nn.Linear(dim, sets * 3 * dim, bias=False)

    def forward(self, vec: Tensor) -> Tensor:
        return self.lin(F.silu(vec))[:, None, :]


class DoubleStreamBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_hidden_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.attend = sdpa  # the attention kernel; `Flux2.set_attention` swaps it
        self.img_attn = SelfAttention(dim, num_heads)
        self.txt_attn = SelfAttention(dim, num_heads)
        self.img_mlp = nn.Sequential(
            nn.Linear(dim, 2 * mlp_hidden_dim, bias=False), SwiGLU(), nn.Linear(mlp_hidden_dim, dim, bias=False)
        )
        self.txt_mlp = nn.Sequential(
            nn.Linear(dim, 2 * mlp_hidden_dim, bias=False), SwiGLU(), nn.Linear(mlp_hidden_dim, dim, bias=False)
        )

    def forward(
        self, img: Tensor, txt: Tensor, pe: Tensor, mod_img: Tensor, mod_txt: Tensor, ref_kv: RefKV | None = None
    ) -> tuple[Tensor, Tensor]:
        """img (B, N, D), txt (B, L, D), pe for [txt, img], mods (B, 1, 6D) -> (img, txt)."""
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = mod_img.chunk(6, dim=-1)
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = mod_txt.chunk(6, dim=-1)

        txt_pe, img_pe = pe.split([txt.shape[1], img.shape[1]], dim=2)
        img_q, img_k, img_v = split_heads(self.img_attn.qkv(modulate(img, img_shift1, img_scale1)), self.num_heads)
        img_q, img_k = self.img_attn.norm(img_q, img_k, img_pe, img_v.dtype)
        txt_q, txt_k, txt_v = split_heads(self.txt_attn.qkv(modulate(txt, txt_shift1, txt_scale1)), self.num_heads)
        txt_q, txt_k = self.txt_attn.norm(txt_q, txt_k, txt_pe, txt_v.dtype)

        q = torch.cat([txt_q, img_q], dim=2)
        k = torch.cat([txt_k, img_k], dim=2)
        v = torch.cat([txt_v, img_v], dim=2)
        del img_q, img_k, img_v, txt_q, txt_k, txt_v  # free the qkv projections before attention
        attn = attention(q, k, v, self.attend, ref_kv)
        del q, k, v
        txt_attn, img_attn = attn.split([txt.shape[1], img.shape[1]], dim=1)

        img = torch.addcmul(img, img_gate1, self.img_attn.proj(img_attn))
        img = torch.addcmul(img, img_gate2, self.img_mlp(modulate(img, img_shift2, img_scale2)))
        txt = torch.addcmul(txt, txt_gate1, self.txt_attn.proj(txt_attn))
        txt = torch.addcmul(txt, txt_gate2, self.txt_mlp(modulate(txt, txt_shift2, txt_scale2)))
        if txt.dtype == torch.float16:  # fp16 overflows in the text stream; clip like the reference
            txt = txt.clip(-65504, 65504)
        return img, txt


class SingleStreamBlock(nn.Module):
    """Parallel block: attention and MLP read one fused input projection and write one fused output projection."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.attend = sdpa  # the attention kernel; `Flux2.set_attention` swaps it
        self.split_sizes = [3 * dim, 2 * mlp_hidden_dim]
        self.linear1 = nn.Linear(dim, 3 * dim + 2 * mlp_hidden_dim, bias=False)
        self.linear2 = nn.Linear(dim + mlp_hidden_dim, dim, bias=False)
        self.norm = QKNorm(dim // num_heads)

    def project_in(self, x: Tensor) -> list[Tensor]:
        """linear1 -> [qkv, SwiGLU gate, SwiGLU up]. On CPU a plain Linear runs as one matmul per part: MKL's fp32
        GEMM ran a 1024 -> 9216 linear1 (the shape of `benchmarks/transformer_cpu.py`'s model) about 15% slower than the
        same work in these three parts (145 vs 165-175 GFLOP/s, standalone matmuls on 2 cores), and klein-4b's
        3072 -> 27648 equally fast either way.
        GPUs keep the one wide GEMM, and quantized or LoRA-wrapped layers their own forward."""
        qkv_size, mlp_size = self.split_sizes
        sizes = [qkv_size, mlp_size // 2, mlp_size // 2]
        if type(self.linear1) is nn.Linear and x.device.type == "cpu":
            return [F.linear(x, part) for part in self.linear1.weight.split(sizes)]
        return list(self.linear1(x).split(sizes, dim=-1))

    def forward(self, x: Tensor, pe: Tensor, mod: Tensor, ref_kv: RefKV | None = None) -> Tensor:
        """x (B, L+N, D) = [txt, img], mod (B, 1, 3D) -> x."""
        shift, scale, gate = mod.chunk(3, dim=-1)
        qkv, mlp_gate, mlp_up = self.project_in(modulate(x, shift, scale))
        q, k, v = split_heads(qkv, self.num_heads)
        q, k = self.norm(q, k, pe, v.dtype)
        attn = attention(q, k, v, self.attend, ref_kv)
        del q, k, v, qkv
        mlp = swiglu(mlp_gate, mlp_up)
        del mlp_gate, mlp_up  # the last views of linear1's output: freed before the concat below
        out = torch.addcmul(x, gate, self.linear2(torch.cat([attn, mlp], dim=-1)))
        if out.dtype == torch.float16:
            out = out.clip(-65504, 65504)
        return out


class LastLayer(nn.Module):
    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, bias=False))
        self.linear = nn.Linear(dim, out_channels, bias=False)

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)  # BFL order: shift first
        return self.linear(modulate(x, shift, scale))


class Flux2(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        dim, heads, mlp = config.hidden_size, config.num_heads, config.mlp_hidden_dim
        self.img_in = nn.Linear(config.in_channels, dim, bias=False)
        self.txt_in = nn.Linear(config.context_in_dim, dim, bias=False)
        self.time_in = MLPEmbedder(config.timestep_dim, dim)
        self.guidance_in = MLPEmbedder(config.timestep_dim, dim) if config.guidance_embed else None
        self.double_stream_modulation_img = Modulation(dim, sets=2)
        self.double_stream_modulation_txt = Modulation(dim, sets=2)
        self.single_stream_modulation = Modulation(dim, sets=1)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(dim, heads, mlp) for _ in range(config.depth))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(dim, heads, mlp) for _ in range(config.depth_single_blocks)
        )
        self.final_layer = LastLayer(dim, config.in_channels)
        self.attention_backend = "sdpa"

    def set_attention(self, backend: Backend) -> None:
        """Make every block call `backend`'s kernel (chosen once, by `attention.select`, when a pipeline loads)."""
        self.attention_backend = backend.name
        for block in self.repeated_blocks():
            block.attend = backend.attend

    def repeated_blocks(self):
        """Every double- and single-stream block (found by class: the block lists may hold streaming wrappers)."""
        return (m for m in self.modules() if isinstance(m, (DoubleStreamBlock, SingleStreamBlock)))

    def _vec(self, t1000: Tensor, g1000: Tensor | None) -> Tensor:
        """Timestep (+ guidance) already scaled by 1000 -> conditioning vector (B, D)."""
        vec = self.time_in(timestep_embedding(t1000, self.config.timestep_dim))
        if self.guidance_in is not None and g1000 is not None:
            vec = vec + self.guidance_in(timestep_embedding(g1000, self.config.timestep_dim))
        return vec

    def _scaled(self, timesteps: Tensor, guidance: Tensor | None, dtype: torch.dtype):
        # cast first, then scale: in bf16 the reference quantises t*1000 this way, and so must we
        return timesteps.to(dtype) * 1000, None if guidance is None else guidance.to(dtype) * 1000

    def _pe(self, ctx_ids: Tensor, x_ids: Tensor) -> Tensor:
        ctx_ids, x_ids = _batched(ctx_ids), _batched(x_ids)
        batch = max(ctx_ids.shape[0], x_ids.shape[0])
        ids = torch.cat([ctx_ids.expand(batch, -1, -1), x_ids.expand(batch, -1, -1)], dim=1)
        return rope(ids, self.config.axes_dim, self.config.theta)

    def forward(
        self,
        x: Tensor,
        x_ids: Tensor,
        timesteps: Tensor,
        ctx: Tensor,
        ctx_ids: Tensor,
        guidance: Tensor | None = None,
        step_cache: FirstBlockCache | None = None,
    ) -> Tensor:
        """x (B, N, in_ch), x_ids (B, N, 4), timesteps (B,) in [0, 1], ctx (B, L, ctx_dim), ctx_ids (B, L, 4),
        guidance (B,) raw scale or None -> velocity (B, N, in_ch). With `step_cache`, the blocks after the first may
        be skipped (see `FirstBlockCache`)."""
        return self._forward(x, x_ids, timesteps, ctx, ctx_ids, guidance, None, step_cache)

    def _forward(
        self, x, x_ids, timesteps, ctx, ctx_ids, guidance, cache: RefKVCache | None, step_cache=None
    ) -> Tensor:
        vec = self._vec(*self._scaled(timesteps, guidance, x.dtype))
        mod_img = self.double_stream_modulation_img(vec)
        mod_txt = self.double_stream_modulation_txt(vec)
        mod_single = self.single_stream_modulation(vec)
        pe = self._pe(ctx_ids, x_ids)
        img, txt = self.img_in(x), self.txt_in(ctx)
        num_txt = txt.shape[1]
        entry_img = img if step_cache is not None else None  # kept only when a step cache needs it
        first_img = None
        for i, block in enumerate(self.double_blocks):
            if cache is None:
                img, txt = block(img, txt, pe, mod_img, mod_txt)
            else:
                img, txt = block(img, txt, pe, mod_img, mod_txt, cache.double[i])
            if i == 0 and step_cache is not None:
                first_img = img
                if step_cache.reusable(first_img - entry_img):
                    return self.final_layer(first_img + step_cache.remainder, vec)
        x = torch.cat([txt, img], dim=1)
        del img, txt
        for i, block in enumerate(self.single_blocks):
            x = block(x, pe, mod_single) if cache is None else block(x, pe, mod_single, cache.single[i])
        if first_img is not None:
            step_cache.store(entry_img, first_img, x[:, num_txt:])
        return self.final_layer(x[:, num_txt:], vec)

    @torch.no_grad()
    def extract_ref_kv(self, ref: Tensor, ref_ids: Tensor, guidance: Tensor | None = None) -> RefKVCache:
        """Run reference tokens ref (B, R, in_ch) with ids (B, R, 4) alone, modulated at timestep 0 (clean), and
        return every block's K/V. They attend only to each other, so the result serves every denoising step."""
        t1000 = torch.zeros(ref.shape[0], dtype=ref.dtype, device=ref.device)
        vec = self._vec(t1000, None if guidance is None else guidance.to(ref.dtype) * 1000)
        mod_img = self.double_stream_modulation_img(vec)
        mod_single = self.single_stream_modulation(vec)
        pe = rope(_batched(ref_ids), self.config.axes_dim, self.config.theta)
        cache = RefKVCache(
            [RefKV() for _ in self.double_blocks], [RefKV() for _ in self.single_blocks], num_ref=ref.shape[1]
        )
        img = self.img_in(ref)
        no_txt = img[:, :0]
        for block, ref_kv in zip(self.double_blocks, cache.double):
            img, _ = block(img, no_txt, pe, mod_img, mod_img, ref_kv)
        for block, ref_kv in zip(self.single_blocks, cache.single):
            img = block(img, pe, mod_single, ref_kv)
        return cache

    def forward_kv_cached(
        self,
        x: Tensor,
        x_ids: Tensor,
        timesteps: Tensor,
        ctx: Tensor,
        ctx_ids: Tensor,
        kv_cache: RefKVCache,
        guidance: Tensor | None = None,
    ) -> Tensor:
        """`forward` for the noisy tokens only, with the cached reference K/V joining every attention."""
        return self._forward(x, x_ids, timesteps, ctx, ctx_ids, guidance, kv_cache)

    def forward_kv_extract(
        self,
        x: Tensor,
        x_ids: Tensor,
        timesteps: Tensor,
        ctx: Tensor,
        ctx_ids: Tensor,
        num_ref: int,
        guidance: Tensor | None = None,
    ) -> tuple[Tensor, RefKVCache]:
        """First step of klein-kv sampling: x = [ref, noisy] tokens (references first, as in diffusers'
        `kv_cache_mode="extract"`). Returns the velocity of the noisy tokens (B, N - num_ref, in_ch) and the cache."""
        if not 0 < num_ref < x.shape[1]:
            raise ValueError(f"num_ref must be between 1 and {x.shape[1] - 1}, got {num_ref}")
        x_ids = _batched(x_ids)
        cache = self.extract_ref_kv(x[:, :num_ref], x_ids[:, :num_ref], guidance)
        out = self.forward_kv_cached(x[:, num_ref:], x_ids[:, num_ref:], timesteps, ctx, ctx_ids, cache, guidance)
        return out, cache
