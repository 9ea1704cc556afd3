"""The real DiT with LoRAs loaded here gives diffusers' outputs for the same files (within 1e-4)."""

import torch
from dit_fixtures import GUIDED, diffusers_transformer, inputs, ours_from, run_diffusers
from lora_fixtures import native_lora_pairs, save_peft_lora
from safetensors.torch import save_file
from test_formats import write_kohya

from featherflux.lora import fuse_lora, load_lora, unfuse_lora, unload_lora
from featherflux.memory.quant import quantize
from featherflux.weights.transformer import config_from_diffusers


def diffusers_with_lora(path):
    from diffusers import Flux2Pipeline

    reference = diffusers_transformer(**GUIDED)
    sd, meta = Flux2Pipeline.lora_state_dict(str(path), return_lora_metadata=True)
    Flux2Pipeline.load_lora_into_transformer(sd, transformer=reference, metadata=meta)
    return reference


def test_peft_bfl_kohya_files_match_diffusers(tmp_path):
    reference = diffusers_transformer(**GUIDED)
    config = config_from_diffusers(dict(reference.config), "test")
    peft_file = save_peft_lora(diffusers_transformer(**GUIDED), tmp_path)
    kw = inputs(reference)
    expected = run_diffusers(diffusers_with_lora(peft_file), **kw)
    plain = run_diffusers(reference, **kw)
    assert (expected - plain).abs().max() > 1e-2  # the LoRA does something

    kohya = tmp_path / "kohya.safetensors"
    write_kohya(native_lora_pairs(peft_file, config), kohya)
    bfl = {
        f"diffusion_model.{m}.{k}.weight": t.contiguous()
        for m, (d, u) in native_lora_pairs(peft_file, config).items()
        for k, t in (("lora_A", d), ("lora_B", u))
    }
    save_file(bfl, tmp_path / "bfl.safetensors")
    for path in (peft_file, kohya, tmp_path / "bfl.safetensors"):
        model = ours_from(reference)
        load_lora(model, path)
        with torch.no_grad():
            torch.testing.assert_close(model(**kw), expected, atol=1e-4, rtol=1e-4, msg=str(path))
            fuse_lora(model)
            torch.testing.assert_close(model(**kw), expected, atol=1e-4, rtol=1e-4, msg=str(path))
            unfuse_lora(model)
            unload_lora(model)
            assert torch.equal(model(**kw), ours_from(reference)(**kw))


def test_lycoris_lokr_matches_diffusers(tmp_path):
    g = torch.Generator().manual_seed(5)
    lokr = {  # hidden 32: 32 = 4 x 8
        "lycoris_transformer_blocks_0_attn_to_v.lokr_w1": torch.randn(4, 4, generator=g) * 0.2,
        "lycoris_transformer_blocks_0_attn_to_v.lokr_w2_a": torch.randn(8, 2, generator=g) * 0.2,
        "lycoris_transformer_blocks_0_attn_to_v.lokr_w2_b": torch.randn(2, 8, generator=g) * 0.2,
        "lycoris_transformer_blocks_0_attn_to_v.alpha": torch.tensor(4.0),
        "lycoris_single_transformer_blocks_1_attn_to_qkv_mlp_proj.lokr_w1": torch.randn(4, 4, generator=g) * 0.2,
        "lycoris_single_transformer_blocks_1_attn_to_qkv_mlp_proj.lokr_w2": torch.randn(72, 8, generator=g) * 0.2,
    }
    path = tmp_path / "lokr.safetensors"
    save_file(lokr, path)
    reference = diffusers_transformer(**GUIDED)
    kw = inputs(reference)
    expected = run_diffusers(diffusers_with_lora(path), **kw)
    model = ours_from(reference)
    load_lora(model, path)
    with torch.no_grad():
        torch.testing.assert_close(model(**kw), expected, atol=1e-4, rtol=1e-4)


def test_lora_on_int8_base_is_a_side_branch(tmp_path):
    reference = diffusers_transformer(**GUIDED)
    peft_file = save_peft_lora(diffusers_transformer(**GUIDED), tmp_path)
    kw = inputs(reference)
    with torch.no_grad():
        lora_delta = run_diffusers(diffusers_with_lora(peft_file), **kw) - run_diffusers(reference, **kw)
        model = quantize(ours_from(reference), "int8")
        plain = model(**kw)
        load_lora(model, peft_file, scale=1.0)
        # same delta as on the float model, up to int8 rounding of the base
        torch.testing.assert_close(model(**kw) - plain, lora_delta, atol=5e-2, rtol=5e-2)


def test_lora_on_block_streamed_model(tmp_path):
    from featherflux.memory.streaming import block_entries, stream_modules

    reference = diffusers_transformer(**GUIDED)
    peft_file = save_peft_lora(diffusers_transformer(**GUIDED), tmp_path)
    kw = inputs(reference)
    plain = ours_from(reference)
    load_lora(plain, peft_file)
    streamed = ours_from(reference)
    stream_modules(block_entries([streamed.double_blocks, streamed.single_blocks]), "cpu")
    load_lora(streamed, peft_file, scale=0.5)
    with torch.no_grad():
        from featherflux.lora import set_lora_scale

        set_lora_scale(streamed, "pytorch_lora_weights", 1.0)
        torch.testing.assert_close(streamed(**kw), plain(**kw), atol=1e-5, rtol=1e-5)
