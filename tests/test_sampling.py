import numpy as np
import pytest
import torch

from featherflux.sampling import (
    compute_empirical_mu,
    euler_step,
    get_schedule,
    image_ids,
    initial_noise,
    pack,
    reference_ids,
    text_ids,
    unpack,
)


@pytest.mark.parametrize(
    "seq_len, steps, mu",
    [
        (4096, 50, 2.023351),
        (4096, 28, 2.151443),
        (4096, 4, 2.291180),
        (1024, 4, 2.030690),
        (1024, 50, 1.701956),
        (2304, 50, 1.835871),
        (16384, 50, 3.229986),
    ],
)
def test_empirical_mu_matches_worked_values(seq_len, steps, mu):
    assert compute_empirical_mu(seq_len, steps) == pytest.approx(mu, abs=1e-6)


def test_schedule_matches_worked_values_for_1024px_50_steps():
    sigmas = get_schedule(50, 4096)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (51,)
    assert (sigmas[:3] * 1000).tolist() == pytest.approx([1000.0, 997.309, 994.521], abs=1e-3)
    assert sigmas[-2].item() == pytest.approx(0.133719, abs=1e-6)
    assert sigmas[-1].item() == 0.0
    assert bool((sigmas[1:] < sigmas[:-1]).all())


@pytest.mark.parametrize("steps, seq_len", [(4, 24), (28, 4096), (50, 16384), (1, 1024)])
def test_schedule_equals_diffusers_scheduler_bitwise(steps, seq_len):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0)
    scheduler.set_timesteps(
        steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=compute_empirical_mu(seq_len, steps)
    )
    assert torch.equal(get_schedule(steps, seq_len), scheduler.sigmas)


def test_custom_sigmas_equal_diffusers_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    custom = [1.0, 0.7, 0.45, 0.2]
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0)
    scheduler.set_timesteps(sigmas=custom, mu=compute_empirical_mu(1024, 50))
    assert torch.equal(get_schedule(50, 1024, custom), scheduler.sigmas)  # mu from the requested step count


def test_euler_step_is_fp32_and_returns_velocity_dtype():
    x = torch.randn(2, 5, 8).bfloat16()
    v = torch.randn(2, 5, 8).bfloat16()
    sigmas = get_schedule(4, 40)
    out = euler_step(x, v, sigmas[0], sigmas[1])
    assert out.dtype == torch.bfloat16
    expected = (x.float() + (sigmas[1] - sigmas[0]) * v).bfloat16()
    assert torch.equal(out, expected)
    # a linear field is integrated exactly: x0 = x1 - v over the whole schedule
    x1, v32 = torch.randn(3, 4), torch.randn(3, 4)
    x = x1
    for i in range(4):
        x = euler_step(x, v32, sigmas[i], sigmas[i + 1])
    torch.testing.assert_close(x, x1 - v32)


def test_position_ids():
    ids = image_ids(2, 3)
    assert ids.tolist() == [[0, r, c, 0] for r in range(2) for c in range(3)]
    assert text_ids(3).tolist() == [[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 2]]
    refs = reference_ids([(1, 2), (2, 1)])
    assert refs.tolist() == [[10, 0, 0, 0], [10, 0, 1, 0], [20, 0, 0, 0], [20, 1, 0, 0]]
    assert torch.equal(torch.cartesian_prod(torch.arange(1), torch.arange(4), torch.arange(5), torch.arange(1)),
                       image_ids(4, 5))


def test_pack_roundtrip_and_row_major_order():
    x = torch.randn(2, 8, 3, 5)
    tokens = pack(x)
    assert tokens.shape == (2, 15, 8)
    assert torch.equal(tokens[:, 5 + 2], x[:, :, 1, 2])
    assert torch.equal(unpack(tokens, 3, 5), x)


def test_initial_noise_matches_diffusers_randn_tensor():
    from diffusers.utils.torch_utils import randn_tensor

    shape = (2, 8, 4, 6)
    ours = initial_noise(shape, torch.Generator().manual_seed(7), torch.float32)
    theirs = randn_tensor(shape, generator=torch.Generator().manual_seed(7), dtype=torch.float32)
    assert torch.equal(ours, theirs)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    ours = initial_noise(shape, gens, torch.bfloat16)
    theirs = randn_tensor(shape, generator=[torch.Generator().manual_seed(s) for s in (1, 2)], dtype=torch.bfloat16)
    assert torch.equal(ours, theirs)
    with pytest.raises(ValueError, match="one per image"):
        initial_noise(shape, gens[:1], torch.float32)


def test_true_cfg_runs_both_passes_as_one_batch_and_equals_two_passes():
    from featherflux.model.build import build_transformer
    from featherflux.model.config import DiTConfig
    from featherflux.sampling import denoise, euler_step, get_schedule, image_ids, text_ids

    dit = build_transformer(DiTConfig(in_channels=8, context_in_dim=12, hidden_size=32, num_heads=2, depth=1,
                                      depth_single_blocks=2, axes_dim=(4,) * 4))
    calls = []
    counting = torch.nn.Module()
    counting.register_module("dit", dit)
    counting.forward = lambda *args: calls.append(args[0].shape[0]) or dit(*args)
    latents, ctx, negative = torch.randn(1, 6, 8), torch.randn(1, 5, 12), torch.randn(1, 5, 12)
    sigmas = get_schedule(3, 6)
    x_ids, ctx_ids = image_ids(2, 3), text_ids(5)
    out = denoise(counting, latents, sigmas, x_ids=x_ids, ctx=ctx, ctx_ids=ctx_ids, negative_ctx=negative,
                  cfg_scale=4.0)
    assert calls == [2, 2, 2]  # one DiT call of batch 2 per step
    expected = latents
    for i in range(3):
        t = sigmas[i].expand(1)
        v = dit(expected, x_ids[None], t, ctx, ctx_ids[None])
        v_neg = dit(expected, x_ids[None], t, negative, ctx_ids[None])
        expected = euler_step(expected, v_neg + 4.0 * (v - v_neg), sigmas[i], sigmas[i + 1])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
