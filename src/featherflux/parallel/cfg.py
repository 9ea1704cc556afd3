"""CFG parallelism: the rows of a DiT call split between the two CFG halves of the mesh.

True CFG runs the DiT on [prompt; negative] as one batch (`sampling.denoise`), so with the rows split in two the
conditional pass runs on one half of the processes while the unconditional one runs on the other, and one
all-gather per step puts the velocities back together. Any call whose batch splits in two gains the same way; a
call that does not (a distilled model's single batch-1 pass, klein-9b-kv's reference passes) runs whole on both
halves.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from featherflux.parallel.group import Mesh, sum_over_ranks


def _rows(x: Tensor | None, batch: int, index: int, halves: int) -> Tensor | None:
    if x is None or x.ndim == 0 or x.shape[0] != batch:  # shared by the batch (e.g. ids of shape (1, N, 4))
        return x
    size = batch // halves
    return x[index * size : (index + 1) * size]


class CfgParallel(nn.Module):
    def __init__(self, dit: nn.Module, mesh: Mesh):
        super().__init__()
        self.dit = dit  # the DiT, or its ContextParallel
        self.mesh = mesh

    def forward(self, x, x_ids, timesteps, ctx, ctx_ids, guidance=None, step_cache=None) -> Tensor:
        batch, halves = x.shape[0], self.mesh.cfg
        if batch % halves:
            return self.dit(x, x_ids, timesteps, ctx, ctx_ids, guidance, step_cache)
        i = self.mesh.cfg_index
        if step_cache is not None and step_cache.threshold > 0:  # both halves decide on the whole batch
            step_cache.reduce = sum_over_ranks
        args = (x, x_ids, timesteps, ctx, ctx_ids, guidance)
        local = self.dit(*(_rows(a, batch, i, halves) for a in args), step_cache)
        parts = [torch.empty_like(local) for _ in range(halves)]
        dist.all_gather(parts, local.contiguous(), group=self.mesh.cfg_group)
        return torch.cat(parts)

    def forward_kv_extract(self, *args, **kwargs):
        return self.dit.forward_kv_extract(*args, **kwargs)

    def forward_kv_cached(self, *args, **kwargs):
        return self.dit.forward_kv_cached(*args, **kwargs)
