"""PNG output: parameters in text chunks, atomic writes with ordinary file permissions."""

import os
import stat

import pytest
from PIL import Image

from featherflux.images import read_png_parameters, save_png


def test_save_png_round_trips_parameters_with_the_umask_mode(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what any file created here gets: 0666 minus the umask
    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "out" / "a.png", {"prompt": "a cat", "seed": 3})
    assert read_png_parameters(path) == {"prompt": "a cat", "seed": 3}
    assert stat.S_IMODE(os.stat(path).st_mode) == stat.S_IMODE(os.stat(plain).st_mode)
    assert os.listdir(path.parent) == ["a.png"]  # no temporary file left


def test_failed_save_leaves_no_file(tmp_path):
    with pytest.raises(TypeError):
        save_png(Image.new("RGB", (8, 8)), tmp_path / "b.png", {"bad": object()})  # not JSON-serialisable
    assert os.listdir(tmp_path) == []
