"""Context parallelism: every rank holds a slice of the DiT's text and image tokens, and attention alone sees
them all.

- Token-wise work (projections, MLPs, norms, modulation, RoPE) runs on each rank's slice. Each stream (text, image
  tokens with any reference tokens after them, and klein-9b-kv's cached reference K/V) is cut into equal slices
  in rank order, the last padded; a rank's local sequence is its text slice then its image slice, so the blocks
  run unchanged on it.
- Attention (`SequenceParallelAttention`, installed as every block's kernel around the chosen backend):
  - Ulysses: an all-to-all turns (all heads, my tokens) into (my heads, all tokens of the row), attention runs on
    whole sequences with the backend's kernel (padding keys dropped first, so no mask is needed), and a second
    all-to-all turns it back. Heads must divide by the degree.
  - ring: each rank keeps its queries and passes its keys and values around the ring; blocks are merged with
    their log-sum-exp (an online softmax), so any head count works.
  - USP: Ulysses inside each row of the mesh, then the ring along its column.
- The velocity of the image slices is gathered on every rank, so every rank steps the same latents and returns
  the same image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from featherflux.model.dit import RefKVCache, _batched
from featherflux.parallel.group import Mesh, sum_over_ranks

Attend = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Stream:
    """`length` real tokens cut into `world` slices of `per_rank` (the last ones padded)."""

    length: int
    per_rank: int

    @classmethod
    def of(cls, length: int, world: int) -> Stream:
        return cls(length, -(-length // world))

    def slice(self, x: Tensor, rank: int) -> Tensor:
        """This rank's slice of (B, length, ...) `x`, zero-padded at the end."""
        padded = self.per_rank * (rank + 1)
        if padded > x.shape[1]:
            x = torch.cat([x, x.new_zeros(x.shape[0], padded - x.shape[1], *x.shape[2:])], dim=1)
        return x[:, self.per_rank * rank : padded]

    def valid(self, rank: int) -> Tensor:
        """(per_rank,) True where rank's slice holds a real token."""
        return torch.arange(self.per_rank * rank, self.per_rank * (rank + 1)) < self.length


def key_valid(streams: tuple[Stream, ...], ranks: list[int]) -> Tensor:
    """(len(ranks) * local length,) validity of the keys of `ranks`' local sequences, concatenated in that order."""
    return torch.cat([torch.cat([s.valid(r) for s in streams]) for r in ranks])


def attend_with_lse(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Attention output (B, H, S, D) and its log-sum-exp (B, H, S) in fp32, from the fused kernels that return it."""
    aten = torch.ops.aten
    if q.device.type == "cuda":
        if q.dtype in (torch.bfloat16, torch.float16):
            out, lse = aten._scaled_dot_product_flash_attention(q, k, v)[:2]
        else:
            out, lse = aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]
        return out, lse[..., : q.shape[2]].float()
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[:2]
    return out, lse.float()


class SequenceParallelAttention:
    """A block's attention kernel over sequence slices: Ulysses, ring or both, around `inner` (the backend)."""

    def __init__(self, mesh: Mesh, inner: Attend):
        self.mesh = mesh
        self.inner = inner
        self.key_streams: tuple[Stream, ...] = ()  # set by `ContextParallel` before each DiT call
        self.query_streams: tuple[Stream, ...] = ()
        self._indices: dict = {}

    # Compiled blocks break their graph here: collectives and the per-layout index cache stay eager, the
    # projections and MLPs on either side are compiled as usual.
    @torch.compiler.disable
    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        m = self.mesh
        streams = self.query_streams if k.shape[2] == q.shape[2] else self.key_streams
        if m.ulysses > 1:
            q, k, v = (self._heads_for_sequence(t) for t in (q, k, v))
        if m.ring > 1:
            out = self._ring(q, k, v, streams)
        else:
            keep = self._valid_keys(streams, tuple(m.row()), k.device)
            out = self.inner(q, _keys(k, keep), _keys(v, keep))
        return self._sequence_for_heads(out) if m.ulysses > 1 else out

    def _valid_keys(self, streams: tuple[Stream, ...], ranks: tuple[int, ...], device: torch.device) -> Tensor | None:
        """Indices of the real keys, or None when there is no padding: made on the host once per layout, so the step
        loop never reads the device."""
        key = (streams, ranks, device)
        if key not in self._indices:
            valid = key_valid(streams, list(ranks))
            self._indices[key] = None if valid.all() else valid.nonzero().flatten().to(device)
        return self._indices[key]

    def _heads_for_sequence(self, x: Tensor) -> Tensor:
        """(B, H, S, D) all heads of my slice -> (B, H/u, u*S, D) my heads of the row's slices, in row order."""
        u = self.mesh.ulysses
        B, H, S, D = x.shape
        send = x.reshape(B, u, H // u, S, D).transpose(0, 1).contiguous()
        received = torch.empty_like(send)
        dist.all_to_all_single(received, send, group=self.mesh.ulysses_group)
        return received.permute(1, 2, 0, 3, 4).reshape(B, H // u, u * S, D)

    def _sequence_for_heads(self, x: Tensor) -> Tensor:
        """The inverse of `_heads_for_sequence`."""
        u = self.mesh.ulysses
        B, h, US, D = x.shape
        send = x.reshape(B, h, u, US // u, D).permute(2, 0, 1, 3, 4).contiguous()
        received = torch.empty_like(send)
        dist.all_to_all_single(received, send, group=self.mesh.ulysses_group)
        return received.transpose(0, 1).reshape(B, u * h, US // u, D)

    def _ring(self, q: Tensor, k: Tensor, v: Tensor, streams: tuple[Stream, ...]) -> Tensor:
        """Online-softmax attention of my queries over every column member's keys, passed around the ring."""
        m = self.mesh
        column = m.column()
        me = column.index(m.context_rank)
        nxt, prev = m.global_rank(column[(me + 1) % m.ring]), m.global_rank(column[(me - 1) % m.ring])
        kv = torch.stack([k, v])
        out = lse = None
        for step in range(m.ring):
            owner = column[(me - step) % m.ring]  # whose keys and values `kv` holds now
            if step + 1 < m.ring:
                incoming = torch.empty_like(kv)
                ops = [dist.P2POp(dist.isend, kv, nxt, m.ring_group), dist.P2POp(dist.irecv, incoming, prev, m.ring_group)]
                pending = dist.batch_isend_irecv(ops)
            owner_row = [owner - m.ulysses_index + j for j in range(m.ulysses)]  # the row whose slices it gathered
            keep = self._valid_keys(streams, tuple(owner_row), kv.device)
            if keep is None or keep.numel():
                block_out, block_lse = attend_with_lse(q, _keys(kv[0], keep), _keys(kv[1], keep))
                out, lse = _merge(out, lse, block_out, block_lse)
            if step + 1 < m.ring:
                for request in pending:
                    request.wait()
                kv = incoming
        return out.to(q.dtype)


def _keys(x: Tensor, keep: Tensor | None) -> Tensor:
    return x if keep is None else x.index_select(2, keep)


def _merge(out: Tensor | None, lse: Tensor | None, block_out: Tensor, block_lse: Tensor) -> tuple[Tensor, Tensor]:
    """Combine two partial softmax attentions by their log-sum-exps, in fp32."""
    if out is None:
        return block_out.float(), block_lse
    new_lse = torch.logaddexp(lse, block_lse)
    out = out * torch.exp(lse - new_lse)[..., None] + block_out.float() * torch.exp(block_lse - new_lse)[..., None]
    return out, new_lse


class ContextParallel(nn.Module):
    """The DiT of a context-parallel run: the same calls as `Flux2` (`forward`, `forward_kv_extract`,
    `forward_kv_cached`) on whole sequences; inside, each rank runs its slices."""

    def __init__(self, dit: nn.Module, mesh: Mesh):
        super().__init__()
        self.dit = dit
        self.mesh = mesh
        self.attention = SequenceParallelAttention(mesh, next(dit.repeated_blocks()).attend)
        for block in dit.repeated_blocks():
            block.attend = self.attention

    def _slices(self, x: Tensor, ids: Tensor, stream: Stream, batch: int) -> tuple[Tensor, Tensor]:
        ids = _batched(ids).expand(batch, -1, -1)
        rank = self.mesh.context_rank
        return stream.slice(x, rank), stream.slice(ids, rank)

    def _gather(self, local: Tensor, stream: Stream) -> Tensor:
        """Every rank's output slice, concatenated and unpadded: (B, stream.length, C) on every rank."""
        parts = [torch.empty_like(local) for _ in range(self.mesh.context_world)]
        dist.all_gather(parts, local.contiguous(), group=self.mesh.context_group)
        return torch.cat(parts, dim=1)[:, : stream.length]

    def forward(self, x, x_ids, timesteps, ctx, ctx_ids, guidance=None, step_cache=None) -> Tensor:
        world, batch = self.mesh.context_world, x.shape[0]
        img, txt = Stream.of(x.shape[1], world), Stream.of(ctx.shape[1], world)
        x, x_ids = self._slices(x, x_ids, img, batch)
        ctx, ctx_ids = self._slices(ctx, ctx_ids, txt, batch)
        self.attention.query_streams = self.attention.key_streams = (txt, img)
        if step_cache is not None and step_cache.threshold > 0:  # decide on the whole image, padding left out
            step_cache.rows = img.valid(self.mesh.context_rank).to(x.device, x.dtype)[None, :, None]
            step_cache.reduce = sum_over_ranks
        return self._gather(self.dit(x, x_ids, timesteps, ctx, ctx_ids, guidance, step_cache), img)

    def forward_kv_extract(self, x, x_ids, timesteps, ctx, ctx_ids, num_ref: int, guidance=None):
        world, batch = self.mesh.context_world, x.shape[0]
        ref = Stream.of(num_ref, world)
        x_ids = _batched(x_ids).expand(batch, -1, -1)
        ref_x, ref_ids = self._slices(x[:, :num_ref], x_ids[:, :num_ref], ref, batch)
        self.attention.query_streams = self.attention.key_streams = (ref,)
        cache = self.dit.extract_ref_kv(ref_x, ref_ids, guidance)
        cache.num_ref = num_ref  # the whole count: later calls rebuild the slices' layout from it
        out = self.forward_kv_cached(x[:, num_ref:], x_ids[:, num_ref:], timesteps, ctx, ctx_ids, cache, guidance)
        return out, cache

    def forward_kv_cached(self, x, x_ids, timesteps, ctx, ctx_ids, kv_cache: RefKVCache, guidance=None) -> Tensor:
        world, batch = self.mesh.context_world, x.shape[0]
        img, txt = Stream.of(x.shape[1], world), Stream.of(ctx.shape[1], world)
        x, x_ids = self._slices(x, x_ids, img, batch)
        ctx, ctx_ids = self._slices(ctx, ctx_ids, txt, batch)
        self.attention.query_streams = (txt, img)
        self.attention.key_streams = (txt, img, Stream.of(kv_cache.num_ref, world))
        out = self.dit.forward_kv_cached(x, x_ids, timesteps, ctx, ctx_ids, kv_cache, guidance)
        return self._gather(out, img)
