"""Regional compilation: the values it takes, and eager mode (with a warning) where the compiler cannot run.
Compiled-equals-eager, diffusers parity and the recompile count are checked on whole pipelines in test_pipeline.py."""

import pytest

from featherflux.errors import UserError
from featherflux.model import compile as compile_module
from featherflux.model.build import build_transformer
from featherflux.model.compile import check_mode, compile_blocks, uncompile_blocks, why_not


def test_compile_values():
    assert [check_mode(v) for v in (None, False, True, "max")] == [False, False, True, "max"]
    for bad in ("yes", "reduce-overhead", 1.5):
        with pytest.raises(UserError, match="use False, True or 'max'"):
            check_mode(bad)


def test_blocks_are_compiled_one_by_one_and_can_go_back():
    model = build_transformer("demo")
    assert compile_blocks(model, True, "cpu")
    blocks = list(model.repeated_blocks())
    assert len(blocks) == model.config.depth + model.config.depth_single_blocks
    assert all(b._compiled_call_impl is not None for b in blocks)
    assert model._compiled_call_impl is None  # regional: the model around the blocks stays eager
    uncompile_blocks(model)
    assert all(b._compiled_call_impl is None for b in blocks)


def test_no_compiler_warns_and_stays_eager(monkeypatch):
    monkeypatch.setattr(compile_module.shutil, "which", lambda name: None)
    assert "C++ compiler" in why_not("cpu")
    model = build_transformer("demo")
    with pytest.warns(UserWarning, match="running eagerly"):
        assert not compile_blocks(model, "max", "cpu")
    assert all(b._compiled_call_impl is None for b in model.repeated_blocks())
