"""Tensor parallelism: every DiT block's weights split across the ranks of a tensor group, Megatron-style.

- Column-parallel (no communication): the fused q/k/v projections and the MLP inputs keep whole heads and whole
  hidden units of the SwiGLU: a rank holds heads [i*H/N, (i+1)*H/N) of q, k and v, and the same slice of the gate
  and of the up projection, so attention, QK-norm and SwiGLU run unchanged on its share.
- Row-parallel: the attention output projection and the MLP output (and a single block's fused `linear2`) take
  the matching slice of their inputs and produce partial sums, added up by one all-reduce per block half
  (`RowParallelLinear`).
- The embedders, modulation and final layer stay whole on every rank (a few percent of the weights).
- Slicing happens after loading, on the host: with the DiT's weights memory-mapped (`mmap=True`, which
  `load_pipeline` sets for tensor parallelism), a rank only reads the pages of its slices.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from featherflux.errors import UserError
from featherflux.parallel.group import Mesh


class RowParallelLinear(nn.Module):
    """A bias-free Linear over this rank's slice of the input features; the full output is the all-reduced sum."""

    def __init__(self, weight: Tensor, group):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.group = group

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x, self.weight)
        dist.all_reduce(out, group=self.group)
        return out


def _rows(weight: Tensor, sizes: list[int], parts: int, index: int) -> Tensor:
    """Rows of `weight`, which stacks blocks of `sizes` rows: slice `index` of `parts` of every block, re-stacked."""
    blocks = weight.split(sizes, dim=0)
    return torch.cat([b.unflatten(0, (parts, -1))[index] for b in blocks]).clone()


def _columns(weight: Tensor, sizes: list[int], parts: int, index: int) -> Tensor:
    blocks = weight.split(sizes, dim=1)
    return torch.cat([b.unflatten(1, (parts, -1))[:, index] for b in blocks], dim=1).clone()


def _column_parallel(linear: nn.Linear, sizes: list[int], parts: int, index: int) -> None:
    linear.weight = nn.Parameter(_rows(linear.weight.data, sizes, parts, index), requires_grad=False)
    linear.out_features = linear.weight.shape[0]


def _row_parallel(linear: nn.Linear, sizes: list[int], parts: int, index: int, group) -> RowParallelLinear:
    return RowParallelLinear(_columns(linear.weight.data, sizes, parts, index), group)


@torch.no_grad()
def shard_blocks(dit: nn.Module, mesh: Mesh) -> None:
    """Keep only this rank's slice of every block's weights, in place."""
    n, i, group = mesh.tensor, mesh.tensor_index, mesh.tensor_group
    for name, module in dit.named_modules():
        if "blocks." in name and module.__class__.__name__.endswith("Linear") and type(module) is not nn.Linear:
            raise UserError(
                f"tensor parallelism slices plain weights, but {name} is a {type(module).__name__} (a quantized "
                "DiT file or quantize=); use a context mode (ulysses, ring, usp) with it"
            )
    dim, mlp = dit.config.hidden_size, dit.config.mlp_hidden_dim
    for block in dit.double_blocks:
        for attn, mlp_layers in ((block.img_attn, block.img_mlp), (block.txt_attn, block.txt_mlp)):
            _column_parallel(attn.qkv, [dim] * 3, n, i)
            attn.proj = _row_parallel(attn.proj, [dim], n, i, group)
            _column_parallel(mlp_layers[0], [mlp] * 2, n, i)
            mlp_layers[2] = _row_parallel(mlp_layers[2], [mlp], n, i, group)
        block.num_heads //= n
    for block in dit.single_blocks:
        _column_parallel(block.linear1, [dim] * 3 + [mlp] * 2, n, i)
        block.linear2 = _row_parallel(block.linear2, [dim, mlp], n, i, group)
        block.split_sizes = [3 * dim // n, 2 * mlp // n]
        block.num_heads //= n
