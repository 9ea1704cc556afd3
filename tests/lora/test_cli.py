"""`featherflux train-lora` on a tiny saved pipeline and a folder of captioned images, and its bad inputs."""

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import tiny_pipeline_dir

from featherflux.cli import main
from featherflux.errors import UserError
from featherflux.lora.data import scan_folder


@pytest.fixture(scope="module")
def klein_dir(tmp_path_factory):
    return tiny_pipeline_dir("klein", tmp_path_factory.mktemp("tiny"))


def make_data(folder, sizes=((80, 64), (64, 96), (64, 64))):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a red square number {i}")
    Image.new("RGB", (32, 32)).save(folder / "no_caption.png")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    (folder / "broken.txt").write_text("broken")
    return folder


def test_train_lora_command(tmp_path, klein_dir, capsys):
    data = make_data(tmp_path / "data")
    out = tmp_path / "out"
    args = [
        "train-lora",
        "--model",
        str(klein_dir),
        "--data",
        str(data),
        "--output",
        str(out),
        "--steps",
        "2",
        "--resolution",
        "64",
        "--rank",
        "2",
        "--checkpoint-every",
        "1",
        "--validate-every",
        "2",
        "--validation-prompt",
        "a red square",
        "--caption-dropout",
        "0.5",
        "--gradient-checkpointing",
    ]
    assert main(args) == 0
    printed = capsys.readouterr()
    assert (  # the data report is a notice (stderr); stdout holds only the files written, for scripts
        "3 images with captions; 1 skipped without a .txt caption" in printed.err and "1 skipped as unreadable" in printed.err
    )
    assert printed.out.split() == [str(out / "diffusers" / "pytorch_lora_weights.safetensors"), str(out / "lora.safetensors")]
    assert (out / "lora.safetensors").is_file() and (out / "diffusers" / "pytorch_lora_weights.safetensors").is_file()
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-0000002.png"]
    assert (out / "checkpoints" / "step-0000001" / "state.json").is_file()

    from featherflux.pipeline import load_pipeline

    pipe = load_pipeline(klein_dir)
    plain = pipe(prompt="a red square", height=64, width=64, num_inference_steps=2, seed=0, output_type="pt")
    pipe.load_lora(out / "lora.safetensors", scale=1.0)
    assert pipe.transformer is not None
    tuned = pipe(prompt="a red square", height=64, width=64, num_inference_steps=2, seed=0, output_type="pt")
    assert not (plain.images == tuned.images).all()

    # the diffusers-format output in diffusers' own pipeline: same image as ours with the same file
    from tiny import load_diffusers_pipeline

    theirs = load_diffusers_pipeline(klein_dir)
    theirs.set_progress_bar_config(disable=True)
    theirs.load_lora_weights(str(out / "diffusers"))
    pipe.unload_lora()
    pipe.load_lora(out / "diffusers")
    kw = dict(prompt="a red square", height=64, width=64, num_inference_steps=2, max_sequence_length=32,
              guidance_scale=1.0, output_type="np")
    expected = theirs(generator=torch.Generator().manual_seed(0), **kw).images
    ours = pipe(generator=torch.Generator().manual_seed(0), show_progress=False, **kw).images
    np.testing.assert_allclose(ours, expected, atol=1e-4)

    png = tmp_path / "with_lora.png"
    assert (
        main(
            [
                "generate",
                "a red square",
                "--model",
                str(klein_dir),
                "--lora",
                f"{out / 'lora.safetensors'}:0.5",
                "--steps",
                "2",
                "--width",
                "64",
                "--height",
                "64",
                "--seed",
                "0",
                "-o",
                str(png),
            ]
        )
        == 0
    )
    from featherflux.images import read_png_parameters

    assert read_png_parameters(png)["loras"] == [f"{out / 'lora.safetensors'}:0.5"]


def test_bad_data_folders(tmp_path, klein_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no images"):
        scan_folder(tmp_path / "empty")
    only_uncaptioned = tmp_path / "uncaptioned"
    only_uncaptioned.mkdir()
    Image.new("RGB", (8, 8)).save(only_uncaptioned / "a.png")
    with pytest.raises(UserError, match="1 skipped without a .txt caption"):
        scan_folder(only_uncaptioned)
    code = main(
        ["train-lora", "--model", str(klein_dir), "--data", str(tmp_path / "nope"), "--output", str(tmp_path / "o")]
    )
    assert code == 2
