"""The trainer: lowers the loss, resumes exactly, writes LoRAs that diffusers loads with identical outputs."""

import csv

import pytest
import torch
from dit_fixtures import GUIDED, diffusers_transformer, inputs, ours_from, run_diffusers
from safetensors.torch import load_file

from featherflux.errors import UserError
from featherflux.lora import load_lora
from featherflux.lora.train import CachedDataset, TrainConfig, train


def tiny_data(n=6, seed=0):
    """Two latent sizes (buckets) of a learnable toy distribution, and per-sample prompt embeddings."""
    g = torch.Generator().manual_seed(seed)
    latents = [torch.randn(8, 2, 3, generator=g) * 0.3 + 1.0 for _ in range(n // 2)]
    latents += [torch.randn(8, 3, 2, generator=g) * 0.3 - 1.0 for _ in range(n - n // 2)]
    embeds = [torch.randn(5, 24, generator=g) for _ in range(n)]
    return CachedDataset(latents, embeds, torch.zeros(5, 24), [f"s{i}" for i in range(n)])


def fresh_model():
    return ours_from(diffusers_transformer(**GUIDED)).requires_grad_(False)


def test_lora_training_lowers_loss_and_diffusers_loads_it(tmp_path):
    config = TrainConfig(
        steps=40, learning_rate=3e-3, batch_size=2, rank=4, alpha=8, caption_dropout=0.2, base_model="tiny"
    )
    model = fresh_model()
    result = train(model, tiny_data(), config, tmp_path)
    first, last = sum(result.losses[:8]) / 8, sum(result.losses[-8:]) / 8
    assert last < 0.8 * first, (first, last)
    rows = list(csv.DictReader((tmp_path / "log.csv").open()))
    assert len(rows) == 40 and rows[-1]["step"] == "40"

    from diffusers import Flux2Pipeline

    reference = diffusers_transformer(**GUIDED)
    kw = inputs(reference)
    sd, meta = Flux2Pipeline.lora_state_dict(str(tmp_path / "diffusers"), return_lora_metadata=True)
    assert meta["transformer.r"] == 4 and meta["transformer.lora_alpha"] == 8
    Flux2Pipeline.load_lora_into_transformer(sd, transformer=reference, metadata=meta)
    with torch.no_grad():
        ours = model(**kw)
        torch.testing.assert_close(run_diffusers(reference, **kw), ours, atol=1e-4, rtol=1e-4)
        # the BFL/ComfyUI file and the diffusers file load back here to the same model
        for path in (tmp_path / "lora.safetensors", tmp_path / "diffusers"):
            again = fresh_model()
            load_lora(again, path)
            torch.testing.assert_close(again(**kw), ours, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode,optimizer", [("lora", "adamw"), ("full", "adamw"), ("lora", "adamw8bit")])
def test_resume_equals_uninterrupted(tmp_path, mode, optimizer):
    config = TrainConfig(
        mode=mode,
        optimizer=optimizer,
        steps=6,
        lr_schedule="cosine",
        warmup_steps=2,
        learning_rate=1e-3,
        batch_size=2,
        rank=2,
        checkpoint_every=2,
        caption_dropout=0.3,
        gradient_checkpointing=True,
    )
    straight = train(fresh_model(), tiny_data(), config, tmp_path / "a")
    train(fresh_model(), tiny_data(), config, tmp_path / "b", stop_after=3)  # dies after step 3, checkpoint at 2
    resumed_model = fresh_model()
    resumed = train(resumed_model, tiny_data(), config, tmp_path / "b")
    assert resumed.losses == straight.losses[2:]
    for out_a, out_b in zip(straight.outputs, resumed.outputs):
        if out_a.suffix != ".safetensors":
            assert out_a.read_text() == out_b.read_text()
            continue
        ta, tb = load_file(out_a), load_file(out_b)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert [r["step"] for r in csv.DictReader((tmp_path / "b" / "log.csv").open())] == [str(i) for i in range(1, 7)]


def test_bad_training_settings(tmp_path):
    with pytest.raises(UserError, match="training mode"):
        TrainConfig(mode="half")
    with pytest.raises(UserError, match="no layer matches"):
        train(fresh_model(), tiny_data(), TrainConfig(steps=1, targets=("nothing",)), tmp_path)


def test_qlora_on_int8_base_trains_only_the_adapters(tmp_path):
    from featherflux.memory.quant import quantize

    model = quantize(fresh_model(), "int8")
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(model, tiny_data(), TrainConfig(steps=3, learning_rate=1e-2, rank=2, batch_size=2), tmp_path)
    assert len(result.losses) == 3
    after = {k.replace(".base.", "."): v for k, v in model.state_dict().items()}  # LoRALinear wraps the layer
    changed = [k for k in after if k not in frozen]
    assert changed and all(".adapters." in k for k in changed)
    assert all(torch.equal(frozen[k], after[k]) for k in frozen if k in after)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in after.items() if k.endswith(".up"))


def test_qlora_nf4_base_with_8bit_adamw(tmp_path):
    from featherflux.memory.quant import NF4Linear, nf4_available, quantize
    from featherflux.model.config import DiTConfig
    from featherflux.model.dit import Flux2

    if not nf4_available():
        pytest.skip("bitsandbytes NF4 is not available here")
    config = DiTConfig(
        in_channels=64, context_in_dim=64, hidden_size=64, num_heads=2, depth=1, depth_single_blocks=1,
        axes_dim=(8, 8, 8, 8),
    )  # NF4 needs inputs in blocks of 64
    model = quantize(Flux2(config).requires_grad_(False), "nf4")
    assert any(isinstance(m, NF4Linear) for m in model.modules())
    data = CachedDataset([torch.randn(64, 2, 2) for _ in range(2)], [torch.randn(4, 64) for _ in range(2)],
                         torch.zeros(4, 64))
    result = train(model, data, TrainConfig(steps=2, rank=2, optimizer="adamw8bit"), tmp_path)
    assert len(result.losses) == 2 and (tmp_path / "lora.safetensors").is_file()
