"""Run a function on several CPU processes joined in one gloo process group, as torchrun would start them."""

from __future__ import annotations

import datetime
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank_main(rank: int, world: int, store: str, fn, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
    )
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, scratch: Path, fn, *args) -> None:
    """`fn(rank, world, *args)` in `world` fresh processes; a failure on any rank fails the caller."""
    store = Path(scratch) / f"store-{fn.__name__}-{world}"
    mp.spawn(_rank_main, args=(world, str(store), fn, args), nprocs=world, join=True)
