"""The process group of a parallel run, and how its ranks are arranged.

- `init_mesh` joins the process group that `torchrun` describes in the environment (RANK, WORLD_SIZE, MASTER_ADDR,
  ...), or uses one the caller made already: NCCL when the ranks compute on CUDA, gloo on CPU. Each rank computes on
  `cuda:LOCAL_RANK` when CUDA is there.
- A `Mesh` arranges the ranks in up to two CFG halves (with "cfg", each half runs one of the two guidance
  passes), each a grid of `ring` rows of `ulysses` ranks: ranks next to each other share one Ulysses all-to-all
  (they swap heads for sequence), ranks in the same column pass K/V around one ring. Plain Ulysses is one row,
  plain ring one column; USP uses both.
- Collectives time out (`timeout_s`) instead of waiting forever for a rank that died or hangs.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from featherflux.errors import UserError

CONTEXT_MODES = ("ulysses", "ring", "usp")
# "cfg" combines with one context mode: "cfg+ulysses", "cfg+ring", "cfg+usp"
PARALLEL_MODES = (*CONTEXT_MODES, "cfg", *(f"cfg+{mode}" for mode in CONTEXT_MODES))
TORCHRUN_HINT = "torchrun --nproc-per-node 2 -m featherflux generate PROMPT --model M --parallel ulysses"
DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Mesh:
    """This rank's place among `world` ranks: `cfg` halves (1 or 2) of `ring` x `ulysses` context grids.

    rank = cfg_index * context_world + ring_index * ulysses + ulysses_index. Row, column and context ranks are
    numbered within this rank's context grid; `global_rank` turns them into process-group ranks.
    """

    rank: int
    world: int
    cfg: int
    ulysses: int
    ring: int
    device: torch.device
    ulysses_group: object = None  # this rank's row (None when ulysses == 1)
    ring_group: object = None  # this rank's column (None when ring == 1)
    context_group: object = None  # this rank's whole grid (None when it is one rank)
    cfg_group: object = None  # this rank and its twin in the other CFG half (None without cfg)

    @property
    def context_world(self) -> int:
        return self.ulysses * self.ring

    @property
    def context_rank(self) -> int:
        return self.rank % self.context_world

    @property
    def cfg_index(self) -> int:
        return self.rank // self.context_world

    @property
    def ulysses_index(self) -> int:
        return self.context_rank % self.ulysses

    @property
    def ring_index(self) -> int:
        return self.context_rank // self.ulysses

    def global_rank(self, context_rank: int) -> int:
        return self.cfg_index * self.context_world + context_rank

    def row(self) -> list[int]:
        """The context ranks of this rank's Ulysses all-to-all, in order."""
        start = self.ring_index * self.ulysses
        return list(range(start, start + self.ulysses))

    def column(self) -> list[int]:
        """The context ranks of this rank's ring, in order."""
        return [self.ulysses_index + self.ulysses * i for i in range(self.ring)]


def check_mode(mode: str | None) -> None:
    if mode is not None and mode not in PARALLEL_MODES:
        raise UserError(f"unknown parallel mode {mode!r}; use one of {', '.join(PARALLEL_MODES)}")


def rank_device(device: str | torch.device) -> torch.device:
    """The device this rank computes on: a bare "cuda" becomes `cuda:LOCAL_RANK`."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def mesh_degrees(mode: str, world: int, degree: int | None, num_heads: int) -> tuple[int, int, int]:
    """(cfg, ulysses, ring) degrees for `mode` over `world` ranks. `degree` is the Ulysses degree of "usp" (None:
    the largest that divides both its ranks and the head count); for the other modes it must equal their ranks."""
    check_mode(mode)
    cfg = 2 if mode.startswith("cfg") else 1
    context = mode.removeprefix("cfg").removeprefix("+") or None
    if world % cfg:
        raise UserError(
            f"cfg parallelism runs the conditional and the unconditional pass on two halves of the processes; "
            f"{world} processes do not halve: start an even number"
        )
    ranks = world // cfg
    if context is None:
        if ranks != 1:
            raise UserError(
                f"parallel='cfg' uses exactly 2 processes, not {world}; for more, split each pass as well: "
                f"cfg+ulysses, cfg+ring or cfg+usp"
            )
        return cfg, 1, 1
    if context == "usp":
        choices = [d for d in range(1, ranks + 1) if ranks % d == 0 and num_heads % d == 0]
        ulysses = degree if degree is not None else max(choices)
        if ulysses not in choices:
            raise UserError(
                f"a Ulysses degree of {ulysses} does not divide the {ranks} ranks of a pass and the DiT's "
                f"{num_heads} heads; degrees that work: {', '.join(map(str, choices))}"
            )
        return cfg, ulysses, ranks // ulysses
    if degree is not None and degree != ranks:
        raise UserError(
            f"parallel_degree={degree} but {ranks} processes split each pass; {context} uses all of them (start "
            f"{degree * cfg} with torchrun --nproc-per-node {degree * cfg}, or leave parallel_degree unset)"
        )
    if context == "ulysses":
        if num_heads % ranks:
            works = [d for d in range(1, num_heads + 1) if num_heads % d == 0 and d <= 64]
            raise UserError(
                f"Ulysses splits the DiT's {num_heads} heads across ranks, so {ranks} ranks per pass do not work; "
                f"use a number that divides {num_heads} ({', '.join(map(str, works))}), or ring (any count) or usp"
            )
        return cfg, ranks, 1
    return cfg, 1, ranks


def init_mesh(
    mode: str, num_heads: int, degree: int | None = None, device: str | None = None, timeout_s: float | None = None
) -> Mesh:
    """Join (or reuse) the process group and arrange its ranks for `mode`."""
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise UserError(
                f"parallel={mode!r} needs several processes started by torchrun, for example: {TORCHRUN_HINT}"
            )
        cuda = torch.cuda.is_available() and device != "cpu"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(
            "nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s or DEFAULT_TIMEOUT_S)
        )
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg, ulysses, ring = mesh_degrees(mode, world, degree, num_heads)
    if device is None:
        cuda = dist.get_backend() == "nccl"
        device = f"cuda:{torch.cuda.current_device()}" if cuda else "cpu"
    size = ulysses * ring
    # every rank makes every group, in the same order, as torch.distributed requires; each keeps its own
    groups = {}
    for half in range(cfg):
        base = half * size
        for r in range(ring):
            groups[("row", half, r)] = _group([base + r * ulysses + u for u in range(ulysses)])
        for u in range(ulysses):
            groups[("column", half, u)] = _group([base + u + ulysses * i for i in range(ring)])
        groups[("context", half)] = _group(list(range(base, base + size)))
    for i in range(size):
        groups[("cfg", i)] = _group([half * size + i for half in range(cfg)])
    half, local = rank // size, rank % size
    return Mesh(
        rank,
        world,
        cfg,
        ulysses,
        ring,
        torch.device(device),
        ulysses_group=groups[("row", half, local // ulysses)],
        ring_group=groups[("column", half, local % ulysses)],
        context_group=groups[("context", half)],
        cfg_group=groups[("cfg", local)],
    )


def _group(ranks: list[int]):
    return dist.new_group(ranks) if len(ranks) > 1 else None
