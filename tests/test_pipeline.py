"""End-to-end parity with diffusers' FLUX.2 pipelines on tiny random pipelines that both libraries load from disk,
and the pipeline's handling of bad input."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from featherflux import load_pipeline  # the package-level name is the contract
from featherflux.errors import UserError, WeightsError
from tests.tiny import copy_pipeline, load_diffusers_pipeline, tiny_pipeline_dir

PROMPTS = ["a dog is dancing", "a red apple on a wooden table"]
SEQ = 32  # max_sequence_length: short prompts keep the tiny runs fast


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="module")
def pipes(scratch):
    """kind -> (ours, diffusers'), loaded once per module."""
    cache = {}

    def get(kind):
        if kind not in cache:
            path = tiny_pipeline_dir(kind, scratch)
            oracle = load_diffusers_pipeline(path)
            oracle.set_progress_bar_config(disable=True)
            cache[kind] = (load_pipeline(path), oracle)
        return cache[kind]

    return get


def references(n):
    rng = np.random.default_rng(n)
    sizes = [(80, 72), (64, 100), (120, 64)]  # (h, w): not multiples of 16, so floor + centre crop run
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes[:n]]


def run_both(pipes, kind, seed=0, **kwargs):
    ours, theirs = pipes(kind)
    kwargs = {"max_sequence_length": SEQ, "output_type": "np", **kwargs}
    gen = kwargs.pop("generators", None)
    a = ours(generator=gen(seed) if gen else torch.Generator().manual_seed(seed), show_progress=False, **kwargs).images
    b = theirs(generator=gen(seed) if gen else torch.Generator().manual_seed(seed), **kwargs).images
    return a, b


CASES = [
    # kind, references, steps, (height, width), guidance
    ("dev", 0, 2, (64, 96), 4.0),
    ("dev", 3, 3, (None, None), 2.5),  # size from the first reference
    ("klein", 1, 2, (96, 64), 1.0),
    ("klein", 3, 4, (64, 64), 1.0),
    ("klein-base", 0, 3, (64, 112), 3.0),  # true CFG
    ("klein-base", 1, 2, (80, 64), 4.0),
    ("klein-kv", 0, 2, (64, 96), None),
    ("klein-kv", 3, 3, (64, 80), None),  # reference K/V extracted on step 0, reused after
]


@pytest.mark.parametrize("kind, n_refs, steps, size, guidance", CASES)
def test_matches_diffusers(pipes, kind, n_refs, steps, size, guidance):
    kwargs = dict(prompt=PROMPTS, num_inference_steps=steps, height=size[0], width=size[1])
    if guidance is not None:
        kwargs["guidance_scale"] = guidance
    if n_refs:
        kwargs["image"] = references(n_refs)
    ours, theirs = run_both(pipes, kind, **kwargs)
    assert ours.shape == theirs.shape and ours.shape[0] == 2
    if size[0] is None:
        assert ours.shape[1:3] == (80, 64)  # first reference 72x80 floored to 64x80
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    assert ours.std() > 0.01  # a real picture, not a constant


def test_custom_sigmas_match_diffusers(pipes):
    ours, theirs = run_both(pipes, "klein", prompt=PROMPTS[:1], num_inference_steps=3, sigmas=[1.0, 0.6, 0.25],
                            height=64, width=64)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_images_per_prompt_with_one_generator_per_image(pipes):
    gens = lambda seed: [torch.Generator().manual_seed(seed + i) for i in range(4)]
    ours, theirs = run_both(pipes, "dev", prompt=PROMPTS, num_images_per_prompt=2, num_inference_steps=2,
                            height=64, width=64, generators=gens)
    assert ours.shape[0] == 4
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["dev", "klein"])
def test_latent_output_matches_diffusers(pipes, kind):
    ours, theirs = run_both(pipes, kind, prompt=PROMPTS[:1], num_inference_steps=2, height=64, width=80,
                            output_type="latent")
    # dev: packed normalised tokens (B, N, C); klein: denormalised (B, z, H/8, W/8)
    assert ours.shape == theirs.shape == ((1, 20, 8) if kind == "dev" else (1, 2, 8, 10))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_prompt_embeds_seed_and_callback(pipes):
    ours, theirs = pipes("klein-base")
    embeds, _ = theirs.encode_prompt(PROMPTS[:1], device="cpu", max_sequence_length=SEQ)
    negative, _ = theirs.encode_prompt([""], device="cpu", max_sequence_length=SEQ)
    common = dict(num_inference_steps=2, height=64, width=64, guidance_scale=3.0, output_type="pt", show_progress=False)
    by_prompt = ours(prompt=PROMPTS[0], seed=3, max_sequence_length=SEQ, **common).images
    seen = []

    def callback(pipe, step, timestep, tensors):
        seen.append((step, float(timestep), tuple(tensors["latents"].shape)))
        return {}

    by_embeds = ours(prompt_embeds=embeds, negative_prompt_embeds=negative,
                     generator=torch.Generator().manual_seed(3), callback_on_step_end=callback, **common).images
    torch.testing.assert_close(by_prompt, by_embeds, atol=1e-6, rtol=0)
    assert [s for s, _, _ in seen] == [0, 1] and seen[0][1] == pytest.approx(1000.0)
    assert seen[0][2] == (1, 16, 8)

    def zero(pipe, step, timestep, tensors):
        return {"latents": torch.zeros_like(tensors["latents"])}

    blank = ours(prompt=PROMPTS[0], seed=3, max_sequence_length=SEQ, callback_on_step_end=zero, **common).images
    assert not torch.allclose(blank, by_prompt)


def test_latents_given_match_diffusers_and_the_seeded_noise(pipes):
    from featherflux.sampling import initial_noise

    noise = initial_noise((1, 8, 4, 5), torch.Generator().manual_seed(5), torch.float32)  # (B, C, H/16, W/16), tiny C
    ours, theirs = run_both(pipes, "klein", prompt=PROMPTS[:1], num_inference_steps=2, height=64, width=80,
                            latents=noise)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    seeded, _ = run_both(pipes, "klein", seed=5, prompt=PROMPTS[:1], num_inference_steps=2, height=64, width=80)
    np.testing.assert_array_equal(ours, seeded)
    with pytest.raises(UserError, match=r"latents must have shape \(1, 8, 4, 5\)"):
        pipes("klein")[0](prompt=PROMPTS[0], latents=noise[..., :4], height=64, width=80, show_progress=False)


def test_bad_inputs(pipes, tmp_path):
    ours, _ = pipes("klein")
    call = dict(num_inference_steps=1, max_sequence_length=8, show_progress=False, output_type="latent")
    with pytest.warns(UserWarning, match="not a multiple of 16; using 64x80"):
        out = ours(prompt="a dog", height=90, width=70, **call).images
    assert out.shape[-2:] == (80 // 8, 64 // 8)
    for h, w in [(48, 64), (64, 40), (4096, 2048), (0, 64)]:
        with pytest.raises(UserError, match=r">= 64 px .* 4 megapixels"):
            ours(prompt="a dog", height=h, width=w, **call)
    with pytest.raises(UserError, match="num_inference_steps must be >= 1, got 0"):
        ours(prompt="a dog", height=64, width=64, **{**call, "num_inference_steps": 0})
    with pytest.raises(UserError, match="at most 10"):
        ours(prompt="a dog", image=[Image.new("RGB", (64, 64))] * 11, **call)
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(UserError, match="broken.png"):
        ours(prompt="a dog", image=[Image.new("RGB", (64, 64)), corrupt], **call)
    with pytest.raises(UserError, match="missing.png"):
        ours(prompt="a dog", image=[tmp_path / "missing.png"], **call)
    with pytest.raises(UserError, match="both sides"):
        ours(prompt="a dog", image=[Image.new("RGB", (32, 64))], **call)
    with pytest.raises(UserError, match="exactly one of"):
        ours(height=64, width=64, **call)
    with pytest.raises(UserError, match="exactly one of"):
        ours(prompt="a", prompt_embeds=torch.zeros(1, 8, 48), height=64, width=64, **call)
    with pytest.raises(UserError, match="one per image"):
        ours(prompt=PROMPTS, generator=[torch.Generator()], height=64, width=64, **call)


def test_load_errors_name_the_problem(scratch, tmp_path):
    src = tiny_pipeline_dir("klein", scratch)
    broken = copy_pipeline(src, tmp_path / "no-vae")
    shutil.rmtree(broken / "vae")
    with pytest.raises(WeightsError, match="`vae/`"):
        load_pipeline(broken)
    (tmp_path / "no-index").mkdir()
    with pytest.raises(WeightsError, match="model_index.json"):
        load_pipeline(tmp_path / "no-index")
    other = copy_pipeline(src, tmp_path / "other")
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    with pytest.raises(WeightsError, match="FluxPipeline"):
        load_pipeline(other)
    with pytest.raises(UserError, match="download=True .* `featherflux pull nobody/no-such-model`"):
        load_pipeline("nobody/no-such-model")
    with pytest.raises(UserError, match="'flash3' cannot run here: needs a CUDA device.*available: sdpa"):
        load_pipeline(tmp_path / "no-index", attention="flash3")  # refused before the folder is read
    with pytest.raises(UserError, match="unknown attention backend 'xformers'"):
        load_pipeline(src, attention="xformers")
    with pytest.raises(UserError, match="unknown cache method 'taylor'"):
        load_pipeline(src, cache="taylor")
    with pytest.raises(ValueError, match="use False, True or 'max'"):
        load_pipeline(src, compile="fast")


def test_the_attention_backend_is_chosen_at_load(scratch):
    assert load_pipeline(tiny_pipeline_dir("klein", scratch), attention="auto").transformer.attention_backend == "sdpa"


@pytest.mark.parametrize("kind, guidance", [("dev", 4.0), ("klein-base", 3.0)])  # guidance embedding; batched CFG
def test_compiled_matches_eager_and_diffusers_without_recompiling(pipes, scratch, kind, guidance):
    from torch._dynamo.utils import counters

    compiled = load_pipeline(tiny_pipeline_dir(kind, scratch), compile=True)
    kwargs = dict(prompt=PROMPTS, num_inference_steps=3, height=64, width=96, guidance_scale=guidance)
    torch._dynamo.reset()
    counters.clear()
    a = compiled(generator=torch.Generator().manual_seed(0), show_progress=False, max_sequence_length=SEQ,
                 output_type="np", **kwargs).images
    assert counters["stats"]["unique_graphs"] == 2  # one per block kind, for every block and every step
    assert not counters["recompiles"] and not counters["graph_break"]
    eager, theirs = run_both(pipes, kind, **kwargs)
    np.testing.assert_allclose(a, eager, atol=1e-4, rtol=0)
    np.testing.assert_allclose(a, theirs, atol=1e-4, rtol=0)


def test_a_failed_compile_falls_back_to_eager(pipes, scratch):
    pipe = load_pipeline(tiny_pipeline_dir("klein", scratch))

    def broken_compiler(graph, example_inputs):
        raise RuntimeError("no kernels today")

    for block in pipe.transformer.repeated_blocks():
        block.compile(backend=broken_compiler)
    kwargs = dict(prompt=PROMPTS, num_inference_steps=2, max_sequence_length=SEQ, output_type="np", show_progress=False)
    with pytest.warns(UserWarning, match="running eagerly"):
        a = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    b = pipes("klein")[0](generator=torch.Generator().manual_seed(0), **kwargs).images
    np.testing.assert_array_equal(a, b)


def test_hub_repo_id_resolves_from_the_local_cache(scratch, tmp_path, monkeypatch):
    import huggingface_hub.constants

    from featherflux.loading import resolve_model_path

    repo = tmp_path / "hub" / "models--someone--tiny-klein"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_pipeline_dir("klein", scratch), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    folder, model_id = resolve_model_path("someone/tiny-klein")
    assert folder == repo / "snapshots" / commit and model_id == "someone/tiny-klein"


def test_variants_and_families(pipes):
    dev, klein, base, kv = (pipes(k)[0] for k in ("dev", "klein", "klein-base", "klein-kv"))
    assert dev.family.dit.guidance_embed and not dev.true_cfg and dev.family.default_steps == 50
    assert not klein.true_cfg and klein.family.default_steps == 4
    assert base.true_cfg and base.family.default_guidance == 4.0
    assert kv.kv_references and not klein.kv_references
    assert dev.family.text_encoder.out_layers == (10, 20, 30) and len(dev.prompt_encoder.model.layers) == 30
    assert klein.family.text_encoder.out_layers == (9, 18, 27) and len(klein.prompt_encoder.model.layers) == 27


def test_bf16_matches_diffusers(scratch):
    path = tiny_pipeline_dir("klein", scratch)
    ours = load_pipeline(path, dtype=torch.bfloat16)
    theirs = load_diffusers_pipeline(path).to(torch.bfloat16)
    theirs.set_progress_bar_config(disable=True)
    kwargs = dict(prompt=PROMPTS, image=references(1), num_inference_steps=2, max_sequence_length=SEQ, output_type="np")
    a = ours(generator=torch.Generator().manual_seed(1), show_progress=False, **kwargs).images
    b = theirs(generator=torch.Generator().manual_seed(1), **kwargs).images
    # bf16 kernels (fused vs split projections, autoencoder ops) round differently; random tiny weights amplify it
    assert a.dtype == np.float32 and np.abs(a - b).mean() < 0.01 and np.abs(a - b).max() < 0.15


def test_named_family_is_recognised_with_its_defaults(tmp_path):
    from tests.tiny import save_family_pipeline

    path = save_family_pipeline("demo", tmp_path / "demo-shaped")
    ours = load_pipeline(path)
    family = ours.family
    assert family.name == "demo" and family.text_encoder.out_layers == (1, 2, 3)
    assert len(ours.prompt_encoder.model.layers) == 3
    theirs = load_diffusers_pipeline(path)
    theirs.set_progress_bar_config(disable=True)
    a = ours(prompt=PROMPTS, seed=0, output_type="np", show_progress=False).images  # family defaults: 4 steps, CFG 2
    b = theirs(prompt=PROMPTS, generator=torch.Generator().manual_seed(0), height=64, width=64,
               num_inference_steps=family.default_steps, guidance_scale=family.default_guidance,
               max_sequence_length=family.text_encoder.max_length,
               text_encoder_out_layers=(1, 2, 3), output_type="np").images
    assert a.shape == (2, 64, 64, 3)
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
