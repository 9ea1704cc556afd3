"""The process group of a parallel run, and how its ranks are arranged.

- `init_mesh` joins the process group that `torchrun` describes in the environment (RANK, WORLD_SIZE, MASTER_ADDR,
  ...), or uses one the caller made already: NCCL when the ranks compute on CUDA, gloo on CPU. Each rank computes on
  `cuda:LOCAL_RANK` when CUDA is there.
- A `Mesh` arranges the ranks in up to two CFG halves (with "cfg", each half runs one of the two guidance
  passes), each a grid of `ring` rows of `ulysses` ranks: ranks next to each other share one Ulysses all-to-all
  (they swap heads for sequence), ranks in the same column pass K/V around one ring. Plain Ulysses is one row,
  plain ring one column; USP uses both. With "tensor", each place in that grid is a group of ranks that each hold
  a slice of every block's weights (`featherflux.parallel.tensor`).
- Collectives time out (`timeout_s`) instead of waiting forever for a rank that died or hangs.
"""

from __future__ import annotations

import datetime
import os
import threading
import time
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import Tensor

from featherflux.errors import UserError

CONTEXT_MODES = ("ulysses", "ring", "usp")
_SPLITS = (*CONTEXT_MODES, "tensor", "tensor+ulysses", "tensor+ring")
# "cfg" combines with any of them: "cfg+ring", "cfg+tensor+ulysses", ...
PARALLEL_MODES = (*_SPLITS, "cfg", *(f"cfg+{mode}" for mode in _SPLITS))
TORCHRUN_HINT = "torchrun --nproc-per-node 2 -m featherflux generate PROMPT --model M --parallel ulysses"
DEFAULT_TIMEOUT_S = 600.0
HEARTBEAT_S = 1.0  # how often each rank says it is alive, in the process group's store
SILENT_AFTER_S = 3.0  # a rank whose last word is older than this has died


@dataclass(frozen=True)
class Mesh:
    """This rank's place among `world` ranks: `cfg` halves (1 or 2), each a `ring` x `ulysses` grid of context ranks,
    each context rank a group of `tensor` ranks that share its weights.

    rank = (cfg_index * context_world + context_rank) * tensor + tensor_index, with context_rank = ring_index *
    ulysses + ulysses_index: tensor-parallel ranks sit next to each other (one node, the fastest links). Row, column
    and context ranks are numbered within this rank's grid; `global_rank` turns them into process-group ranks.
    """

    rank: int
    world: int
    cfg: int
    tensor: int
    ulysses: int
    ring: int
    device: torch.device
    ulysses_group: object = None  # this rank's row (None when ulysses == 1)
    ring_group: object = None  # this rank's column (None when ring == 1)
    context_group: object = None  # this rank's whole grid (None when it is one rank)
    cfg_group: object = None  # this rank and its twin in the other CFG half (None without cfg)
    tensor_group: object = None  # the ranks that hold the other slices of this rank's weights (None when tensor == 1)

    @property
    def context_world(self) -> int:
        return self.ulysses * self.ring

    @property
    def tensor_index(self) -> int:
        return self.rank % self.tensor

    @property
    def context_rank(self) -> int:
        return self.rank // self.tensor % self.context_world

    @property
    def cfg_index(self) -> int:
        return self.rank // (self.tensor * self.context_world)

    @property
    def ulysses_index(self) -> int:
        return self.context_rank % self.ulysses

    @property
    def ring_index(self) -> int:
        return self.context_rank // self.ulysses

    def global_rank(self, context_rank: int) -> int:
        return (self.cfg_index * self.context_world + context_rank) * self.tensor + self.tensor_index

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


def _divisors(n: int, *of: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0 and all(k % d == 0 for k in of)]


def mesh_degrees(
    mode: str, world: int, degree: int | None, num_heads: int, mlp_hidden: int | None = None
) -> tuple[int, int, int, int]:
    """(cfg, tensor, ulysses, ring) degrees for `mode` over `world` ranks. `degree` is the Ulysses degree of "usp"
    and the tensor degree of "tensor+ulysses" / "tensor+ring" (None: the largest that works for usp, 2 for tensor);
    for the other modes it must equal the ranks of a pass."""
    check_mode(mode)
    parts = mode.split("+")
    cfg = 2 if "cfg" in parts else 1
    context = next((p for p in parts if p in CONTEXT_MODES), None)
    tensor_parallel = "tensor" in parts
    if world % cfg:
        raise UserError(
            f"cfg parallelism runs the conditional and the unconditional pass on two halves of the processes; "
            f"{world} processes do not halve: start an even number"
        )
    ranks = world // cfg
    if context is None and not tensor_parallel:
        if ranks != 1:
            raise UserError(
                f"parallel='cfg' uses exactly 2 processes, not {world}; for more, split each pass as well: "
                f"cfg+ulysses, cfg+ring, cfg+usp or cfg+tensor"
            )
        return cfg, 1, 1, 1
    tensor = 1
    if tensor_parallel:
        works = _divisors(ranks, num_heads, mlp_hidden or num_heads)
        tensor = ranks if context is None else (degree if degree is not None else 2)
        if context is None and degree is not None and degree != ranks:
            raise UserError(f"parallel_degree={degree} but tensor parallelism splits the weights over all {ranks}")
        if tensor not in works or (context is not None and tensor == ranks):
            raise UserError(
                f"a tensor degree of {tensor} does not split the DiT's {num_heads} heads over {ranks} ranks per pass"
                f"{' and leave ranks for ' + context if context else ''}; degrees that work: "
                f"{', '.join(str(d) for d in works if context is None or d < ranks) or 'none'}"
            )
        ranks //= tensor
        if context is None:
            return cfg, tensor, 1, 1
    heads = num_heads // tensor  # what each context rank's attention holds
    if context == "usp":
        choices = _divisors(ranks, heads)
        ulysses = degree if degree is not None else max(choices)
        if ulysses not in choices:
            raise UserError(
                f"a Ulysses degree of {ulysses} does not divide the {ranks} ranks of a pass and the DiT's "
                f"{heads} heads; degrees that work: {', '.join(map(str, choices))}"
            )
        return cfg, tensor, ulysses, ranks // ulysses
    if degree is not None and degree != ranks and not tensor_parallel:
        raise UserError(
            f"parallel_degree={degree} but {ranks} processes split each pass; {context} uses all of them (start "
            f"{degree * cfg} with torchrun --nproc-per-node {degree * cfg}, or leave parallel_degree unset)"
        )
    if context == "ulysses":
        if heads % ranks:
            works = [d for d in _divisors(heads) if d <= 64]
            raise UserError(
                f"Ulysses splits the DiT's {heads} heads across ranks, so {ranks} ranks per pass do not work; "
                f"use a number that divides {heads} ({', '.join(map(str, works))}), or ring (any count) or usp"
            )
        return cfg, tensor, ranks, 1
    return cfg, tensor, 1, ranks


def init_mesh(
    mode: str,
    num_heads: int,
    degree: int | None = None,
    device: str | None = None,
    timeout_s: float | None = None,
    mlp_hidden: int | None = None,
) -> Mesh:
    """Join (or reuse) the process group and arrange its ranks for `mode`."""
    join(mode, device, timeout_s)
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg, tensor, ulysses, ring = mesh_degrees(mode, world, degree, num_heads, mlp_hidden)
    if device is None:
        cuda = dist.get_backend() == "nccl"
        device = f"cuda:{torch.cuda.current_device()}" if cuda else "cpu"
    size = ulysses * ring

    def at(half: int, context_rank: int, tensor_index: int) -> int:
        return (half * size + context_rank) * tensor + tensor_index

    # every rank makes every group, in the same order, as torch.distributed requires; each keeps its own
    groups = {}
    for half in range(cfg):
        for t in range(tensor):
            for r in range(ring):
                groups[("row", half, t, r)] = _group([at(half, r * ulysses + u, t) for u in range(ulysses)])
            for u in range(ulysses):
                groups[("column", half, t, u)] = _group([at(half, u + ulysses * i, t) for i in range(ring)])
            groups[("context", half, t)] = _group([at(half, c, t) for c in range(size)])
        for c in range(size):
            groups[("tensor", half, c)] = _group([at(half, c, t) for t in range(tensor)])
    for c in range(size):
        for t in range(tensor):
            groups[("cfg", c, t)] = _group([at(half, c, t) for half in range(cfg)])
    start_heartbeat()
    mesh = Mesh(rank, world, cfg, tensor, ulysses, ring, torch.device(device))
    half, c, t = mesh.cfg_index, mesh.context_rank, mesh.tensor_index
    return replace(
        mesh,
        ulysses_group=groups[("row", half, t, mesh.ring_index)],
        ring_group=groups[("column", half, t, mesh.ulysses_index)],
        context_group=groups[("context", half, t)],
        cfg_group=groups[("cfg", c, t)],
        tensor_group=groups[("tensor", half, c)],
    )


def join(mode: str, device: str | None = None, timeout_s: float | None = None) -> None:
    """Join the process group torchrun describes, unless this process is in one already."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise UserError(f"parallel={mode!r} needs several processes started by torchrun, for example: {TORCHRUN_HINT}")
    cuda = torch.cuda.is_available() and device != "cpu"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = datetime.timedelta(seconds=timeout_s or DEFAULT_TIMEOUT_S)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)


def start_heartbeat() -> None:
    """From now on this rank writes the time into the process group's store every second (a daemon thread), so
    that after a failed collective the survivors can tell which rank died (`silent_ranks`)."""
    global _heartbeat
    if _heartbeat is not None:
        return
    store, key = dist.distributed_c10d._get_default_store(), f"featherflux/alive/{dist.get_rank()}"

    def beat() -> None:
        while True:
            try:
                store.set(key, repr(time.time()))
            except RuntimeError:  # the store is gone: the run is over
                return
            time.sleep(HEARTBEAT_S)

    _heartbeat = threading.Thread(target=beat, name="featherflux-heartbeat", daemon=True)
    _heartbeat.start()


_heartbeat: threading.Thread | None = None


def silent_ranks() -> list[int]:
    """The ranks that stopped writing their heartbeat (after waiting long enough to be sure)."""
    time.sleep(SILENT_AFTER_S + HEARTBEAT_S)
    store, now, silent = dist.distributed_c10d._get_default_store(), time.time(), []
    for rank in range(dist.get_world_size()):
        try:
            last = float(store.get(f"featherflux/alive/{rank}"))
        except RuntimeError:
            last = 0.0
        if now - last > SILENT_AFTER_S:
            silent.append(rank)
    return silent


def is_collective_error(error: BaseException) -> bool:
    """Whether `error` came from the process group (a dropped connection, a time-out) rather than the computation.
    gloo raises plain RuntimeErrors that name its transport; NCCL and the store raise torch's DistError kinds."""
    text = str(error)
    return isinstance(error, dist.DistError) or any(word in text for word in ("gloo", "NCCL", "Connection", "timed out"))


def collective_failure(error: RuntimeError) -> RuntimeError:
    """A failed collective of a split DiT, as an error that names the rank that died, or says that one hangs."""
    silent = silent_ranks()
    who = (
        f"rank {', '.join(map(str, silent))} stopped answering (its process died)"
        if silent
        else "every rank is alive, so one of them hangs (the collective timed out)"
    )
    return RuntimeError(f"rank {dist.get_rank()} of {dist.get_world_size()}: the split DiT failed: {who}: {error}")


def sum_over_ranks(totals: Tensor) -> Tensor:
    """`totals` summed over every rank of the run (the step cache's decision). CFG halves add their own rows;
    tensor-parallel ranks count the same rows N times over in both of the cache's totals, leaving their ratio."""
    dist.all_reduce(totals)
    return totals


def is_main_process() -> bool:
    """True outside a parallel run, and on rank 0 of one: the process that encodes prompts, writes files and
    prints results."""
    return not dist.is_initialized() or dist.get_rank() == 0


def _group(ranks: list[int]):
    return dist.new_group(ranks) if len(ranks) > 1 else None
