"""One image on several processes (GPUs, or CPU processes on gloo), on `torch.distributed`, launched by `torchrun`.

- `group`: the process group and the mesh of CFG halves, Ulysses (heads) and ring (K/V passing) degrees.
- `context`: context parallelism: the DiT's text and image sequences split across ranks, attention made whole again
  by an all-to-all (Ulysses), by passing K/V around a ring, or both (USP).
- `cfg`: the conditional and unconditional passes of true CFG on two halves of the processes.
- `tensor`: every block's weights split across a group of ranks (Megatron-style column and row slices).
- `parallelize` wraps a DiT for a mode; the wrapper takes the DiT's calls on whole tensors, so the sampling loops
  do not know about it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from featherflux.parallel.cfg import CfgParallel
from featherflux.parallel.context import ContextParallel
from featherflux.parallel.group import (
    PARALLEL_MODES,
    Mesh,
    check_mode,
    collective_failure,
    init_mesh,
    is_collective_error,
    is_main_process,
    rank_device,
)
from featherflux.parallel.group import join as join_process_group
from featherflux.parallel.tensor import shard_blocks

__all__ = [
    "ENCODED_ON_RANK_ZERO",
    "PARALLEL_MODES",
    "Mesh",
    "ParallelDiT",
    "check_mode",
    "is_main_process",
    "join_process_group",
    "parallelize",
    "rank_device",
]


class _EncodedOnRankZero:
    """The prompt encoder of ranks > 0: rank 0 alone loads the text encoder, and broadcasts the embeddings."""

    def encode(self, *args, **kwargs):
        raise RuntimeError("ranks other than 0 receive prompt embeddings from rank 0; they never encode")


ENCODED_ON_RANK_ZERO = _EncodedOnRankZero()
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class ParallelDiT(nn.Module):
    """A DiT run by every process of `mesh`: the same calls and results as the DiT itself."""

    def __init__(self, dit: nn.Module, mesh: Mesh):
        super().__init__()
        self.mesh = mesh
        if mesh.tensor > 1:
            shard_blocks(dit, mesh)
        inner = ContextParallel(dit, mesh) if mesh.context_world > 1 else dit
        self.split = CfgParallel(inner, mesh) if mesh.cfg > 1 else inner

    def forward(self, *args, **kwargs) -> Tensor:
        return self._named_failures(self.split, *args, **kwargs)

    def forward_kv_extract(self, *args, **kwargs):
        return self._named_failures(self.split.forward_kv_extract, *args, **kwargs)

    def forward_kv_cached(self, *args, **kwargs):
        return self._named_failures(self.split.forward_kv_cached, *args, **kwargs)

    @staticmethod
    def _named_failures(call, *args, **kwargs):
        try:
            return call(*args, **kwargs)
        except RuntimeError as e:
            if is_collective_error(e):  # a peer is gone or hangs: say which
                raise collective_failure(e) from e
            raise

    def broadcast(self, x: Tensor) -> Tensor:
        """Rank 0's `x` on every rank, where every rank has a tensor of its shape (the initial noise)."""
        x = x.contiguous()
        dist.broadcast(x, src=0)
        return x

    def share(self, x: Tensor | None) -> Tensor | None:
        """Rank 0's (B, L, C) `x` (or None) on every rank; the others pass anything, their value is not read."""
        device = self.mesh.device
        header = torch.zeros(5, dtype=torch.long, device=device)
        if is_main_process() and x is not None:
            header = torch.tensor([1, *x.shape, _DTYPES.index(x.dtype)], device=device)
        dist.broadcast(header, src=0)
        present, b, l, c, dtype = header.tolist()  # once per image, before the step loop
        if not present:
            return None
        if not is_main_process():
            x = torch.empty(b, l, c, dtype=_DTYPES[dtype], device=device)
        return self.broadcast(x.to(device))


def parallelize(dit: nn.Module, mode: str, degree: int | None = None, device: str | torch.device | None = None):
    """`dit` split across the processes of this run as `mode` says (see `featherflux.parallel.group`)."""
    c = dit.config
    mesh = init_mesh(mode, c.num_heads, degree, None if device is None else str(device), mlp_hidden=c.mlp_hidden_dim)
    return ParallelDiT(dit, mesh)


