"""Every LoRA key format loads onto the native modules with the exact deltas diffusers applies."""

import pytest
import torch
from lora_fixtures import CONFIG, NativeStub, diffusers_transformer, native_lora_pairs, to_native_weights
from safetensors.torch import save_file

from featherflux.errors import WeightsError
from featherflux.lora import fuse_lora, load_lora, lora_names, set_lora_scale, set_loras, unfuse_lora, unload_lora
from featherflux.lora.layers import LoRALinear
from featherflux.model.config import DiTConfig


def diffusers_fused(lora_file):
    """Native-named weights of the tiny diffusers transformer after diffusers loads and fuses `lora_file`."""
    from diffusers import Flux2Pipeline

    t = diffusers_transformer()
    base = to_native_weights(t.state_dict())
    sd, meta = Flux2Pipeline.lora_state_dict(str(lora_file), return_lora_metadata=True)
    Flux2Pipeline.load_lora_into_transformer(sd, transformer=t, metadata=meta)
    t.fuse_lora()
    return base, to_native_weights(t.state_dict())


@pytest.fixture(scope="module")
def oracle(peft_lora_file):
    return diffusers_fused(peft_lora_file)


def write_bfl(pairs, path, down_key="lora_A", up_key="lora_B"):
    save_file(
        {
            **{f"diffusion_model.{m}.{down_key}.weight": d.contiguous() for m, (d, u) in pairs.items()},
            **{f"diffusion_model.{m}.{up_key}.weight": u.contiguous() for m, (d, u) in pairs.items()},
        },
        path,
    )


def write_kohya(pairs, path, alpha=2.0):
    """kohya/musubi layout: flattened names, lora_down/up and an alpha per module (scale = alpha / rank)."""
    sd = {}
    for module, (down, up) in pairs.items():
        key = "lora_unet_" + module.replace(".", "_")
        rank = down.shape[0]
        sd[f"{key}.lora_down.weight"] = down.contiguous()
        sd[f"{key}.lora_up.weight"] = (up / (alpha / rank)).contiguous()
        sd[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(sd, path)


def assert_matches(ours: NativeStub, expected: dict[str, torch.Tensor]):
    got = ours.linear_weights()
    for name, w in expected.items():
        torch.testing.assert_close(got[name], w, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("fmt", ["peft", "bfl", "bfl_down_up", "kohya"])
def test_every_format_fuses_to_diffusers_weights(fmt, peft_lora_file, oracle, tmp_path):
    base, fused = oracle
    path = tmp_path / "lora.safetensors"
    if fmt == "peft":
        path = peft_lora_file
    elif fmt == "bfl":
        write_bfl(native_lora_pairs(peft_lora_file), path)
    elif fmt == "bfl_down_up":
        write_bfl(native_lora_pairs(peft_lora_file), path, "lora_down", "lora_up")
    else:
        write_kohya(native_lora_pairs(peft_lora_file), path)
    model = NativeStub(weights=base)
    load_lora(model, path)
    fuse_lora(model)
    assert_matches(model, fused)
    unfuse_lora(model)
    for name, w in model.linear_weights().items():
        assert torch.equal(w, base[name]), name  # exact, not a subtraction


def test_diffusers_reads_our_test_conversions_the_same(peft_lora_file, oracle, tmp_path):
    """Guards the test's own BFL/kohya writers: diffusers gets the same weights from them (norm_out aside, where
    diffusers applies a BFL-named LoRA without reordering shift/scale, and kohya has no name for it)."""
    _, fused = oracle
    for writer in (write_bfl, write_kohya):
        path = tmp_path / f"{writer.__name__}.safetensors"
        writer(native_lora_pairs(peft_lora_file), path)
        _, theirs = diffusers_fused(path)
        for name in fused:
            if name != "final_layer.adaLN_modulation.1":
                torch.testing.assert_close(theirs[name], fused[name], atol=1e-6, rtol=1e-5, msg=name)


def test_scales_stack_and_unload(peft_lora_file, oracle):
    base, fused = oracle
    model = NativeStub(weights=base)
    load_lora(model, peft_lora_file, name="a", scale=0.5)
    load_lora(model, peft_lora_file, name="b", scale=0.5)  # two halves = one full LoRA
    assert lora_names(model) == ["a", "b"]
    fuse_lora(model)
    assert_matches(model, fused)
    unfuse_lora(model)
    set_lora_scale(model, "b", 0.0)
    x = torch.randn(3, CONFIG.hidden_size)
    qkv = model.get_submodule("double_blocks.0.img_attn.qkv")
    delta = fused["double_blocks.0.img_attn.qkv"] - base["double_blocks.0.img_attn.qkv"]
    torch.testing.assert_close(qkv(x), x @ (base["double_blocks.0.img_attn.qkv"] + 0.5 * delta).T, atol=1e-5, rtol=1e-5)
    unload_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == set(NativeStub().state_dict())


def test_lokr_formats_match_diffusers(tmp_path):
    """LyCORIS LoKr on diffusers names (split q/k/v onto our fused qkv, low-rank factor with alpha) and an
    ai-toolkit LoKr on BFL names (fused qkv) give diffusers' fused weights."""
    g = torch.Generator().manual_seed(3)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    lycoris = {
        "lycoris_transformer_blocks_0_attn_to_q.lokr_w1": r(4, 4),
        "lycoris_transformer_blocks_0_attn_to_q.lokr_w2": r(8, 8),
        "lycoris_transformer_blocks_0_attn_to_k.lokr_w1": r(4, 4),
        "lycoris_transformer_blocks_0_attn_to_k.lokr_w2_a": r(8, 2),
        "lycoris_transformer_blocks_0_attn_to_k.lokr_w2_b": r(2, 8),
        "lycoris_transformer_blocks_0_attn_to_k.alpha": torch.tensor(1.0),
        "lycoris_single_transformer_blocks_1_attn_to_out.lokr_w1": r(4, 4),
        "lycoris_single_transformer_blocks_1_attn_to_out.lokr_w2": r(8, 32),
    }
    bfl = {
        "diffusion_model.double_blocks.1.txt_attn.qkv.lokr_w1": r(4, 4),
        "diffusion_model.double_blocks.1.txt_attn.qkv.lokr_w2": r(24, 8),
        "diffusion_model.single_blocks.0.linear1.lokr_w1": r(4, 4),
        "diffusion_model.single_blocks.0.linear1.lokr_w2": r(72, 8),
    }
    for sd in (lycoris, bfl):
        path = tmp_path / "lokr.safetensors"
        save_file(sd, path)
        base, fused = diffusers_fused(path)
        model = NativeStub(weights=base)
        load_lora(model, path)
        wrapped = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
        inputs = {n: torch.randn(5, m.in_features) for n, m in wrapped.items()}
        side_branch = {n: m(inputs[n]) for n, m in wrapped.items()}  # reshape trick, never building kron
        fuse_lora(model)
        assert_matches(model, fused)
        for n, m in wrapped.items():
            torch.testing.assert_close(side_branch[n], m(inputs[n]), atol=1e-5, rtol=1e-5, msg=n)


def test_bad_loras_name_the_offending_keys(tmp_path, peft_lora_file):
    path = tmp_path / "bad.safetensors"
    # FLUX.1 keys: not a FLUX.2 layer
    save_file(
        {
            "lora_unet_double_blocks_0_img_mod_lin.lora_down.weight": torch.zeros(4, 32),
            "lora_unet_double_blocks_0_img_mod_lin.lora_up.weight": torch.zeros(192, 4),
        },
        path,
    )
    with pytest.raises(WeightsError, match="img_mod_lin"):
        load_lora(NativeStub(), path)
    # a LoRA for a wider sibling of the family
    wide = DiTConfig(
        in_channels=4,
        context_in_dim=16,
        hidden_size=64,
        num_heads=4,
        depth=2,
        depth_single_blocks=2,
        axes_dim=(4, 4, 4, 4),
    )
    with pytest.raises(WeightsError, match="does not fit"):
        load_lora(NativeStub(wide), peft_lora_file)
    # a block the model does not have
    save_file(
        {
            "diffusion_model.double_blocks.7.img_attn.proj.lora_A.weight": torch.zeros(4, 32),
            "diffusion_model.double_blocks.7.img_attn.proj.lora_B.weight": torch.zeros(32, 4),
        },
        path,
    )
    with pytest.raises(WeightsError, match="double_blocks.7"):
        load_lora(NativeStub(), path)
    # one good key and one stray key: nothing is attached
    save_file(
        {
            "diffusion_model.img_in.lora_A.weight": torch.zeros(4, 4),
            "diffusion_model.img_in.lora_B.weight": torch.zeros(32, 4),
            "diffusion_model.img_in.lora_C.weight": torch.zeros(1),
        },
        path,
    )
    model = NativeStub()
    with pytest.raises(WeightsError, match="lora_C"):
        load_lora(model, path)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    (tmp_path / "x.ckpt").write_bytes(b"pickle")
    with pytest.raises(WeightsError, match="only .safetensors"):
        load_lora(model, tmp_path / "x.ckpt")


def test_set_loras_switches_adapters_per_request(peft_lora_file, oracle, tmp_path):
    base, fused = oracle
    model = NativeStub(weights=base)
    set_loras(model, {"style": (peft_lora_file, 1.0)})
    set_loras(model, {"style": (peft_lora_file, 1.0)})  # cached: not loaded twice
    assert lora_names(model) == ["style"]
    fuse_lora(model)
    assert_matches(model, fused)
    set_loras(model, {})  # unfuses, deactivates, keeps the adapter cached
    qkv = model.get_submodule("double_blocks.0.img_attn.qkv")
    x = torch.randn(2, CONFIG.hidden_size)
    assert torch.equal(qkv(x), qkv.base(x)) and lora_names(model) == ["style"]


def test_fal_flux2_lora_with_guidance_embedder_keys(peft_lora_file, oracle, tmp_path):
    """fal's FLUX.2 trainer writes `diffusion_model.` keys that mix BFL names for the embedders (guidance_in,
    time_in, img_in, txt_in) with diffusers names for the blocks; diffusers 0.42.1 refuses the guidance_in keys
    (diffusers#13484). The file's alpha is folded in, so the scale is 1."""
    import json

    from safetensors import safe_open

    with safe_open(str(peft_lora_file), "pt") as f:
        peft = {k.removeprefix("transformer."): f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    scale = meta["transformer.lora_alpha"] / meta["transformer.r"]
    bfl_globals = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear"}
    fal = {}
    for key, tensor in peft.items():
        module, kind = key.rsplit(".lora_", 1)
        if module == "norm_out.linear":
            continue
        fal[f"diffusion_model.{bfl_globals.get(module, module)}.lora_{kind}"] = tensor * (scale if "B" in kind else 1)
    g = torch.Generator().manual_seed(5)
    guidance = {}
    for layer, (out, inp) in {"guidance_in.in_layer": (32, 256), "guidance_in.out_layer": (32, 32)}.items():
        guidance[layer] = (torch.randn(4, inp, generator=g) * 0.1, torch.randn(out, 4, generator=g) * 0.1)
        fal[f"diffusion_model.{layer}.lora_A.weight"], fal[f"diffusion_model.{layer}.lora_B.weight"] = guidance[layer]
    save_file({k: v.contiguous() for k, v in fal.items()}, tmp_path / "fal.safetensors")
    base, fused = oracle
    model = NativeStub(weights=base)
    load_lora(model, tmp_path / "fal.safetensors")
    fuse_lora(model)
    expected = dict(fused) | {"final_layer.adaLN_modulation.1": base["final_layer.adaLN_modulation.1"]}
    expected |= {layer: base[layer] + up @ down for layer, (down, up) in guidance.items()}
    assert_matches(model, expected)


def test_simpletuner_klein_lokr_on_the_feed_forward_layers(tmp_path):
    """SimpleTuner's klein LoKr (ComfyUI#12084): LyCORIS names of diffusers' FLUX.2 feed-forward layers
    (`ff_linear_in`, `ff_context_linear_in`, `ff_linear_out`), full factors, an alpha that full factors ignore."""
    g = torch.Generator().manual_seed(6)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    factors = {
        "transformer_blocks_0_ff_linear_in": ("double_blocks.0.img_mlp.0", r(4, 4), r(48, 8)),
        "transformer_blocks_1_ff_context_linear_in": ("double_blocks.1.txt_mlp.0", r(4, 4), r(48, 8)),
        "transformer_blocks_0_ff_linear_out": ("double_blocks.0.img_mlp.2", r(4, 4), r(8, 24)),
    }
    sd = {}
    for name, (_, w1, w2) in factors.items():
        sd |= {f"lycoris_{name}.lokr_w1": w1, f"lycoris_{name}.lokr_w2": w2, f"lycoris_{name}.alpha": torch.tensor(4.0)}
    save_file(sd, tmp_path / "lokr.safetensors")
    base = NativeStub().linear_weights()
    model = NativeStub(weights=base)
    load_lora(model, tmp_path / "lokr.safetensors")
    fuse_lora(model)
    assert_matches(model, {native: base[native] + torch.kron(w1, w2) for native, w1, w2 in factors.values()})

