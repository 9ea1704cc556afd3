"""Batch jobs switch LoRAs per job: a job's adapter is active for that job only."""

import json

import numpy as np
from PIL import Image

from featherflux.images import read_png_parameters
from featherflux.scale.batch import run_batch
from tests.lora.lora_fixtures import save_peft_lora


def test_each_job_gets_exactly_its_loras(tiny_klein, tmp_path):
    from diffusers import Flux2Transformer2DModel

    lora = save_peft_lora(Flux2Transformer2DModel.from_pretrained(tiny_klein / "transformer"), tmp_path / "lora")
    job = {"prompt": "a red star", "seed": 3, "size": "64x64", "steps": 2}
    lines = [job | {"id": "plain"}, job | {"id": "styled", "loras": [f"lora/{lora.name}:1.5"]}, job | {"id": "again"}]
    (tmp_path / "jobs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    report = run_batch(tmp_path / "jobs.jsonl", tmp_path / "out", str(tiny_klein))
    assert (report.done, report.failed) == (3, [])
    pixels = {name: np.asarray(Image.open(tmp_path / "out" / f"{name}.png")) for name in ("plain", "styled", "again")}
    assert not np.array_equal(pixels["plain"], pixels["styled"])
    assert np.array_equal(pixels["plain"], pixels["again"])  # the adapter was switched off after its job
    assert read_png_parameters(tmp_path / "out" / "styled.png")["loras"] == [f"lora/{lora.name}:1.5"]
