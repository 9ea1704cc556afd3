import json
import struct

import pytest
import torch
from diffusers import Flux2Transformer2DModel
from safetensors.torch import save_file

import featherflux
from featherflux.errors import WeightsError
from featherflux.model.config import FAMILIES, DiTConfig
from featherflux.model.dit import Flux2
from featherflux.weights import load_transformer, save_transformer
from featherflux.weights.io import LazyTensor, open_checkpoint
from featherflux.weights.transformer import config_from_shapes, diffusers_to_native, family_of
from tests.dit_fixtures import GUIDED, UNGUIDED, assert_close, diffusers_transformer, inputs, run_diffusers


def _bfl_state(reference) -> dict[str, torch.Tensor]:
    """The diffusers weights under BFL's single-file names (our native names plus BFL's prefix)."""
    native = diffusers_to_native(dict(reference.state_dict()))
    return {
        f"model.diffusion_model.{k}": (v.load() if isinstance(v, LazyTensor) else v).contiguous()
        for k, v in native.items()
    }


def _check(model, reference, guidance=True):
    args = inputs(reference, guidance=guidance)
    with torch.no_grad():
        assert_close(model(**args), run_diffusers(reference, **args), rel=1e-5)


@pytest.mark.parametrize("sharded", [False, True])
def test_loads_diffusers_save_pretrained(tmp_path, sharded):
    reference = diffusers_transformer(**GUIDED)
    reference.save_pretrained(tmp_path / "transformer", max_shard_size="20KB" if sharded else "10GB")
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists() == sharded
    model = featherflux.load_transformer(tmp_path / "transformer")
    assert model.config == DiTConfig(
        in_channels=8, context_in_dim=24, hidden_size=32, num_heads=2, depth=1, depth_single_blocks=2,
        axes_dim=(4, 4, 4, 4), guidance_embed=True,
    )  # fmt: skip
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    _check(model, reference)
    _check(load_transformer(tmp_path), reference)  # a pipeline folder with transformer/


def test_loads_bfl_single_file_inferring_the_config(tmp_path):
    reference = diffusers_transformer(**UNGUIDED)
    save_file(_bfl_state(reference), tmp_path / "flux2-tiny.safetensors")
    model = load_transformer(tmp_path / "flux2-tiny.safetensors", dtype=torch.float32)
    assert model.config.depth == 2 and model.config.depth_single_blocks == 3 and not model.config.guidance_embed
    _check(model, reference, guidance=False)


def test_loads_diffusers_keyed_single_file(tmp_path):
    reference = diffusers_transformer(**GUIDED)
    save_file(dict(reference.state_dict()), tmp_path / "diffusers-names.safetensors")
    _check(load_transformer(tmp_path / "diffusers-names.safetensors"), reference)


def test_config_override_sets_what_weights_cannot_tell(tmp_path):
    reference = diffusers_transformer(**GUIDED)
    save_file(_bfl_state(reference), tmp_path / "tiny.safetensors")
    config = DiTConfig(
        in_channels=8, context_in_dim=24, hidden_size=32, num_heads=2, depth=1, depth_single_blocks=2,
        axes_dim=(2, 2, 6, 6),
    )  # fmt: skip
    assert load_transformer(tmp_path / "tiny.safetensors", config=config).config.axes_dim == (2, 2, 6, 6)


def test_loads_onto_dtype(tmp_path):
    reference = diffusers_transformer(**GUIDED)
    reference.save_pretrained(tmp_path)
    model = load_transformer(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("max_shard_bytes", [10**9, 30_000])
def test_saved_folder_opens_in_diffusers_with_identical_output(tmp_path, max_shard_bytes):
    reference = diffusers_transformer(**GUIDED)
    save_file(_bfl_state(reference), tmp_path / "bfl.safetensors")
    model = load_transformer(tmp_path / "bfl.safetensors")
    files = save_transformer(model, tmp_path / "out", max_shard_bytes=max_shard_bytes)
    assert (len(files) > 1) == (max_shard_bytes < 10**9)
    reopened = Flux2Transformer2DModel.from_pretrained(tmp_path / "out").eval()
    args = inputs(reference)
    expected = run_diffusers(reference, **args)
    assert torch.equal(run_diffusers(reopened, **args), expected)
    with torch.no_grad():
        assert torch.equal(load_transformer(tmp_path / "out")(**args), model(**args))


def _sparse_checkpoint(path, config: DiTConfig):
    """A BFL-keyed safetensors file with the real shapes of `config` whose data is a hole: header only on disk."""
    with torch.device("meta"):
        state = Flux2(config).state_dict()
    header, offset = {}, 0
    for k, v in state.items():
        size = v.numel() * 2
        entry = {"dtype": "BF16", "shape": list(v.shape), "data_offsets": [offset, offset + size]}
        header[f"model.diffusion_model.{k}"] = entry
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(8 + len(blob) + offset)


def test_wrong_family_names_both(tmp_path):
    _sparse_checkpoint(tmp_path / "flux-2-klein-4b.safetensors", FAMILIES["klein-4b"].dit)
    with pytest.raises(WeightsError, match=r"holds klein-4b, but flux\.2-dev was asked for"):
        load_transformer(tmp_path / "flux-2-klein-4b.safetensors", config="flux.2-dev")


@pytest.mark.parametrize("family", ["flux.2-dev", "klein-4b", "klein-9b"])
def test_family_inferred_from_real_shapes(family):
    with torch.device("meta"):
        state = Flux2(FAMILIES[family].dit).state_dict()
    lazies = {k: LazyTensor(tuple(v.shape), torch.bfloat16, lambda: None) for k, v in state.items()}
    assert family_of(config_from_shapes(lazies, "x")) == family


def test_tiny_checkpoint_is_not_a_family(tmp_path):
    reference = diffusers_transformer(**GUIDED)
    save_file(_bfl_state(reference), tmp_path / "tiny.safetensors")
    with pytest.raises(WeightsError, match=r"holds a custom transformer \(hidden 32.*but klein-9b was asked for"):
        load_transformer(tmp_path / "tiny.safetensors", config="klein-9b")


def test_missing_unexpected_and_misshaped_keys_in_one_error(tmp_path):
    state = _bfl_state(diffusers_transformer(**GUIDED))
    del state["model.diffusion_model.single_blocks.1.linear2.weight"]
    state["model.diffusion_model.single_blocks.0.linear2.bias"] = torch.zeros(32)
    state["model.diffusion_model.double_blocks.0.img_attn.proj.weight"] = torch.zeros(32, 30)
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(WeightsError) as err:
        load_transformer(tmp_path / "bad.safetensors")
    msg = str(err.value)
    assert "bad.safetensors" in msg
    assert "1 missing keys:\n    single_blocks.1.linear2.weight" in msg
    assert "1 unexpected keys:\n    single_blocks.0.linear2.bias" in msg
    assert "double_blocks.0.img_attn.proj.weight: checkpoint (32, 30), model (32, 32)" in msg


def test_missing_path(tmp_path):
    with pytest.raises(WeightsError, match="does not exist; expected"):
        load_transformer(tmp_path / "flux2-dev.safetensors")


def test_folder_of_neither_layout(tmp_path):
    (tmp_path / "notes.txt").write_text("not weights")
    with pytest.raises(WeightsError, match="neither a diffusers transformer folder"):
        load_transformer(tmp_path)


def test_other_diffusers_class(tmp_path):
    diffusers_transformer(**GUIDED).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, _class_name="FluxTransformer2DModel")))
    with pytest.raises(WeightsError, match="describes a FluxTransformer2DModel, not a FLUX.2 transformer"):
        load_transformer(tmp_path)


def test_text_encoder_folder_is_named_as_such(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}))
    save_file({"model.embed_tokens.weight": torch.zeros(4, 2)}, tmp_path / "model.safetensors")
    with pytest.raises(WeightsError, match="describes a Qwen3ForCausalLM, not a FLUX.2 transformer"):
        load_transformer(tmp_path)


def test_not_a_transformer(tmp_path):
    save_file({"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3)}, tmp_path / "ae.safetensors")
    with pytest.raises(WeightsError, match="does not look like a FLUX.2 transformer"):
        load_transformer(tmp_path / "ae.safetensors")


def test_truncated_file_is_named(tmp_path):
    save_file(_bfl_state(diffusers_transformer(**GUIDED)), tmp_path / "flux2.safetensors")
    data = (tmp_path / "flux2.safetensors").read_bytes()
    (tmp_path / "flux2.safetensors").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(WeightsError, match=r"flux2\.safetensors is not a readable safetensors file"):
        load_transformer(tmp_path / "flux2.safetensors")


def test_checkpoint_tensors_stay_lazy_until_loaded(tmp_path):
    save_file(_bfl_state(diffusers_transformer(**GUIDED)), tmp_path / "flux2.safetensors")
    ckpt = open_checkpoint(tmp_path / "flux2.safetensors")
    assert ckpt.shape("model.diffusion_model.img_in.weight") == (32, 8)
