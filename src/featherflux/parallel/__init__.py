"""One image on several processes (GPUs, or CPU processes on gloo), on `torch.distributed`, launched by `torchrun`.

- `group`: the process group and the 2-D mesh of Ulysses (heads) and ring (K/V passing) degrees.
- `context`: context parallelism: the DiT's text and image sequences split across ranks, attention made whole again
  by an all-to-all (Ulysses), by passing K/V around a ring, or both (USP).
"""

from featherflux.parallel.context import ContextParallel
from featherflux.parallel.group import PARALLEL_MODES, Mesh, check_mode, init_mesh, rank_device

__all__ = ["PARALLEL_MODES", "ContextParallel", "Mesh", "check_mode", "init_mesh", "rank_device"]
