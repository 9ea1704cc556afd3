import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from featherflux.memory.offload import apply_placement, fallback
from featherflux.memory.planner import GiB, Hardware, Plan, pick_resident_blocks, plan
from featherflux.memory.streaming import (
    ALIGN,
    DeviceLedger,
    Layout,
    StreamedModule,
    aligned,
    block_entries,
    module_bytes,
    stream_modules,
)
from featherflux.model.config import FAMILIES
from featherflux.model.dit import Flux2
from tests.memory.conftest import SMALL_DIT, dit_inputs


def small_plan(**kw) -> Plan:
    base = {
        "family": "small",
        "offload": "blocks",
        "quantize": None,
        "text_encoder": "offload",
        "dit": "stream",
        "autoencoder": "offload",
        "dit_resident_blocks": (),
        "dit_blocks": 5,
        "mmap": False,
        "vram_budget_bytes": 0,
        "peak_vram_bytes": 0,
        "host_bytes": 0,
        "seconds_per_step": 0.0,
        "copy_seconds_per_step": 0.0,
        "seconds_per_image": 0.0,
        "fits": True,
    }
    return Plan(**(base | kw))


def fake_pipe(dit, encoder_model=None, autoencoder=None):
    return SimpleNamespace(
        transformer=dit,
        autoencoder=autoencoder or nn.Conv2d(4, 4, 1),
        prompt_encoder=SimpleNamespace(model=encoder_model) if encoder_model else object(),
    )


@pytest.mark.parametrize(
    ("dit_mode", "resident"),
    [("resident", ()), ("offload", ()), ("stream", ()), ("stream", (0, 3)), ("stream", (1, 2, 4)), ("sequential", ())],
)
@torch.no_grad()
def test_every_placement_gives_exactly_the_resident_output(small_dit, dit_mode, resident):
    inputs = dit_inputs(SMALL_DIT)
    reference = small_dit(*inputs)
    names = set(small_dit.state_dict())
    dit = copy.deepcopy(small_dit)
    pipe = fake_pipe(dit)
    placement = apply_placement(pipe, small_plan(dit=dit_mode, dit_resident_blocks=resident), "cpu")
    for _ in range(2):  # the second step reuses the prefetch that wrapped around
        with placement.phase("dit"):
            assert torch.equal(dit(*inputs), reference)
    assert set(dit.state_dict()) == names  # streaming keeps parameter names
    streamed = [m for m in dit.modules() if isinstance(m, StreamedModule)]
    if dit_mode == "stream":
        assert len(streamed) == 5 - len(resident)
    if dit_mode == "sequential":
        assert all(isinstance(m.block, nn.Linear) for m in streamed) and streamed


@torch.no_grad()
def test_streaming_peak_stays_within_budget_on_a_tiny_model(small_dit):
    blocks = [module_bytes(b) for b in [*small_dit.double_blocks, *small_dit.single_blocks]]
    globals_ = module_bytes(small_dit) - sum(blocks)
    budget = sum(blocks) // 2
    resident = pick_resident_blocks(blocks, budget)
    ledger = DeviceLedger()
    apply_placement(fake_pipe(small_dit), small_plan(dit_resident_blocks=resident), "cpu", ledger)
    small_dit(*dit_inputs(SMALL_DIT))
    assert 0 < len(resident) < 5
    assert ledger.peak <= globals_ + budget + 2 * max(blocks)
    assert ledger.peak < module_bytes(small_dit)  # never the whole model at once
    # between steps only the wrapped-around prefetch of the first streamed block stays on the device
    first_streamed = next(i for i in range(5) if i not in resident)
    assert ledger.current == globals_ + sum(blocks[i] for i in resident) + blocks[first_streamed]


@torch.no_grad()
def test_a_phase_leaves_no_streamed_block_on_the_device(small_dit):
    blocks = [*small_dit.double_blocks, *small_dit.single_blocks]
    globals_ = module_bytes(small_dit) - sum(module_bytes(b) for b in blocks)
    ledger = DeviceLedger()
    placement = apply_placement(fake_pipe(small_dit), small_plan(dit_resident_blocks=(1,)), "cpu", ledger)
    resident = globals_ + module_bytes(blocks[1])
    assert ledger.current == resident
    for _ in range(2):
        with placement.phase("dit"):
            small_dit(*dit_inputs(SMALL_DIT))
            assert ledger.current > resident  # the prefetch of the next step's first block
        assert ledger.current == resident
        assert not placement.streamers["dit"]._loaded


def test_streamed_blocks_are_packed_once_into_exact_host_buffers(small_dit):
    blocks = [*small_dit.double_blocks, *small_dit.single_blocks]
    streamer = stream_modules(block_entries([small_dit.double_blocks, small_dit.single_blocks]), "cpu", resident=(1,))
    streamed = [b for i, b in enumerate(blocks) if i != 1]
    exact = [sum(aligned(t.numel() * t.element_size()) for t in [*b.parameters(), *b.buffers()]) for b in streamed]
    assert streamer.host_bytes == sum(exact)
    assert sum(exact) - sum(module_bytes(b) for b in streamed) < ALIGN * sum(len(list(b.parameters())) for b in streamed)
    for host, block in zip(streamer.host, streamed, strict=True):
        start = host.packed.data_ptr()
        assert all(start <= p.data_ptr() < start + host.packed.numel() for p in block.parameters())
        assert all((p.data_ptr() - start) % ALIGN == 0 for p in block.parameters())


def test_a_lora_added_inside_a_streamed_block_is_packed_with_it(small_dit):
    from featherflux.lora.load import load_lora

    inputs = dit_inputs(SMALL_DIT)
    name = "double_blocks.0.img_attn.qkv"
    linear = small_dit.get_submodule(name)
    g = torch.Generator().manual_seed(0)
    lora = {
        f"diffusion_model.{name}.lora_A.weight": torch.randn(4, linear.in_features, generator=g),
        f"diffusion_model.{name}.lora_B.weight": torch.randn(linear.out_features, 4, generator=g),
    }
    reference = copy.deepcopy(small_dit)
    load_lora(reference, lora)
    expected = reference(*inputs)
    streamer = stream_modules(block_entries([small_dit.double_blocks, small_dit.single_blocks]), "cpu")
    before = streamer.host_bytes
    load_lora(small_dit, lora)
    assert torch.equal(small_dit(*inputs), expected)
    assert streamer.host_bytes > before  # the adapter's weights joined the block's buffer


class TiedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.second = nn.Linear(4, 4)
        self.second.weight = self.first.weight  # one tensor in two places
        self.register_buffer("offset", torch.ones(4))

    def forward(self, x):
        return self.second(self.first(x)) + self.offset


@torch.no_grad()
def test_a_streamed_forward_reads_every_place_from_the_copies_and_puts_the_host_tensors_back(monkeypatch):
    """On CPU a copy is the host tensor itself, so doubled 'copies' stand in for the device's to show that every
    place the block reads (a tied weight's two, a buffer) takes them, and that the host tensors come back after."""
    holder = nn.ModuleList([TiedBlock()])
    streamer = stream_modules(block_entries([holder]), "cpu")
    block = holder[0].block
    host = {name: t for name, t in [*block.named_parameters(), *block.named_buffers()]}
    doubled = copy.deepcopy(block)
    for t in [*doubled.parameters(), *doubled.buffers()]:
        t.mul_(2)
    real_acquire = streamer.acquire

    def acquire_doubled(i):
        tensors, places = real_acquire(i)
        return {name: 2 * t for name, t in tensors.items()}, places

    monkeypatch.setattr(streamer, "acquire", acquire_doubled)
    x = torch.randn(3, 4)
    assert torch.equal(holder[0](x), doubled(x))
    assert block.second.weight is block.first.weight is host["first.weight"]
    assert block.offset is host["offset"]
    assert torch.equal(holder[0](x), doubled(x))  # twice: nothing of the first call stayed in place


@torch.no_grad()
def test_out_of_order_calls_still_work(small_dit):
    entries = block_entries([small_dit.single_blocks])
    x = torch.randn(1, 8, 128).to(torch.bfloat16)
    pe = small_dit._pe(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4))
    mod = torch.randn(1, 1, 384).to(torch.bfloat16)
    expected = [b(x, pe, mod) for b in small_dit.single_blocks]
    streamer = stream_modules(entries, "cpu")
    for i in (2, 0, 1, 1):
        assert torch.equal(small_dit.single_blocks[i](x, pe, mod), expected[i])
    assert len(streamer._loaded) <= 1  # at most the prefetch of the next block


def _meta_pipe(family):
    from transformers import MistralConfig, MistralModel, Qwen3Config, Qwen3Model

    from featherflux.model.autoencoder import AutoEncoder

    f = FAMILIES[family]
    c = f.text_encoder
    kw = {
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.layers_needed,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
    }
    with torch.device("meta"):
        dit = Flux2(f.dit).to(torch.bfloat16)
        te = (MistralModel(MistralConfig(**kw)) if c.arch == "mistral3" else Qwen3Model(Qwen3Config(**kw))).to(
            torch.bfloat16
        )
        ae = AutoEncoder(f.autoencoder).to(torch.bfloat16)
    return fake_pipe(dit, te, ae)


@pytest.mark.parametrize(("family", "vram", "ram"), [("flux.2-dev", 24, 128), ("klein-4b", 8, 32)])
@torch.no_grad()
def test_real_size_byte_accounting_on_meta(family, vram, ram):
    p = plan(family, vram, ram)
    pipe = _meta_pipe(family)
    ledger = DeviceLedger()
    placement = apply_placement(pipe, p, "meta", ledger, host="meta")
    hw = Hardware(vram * GiB, ram * GiB)
    img = (1024 // 16) ** 2
    x = torch.empty(1, img, 128, device="meta", dtype=torch.bfloat16)
    ctx = torch.empty(1, 512, FAMILIES[family].dit.context_in_dim, device="meta", dtype=torch.bfloat16)
    ids = torch.empty(1, img, 4, device="meta"), torch.empty(1, 512, 4, device="meta")
    with placement.phase("text_encoder"):
        pipe.prompt_encoder.model(
            inputs_embeds=torch.empty(
                1, 512, FAMILIES[family].text_encoder.hidden_size, device="meta", dtype=torch.bfloat16
            )
        )
    with placement.phase("dit"):
        pipe.transformer(x, ids[0], torch.empty(1, device="meta"), ctx, ids[1])
    with placement.phase("autoencoder"):
        pass
    # pinned host memory is what the planner counted: every streamed block's and layer's exact packed size
    packed = sum(Layout.of(dict(m.block.named_parameters())).nbytes for st in placement.streamers.values() for m in st.modules)
    assert abs(packed - p.pinned_bytes) < 0.01 * p.pinned_bytes
    # the weights actually placed never exceed what the planner budgeted for weights
    assert ledger.peak <= p.peak_vram_bytes - hw.reserve_bytes
    assert p.peak_vram_bytes <= vram * GiB
    assert ledger.peak > 0.5 * (vram * GiB - hw.reserve_bytes) or p.dit == "resident"  # and the budget is used


def test_fallback_applies_a_smaller_plan(small_dit):
    candidates = [
        small_plan(dit="resident", peak_vram_bytes=3),
        small_plan(dit="stream", peak_vram_bytes=2),
        small_plan(dit="sequential", peak_vram_bytes=1),
    ]
    pipe = fake_pipe(small_dit)
    placement = apply_placement(pipe, candidates[0], "cpu", fallbacks=candidates[1:])
    with pytest.warns(UserWarning, match="falling back to"):
        placement = fallback(pipe, placement)
    assert placement.plan.dit == "stream" and isinstance(small_dit.single_blocks[0], StreamedModule)
    with pytest.warns(UserWarning):
        placement = fallback(pipe, placement)
    assert placement.plan.dit == "sequential" and fallback(pipe, placement) is None
    assert torch.equal(small_dit(*dit_inputs(SMALL_DIT)), small_dit(*dit_inputs(SMALL_DIT)))


def test_sequential_offload_streams_quantized_linears(small_dit):
    ledger = DeviceLedger()
    apply_placement(fake_pipe(small_dit), small_plan(quantize="int8", dit="sequential"), "cpu", ledger)
    small_dit(*dit_inputs(SMALL_DIT))
    largest = max(module_bytes(m) for m in small_dit.modules() if isinstance(m, StreamedModule))
    assert ledger.peak <= 2 * largest + 16 * 1024  # two Linears in flight plus the norms and embedders' small rest
    assert ledger.peak < module_bytes(small_dit) / 4


def test_quantized_streaming(small_dit):
    reference = small_dit(*dit_inputs(SMALL_DIT))
    apply_placement(fake_pipe(small_dit), small_plan(quantize="int8", dit_resident_blocks=(1,)), "cpu")
    out = small_dit(*dit_inputs(SMALL_DIT))
    assert ((out.float() - reference.float()).norm() / reference.float().norm()) < 0.02

@pytest.mark.skipif(not torch.cuda.is_available(), reason="side-stream prefetch and pinned memory need CUDA")
@torch.no_grad()
def test_cuda_streaming_matches_resident_within_its_budget(small_dit):
    device = torch.device("cuda")
    inputs = [t.to(device) for t in dit_inputs(SMALL_DIT)]
    reference = copy.deepcopy(small_dit).to(device)(*inputs)
    ledger = DeviceLedger()
    placement = apply_placement(fake_pipe(small_dit), small_plan(dit_resident_blocks=(1,)), device, ledger)
    assert all(p.is_pinned() for m in small_dit.modules() if isinstance(m, StreamedModule) for p in m.parameters())
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with placement.phase("dit"):
        for _ in range(3):
            assert torch.equal(small_dit(*inputs), reference)
    torch.cuda.synchronize()
    blocks = [module_bytes(b) for b in [*small_dit.double_blocks, *small_dit.single_blocks]]
    assert torch.cuda.max_memory_allocated() - before < 2 * max(blocks) + 64 * 2**20  # two blocks + activations
    assert torch.cuda.memory_allocated() == before  # the phase closed its streamer: no block stays


def test_lora_on_a_sequentially_streamed_linear_lives_on_the_compute_device(small_dit):
    """Sequential offload streams each Linear from the host; a LoRA around it runs on the device, so it is put there
    (the meta device stands in for CUDA: nothing is copied, but devices are kept)."""
    from featherflux.lora.load import load_lora
    from featherflux.memory.streaming import leaf_entries, stream_modules

    stream_modules(leaf_entries(small_dit), "meta")
    name = "double_blocks.0.img_attn.qkv"
    linear = small_dit.get_submodule(name)
    lora = {
        f"diffusion_model.{name}.lora_A.weight": torch.randn(4, linear.in_features),
        f"diffusion_model.{name}.lora_B.weight": torch.randn(linear.out_features, 4),
    }
    load_lora(small_dit, lora)
    wrapped = small_dit.get_submodule(name)
    assert all(p.device.type == "meta" for p in wrapped.adapters.parameters())
    assert all(p.device.type == "cpu" for p in wrapped.base.parameters())  # the base stays streamed from the host


def test_a_plan_that_tiles_the_decode_turns_tiling_on(small_dit):
    from featherflux.model.autoencoder import AutoEncoder
    from featherflux.model.config import AutoEncoderConfig

    ae = AutoEncoder(AutoEncoderConfig(channels=(8, 8), num_res_blocks=1, z_channels=4, norm_groups=1))
    apply_placement(fake_pipe(copy.deepcopy(small_dit), autoencoder=ae), small_plan(autoencoder_slicing=True), "cpu")
    assert ae.use_slicing and not ae.use_tiling
    tiled = small_plan(autoencoder_slicing=True, autoencoder_tile=64)
    apply_placement(fake_pipe(copy.deepcopy(small_dit), autoencoder=ae), tiled, "cpu")
    assert ae.use_tiling and ae.tile_size == 64


@torch.no_grad()
def test_compiled_blocks_run_compiled_when_streamed_without_recompiling(small_dit):
    from torch._dynamo.utils import counters

    from featherflux.model.compile import compile_blocks

    inputs = dit_inputs(SMALL_DIT)
    expected = small_dit(*inputs)
    assert compile_blocks(small_dit, True, "cpu")
    stream_modules(block_entries([small_dit.double_blocks, small_dit.single_blocks]), "cpu")
    torch._dynamo.reset()
    counters.clear()
    first, second = small_dit(*inputs), small_dit(*inputs)
    assert counters["stats"]["unique_graphs"] > 0  # the blocks did run compiled
    assert not counters["recompiles"] and not counters["graph_break"]
    torch.testing.assert_close(first, expected, atol=2e-2, rtol=2e-2)  # bf16: compiled fusions round differently
    assert torch.equal(first, second)
