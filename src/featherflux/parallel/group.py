"""The process group of a parallel run, and how its ranks are arranged.

- `init_mesh` joins the process group that `torchrun` describes in the environment (RANK, WORLD_SIZE, MASTER_ADDR,
  ...), or uses one the caller made already: NCCL when the ranks compute on CUDA, gloo on CPU. Each rank computes on
  `cuda:LOCAL_RANK` when CUDA is there.
- A `Mesh` arranges the ranks in a grid of `ring` rows of `ulysses` ranks: ranks next to each other share one
  Ulysses all-to-all (they swap heads for sequence), ranks in the same column pass K/V around one ring. Plain
  Ulysses is one row, plain ring one column; USP uses both.
- Collectives time out (`timeout_s`) instead of waiting forever for a rank that died or hangs.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from featherflux.errors import UserError

PARALLEL_MODES = ("ulysses", "ring", "usp")
TORCHRUN_HINT = "torchrun --nproc-per-node 2 -m featherflux generate PROMPT --model M --parallel ulysses"
DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Mesh:
    """This rank's place in a `ring` x `ulysses` grid of `world` ranks (rank = ring_index * ulysses + ulysses_index)."""

    rank: int
    world: int
    ulysses: int
    ring: int
    device: torch.device
    ulysses_group: object = None  # the dist group of this rank's row (None when ulysses == 1)
    ring_group: object = None  # the dist group of this rank's column (None when ring == 1)

    @property
    def ulysses_index(self) -> int:
        return self.rank % self.ulysses

    @property
    def ring_index(self) -> int:
        return self.rank // self.ulysses

    def row(self) -> list[int]:
        """The ranks of this rank's Ulysses all-to-all, in order."""
        start = self.ring_index * self.ulysses
        return list(range(start, start + self.ulysses))

    def column(self) -> list[int]:
        """The ranks of this rank's ring, in order."""
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


def mesh_degrees(mode: str, world: int, degree: int | None, num_heads: int) -> tuple[int, int]:
    """(ulysses, ring) degrees for `mode` over `world` ranks; `degree` is the Ulysses degree of "usp" (None: the
    largest that divides both the world and the head count), and must equal the world for the others."""
    check_mode(mode)
    if mode == "usp":
        choices = [d for d in range(1, world + 1) if world % d == 0 and num_heads % d == 0]
        ulysses = degree if degree is not None else max(choices)
        if ulysses not in choices:
            raise UserError(
                f"a Ulysses degree of {ulysses} does not divide the world size {world} and the DiT's {num_heads} "
                f"heads; degrees that work: {', '.join(map(str, choices))}"
            )
        return ulysses, world // ulysses
    if degree is not None and degree != world:
        raise UserError(
            f"parallel_degree={degree} but {world} processes were started; {mode} uses every process "
            f"(start {degree} with torchrun --nproc-per-node {degree}, or leave parallel_degree unset)"
        )
    if mode == "ulysses":
        if num_heads % world:
            works = [d for d in range(1, num_heads + 1) if num_heads % d == 0 and d <= 64]
            raise UserError(
                f"Ulysses splits the DiT's {num_heads} heads across ranks, so {world} processes do not work; start "
                f"a number of processes that divides {num_heads} ({', '.join(map(str, works))}), or use "
                f"--parallel ring (any count) or usp"
            )
        return world, 1
    return 1, world


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
    ulysses, ring = mesh_degrees(mode, world, degree, num_heads)
    if device is None:
        cuda = dist.get_backend() == "nccl"
        device = f"cuda:{torch.cuda.current_device()}" if cuda else "cpu"
    rows = [dist.new_group(list(range(r * ulysses, (r + 1) * ulysses))) if ulysses > 1 else None for r in range(ring)]
    columns = [dist.new_group([u + ulysses * i for i in range(ring)]) if ring > 1 else None for u in range(ulysses)]
    return Mesh(
        rank, world, ulysses, ring, torch.device(device), rows[rank // ulysses], columns[rank % ulysses]
    )
