import pytest
import torch
from diffusers.models.transformers.transformer_flux2 import Flux2KVAttnProcessor, Flux2KVParallelSelfAttnProcessor

from featherflux.model.config import FAMILIES
from featherflux.model.dit import Flux2, SingleStreamBlock
from tests.dit_fixtures import (
    GUIDED,
    UNGUIDED,
    assert_close,
    diffusers_transformer,
    grid_ids,
    inputs,
    ours_from,
    run_diffusers,
)

CASES = {
    "guided": (GUIDED, {"h": 3, "w": 5}),
    "guided-called-without-guidance": (GUIDED, {"h": 4, "w": 2, "guidance": False}),
    "unguided": (UNGUIDED, {"h": 2, "w": 6, "guidance": False}),
    "unguided-batch1-tall": (UNGUIDED, {"batch": 1, "h": 7, "w": 2, "txt": 3, "guidance": False}),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_diffusers_fp32(case):
    kwargs, shape = CASES[case]
    reference = diffusers_transformer(**kwargs)
    model = ours_from(reference)
    args = inputs(reference, **shape)
    with torch.no_grad():
        out = model(**args)
    assert out.shape == args["x"].shape
    assert_close(out, run_diffusers(reference, **args), rel=1e-5)


@pytest.mark.parametrize("kwargs", [GUIDED, UNGUIDED], ids=["guided", "unguided"])
def test_matches_diffusers_bf16(kwargs):
    reference = diffusers_transformer(**kwargs).to(torch.bfloat16)
    model = ours_from(reference)
    assert model.img_in.weight.dtype == torch.bfloat16
    args = inputs(reference, dtype=torch.bfloat16, guidance=kwargs["guidance_embeds"])
    with torch.no_grad():
        out = model(**args)
    expected = run_diffusers(reference, **args)
    # a few bf16 ulps at the largest value: we fuse multiply-adds (one rounding where diffusers has two)
    assert_close(out, expected, rel=2e-2)
    assert (out.float() - expected.float()).abs().mean() <= 2e-3 * expected.float().abs().max()


def test_reference_tokens_on_the_time_axis_and_shared_2d_ids():
    reference = diffusers_transformer(**GUIDED)
    model = ours_from(reference)
    args = inputs(reference, h=2, w=3)
    refs = torch.randn(2, 4, 8)
    args["x"] = torch.cat([args["x"], refs], dim=1)
    args["x_ids"] = torch.cat([args["x_ids"], grid_ids(2, 2, 2, t=10)], dim=1)
    expected = run_diffusers(reference, **args)
    with torch.no_grad():
        assert_close(model(**args), expected, rel=1e-5)
        shared = dict(args, x_ids=args["x_ids"][0], ctx_ids=args["ctx_ids"][0])
        assert_close(model(**shared), expected, rel=1e-5)


def _kv_reference(kwargs):
    reference = diffusers_transformer(**kwargs)
    for block in reference.transformer_blocks:
        block.attn.set_processor(Flux2KVAttnProcessor())
    for block in reference.single_transformer_blocks:
        block.attn.set_processor(Flux2KVParallelSelfAttnProcessor())
    return reference


@pytest.mark.parametrize("kwargs", [GUIDED, UNGUIDED], ids=["guided", "unguided"])
def test_kv_extract_and_cached_match_diffusers(kwargs):
    reference = _kv_reference(kwargs)
    model = ours_from(reference)
    args = inputs(reference, guidance=kwargs["guidance_embeds"])
    num_ref = 6
    refs, ref_ids = torch.randn(2, num_ref, 8), grid_ids(2, 2, 3, t=10)
    x = torch.cat([refs, args["x"]], dim=1)  # references first in extract mode
    x_ids = torch.cat([ref_ids, args["x_ids"]], dim=1)
    common = {"encoder_hidden_states": args["ctx"], "txt_ids": args["ctx_ids"], "guidance": args["guidance"]}
    with torch.no_grad():
        expected, cache = reference(
            hidden_states=x, img_ids=x_ids, timestep=args["timesteps"], kv_cache_mode="extract",
            num_ref_tokens=num_ref, return_dict=False, **common,
        )  # fmt: skip
        out, ours = model.forward_kv_extract(
            x, x_ids, args["timesteps"], args["ctx"], args["ctx_ids"], num_ref, guidance=args["guidance"]
        )
        assert_close(out, expected, rel=1e-5)
        assert ours.num_ref == num_ref and len(ours.double) == kwargs["num_layers"]
        for i, layer in enumerate(ours.single):  # ours (B, H, R, D), diffusers (B, R, H, D)
            assert_close(layer.k.transpose(1, 2), cache.get_single(i).k_ref, rel=1e-5)
            assert_close(layer.v.transpose(1, 2), cache.get_single(i).v_ref, rel=1e-5)

        later = torch.tensor([0.5, 0.1])
        expected = reference(
            hidden_states=args["x"], img_ids=args["x_ids"], timestep=later, kv_cache_mode="cached", kv_cache=cache,
            return_dict=False, **common,
        )[0]  # fmt: skip
        out = model.forward_kv_cached(
            args["x"], args["x_ids"], later, args["ctx"], args["ctx_ids"], ours, args["guidance"]
        )
        assert_close(out, expected, rel=1e-5)


def test_kv_extract_rejects_bad_reference_count():
    reference = diffusers_transformer(**UNGUIDED)
    model = ours_from(reference)
    args = inputs(reference, guidance=False)
    with pytest.raises(ValueError, match="num_ref"):
        model.forward_kv_extract(args["x"], args["x_ids"], args["timesteps"], args["ctx"], args["ctx_ids"], 0)


@pytest.mark.parametrize(
    "family, count", [("flux.2-dev", 32_223_281_152), ("klein-4b", 3_875_544_576), ("klein-9b", 9_078_581_248)]
)
def test_parameter_counts_on_meta(family, count):
    with torch.device("meta"):
        model = Flux2(FAMILIES[family].dit)
    assert sum(p.numel() for p in model.parameters()) == count
    assert all(not m.bias for m in model.modules() if isinstance(m, torch.nn.Linear) and hasattr(m, "bias"))


def test_gradients_match_diffusers():
    reference = diffusers_transformer(**GUIDED)
    model = ours_from(reference)
    args = inputs(reference)
    expected = reference(
        hidden_states=args["x"], encoder_hidden_states=args["ctx"], timestep=args["timesteps"],
        img_ids=args["x_ids"], txt_ids=args["ctx_ids"], guidance=args["guidance"], return_dict=False,
    )[0]  # fmt: skip
    expected.square().mean().backward()
    model(**args).square().mean().backward()
    assert_close(model.img_in.weight.grad, reference.x_embedder.weight.grad, rel=1e-4)
    fused = reference.single_transformer_blocks[0].attn.to_qkv_mlp_proj
    assert_close(model.single_blocks[0].linear1.weight.grad, fused.weight.grad, rel=1e-4)


def test_forward_compiles_without_graph_breaks():
    reference = diffusers_transformer(**GUIDED)
    model = ours_from(reference)
    args = inputs(reference)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        assert_close(compiled(**args), model(**args), rel=1e-6)


def test_single_block_input_projection_in_parts_equals_the_fused_linear():
    """On CPU a plain linear1 runs one matmul per part (qkv, gate, up); anything else (a quantized or LoRA-wrapped
    layer, here a Linear subclass that counts its calls) runs its own forward once. Both equal the fused split."""
    torch.manual_seed(0)
    block = SingleStreamBlock(dim=64, num_heads=4, mlp_hidden_dim=96)
    x = torch.randn(2, 10, 64)
    fused = block.linear1(x).split([3 * 64, 96, 96], dim=-1)
    for part, expected in zip(block.project_in(x), fused, strict=True):
        assert_close(part, expected, rel=1e-6)

    class CountingLinear(torch.nn.Linear):
        calls = 0

        def forward(self, x):
            CountingLinear.calls += 1
            return super().forward(x)

    wrapped = CountingLinear(64, 3 * 64 + 2 * 96, bias=False)
    wrapped.weight = block.linear1.weight
    block.linear1 = wrapped
    for part, expected in zip(block.project_in(x), fused, strict=True):
        assert_close(part, expected, rel=1e-6)
    assert CountingLinear.calls == 1
