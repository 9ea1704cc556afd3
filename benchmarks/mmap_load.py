"""Host memory of a DiT loaded normally vs memory-mapped (`load_pipeline(..., mmap=True)` path), on CPU.

    python benchmarks/mmap_load.py [--hidden 1024] [--blocks 4 8]

Writes a random DiT as a BFL single file, then loads it in fresh subprocesses and prints the load time and the
process's anonymous RSS (private RAM) and file-backed RSS (page cache, reclaimable) after one forward pass.
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import sys, time, torch
from featherflux.loading.dit import load_mapped_transformer
from featherflux.weights import load_transformer
path, mode = sys.argv[1], sys.argv[2]
start = time.perf_counter()
if mode == "mmap":
    from featherflux.loading.dit import dit_config_from_file
    model = load_mapped_transformer(path, dit_config_from_file(path))
else:
    model = load_transformer(path)
seconds = time.perf_counter() - start
c = model.config
n, l = 64, 16
with torch.no_grad():
    model(torch.randn(1, n, c.in_channels).bfloat16(), torch.zeros(1, n, 4), torch.full((1,), 0.5),
          torch.randn(1, l, c.context_in_dim).bfloat16(), torch.zeros(1, l, 4))
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
kib = lambda k: int(status[k].split()[0]) / 1024
print(f"{mode:6} load {seconds:6.2f} s  anon RSS {kib('RssAnon'):8.0f} MiB  file RSS {kib('RssFile'):8.0f} MiB")
"""


def main() -> None:
    import torch
    from safetensors.torch import save_file

    from featherflux.model.config import FAMILIES
    from featherflux.model.dit import Flux2

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--blocks", type=int, nargs=2, default=(4, 8), metavar=("DOUBLE", "SINGLE"))
    args = parser.parse_args()
    base = FAMILIES["klein-4b"].dit
    config = dataclasses.replace(
        base,
        hidden_size=args.hidden,
        num_heads=args.hidden // 128,
        depth=args.blocks[0],
        depth_single_blocks=args.blocks[1],
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dit.safetensors"
        model = Flux2(config).to(torch.bfloat16)
        nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
        del model
        print(f"DiT: hidden {args.hidden}, {args.blocks[0]}+{args.blocks[1]} blocks, {nbytes / 2**20:.0f} MiB bf16")
        for mode in ("normal", "mmap"):
            start = time.perf_counter()
            out = subprocess.run(
                [sys.executable, "-c", CHILD, str(path), mode], check=False, capture_output=True, text=True
            )
            print(out.stdout.strip() or out.stderr[-2000:], f"(process {time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
