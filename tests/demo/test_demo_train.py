"""The demo's training recipe end to end at toy length: every stage runs, the result loads like any FLUX.2
pipeline, and a rerun reuses the finished autoencoder."""

import torch

from featherflux.demo import scenes
from featherflux.demo.train import Recipe, edges, main, render_tensor
from featherflux.pipeline import load_pipeline

TOY = Recipe(ae_steps=2, ae_batch=2, ae_images=4, ae_stats_images=4, dit_images=4, dit_steps=2, dit_batch=2,
             dit_warmup=1)


def test_recipe_writes_a_loadable_pipeline_and_reuses_the_autoencoder(tmp_path):
    main(tmp_path / "demo", TOY, tmp_path / "work")
    pipe = load_pipeline(tmp_path / "demo")
    assert pipe.family.name == "demo"
    image = pipe(prompt="a red star on a blue background", num_inference_steps=1, seed=0).images[0]
    assert image.size == (scenes.IMAGE_SIZE, scenes.IMAGE_SIZE)

    cached = list((tmp_path / "work").glob("autoencoder-*.safetensors"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    main(tmp_path / "demo", TOY, tmp_path / "work")
    assert cached[0].stat().st_mtime_ns == stamp  # loaded, not retrained
    again = load_pipeline(tmp_path / "demo").autoencoder.state_dict()
    assert all(torch.equal(v, again[k]) for k, v in pipe.autoencoder.state_dict().items())


def test_edges_mark_colour_boundaries_only():
    flat = render_tensor([(scenes.Scene("circle", "red", "red"), 0)])  # shape and background the same colour
    assert edges(flat).sum() == 0
    picture = render_tensor([(scenes.Scene("square", "white", "black"), 0)])
    mask = edges(picture)[0, 0]
    assert mask[0].sum() == 0 and mask[:, 0].sum() == 0  # the border is background
    assert mask[scenes.IMAGE_SIZE // 2, scenes.IMAGE_SIZE // 2] == 0  # inside the square
    assert 0 < mask.mean() < 0.2
