import json
import struct

import pytest
import torch

from featherflux.cli import main
from featherflux.errors import UserError
from featherflux.loading import resolve_family
from featherflux.memory import sizes
from featherflux.memory.hardware import gpu_hardware
from featherflux.memory.planner import QUALITY_FACTOR, GiB, Hardware, _sizes, parse_bytes, plan, plans
from featherflux.model.config import FAMILIES

BUDGETS = (8, 12, 16, 24, 48, 80)


@pytest.mark.parametrize(
    ("family", "params"), [("flux.2-dev", 32_223_281_152), ("klein-4b", 3_875_544_576), ("klein-9b", 9_078_581_248)]
)
def test_dit_parameter_count_matches_the_reference(family, params):
    assert sizes.dit_weights(FAMILIES[family].dit).total.params == params


def test_dit_accounting_matches_a_meta_model():
    dit = pytest.importorskip("featherflux.model.dit")
    config = FAMILIES["klein-9b"].dit
    with torch.device("meta"):
        model = dit.Flux2(config)
    w = sizes.dit_weights(config)
    assert sum(p.numel() for p in model.parameters()) == w.total.params
    assert sum(p.numel() for p in model.double_blocks[0].parameters()) == w.double_block.params
    assert sum(p.numel() for p in model.single_blocks[0].parameters()) == w.single_block.params


@pytest.mark.parametrize("family", ["flux.2-dev", "klein-4b", "klein-9b"])
def test_text_encoder_accounting_matches_transformers_on_meta(family):
    from transformers import MistralConfig, MistralModel, Qwen3Config, Qwen3Model

    c = FAMILIES[family].text_encoder
    kwargs = {
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.layers_needed,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
    }
    config = MistralConfig(**kwargs) if c.arch == "mistral3" else Qwen3Config(**kwargs)
    with torch.device("meta"):
        model = (MistralModel if c.arch == "mistral3" else Qwen3Model)(config)
    final_norm = c.hidden_size
    assert sum(p.numel() for p in model.parameters()) - final_norm == sizes.text_encoder_weights(c).params


def test_autoencoder_accounting_matches_a_meta_model():
    autoencoder = pytest.importorskip("featherflux.model.autoencoder")
    config = FAMILIES["flux.2-dev"].autoencoder
    with torch.device("meta"):
        ae = autoencoder.AutoEncoder(config)
    count = sum(p.numel() for p in ae.parameters()) + sum(b.numel() for b in ae.buffers())
    assert count == sizes.autoencoder_weights(config).params


@pytest.mark.parametrize("family", ["flux.2-dev", "klein-4b", "klein-9b"])
@pytest.mark.parametrize("vram", BUDGETS)
def test_planner_fits_every_budget_and_explains_it(family, vram):
    p = plan(family, vram, 64)
    assert p.fits and p.peak_vram_bytes <= vram * GiB
    assert f"{vram} GiB VRAM" in p.explanation and "fits" in p.explanation
    # the ranking never prefers a slower plan of the same precision that decodes the image the same way
    same_precision = [
        q
        for q in plans(family, vram, 64)
        if q.fits and q.quantize == p.quantize and q.autoencoder_tile == p.autoencoder_tile
    ]
    assert p.seconds_per_image <= min(q.seconds_per_image for q in same_precision) + 1e-9


def test_planner_choices_follow_the_budget():
    # klein-4b: everything resident from 24 GiB, DiT resident with the text encoder moved off at 12-16 GiB
    assert plan("klein-4b", 24, 64).offload is None and plan("klein-4b", 24, 64).quantize is None
    assert plan("klein-4b", 16, 64).dit == "resident" and plan("klein-4b", 16, 64).text_encoder != "resident"
    # dev: bf16 blocks streaming at 24 GiB given enough RAM, resident DiT at 80 GiB, quantized only when tight
    dev24 = plan("flux.2-dev", 24, 128)
    assert (dev24.offload, dev24.quantize, dev24.dit) == ("blocks", None, "stream")
    assert 0 < len(dev24.dit_resident_blocks) < dev24.dit_blocks
    assert plan("flux.2-dev", 80, 128).dit == "resident"
    assert plan("flux.2-dev", 8, 128).quantize is not None
    # larger budgets never plan worse (time x quality factor)
    for family in FAMILIES:
        times = [(p := plan(family, v, 128)).seconds_per_image * QUALITY_FACTOR[p.quantize] for v in BUDGETS]
        assert times == sorted(times, reverse=True)


def test_targets_of_the_issue_under_the_speed_model():
    resident = {f: plans(f, 1000, 1000, offload=None, quantize=None)[0].seconds_per_step for f in FAMILIES}
    assert plan("flux.2-dev", 24, 128).seconds_per_step <= 1.5 * resident["flux.2-dev"]
    assert plan("flux.2-dev", 8, 128).fits
    assert plan("klein-4b", 8, 64).seconds_per_step <= 1.2 * resident["klein-4b"]


def test_low_ram_host_memory_maps_weights():
    p = plan("flux.2-dev", 24, 16, quantize=None)
    assert p.mmap and "memory-mapped" in p.explanation


def test_forced_modes_and_no_fit():
    p = plan("flux.2-dev", 80, 256, offload=None, quantize=None)
    assert not p.fits and "does NOT fit" in p.explanation
    assert plan("klein-4b", 48, 64, offload="sequential").dit == "sequential"
    with pytest.raises(UserError, match="offload"):
        plan("klein-4b", 8, offload="disk")
    with pytest.raises(UserError, match="quantization"):
        plan("klein-4b", 8, quantize="int3")


def test_parse_bytes():
    assert parse_bytes("24") == parse_bytes(24) == parse_bytes("24GiB") == parse_bytes("24 gib") == 24 * GiB
    assert parse_bytes("24GB") == 24 * 10**9 and parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes(25_000_000_000) == 25_000_000_000
    with pytest.raises(UserError, match="24GiB"):
        parse_bytes("lots")


def _write_header_only_safetensors(path, shapes):
    header = {k: {"dtype": "BF16", "shape": list(s), "data_offsets": [0, 0]} for k, s in shapes.items()}
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)


def test_family_from_names_files_and_folders(tmp_path):
    assert resolve_family("black-forest-labs/FLUX.2-klein-4B")[0].name == "klein-4b"
    assert resolve_family("dev")[0].name == "flux.2-dev"
    c = FAMILIES["klein-9b"].dit
    shapes = {"model.diffusion_model.img_in.weight": (c.hidden_size, 128)}
    shapes |= {f"model.diffusion_model.double_blocks.{i}.img_attn.qkv.weight": (1, 1) for i in range(c.depth)}
    shapes |= {f"model.diffusion_model.single_blocks.{i}.linear1.weight": (1, 1) for i in range(c.depth_single_blocks)}
    _write_header_only_safetensors(tmp_path / "flux-2-klein-9b.safetensors", shapes)
    assert resolve_family(tmp_path / "flux-2-klein-9b.safetensors")[0].name == "klein-9b"
    (tmp_path / "pipe" / "transformer").mkdir(parents=True)
    (tmp_path / "pipe" / "transformer" / "config.json").write_text(
        json.dumps({"num_attention_heads": 24, "attention_head_dim": 128, "num_layers": 5, "num_single_layers": 20})
    )
    assert resolve_family(tmp_path / "pipe")[0].name == "klein-4b"


def test_cli_json(capsys):
    assert main(["plan", "klein-4b", "--vram", "24GiB", "--ram", "64", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] is True and 0 < out["peak_vram_gib"] <= 24
    assert main(["plan", "flux.2-dev", "--vram", "2", "--ram", "64", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["fits"] is False


def test_true_cfg_families_cost_two_dit_passes():
    from dataclasses import replace

    distilled = plan("klein-4b", 24, 64, offload=None, quantize=None)
    base = plan(replace(FAMILIES["klein-4b"], guidance_distilled=False), 24, 64, offload=None, quantize=None)
    assert base.seconds_per_step == pytest.approx(2 * distilled.seconds_per_step, rel=0.05)


def test_hardware_speed_knobs_change_the_choice():
    slow_link = Hardware(8 * GiB, 128 * GiB, h2d_gbps=6.0)  # PCIe 3.0 x8: copies no longer hide behind compute
    assert plan("flux.2-dev", hardware=slow_link).quantize == "nf4"


# ------------------------------------------------------------------------------- quality first, on known hardware

H200 = gpu_hardware("NVIDIA H200", (9, 0), 139 * GiB, 256 * GiB)
H100 = gpu_hardware("NVIDIA H100 80GB HBM3", (9, 0), 80 * GiB, 256 * GiB)
RTX4090 = gpu_hardware("NVIDIA GeForce RTX 4090", (8, 9), 24 * GiB, 64 * GiB)
RTX4060 = gpu_hardware("NVIDIA GeForce RTX 4060 Ti", (8, 9), 8 * GiB, 32 * GiB)


@pytest.mark.parametrize("hw", [H100, H200], ids=["h100-80", "h200-139"])
@pytest.mark.parametrize("family", ["flux.2-dev", "klein-9b", "klein-4b"])
def test_big_cards_keep_the_checkpoints_precision(family, hw):
    p = plan(family, hardware=hw)
    assert p.fits and p.quantize is None and p.dit == "resident", p.explanation


def test_klein_4b_stays_bf16_on_a_24_gib_card():
    p = plan("klein-4b", hardware=RTX4090)
    assert p.fits and p.quantize is None and p.dit == "resident", p.explanation


@pytest.mark.parametrize("hw", [RTX4090, RTX4060], ids=["24", "8"])
@pytest.mark.parametrize("family", ["flux.2-dev", "klein-9b", "klein-4b"])
def test_quantizing_only_when_the_unquantized_dit_does_not_fit_and_saying_why(family, hw):
    candidates = plans(family, hardware=hw)
    best = candidates[0]
    unquantized_resident = [p for p in candidates if p.quantize is None and p.dit == "resident" and p.fits]
    if unquantized_resident:
        assert best.quantize is None
    if best.quantize is not None:
        assert "Quantized because" in best.explanation


def test_fp8_is_planned_at_the_fp8_rate_only_where_it_runs_there():
    fast = plan("flux.2-dev", hardware=H200, quantize="fp8", offload=None)
    bf16 = plan("flux.2-dev", hardware=H200, quantize="none", offload=None)
    a100 = gpu_hardware("NVIDIA A100-SXM4-80GB", (8, 0), 139 * GiB, 256 * GiB)  # as if it had an H200's memory
    dequantised = plan("flux.2-dev", hardware=a100, quantize="fp8", offload=None)
    a100_bf16 = plan("flux.2-dev", hardware=a100, quantize="none", offload=None)
    assert fast.seconds_per_step < 0.7 * bf16.seconds_per_step
    assert dequantised.seconds_per_step > a100_bf16.seconds_per_step  # a bf16 copy per call costs, never saves


def test_the_largest_dequantisation_temporary_is_budgeted():
    family = FAMILIES["flux.2-dev"]
    d, m = family.dit.hidden_size, family.dit.mlp_hidden_dim
    largest = d * (3 * d + 2 * m)  # single-block linear1

    def temporary(quant, hw):
        return _sizes(family, quant, hw, 1024, 1024, 1).dequant_temp

    assert temporary(None, H100) == 0
    assert temporary("fp8", H100) == 0  # multiplied in fp8, never dequantised
    assert temporary("fp8", Hardware(80 * GiB, 256 * GiB)) == 2 * largest  # a bf16 copy per call
    assert temporary("nf4", H100) == 2 * largest
    assert temporary("q4_k", H100) == 6 * largest  # GGUF kernels go through fp32
    hw = Hardware(8 * GiB, 256 * GiB)
    with_temp = plan(family, hardware=hw, quantize="int8", offload="sequential")
    s = _sizes(family, "int8", hw, 1024, 1024, 1)
    dit_phase = 2 * s.dit_largest_leaf + s.act_dit + s.dequant_temp
    assert with_temp.peak_vram_bytes >= dit_phase + hw.reserve_bytes


def test_quantize_none_that_cannot_fit_names_the_budget_and_the_quantized_plans():
    with pytest.raises(UserError) as e:
        plans("flux.2-dev", vram=3, ram=256, quantize="none", hardware=RTX4090)
    message = str(e.value)
    assert "without quantization" in message and "--vram" in message and "GiB" in message
    need = float(message.split("needs ")[1].split(" GiB")[0])
    assert plan("flux.2-dev", vram=need + 0.1, ram=256, quantize="none", hardware=RTX4090).fits
    assert not plans("flux.2-dev", vram=need - 0.2, ram=256, quantize=None, hardware=RTX4090)[0].fits


def test_quantize_none_lists_quantized_plans_that_would_fit():
    with pytest.raises(UserError, match="these would fit: quantize=fp8 offload=sequential"):
        plans("flux.2-dev", vram=4, ram=256, quantize="none", hardware=RTX4060)


def test_plan_cli_takes_quantize_none(capsys):
    assert main(["plan", "klein-4b", "--vram", "24", "--ram", "64", "--quantize", "none", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["quantize"] is None


def test_decode_is_tiled_only_when_a_whole_image_does_not_fit():
    whole = plan("klein-4b", hardware=RTX4060)  # 1024x1024 decodes whole even on 8 GiB
    assert (whole.autoencoder_slicing, whole.autoencoder_tile) == (False, None)
    big = plan("klein-4b", hardware=RTX4060, height=2048, width=2048)
    assert big.fits and (big.autoencoder_slicing, big.autoencoder_tile) == (True, 1024)
    assert "1024-pixel tiles" in big.explanation
    roomy = plan("klein-4b", hardware=H200, height=2048, width=2048)
    assert (roomy.autoencoder_slicing, roomy.autoencoder_tile) == (False, None)
    batch = plan("klein-4b", hardware=RTX4060, batch=4)  # one image at a time is enough, and exact
    assert batch.fits and (batch.autoencoder_slicing, batch.autoencoder_tile) == (True, None)
    assert "one image at a time" in batch.explanation
    s = _sizes(FAMILIES["klein-4b"], None, RTX4060, 2048, 2048, 1)
    assert big.peak_vram_bytes < s.act_ae  # the whole decode alone would not fit


def test_tensor_parallel_puts_dev_in_bf16_on_four_24_gib_cards(capsys):
    one = plan("flux.2-dev", 24, 128)
    four = plan("flux.2-dev", 24, 128, tensor_degrees=(4,))
    assert four.fits and four.tensor_parallel == 4 and four.quantize is None and four.dit == "resident"
    assert one.dit == "stream" and four.seconds_per_step < one.seconds_per_step
    s = _sizes(FAMILIES["flux.2-dev"], None, RTX4090, 1024, 1024, 1)
    s4 = _sizes(FAMILIES["flux.2-dev"], None, RTX4090, 1024, 1024, 1, tensor=4)
    assert s4.dit_blocks == [b // 4 for b in s.dit_blocks] and s4.dit_globals == s.dit_globals
    assert plans("flux.2-dev", 24, 128, tensor_degrees=(1, 4))[0].tensor_parallel == 4
    with pytest.raises(UserError, match="tensor parallelism slices the checkpoint's own weights"):
        plans("flux.2-dev", 24, 128, quantize="int8", tensor_degrees=(4,))
    assert main(["plan", "flux.2-dev", "--vram", "24", "--ram", "128", "--gpus", "4"]) == 0
    out = capsys.readouterr().out
    assert "Picks tensor parallel over 4 GPUs" in out and "torchrun --nproc-per-node 4" in out
