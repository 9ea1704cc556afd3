"""Context parallelism on 2 and 4 CPU processes (gloo) equals one process, for the DiT and for whole pipelines."""

import copy

import numpy as np
import pytest
import torch

from featherflux.errors import UserError
from featherflux.model.config import DiTConfig
from featherflux.model.dit import Flux2
from featherflux.parallel import parallelize
from featherflux.parallel.group import init_mesh, mesh_degrees
from tests.parallel.ranks import run_ranks

# four heads, so Ulysses works on 2 and 4 ranks
DIT = DiTConfig(
    in_channels=8, context_in_dim=24, hidden_size=64, num_heads=4, depth=2, depth_single_blocks=2,
    axes_dim=(4, 4, 4, 4), guidance_embed=True,
)
MODES = {
    2: [("ulysses", None), ("ring", None), ("cfg", None), ("tensor", None)],
    4: [
        ("ulysses", None), ("ring", None), ("usp", 2), ("cfg+ulysses", None), ("cfg+ring", None), ("tensor", None),
        ("tensor+ulysses", 2), ("tensor+ring", 2), ("cfg+tensor", None),
    ],
}


def _ids(batch: int, n: int, t: int = 0) -> torch.Tensor:
    ids = torch.zeros(n, 4)
    ids[:, 0], ids[:, 1], ids[:, 2] = t, torch.arange(n) // 4, torch.arange(n) % 4
    return ids[None].expand(batch, -1, -1)


def _dit_cases(rank, world):
    torch.manual_seed(0)
    dit = Flux2(DIT).eval()
    g = torch.Generator().manual_seed(1)
    B, N, L, R = 2, 13, 7, 5  # lengths that do not divide by 2 or 4
    x = torch.randn(B, N, 8, generator=g)
    ctx = torch.randn(B, L, 24, generator=g)
    ref = torch.randn(B, R, 8, generator=g)
    ctx_ids = torch.zeros(B, L, 4)
    ctx_ids[..., 3] = torch.arange(L)
    t, guidance = torch.full((B,), 0.6), torch.full((B,), 3.5)
    x_ids = _ids(B, N)
    both, both_ids = torch.cat([ref, x], dim=1), torch.cat([_ids(B, R, 10), x_ids], dim=1)
    with torch.no_grad():
        plain = dit(x, x_ids, t, ctx, ctx_ids, guidance)
        plain_kv, cache = dit.forward_kv_extract(both, both_ids, t, ctx, ctx_ids, R, guidance)
        plain_cached = dit.forward_kv_cached(x, x_ids, t * 0.5, ctx, ctx_ids, cache, guidance)
        for mode, degree in MODES[world]:
            split = parallelize(copy.deepcopy(dit), mode, degree)
            torch.testing.assert_close(split(x, x_ids, t, ctx, ctx_ids, guidance), plain, atol=1e-5, rtol=0)
            one = split(x[:1], x_ids[:1], t[:1], ctx[:1], ctx_ids[:1], guidance[:1])  # a batch that does not halve
            torch.testing.assert_close(one, plain[:1], atol=1e-5, rtol=0)
            out, split_cache = split.forward_kv_extract(both, both_ids, t, ctx, ctx_ids, R, guidance)
            torch.testing.assert_close(out, plain_kv, atol=1e-5, rtol=0)
            cached = split.forward_kv_cached(x, x_ids, t * 0.5, ctx, ctx_ids, split_cache, guidance)
            torch.testing.assert_close(cached, plain_cached, atol=1e-5, rtol=0)
            if mode == "tensor":  # each rank holds 1/N of every block, and the small rest whole
                assert _block_bytes(split) * world == _block_bytes(dit)
                assert _bytes(split) - _block_bytes(split) == _bytes(dit) - _block_bytes(dit)


def _bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _block_bytes(module) -> int:
    """Bytes of the blocks' projections (their per-head QK-norm scales are whole on every rank)."""
    blocks = [m for m in module.modules() if type(m).__name__ in ("DoubleStreamBlock", "SingleStreamBlock")]
    return sum(p.numel() * p.element_size() for b in blocks for n, p in b.named_parameters() if "norm" not in n)


@pytest.mark.parametrize("world", [2, 4])
def test_split_dit_equals_the_whole_dit(tmp_path, world):
    run_ranks(world, tmp_path, _dit_cases)


def _pipeline_cases(rank, world, folders, mode):
    from featherflux.parallel import ENCODED_ON_RANK_ZERO
    from featherflux.pipeline import load_pipeline
    from tests.test_pipeline import references

    for kind, folder in folders.items():
        whole = load_pipeline(folder)
        split = load_pipeline(folder, parallel=mode)
        assert (split.prompt_encoder is ENCODED_ON_RANK_ZERO) == (rank > 0)  # one text encoder, on rank 0
        for n_refs in (0, 2) if kind != "klein-kv" else (2,):
            call = dict(
                prompt="a dog", height=80, width=80, num_inference_steps=2, max_sequence_length=25,
                output_type="np", show_progress=False, image=references(n_refs) or None,
            )
            a = whole(generator=torch.Generator().manual_seed(0), **call).images
            b = split(generator=torch.Generator().manual_seed(0), **call).images
            np.testing.assert_allclose(b, a, atol=1e-4, rtol=0, err_msg=f"{kind}, {n_refs} references")


@pytest.mark.parametrize(
    "world,mode", [(2, "ulysses"), (2, "ring"), (2, "cfg"), (2, "tensor"), (4, "usp"), (4, "cfg+tensor")]
)
def test_split_pipelines_make_the_single_process_image(tmp_path_factory, tmp_path, world, mode):
    from tests.tiny import tiny_pipeline_dir

    scratch = tmp_path_factory.getbasetemp() / "tiny"
    scratch.mkdir(exist_ok=True)
    folders = {kind: tiny_pipeline_dir(kind, scratch) for kind in ("dev", "klein", "klein-base", "klein-kv")}
    run_ranks(world, tmp_path, _pipeline_cases, folders, mode)


def test_degrees_that_do_not_work_name_the_ones_that_do():
    assert mesh_degrees("usp", 8, None, 24) == (1, 1, 8, 1)
    assert mesh_degrees("usp", 4, 2, 24) == (1, 1, 2, 2)
    assert mesh_degrees("ring", 3, None, 2) == (1, 1, 1, 3)
    assert mesh_degrees("cfg+usp", 8, 2, 24) == (2, 1, 2, 2)
    assert mesh_degrees("cfg", 2, None, 24) == (2, 1, 1, 1)
    assert mesh_degrees("tensor", 4, None, 48, 18432) == (1, 4, 1, 1)
    assert mesh_degrees("cfg+tensor+ulysses", 8, 2, 48, 18432) == (2, 2, 2, 1)
    with pytest.raises(UserError, match="degrees that work: 1, 2, 4"):
        mesh_degrees("tensor+ring", 8, 8, 12, 64)
    with pytest.raises(UserError, match="cfg\\+usp or cfg\\+tensor"):
        mesh_degrees("cfg", 4, None, 24)
    with pytest.raises(UserError, match="start an even number"):
        mesh_degrees("cfg+ring", 3, None, 24)
    with pytest.raises(UserError, match="divides 24"):
        mesh_degrees("ulysses", 5, None, 24)
    with pytest.raises(UserError, match="degrees that work: 1, 2, 3, 6"):
        mesh_degrees("usp", 6, 4, 24)
    with pytest.raises(UserError, match="unknown parallel mode"):
        mesh_degrees("pipeline", 2, None, 24)


def test_parallel_without_torchrun_shows_the_command(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(UserError, match="torchrun --nproc-per-node"):
        init_mesh("ring", 4)


def _compiled_case(rank, world):
    from featherflux.model.compile import compile_blocks

    torch.manual_seed(0)
    dit = Flux2(DIT).eval()
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(1, 13, 8, generator=g), torch.randn(1, 7, 24, generator=g)
    ctx_ids = torch.zeros(1, 7, 4)
    ctx_ids[..., 3] = torch.arange(7)
    t, guidance = torch.full((1,), 0.6), torch.full((1,), 3.5)
    with torch.no_grad():
        plain = dit(x, _ids(1, 13), t, ctx, ctx_ids, guidance)
        compiled = copy.deepcopy(dit)
        assert compile_blocks(compiled, True, "cpu")
        split = parallelize(compiled, "ring")
        torch.testing.assert_close(split(x, _ids(1, 13), t, ctx, ctx_ids, guidance), plain, atol=1e-5, rtol=0)


def test_compiled_blocks_run_split(tmp_path):
    """The compiled blocks break their graph around the parallel attention and give the same output."""
    run_ranks(2, tmp_path, _compiled_case)


def test_tensor_parallelism_refuses_quantized_layers_naming_the_fix():
    from featherflux.memory.quant import quantize
    from featherflux.parallel.group import Mesh
    from featherflux.parallel.tensor import shard_blocks

    dit = Flux2(DIT)
    quantize(dit, "int8")
    with pytest.raises(UserError, match="use a context mode"):
        shard_blocks(dit, Mesh(0, 2, 1, 2, 1, 1, torch.device("cpu")))


def _rank_one_dies(rank, world):
    import os

    import torch.distributed as dist

    torch.manual_seed(0)
    split = parallelize(Flux2(DIT).eval(), "ring")
    dist.barrier()
    if rank == 1:
        os._exit(0)  # gone without a word, mid-run
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(1, 13, 8, generator=g), torch.randn(1, 7, 24, generator=g)
    with pytest.raises(RuntimeError, match="rank 0 of 2: the split DiT failed: rank 1 stopped answering"):
        split(x, _ids(1, 13), torch.full((1,), 0.5), ctx, torch.zeros(1, 7, 4), torch.full((1,), 3.5))
    os._exit(0)  # the group is broken: skip its orderly teardown


def test_a_dead_rank_is_named_by_the_others(tmp_path):
    run_ranks(2, tmp_path, _rank_one_dies)


def _cached_demo_case(rank, world):
    from featherflux.pipeline import load_pipeline

    call = dict(prompt="a red circle on a blue background", height=80, width=80, num_inference_steps=8,
                output_type="np", show_progress=False, cache="first-block", cache_threshold=0.2)
    whole = load_pipeline("demo")(generator=torch.Generator().manual_seed(0), **call)
    assert 1 < whole.dit_calls < 8  # some steps skipped, some not: the decision matters
    for mode in ("ring", "cfg"):
        split = load_pipeline("demo", parallel=mode)(generator=torch.Generator().manual_seed(0), **call)
        assert split.dit_calls == whole.dit_calls, mode
        np.testing.assert_allclose(split.images, whole.images, atol=1e-4, rtol=0, err_msg=mode)


def test_step_caching_decides_on_the_whole_image_across_ranks(tmp_path):
    run_ranks(2, tmp_path, _cached_demo_case)
