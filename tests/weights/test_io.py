import json

import pytest
import torch
from safetensors.torch import save_file

from featherflux.errors import WeightsError
from featherflux.weights.io import LazyTensor, materialize, mmap_safetensors, open_checkpoint, save_safetensors


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)
        self.norm = torch.nn.BatchNorm1d(3)


def _state():
    return {k: v.clone() for k, v in Net().state_dict().items()}


def test_single_file_and_folder_open_lazily(tmp_path):
    state = _state()
    save_file(state, tmp_path / "model.safetensors")
    for path in (tmp_path / "model.safetensors", tmp_path):
        ckpt = open_checkpoint(path)
        assert sorted(ckpt.keys()) == sorted(state)
        assert ckpt.shape("lin.weight") == (3, 4)
        assert ckpt.dtype("norm.num_batches_tracked") == torch.int64
        assert torch.equal(ckpt.get("lin.weight"), state["lin.weight"])
        assert ckpt.files == [tmp_path / "model.safetensors"]


def test_sharded_save_roundtrip_and_stale_files_removed(tmp_path):
    state = _state()
    files = save_safetensors(state, tmp_path, config={"a": 1}, max_shard_bytes=40)
    assert len(files) > 1 and all(f.exists() for f in files)
    index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(state)
    assert json.loads((tmp_path / "config.json").read_text()) == {"a": 1}
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.files == files
    for k, v in state.items():
        assert torch.equal(ckpt.get(k), v)
    # saving again unsharded leaves one layout behind
    save_safetensors(state, tmp_path)
    assert [p.name for p in tmp_path.glob("*.safetensors*")] == ["diffusion_pytorch_model.safetensors"]
    assert open_checkpoint(tmp_path).files == [tmp_path / "diffusion_pytorch_model.safetensors"]


def test_save_views_of_one_storage(tmp_path):
    qkv = torch.randn(6, 2)
    q, k, v = qkv.chunk(3)
    save_safetensors({"q": q, "k": k, "v": v}, tmp_path)
    assert torch.equal(open_checkpoint(tmp_path).get("k"), k)


def test_materialize_loads_onto_dtype_keeping_integers(tmp_path):
    state = _state()
    save_file(state, tmp_path / "m.safetensors")
    with torch.device("meta"):
        net = Net()
    materialize(net, open_checkpoint(tmp_path).lazy(), dtype=torch.bfloat16, keep_fp32={"norm.running_var"})
    assert net.lin.weight.dtype == torch.bfloat16 and not net.lin.weight.is_meta
    assert net.norm.running_var.dtype == torch.float32
    assert net.norm.num_batches_tracked.dtype == torch.int64
    assert torch.equal(net.lin.bias, state["lin.bias"].bfloat16())
    assert isinstance(net.lin.weight, torch.nn.Parameter) and not net.training


def test_materialize_default_dtype_is_the_checkpoints():
    state = {k: v.half() if v.is_floating_point() else v for k, v in _state().items()}
    with torch.device("meta"):
        net = Net()
    materialize(net, state)
    assert net.lin.weight.dtype == torch.float16


def test_materialize_lists_every_problem_in_one_error():
    state = _state()
    del state["lin.bias"]
    state["extra.weight"] = torch.zeros(1)
    state["lin.weight"] = torch.zeros(3, 5)
    for i in range(12):
        state[f"more.{i}"] = torch.zeros(1)
    with torch.device("meta"):
        net = Net()
    with pytest.raises(WeightsError) as err:
        materialize(net, state, source="ckpt.safetensors")
    msg = str(err.value)
    assert "1 missing keys" in msg and "lin.bias" in msg
    assert "13 unexpected keys" in msg and "extra.weight" in msg and "and 3 more" in msg
    assert "1 mis-shaped keys" in msg and "lin.weight: checkpoint (3, 5), model (3, 4)" in msg
    assert "ckpt.safetensors" in msg


def test_lazy_tensors_are_read_only_after_the_check():
    reads = []

    def lazy(t):
        return LazyTensor(tuple(t.shape), t.dtype, lambda: reads.append(1) or t)

    state = {k: lazy(v) for k, v in _state().items()}
    state["lin.weight"] = lazy(torch.zeros(2, 2))
    with torch.device("meta"):
        net = Net()
    with pytest.raises(WeightsError):
        materialize(net, state)
    assert reads == []


def test_missing_path_names_what_was_expected(tmp_path):
    with pytest.raises(WeightsError, match="does not exist; expected a .safetensors file"):
        open_checkpoint(tmp_path / "nope.safetensors")


def test_folder_without_weights(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(WeightsError, match="holds no weights"):
        open_checkpoint(tmp_path)


def test_ambiguous_folder(tmp_path):
    save_file(_state(), tmp_path / "a.safetensors")
    save_file(_state(), tmp_path / "b.safetensors")
    with pytest.raises(WeightsError, match="several checkpoints"):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize("keep", [0.5, 0.01])
def test_truncated_file_is_named(tmp_path, keep):
    path = tmp_path / "model.safetensors"
    save_file(_state(), path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(WeightsError, match=r"model\.safetensors is not a readable safetensors file"):
        open_checkpoint(tmp_path)


def test_missing_shard_is_named(tmp_path):
    files = save_safetensors(_state(), tmp_path, max_shard_bytes=40)
    files[-1].unlink()
    with pytest.raises(WeightsError, match=files[-1].name):
        open_checkpoint(tmp_path)


def test_mmap_safetensors_reads_lazily(tmp_path):
    from safetensors.torch import save_file

    tensors = {"a": torch.randn(3, 4).to(torch.bfloat16), "b": torch.arange(5, dtype=torch.int64)}
    save_file(tensors, tmp_path / "w.safetensors")
    mapped = mmap_safetensors(tmp_path / "w.safetensors")
    assert all(torch.equal(mapped[k], tensors[k]) for k in tensors)
