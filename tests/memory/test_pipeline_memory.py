import pytest
import torch

from featherflux.memory import PlacedPromptEncoder, apply_placement
from featherflux.memory.streaming import StreamedModule
from featherflux.pipeline import load_pipeline
from tests.memory.test_placement import small_plan
from tests.tiny import CALL, tiny_pipeline_dir


@pytest.fixture(scope="module")
def klein_dir(tmp_path_factory):
    return tiny_pipeline_dir("klein", tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def reference(klein_dir):
    return load_pipeline(klein_dir)(**CALL).images


@pytest.mark.parametrize("offload", ["model", "blocks", "sequential"])
def test_load_pipeline_placements_give_the_resident_image(klein_dir, reference, offload):
    pipe = load_pipeline(klein_dir, offload=offload)
    assert pipe.placement.plan.offload == offload
    # Streamed weights are packed on aligned offsets, while the resident ones sit where the file put them; the CPU
    # BLAS sums in an order that depends on a pointer's alignment, so the last bit of a batch-1 matmul may differ.
    torch.testing.assert_close(pipe(**CALL).images, reference, rtol=0, atol=1e-5)


def test_streamed_text_encoder_and_dit_inside_the_pipeline(klein_dir, reference):
    pipe = load_pipeline(klein_dir)
    pipe.placement = apply_placement(
        pipe, small_plan(text_encoder="stream", dit="stream", dit_resident_blocks=(0,)), "cpu"
    )
    pipe.prompt_encoder = PlacedPromptEncoder(pipe.prompt_encoder, pipe)
    assert all(isinstance(layer, StreamedModule) for layer in pipe.prompt_encoder.model.layers)
    assert torch.equal(pipe(**CALL).images, reference)
    assert pipe.placement.ledger.peak < sum(p.numel() * p.element_size() for p in pipe.transformer.parameters()) + sum(
        p.numel() * p.element_size() for p in pipe.prompt_encoder.model.parameters()
    )


def test_embedding_cache_never_wakes_the_encoder_twice(klein_dir, reference, tmp_path):
    pipe = load_pipeline(klein_dir, embed_cache=tmp_path / "cache")
    assert torch.equal(pipe(**CALL).images, reference)
    assert (pipe.prompt_encoder.hits, pipe.prompt_encoder.misses) == (0, 1)
    again = load_pipeline(klein_dir, embed_cache=tmp_path / "cache")

    def asleep(*args, **kwargs):
        raise AssertionError("the text encoder ran for a cached prompt")

    again.prompt_encoder.encoder.encode = asleep
    assert torch.equal(again(**CALL).images, reference)
    assert again.prompt_encoder.hits == 1
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1 and not list((tmp_path / "cache").glob("*.tmp"))


def test_cache_key_separates_settings(klein_dir, tmp_path):
    pipe = load_pipeline(klein_dir, embed_cache=tmp_path)
    cache = pipe.prompt_encoder
    assert cache.path("a", 512, None) != cache.path("a", 256, None) != cache.path("b", 512, None)
    assert cache.path("a", 512, None) != cache.path("a", 512, (1, 2, 3))
    cache.path("a", 512, None).write_bytes(b"torn")  # an unreadable entry is a miss, then rewritten
    out = cache.encode(["a"], 512)
    assert cache.misses == 1 and torch.equal(cache.encode(["a"], 512), out)


def test_out_of_memory_falls_back_to_the_next_plan(klein_dir, reference):
    pipe = load_pipeline(klein_dir, vram="1000GiB", quantize="int8")
    first = pipe.placement.plan
    forward = pipe.transformer.forward
    calls = []

    def oom_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(*args, **kwargs)

    pipe.transformer.forward = oom_once
    with pytest.warns(UserWarning, match="falling back"):
        pipe(**CALL)
    assert pipe.placement.plan.peak_vram_bytes < first.peak_vram_bytes


def test_generate_cli_memory_flags(klein_dir, tmp_path, capsys):
    from featherflux.cli import main

    out = tmp_path / "out.png"
    flags = ["--width", "64", "--height", "64", "--steps", "1", "--seed", "0", "--offload", "blocks", "--quantize", "none"]
    argv = ["generate", "a dog is dancing", "--model", str(klein_dir), *flags, "-o", str(out)]
    argv += ["--embed-cache", str(tmp_path / "c")]
    assert main(argv) == 0
    log = capsys.readouterr().err
    assert out.is_file() and "memory plan" in log and "weights in bf16" in log
    assert len(list((tmp_path / "c").glob("*.safetensors"))) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_says_to_use_the_cpu_before_loading(klein_dir):
    from featherflux.errors import UserError

    with pytest.raises(UserError, match="--device cpu"):
        load_pipeline(klein_dir, device="cuda")


def test_fp8_without_fp8_tensor_cores_says_it_falls_back(klein_dir, reference):
    with pytest.warns(UserWarning, match="without fp8 tensor cores .* dequantised to bf16"):
        pipe = load_pipeline(klein_dir, quantize="fp8")
    images = pipe(**CALL).images
    assert images.shape == reference.shape and (images - reference).abs().mean() < 0.1
