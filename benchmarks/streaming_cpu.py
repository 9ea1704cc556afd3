"""Host time that streaming adds to a DiT forward, featherflux against diffusers' group offload, on CPU.

On CPU no copy happens, so what streaming adds there is bookkeeping: host time that, on a GPU, the kernel launch
queue waits for. A tiny DiT (hidden 64, 2 double + 6 single blocks, 16 image + 8 text tokens, one thread) keeps the
forward short so the overhead shows. Both models hold the same weights. Printed per forward and per streamed block:
- featherflux with every block streamed (`memory/streaming.py`: the block runs as itself, its parameters swapped
  for the copies and back), and the same streamer running blocks through `torch.func.functional_call` as it once did;
- diffusers with `enable_group_offload(offload_type="block_level", num_blocks_per_group=1)` (its hooks);
- each one's overhead over its own plain forward, and featherflux's overhead as a fraction of diffusers'.

    python benchmarks/streaming_cpu.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from diffusers import Flux2Transformer2DModel
from torch.func import functional_call

from featherflux.memory.streaming import StreamedModule, block_entries, stream_modules
from featherflux.model.dit import Flux2
from featherflux.weights.io import materialize
from featherflux.weights.transformer import config_from_diffusers, diffusers_to_native

CALLS = 100
DOUBLE, SINGLE = 2, 6


def ms_per_forward(runners: dict, rounds: int) -> dict[str, float]:
    """Best time of each runner over `rounds`, the runners taking turns so that drift in the machine's speed
    touches them all alike."""
    best = dict.fromkeys(runners, float("inf"))
    for run in runners.values():
        for _ in range(10):
            run()
    for _ in range(rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            for _ in range(CALLS):
                run()
            best[name] = min(best[name], (time.perf_counter() - start) / CALLS * 1e3)
    return best


def forward_through_functional_call(self, *args, **kwargs):
    tensors, _ = self.streamer.acquire(self.index)
    try:
        return functional_call(self.block, tensors, args, kwargs, strict=True)
    finally:
        self.streamer.release(self.index)


def through_functional_call(run):
    """`run` with streamed blocks running the way they once did."""

    def run_the_old_way():
        swapped = StreamedModule.forward
        StreamedModule.forward = forward_through_functional_call
        try:
            return run()
        finally:
            StreamedModule.forward = swapped

    return run_the_old_way


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    reference = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=DOUBLE, num_single_layers=SINGLE, attention_head_dim=32,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(8, 8, 8, 8), guidance_embeds=False,
    ).eval()  # fmt: skip
    with torch.device("meta"):
        ours = Flux2(config_from_diffusers(dict(reference.config), "benchmark"))
    materialize(ours, diffusers_to_native({k: v.clone() for k, v in reference.state_dict().items()}))
    streamed, old_way, offloaded = copy.deepcopy(ours), copy.deepcopy(ours), copy.deepcopy(reference)
    for model in (streamed, old_way):  # old_way's blocks will run through functional_call
        stream_modules(block_entries([model.double_blocks, model.single_blocks]), "cpu")
    offloaded.enable_group_offload(
        onload_device=torch.device("cpu"), offload_device=torch.device("cpu"), offload_type="block_level",
        num_blocks_per_group=1,
    )  # fmt: skip

    zero = torch.tensor([0])
    x, ctx, t = torch.randn(1, 16, 16), torch.randn(1, 8, 32), torch.tensor([0.5])
    x_ids = torch.cartesian_prod(zero, torch.arange(4), torch.arange(4), zero)[None]
    ctx_ids = torch.cartesian_prod(zero, zero, zero, torch.arange(8))[None]

    def ours_forward(model):
        return lambda: model(x, x_ids, t, ctx, ctx_ids)

    def diffusers_forward(model):
        return lambda: model(
            hidden_states=x, encoder_hidden_states=ctx, timestep=t, img_ids=x_ids, txt_ids=ctx_ids, return_dict=False
        )[0]

    with torch.inference_mode():
        assert torch.allclose(ours_forward(streamed)(), diffusers_forward(offloaded)(), atol=1e-5)
        runners = {
            "featherflux": ours_forward(ours),
            "featherflux streamed": ours_forward(streamed),
            "featherflux streamed, functional_call": through_functional_call(ours_forward(old_way)),
            "diffusers": diffusers_forward(reference),
            "diffusers group offload": diffusers_forward(offloaded),
        }
        ms = ms_per_forward(runners, args.rounds)

    plain_of = {
        "featherflux streamed": "featherflux",
        "featherflux streamed, functional_call": "featherflux",
        "diffusers group offload": "diffusers",
    }
    overhead_us = {name: (ms[name] - ms[plain]) * 1e3 / (DOUBLE + SINGLE) for name, plain in plain_of.items()}
    for name, value in ms.items():
        extra = f", {overhead_us[name]:.0f} us of overhead per block" if name in overhead_us else ""
        print(f"{name}: {value:.2f} ms per forward{extra}")
    for name in ("featherflux streamed", "featherflux streamed, functional_call"):
        ratio = overhead_us[name] / overhead_us["diffusers group offload"]
        print(f"{name} / diffusers group offload, overhead: {ratio:.2f}")


if __name__ == "__main__":
    main()
