import numpy as np
import pytest
import torch

from featherflux.errors import WeightsError
from featherflux.loading import resolve_family
from featherflux.loading.dit import load_gguf_transformer
from featherflux.memory.gguf import SUPPORTED_FORMATS, GGUFLinear, dequantize, dequantizer
from featherflux.memory.planner import plan
from featherflux.model.config import FAMILIES, DiTConfig
from featherflux.model.dit import Flux2
from featherflux.weights.gguf import gguf_summary
from tests.memory.conftest import dit_inputs

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

# FLUX-shaped but tiny; widths are multiples of 32 for the legacy block formats.
GGUF_DIT = DiTConfig(
    in_channels=128,
    context_in_dim=96,
    hidden_size=128,
    num_heads=2,
    depth=1,
    depth_single_blocks=2,
    axes_dim=(16, 16, 16, 16),
    guidance_embed=False,
)


def _random_blocks(kind, n_blocks, rng):
    """Valid raw blocks of `kind`: random bytes with finite fp16 scales."""
    size, nbytes = gguf.GGML_QUANT_SIZES[kind]
    raw = rng.integers(0, 256, size=(n_blocks, nbytes), dtype=np.uint8)
    scale_offsets = {
        Q.Q2_K: (80, 82),
        Q.Q3_K: (108,),
        Q.Q4_K: (0, 2),
        Q.Q5_K: (0, 2),
        Q.Q6_K: (208,),
        Q.Q8_0: (0,),
        Q.Q4_0: (0,),
        Q.Q5_0: (0,),
        Q.Q4_1: (0, 2),
        Q.Q5_1: (0, 2),
    }[kind]
    for off in scale_offsets:
        raw[:, off : off + 2] = np.frombuffer(
            rng.uniform(0.001, 0.1, n_blocks).astype(np.float16).tobytes(), dtype=np.uint8
        ).reshape(n_blocks, 2)
    return raw, size


ISSUE_FORMATS = ["Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q4_0", "Q5_0", "Q3_K", "Q2_K"]


def test_every_listed_format_has_a_torch_kernel():
    assert set(ISSUE_FORMATS) <= set(SUPPORTED_FORMATS)


def _blocks(kind, rng):
    """2 rows of 4 blocks of `kind`: the gguf package's quantization of random values where it can quantize the
    format, else random raw blocks."""
    size, _ = gguf.GGML_QUANT_SIZES[kind]
    try:
        return gguf.quants.quantize(rng.standard_normal((2, 4 * size)).astype(np.float32), kind)
    except NotImplementedError:
        return _random_blocks(kind, 8, rng)[0].reshape(2, -1)


@pytest.mark.parametrize("kind", sorted(set(ISSUE_FORMATS) | set(SUPPORTED_FORMATS)))
@pytest.mark.parametrize("source", ["quantized", "random"])
def test_torch_dequantisers_match_the_gguf_package(kind, source):
    kind, rng = Q[kind], np.random.default_rng(0)
    raw = _blocks(kind, rng) if source == "quantized" else _random_blocks(kind, 8, rng)[0].reshape(2, -1)
    expected = gguf.quants.dequantize(raw, kind)
    assert expected.shape == (2, 4 * gguf.GGML_QUANT_SIZES[kind][0]) and np.isfinite(expected).all()
    ours = dequantize(torch.from_numpy(raw), int(kind), expected.shape, torch.float32)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())


def test_a_format_with_no_torch_kernel_is_refused():
    with pytest.raises(WeightsError, match=r"TQ1_0.*supported quantized formats: .*Q2_K"):
        dequantizer(int(Q.TQ1_0))


def _write_gguf(path, model, qtype, prefix="model.diffusion_model."):
    w = gguf.GGUFWriter(str(path), "flux")
    for name, t in model.state_dict().items():
        arr = t.float().numpy()
        if t.ndim == 2 and name.endswith(".weight") and qtype is not None:
            w.add_tensor(prefix + name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(prefix + name, arr.astype(np.float16) if t.ndim == 2 else arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("kind", ["Q8_0", "Q5_1", "Q4_0"])
@torch.no_grad()
def test_gguf_round_trip_matches_the_dequantised_reference(tmp_path, monkeypatch, kind):
    from featherflux.model import config

    family = FAMILIES["klein-4b"].__class__(
        name="gguf-tiny",
        dit=GGUF_DIT,
        autoencoder=FAMILIES["klein-4b"].autoencoder,
        text_encoder=FAMILIES["demo"].text_encoder.__class__(
            arch="qwen3",
            hidden_size=32,
            num_layers=3,
            intermediate_size=64,
            num_heads=2,
            num_kv_heads=1,
            head_dim=16,
            vocab_size=64,
            out_layers=(1, 2, 3),
        ),
        default_steps=4,
        default_guidance=1.0,
        guidance_distilled=True,
    )
    monkeypatch.setitem(config.FAMILIES, "gguf-tiny", family)
    torch.manual_seed(0)
    original = Flux2(GGUF_DIT).to(torch.bfloat16).eval()
    path = tmp_path / "flux-2-tiny-Q.gguf"
    _write_gguf(path, original, Q[kind])

    loaded = load_gguf_transformer(path)
    assert isinstance(loaded.double_blocks[0].img_attn.qkv, GGUFLinear)
    # reference: the same file dequantised by the gguf package into a plain bf16 model
    reference = Flux2(GGUF_DIT).to(torch.bfloat16).eval()
    state = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        state[t.name.removeprefix("model.diffusion_model.")] = torch.from_numpy(np.array(values)).to(torch.bfloat16)
    reference.load_state_dict({k: v.reshape(reference.state_dict()[k].shape) for k, v in state.items()})
    inputs = dit_inputs(GGUF_DIT)
    out = loaded(*inputs)
    assert torch.equal(out, reference(*inputs))
    err = (out.float() - original(*inputs).float()).norm() / original(*inputs).float().norm()
    assert err < {"Q8_0": 0.02, "Q5_1": 0.08, "Q4_0": 0.2}[kind]
    shapes, quant = gguf_summary(path)
    assert quant == kind.lower() and shapes["img_in.weight"] == (128, 128)
    family, file_quantization = resolve_family(path)
    assert plan(family, 8, 16, file_quantization=file_quantization).quantize == kind.lower()


def test_bad_gguf_is_a_weights_error(tmp_path):
    from featherflux.errors import WeightsError

    (tmp_path / "x.gguf").write_bytes(b"GGUF" + b"\0" * 10)
    with pytest.raises(WeightsError, match="x.gguf"):
        load_gguf_transformer(tmp_path / "x.gguf")


@pytest.mark.parametrize("kind", ["TQ1_0", "IQ4_NL"])
def test_gguf_with_an_unsupported_format_is_refused_before_loading(tmp_path, monkeypatch, kind):
    from featherflux.loading import dit

    torch.manual_seed(0)
    model = Flux2(GGUF_DIT)
    state = model.state_dict()
    path = tmp_path / f"flux-2-tiny-{kind}.gguf"
    w = gguf.GGUFWriter(str(path), "flux")
    for name, t in state.items():
        arr = t.float().numpy()
        if name == "img_in.weight":  # raw blocks of the unsupported format (any bytes: never dequantised)
            size, nbytes = gguf.GGML_QUANT_SIZES[Q[kind]]
            raw = np.zeros((arr.shape[0], arr.shape[1] // size * nbytes), dtype=np.uint8)
            w.add_tensor("model.diffusion_model." + name, raw, raw_dtype=Q[kind])
        elif t.ndim == 2 and name.endswith(".weight"):
            w.add_tensor("model.diffusion_model." + name, gguf.quants.quantize(arr, Q.Q8_0), raw_dtype=Q.Q8_0)
        else:
            w.add_tensor("model.diffusion_model." + name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    def no_read(*args, **kwargs):
        raise AssertionError("tensor data read before the format check")

    monkeypatch.setattr(dit, "read_gguf", no_read)
    with pytest.raises(WeightsError) as caught:
        load_gguf_transformer(path)
    message = str(caught.value)
    assert "img_in.weight" in message and kind in message and path.name in message
    assert all(f in message for f in SUPPORTED_FORMATS)
