"""load_pipeline(folder, transformer=FILE): GGUF, BFL fp8 and plain BFL DiT files; memory-mapped weights; LoRA on
quantized layers inside a loaded pipeline."""

import copy
import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from featherflux.errors import WeightsError
from featherflux.memory.gguf import GGUFLinear
from featherflux.memory.quant import Float8Linear, Int8Linear, quantize
from featherflux.model.dit import Flux2
from featherflux.pipeline import load_pipeline
from featherflux.weights import load_transformer
from tests.tiny import CALL, tiny_pipeline_dir

PREFIX = "model.diffusion_model."


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def assert_same_image(a, b):
    # CPU matmul kernels round differently for weights at other memory alignments (file offsets): not bit-exact
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def klein_dir(tmp_path_factory):
    return tiny_pipeline_dir("klein", tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def native(klein_dir):
    return load_transformer(klein_dir / "transformer")


@pytest.fixture(scope="module")
def reference(klein_dir):
    return load_pipeline(klein_dir)(**CALL).images


@pytest.fixture(scope="module")
def bfl_file(native, tmp_path_factory):
    path = tmp_path_factory.mktemp("bfl") / "flux-2-tiny.safetensors"
    save_file({PREFIX + k: v.contiguous() for k, v in native.state_dict().items()}, path)
    return path


def file_backed(path: Path):
    """A predicate: does a tensor's memory lie in a mapping of `path` (read from /proc/self/maps)?"""
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() == str(path.resolve()):
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((lo, hi))
    return lambda t: any(lo <= t.data_ptr() < hi for lo, hi in ranges)


def write_gguf(path, model, qtype):
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), "flux")
    for name, t in model.state_dict().items():
        arr = t.float().numpy()
        if t.ndim == 2 and t.shape[1] % 32 == 0:  # Q8_0 blocks are 32 wide; narrower inputs stay float
            w.add_tensor(PREFIX + name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(PREFIX + name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@torch.no_grad()
def test_gguf_file_overrides_the_folders_transformer(klein_dir, native, reference, tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "flux-2-tiny-Q8_0.gguf"
    write_gguf(path, native, gguf.GGMLQuantizationType.Q8_0)
    pipe = load_pipeline(klein_dir, transformer=path, dtype=torch.float32)
    assert isinstance(pipe.transformer.single_blocks[0].linear1, GGUFLinear)
    assert rel_err(pipe(**CALL).images, reference) < 0.02
    linear1 = pipe.transformer.single_blocks[0].linear1  # a LoRA wraps GGUF layers too (side branch)
    lora = {"diffusion_model.single_blocks.0.linear1.lora_A.weight": torch.randn(2, linear1.in_features)}
    lora["diffusion_model.single_blocks.0.linear1.lora_B.weight"] = torch.randn(linear1.out_features, 2)
    pipe.load_lora(lora, name="gguf")
    assert pipe.transformer.single_blocks[0].linear1.base is linear1
    pipe.unload_lora()
    # a folder with only the text encoder and the autoencoder: the architecture comes from the file
    bare = shutil.copytree(klein_dir, tmp_path / "bare", ignore=shutil.ignore_patterns("transformer"))
    again = load_pipeline(bare, transformer=path, dtype=torch.float32, mmap=True)
    backed = file_backed(path)
    assert backed(again.transformer.double_blocks[0].img_attn.qkv.weight)  # quantized blocks stay in the file
    assert_same_image(again(**CALL).images, pipe(**CALL).images)
    # the plan accounts for the file's format
    placed = load_pipeline(bare, transformer=path, dtype=torch.float32, offload="blocks")
    assert placed.placement.plan.quantize == "q8_0"


@torch.no_grad()
def test_bfl_fp8_file_loads_float8_linears(klein_dir, native, reference, tmp_path):
    q = quantize(copy.deepcopy(native), "fp8", predicate=lambda n, m: "blocks" in n, fp8_matmul=False)
    state = {PREFIX + k: v.contiguous() for k, v in q.state_dict().items()}
    state |= {k.replace("weight_scale", "input_scale"): torch.ones(1) for k in state if k.endswith("weight_scale")}
    path = tmp_path / "flux-2-tiny-fp8.safetensors"
    save_file(state, path)
    pipe = load_pipeline(klein_dir, transformer=path, dtype=torch.float32, mmap=True)
    linear1 = pipe.transformer.single_blocks[0].linear1
    assert isinstance(linear1, Float8Linear) and file_backed(path)(linear1.weight)
    assert rel_err(pipe(**CALL).images, reference) < 0.1
    # already quantized by its file: the placement does not quantize it again, and a different mode is refused
    placed = load_pipeline(klein_dir, transformer=path, dtype=torch.float32, offload="model")
    assert placed.placement.plan.quantize == "fp8" and isinstance(placed.transformer.txt_in, nn.Linear)
    from featherflux.errors import UserError

    with pytest.raises(UserError, match="already quantized"):
        load_pipeline(klein_dir, transformer=path, quantize="int8")


@torch.no_grad()
def test_plain_bfl_file_and_memory_mapped_load_give_the_same_image(klein_dir, bfl_file, reference):
    assert_same_image(load_pipeline(klein_dir, transformer=bfl_file)(**CALL).images, reference)
    mapped = load_pipeline(klein_dir, transformer=bfl_file, mmap=True)
    backed = file_backed(bfl_file)
    tensors = list(mapped.transformer.parameters())
    assert all(backed(t) for t in tensors)  # zero copy: every weight is a view of the file
    assert all(t.dtype == torch.float32 for t in tensors)
    assert_same_image(mapped(**CALL).images, reference)


@torch.no_grad()
def test_planned_mmap_on_a_small_host_streams_mapped_blocks(klein_dir, reference):
    """A diffusers folder: all but the fused q/k/v and the swapped final modulation stay views of the file."""
    pipe = load_pipeline(klein_dir, ram="1MiB", offload="blocks")
    assert pipe.placement.plan.mmap
    backed = file_backed(next((klein_dir / "transformer").glob("*.safetensors")))
    assert all(backed(p) for p in pipe.transformer.single_blocks.parameters())
    assert backed(pipe.transformer.double_blocks[0].img_mlp[0].weight)
    assert not backed(pipe.transformer.double_blocks[0].img_attn.qkv.weight)  # concatenated from to_q/k/v
    assert_same_image(pipe(**CALL).images, reference)


def test_a_file_of_another_family_is_a_clear_error(klein_dir, native, tmp_path):
    with torch.device("meta"):
        other = Flux2(dataclasses.replace(native.config, depth=1))
    path = tmp_path / "other.safetensors"
    save_file({k: torch.zeros(v.shape) for k, v in other.state_dict().items()}, path)
    with pytest.raises(WeightsError, match="other.safetensors holds .* pipeline"):
        load_pipeline(klein_dir, transformer=path)
    with pytest.raises(WeightsError, match="does not exist"):
        load_pipeline(klein_dir, transformer=tmp_path / "missing.gguf")


def test_generate_cli_transformer_flag(klein_dir, bfl_file, tmp_path, capsys):
    from featherflux.cli import main

    out = tmp_path / "out.png"
    argv = ["generate", "a dog is dancing", "--model", str(klein_dir), "--transformer", str(bfl_file), "--mmap"]
    argv += ["--width", "64", "--height", "64", "--steps", "1", "--seed", "0", "-o", str(out)]
    assert main(argv) == 0 and out.is_file()


@torch.no_grad()
def test_lora_reaches_int8_layers_of_a_quantized_pipeline(klein_dir, native, tmp_path):
    from featherflux.lora.layers import LoRALinear

    g = torch.Generator().manual_seed(3)
    targets = [n for n, m in native.named_modules() if isinstance(m, nn.Linear) and "blocks" in n]
    lora = {}
    for name in targets:
        linear = native.get_submodule(name)
        lora[f"diffusion_model.{name}.lora_A.weight"] = torch.randn(4, linear.in_features, generator=g) * 0.5
        lora[f"diffusion_model.{name}.lora_B.weight"] = torch.randn(linear.out_features, 4, generator=g) * 0.5
    path = tmp_path / "lora.safetensors"
    save_file(lora, path)
    plain = load_pipeline(klein_dir)
    plain.load_lora(path)
    pipe = load_pipeline(klein_dir, quantize="int8")
    pipe.load_lora(path)
    wrapped = {n: pipe.transformer.get_submodule(n) for n in targets}
    assert all(isinstance(m, LoRALinear) for m in wrapped.values())  # every targeted layer, quantized or not
    assert any(isinstance(m.base, Int8Linear) for m in wrapped.values())
    expected = plain(**CALL).images
    assert rel_err(pipe(**CALL).images, expected) < 0.02
    assert rel_err(expected, load_pipeline(klein_dir)(**CALL).images) > 0.05  # the LoRA does change the image
