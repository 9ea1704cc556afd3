import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from featherflux.memory.quant import Float8Linear, Int8Linear, NF4Linear, nf4_available, quantize
from tests.memory.conftest import SMALL_DIT, dit_inputs

# Relative L2 error of the DiT output against the bf16 model (measured ~0.4% / ~2.5% / ~8%).
TOLERANCE = {"int8": 0.02, "fp8": 0.06, "nf4": 0.15}


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("mode", ["int8", "fp8", "nf4"])
@torch.no_grad()
def test_quantized_dit_stays_within_tolerance_of_bf16(small_dit, mode):
    if mode == "nf4" and not nf4_available():
        pytest.skip("bitsandbytes not importable")
    inputs = dit_inputs(SMALL_DIT)
    reference = small_dit(*inputs)
    q = quantize(copy.deepcopy(small_dit), mode, fp8_matmul=False)
    kinds = {type(m) for m in q.modules()}
    assert {"int8": Int8Linear, "fp8": Float8Linear, "nf4": NF4Linear}[mode] in kinds
    assert isinstance(q.img_in, nn.Linear) and isinstance(q.final_layer.linear, nn.Linear)  # kept in bf16
    assert rel_err(q(*inputs), reference) < TOLERANCE[mode]
    # quantized weights are smaller, and the state dict keeps the Linear names
    assert "double_blocks.0.img_attn.qkv.weight" in q.state_dict()
    size = sum(b.numel() * b.element_size() for b in q.buffers()) + sum(
        p.numel() * p.element_size() for p in q.parameters()
    )
    assert size < 0.7 * sum(p.numel() * p.element_size() for p in small_dit.parameters())


@torch.no_grad()
def test_fp8_scaled_mm_matches_dequantised_fp8():
    linear = nn.Linear(128, 64, bias=True).to(torch.bfloat16)
    x = torch.randn(3, 5, 128).to(torch.bfloat16)
    plain = Float8Linear.from_linear(linear, scaled_mm=False)
    fast = Float8Linear.from_linear(linear, scaled_mm=True)
    assert rel_err(fast(x), plain(x)) < 0.05 and rel_err(plain(x), linear(x)) < 0.05
    assert fast(x).shape == (3, 5, 64)


@torch.no_grad()
def test_int8_linear_with_bias_and_predicate():
    model = nn.Sequential(nn.Linear(64, 32, bias=True), nn.GELU(), nn.Linear(32, 8))
    x = torch.randn(4, 64)
    reference = model(x)
    quantize(model, "int8", predicate=lambda name, m: name == "0")
    assert isinstance(model[0], Int8Linear) and isinstance(model[2], nn.Linear)
    assert rel_err(model(x), reference) < 0.02


def test_quantized_model_moves_with_to(small_dit):
    q = quantize(small_dit, "int8")
    q.to("meta")
    assert all(b.device.type == "meta" for b in q.buffers())


def test_unknown_mode_is_a_user_error(small_dit):
    from featherflux.errors import UserError

    with pytest.raises(UserError, match="int8, fp8 or nf4"):
        quantize(small_dit, "int3")


@torch.no_grad()
def test_bfl_fp8_checkpoint_loads_into_float8_linears(tmp_path):
    from safetensors.torch import save_file

    from featherflux.loading.dit import load_bfl_fp8_transformer
    from featherflux.model.config import FAMILIES
    from featherflux.model.dit import Flux2

    config = FAMILIES["demo"].dit
    torch.manual_seed(0)
    model = Flux2(config).to(torch.bfloat16).eval()
    quantized = quantize(copy.deepcopy(model), "fp8", predicate=lambda n, m: "blocks" in n, fp8_matmul=False)
    state = {}
    for name, t in quantized.state_dict().items():
        key = "model.diffusion_model." + name
        state[key] = t.contiguous()
        if name.endswith("weight_scale"):  # BFL stores a (per-tensor) input scale next to every fp8 weight
            state[key.replace("weight_scale", "input_scale")] = torch.ones(1)
    save_file(state, tmp_path / "flux-2-demo-fp8.safetensors")
    loaded = load_bfl_fp8_transformer(tmp_path / "flux-2-demo-fp8.safetensors")
    assert isinstance(loaded.single_blocks[0].linear1, Float8Linear) and isinstance(loaded.txt_in, nn.Linear)
    n = 16
    x = torch.randn(1, n, config.in_channels).to(torch.bfloat16)
    ids = torch.zeros(1, n, 4)
    ctx = torch.randn(1, 4, config.context_in_dim).to(torch.bfloat16)
    args = (x, ids, torch.full((1,), 0.5), ctx, torch.zeros(1, 4, 4))
    assert torch.equal(loaded(*args), quantized(*args))
    from featherflux.loading import resolve_family
    from featherflux.memory.planner import plan

    family, file_quantization = resolve_family(tmp_path / "flux-2-demo-fp8.safetensors")
    assert plan(family, 8, 16, file_quantization=file_quantization).quantize == "fp8"  # planned as the file is


@pytest.mark.parametrize("mode", ["int8", "nf4"])
@torch.no_grad()
def test_quantized_text_encoder_stays_close(mode):
    if mode == "nf4" and not nf4_available():
        pytest.skip("bitsandbytes not importable")
    from transformers import Qwen3Config, Qwen3Model

    config = Qwen3Config(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        vocab_size=100,
    )
    model = Qwen3Model(config).to(torch.bfloat16).eval()
    ids = torch.randint(0, 100, (1, 12))
    reference = model(input_ids=ids, output_hidden_states=True).hidden_states[2]
    quantize(model, mode)
    assert all(not isinstance(m, nn.Linear) for m in model.layers.modules())
    out = model(input_ids=ids, output_hidden_states=True).hidden_states[2]
    assert rel_err(out, reference) < {"int8": 0.03, "nf4": 0.25}[mode]  # measured ~0.01 / ~0.16 on random weights


@pytest.mark.skipif(not nf4_available(), reason="bitsandbytes is not installed")
def test_nf4_builds_its_quant_state_once_per_placement_and_dtype():
    layer = NF4Linear.from_linear(nn.Linear(128, 64, bias=False))
    x = torch.randn(2, 128)
    first = layer(x)
    state = layer._state
    assert torch.equal(layer(x), first) and layer._state is state  # reused, not rebuilt per call
    layer(x.bfloat16())
    assert layer._state is not state and layer._state.dtype == torch.bfloat16
    layer.absmax = layer.absmax.clone()  # what a move to another device does to the buffer
    layer(x)
    assert layer._state.absmax is layer.absmax


@pytest.mark.skipif(not nf4_available(), reason="bitsandbytes is not installed")
@torch.no_grad()
def test_nf4_one_row_goes_through_the_4bit_gemv_and_equals_the_dequantised_matmul(monkeypatch):
    import bitsandbytes

    layer = NF4Linear.from_linear(nn.Linear(256, 512, bias=True).to(torch.bfloat16))
    row = torch.randn(1, 1, 256).to(torch.bfloat16)
    gemv_calls = []
    real = bitsandbytes.matmul_4bit
    monkeypatch.setattr(bitsandbytes, "matmul_4bit", lambda *a, **k: gemv_calls.append(1) or real(*a, **k))
    out = layer(row)
    assert gemv_calls and out.shape == (1, 1, 512)
    torch.testing.assert_close(out, F.linear(row, layer.dequantize(row.dtype), layer.bias))
    layer(torch.randn(3, 256).to(torch.bfloat16))
    assert len(gemv_calls) == 1  # several rows: dequantise once, one matmul


@torch.no_grad()
def test_fp8_path_is_chosen_by_the_inputs_device_at_call_time(monkeypatch):
    from featherflux.memory import quant

    linear = nn.Linear(128, 64, bias=False).to(torch.bfloat16)
    x = torch.randn(4, 128).to(torch.bfloat16)
    layer = quantize(nn.Sequential(linear), "fp8", predicate=lambda n, m: True)[0]  # quantized on the host
    assert layer.scaled_mm is None
    plain, fast = Float8Linear.from_linear(linear, scaled_mm=False), Float8Linear.from_linear(linear, scaled_mm=True)
    assert torch.equal(layer(x), plain(x))  # CPU: the dequantising fallback
    monkeypatch.setattr(quant, "fp8_matmul_available", lambda device: True)  # as if it now ran on an sm_89+ GPU
    assert torch.equal(layer(x), fast(x))


@torch.no_grad()
def test_fp8_layer_compiles_without_graph_breaks():
    from torch._dynamo.utils import counters

    layer = quantize(nn.Sequential(nn.Linear(128, 64, bias=False)), "fp8", predicate=lambda n, m: True)
    x = torch.randn(4, 128)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(layer)
    assert torch.equal(compiled(x), layer(x))
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
