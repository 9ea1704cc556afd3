"""`featherflux generate` and `featherflux info` on a tiny pipeline saved to disk."""

import json

import numpy as np
import pytest
from PIL import Image

from featherflux.cli import main
from featherflux.images import read_png_parameters
from tests.tiny import tiny_pipeline_dir


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(tiny_pipeline_dir("klein", tmp_path_factory.mktemp("tiny")))


def pixels(path):
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.int16)


def test_generate_writes_png_whose_metadata_reproduces_it(model, tmp_path, capsys):
    ref = tmp_path / "ref.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(ref)
    out = tmp_path / "out.png"
    args = ["generate", "a dog is dancing", "--model", model, "--image", str(ref), "--steps", "2", "--seed", "7",
            "--num-images", "2", "-o", str(out), "--device", "cpu"]
    assert main(args) == 0
    first, second = tmp_path / "out-0.png", tmp_path / "out-1.png"
    assert capsys.readouterr().out.split() == [str(first), str(second)]
    meta = read_png_parameters(second)
    assert meta["seed"] == 8 and meta["width"] == 80 and meta["height"] == 64  # size from the reference
    with Image.open(second) as img:
        assert img.size == (80, 64) and img.text["prompt"] == "a dog is dancing" and img.text["steps"] == "2"
    again = tmp_path / "again.png"
    rerun = ["generate", meta["prompt"], "--model", meta["model"], "--steps", str(meta["steps"]),
             "--guidance", str(meta["guidance"]), "--seed", str(meta["seed"]), "--width", str(meta["width"]),
             "--height", str(meta["height"]), "-o", str(again), "--device", "cpu"]
    for r in meta["references"]:
        rerun += ["--image", r]
    assert main(rerun) == 0
    assert np.abs(pixels(again) - pixels(second)).max() <= 1  # batch of 2 vs alone: same noise, same picture
    assert not np.array_equal(pixels(first), pixels(second))


def test_generate_errors_are_one_line_and_leave_no_png(model, tmp_path, capsys):
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    out = tmp_path / "never.png"
    assert main(["generate", "x", "--model", model, "--image", str(bad), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "corrupt.jpg" in err[0] and err[0].startswith("featherflux: error:")
    assert main(["generate", "x", "--model", str(tmp_path / "nowhere"), "-o", str(out)]) == 2
    assert "nowhere does not exist; pass a diffusers pipeline folder" in capsys.readouterr().err
    assert list(tmp_path.glob("*.png")) == [] and list(tmp_path.glob(".*")) == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["--width", "32"], "size 32x64 is out of range"),
        (["--width", "4096", "--height", "2048"], "4 megapixels"),
        (["--image", "ref.png"] * 11, "11 --image references given; at most 10"),
        (["--steps", "0"], "--steps must be >= 1"),
    ],
)
def test_bad_arguments_fail_before_the_model_loads(tmp_path, capsys, args, message):
    # the model folder does not exist: these errors must come first, not after minutes of loading
    assert main(["generate", "x", "--model", str(tmp_path / "not-loaded"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_info_backends_lists_each_attention_backend(capsys):
    assert main(["info", "--backends"]) == 0
    out = capsys.readouterr().out
    assert "auto takes: sdpa" in out and "flash3" in out and "flash_attn_interface" in out
    assert "memory planner: no CUDA device" in out and "bf16 TFLOP/s" in out
    assert main(["info"]) == 2
    assert "pass --backends" in capsys.readouterr().err


def test_info_backends_prints_what_the_planner_knows_of_the_gpu(capsys, monkeypatch):
    from featherflux.cli import info
    from featherflux.memory.hardware import GiB, gpu_hardware

    h200 = gpu_hardware("NVIDIA H200", (9, 0), 139 * GiB, 256 * GiB)
    monkeypatch.setattr(info, "detect_hardware", lambda: h200)
    assert main(["info", "--backends"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("memory planner:"))
    assert "NVIDIA H200" in line and "692 bf16 TFLOP/s" in line and "1385 fp8 TFLOP/s" in line and "datasheet" in line


def test_info_reads_headers_only(model, capsys):
    assert main(["info", model, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "custom-klein" and info["variant"] == "klein"
    te = info["components"]["text_encoder"]
    assert 0 < te["loaded"]["params"] < te["params"]  # layer 28 and the LM head are not loaded
    assert info["components"]["transformer"]["dtypes"] == {"F32": info["components"]["transformer"]["bytes"]}
    assert main(["info", model]) == 0
    assert "custom-klein" in capsys.readouterr().out


def test_info_names_the_family_of_a_bfl_transformer_file(tmp_path, capsys):
    from safetensors.torch import save_file

    from featherflux.model.config import FAMILIES
    from featherflux.model.dit import Flux2

    model = Flux2(FAMILIES["demo"].dit)  # native parameter names are BFL's checkpoint names
    path = tmp_path / "demo-dit.safetensors"
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in model.state_dict().items()}, str(path))
    assert main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "demo"
    assert info["components"]["file"]["params"] == sum(p.numel() for p in model.parameters())
    assert info["components"]["file"]["dtypes"] == {"F32": info["components"]["file"]["bytes"]}
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-100])
    assert main(["info", str(truncated)]) == 2
    assert "truncated.safetensors is truncated" in capsys.readouterr().err


def test_generate_inpaints_an_init_picture_and_its_png_reproduces_it(model, tmp_path, capsys):
    from featherflux.pipeline import load_pipeline

    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(init)
    marks = np.zeros((64, 80), dtype=np.uint8)
    marks[:, 40:] = 255
    Image.fromarray(marks).save(mask)
    out = tmp_path / "inpainted.png"
    args = ["generate", "a cat", "--model", model, "--init", str(init), "--mask", str(mask), "--strength", "0.7",
            "--steps", "3", "--seed", "3", "-o", str(out), "--device", "cpu"]
    assert main(args) == 0
    meta = read_png_parameters(out)
    assert (meta["init"], meta["mask"], meta["strength"], meta["steps"]) == (str(init), str(mask), 0.7, 3)
    again = load_pipeline(meta["model"]).inpaint(
        prompt=meta["prompt"], image=meta["init"], mask_image=meta["mask"], strength=meta["strength"],
        num_inference_steps=meta["steps"], guidance_scale=meta["guidance"], seed=meta["seed"], show_progress=False,
    ).images[0]
    assert np.abs(np.asarray(again, dtype=np.int16) - pixels(out)).max() <= 1
    assert main(["generate", "a cat", "--model", model, "--mask", str(mask)]) == 2
    assert "pass --init IMAGE too" in capsys.readouterr().err


@pytest.mark.parametrize("flags, value", [([], None), (["--compile"], True), (["--compile=max"], "max")])
def test_compile_flag_reaches_load_pipeline(flags, value):
    from featherflux.cli import build_parser
    from featherflux.cli.options import pipeline_options

    args = build_parser().parse_args(["generate", "a red apple", *flags])
    assert pipeline_options(args).get("compile") == value


def test_compile_flag_refuses_other_values(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--compile", "fast", "a red apple"])
    assert "--compile takes no value or 'max', got 'fast'" in capsys.readouterr().err
