import os
import subprocess
import sys

import numpy as np
from PIL import Image

from featherflux.cli import main


def test_torchrun_generate_writes_one_png_equal_to_the_single_process_one(tmp_path):
    prompt = ["a red circle on a blue background", "--seed", "3", "--steps", "3"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "featherflux", "generate",
         *prompt, "--parallel", "ring", "-o", str(tmp_path / "split.png")],
        check=False, capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(tmp_path / "split.png")]  # printed once, by rank 0
    assert main(["generate", *prompt, "-o", str(tmp_path / "whole.png")]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["split.png", "whole.png"]
    split = np.asarray(Image.open(tmp_path / "split.png"), dtype=int)
    whole = np.asarray(Image.open(tmp_path / "whole.png"), dtype=int)
    assert np.array_equal(split, whole)
    assert Image.open(tmp_path / "split.png").text["seed"] == "3"
