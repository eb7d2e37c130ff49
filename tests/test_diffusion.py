import math

import pytest
import torch

from trainer.diffusion import NoiseSchedule, per_sample_loss, sample_timesteps, scaled_linear_alphas_cumprod


def test_schedule_matches_stable_diffusion_values():
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    ab = scaled_linear_alphas_cumprod()
    assert ab[0].item() == pytest.approx(1 - 0.00085, rel=1e-9)
    assert torch.allclose(ab.float(), ref, rtol=1e-5)


def test_zero_terminal_snr_ends_in_pure_noise_and_keeps_the_start():
    ab = scaled_linear_alphas_cumprod(zero_terminal_snr=True)
    assert ab[-1].item() < 1e-9
    assert ab[0].item() == pytest.approx(1 - 0.00085, rel=1e-9)
    assert torch.all(ab[1:] <= ab[:-1])


def test_v_target_is_velocity():
    s = NoiseSchedule.create(v_prediction=True)
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    a = s.alphas_cumprod[t].sqrt().float().view(-1, 1, 1, 1)
    b = (1 - s.alphas_cumprod[t]).sqrt().float().view(-1, 1, 1, 1)
    assert torch.allclose(s.target(x0, eps, t), a * eps - b * x0, atol=1e-6)
    # v-pred model output recovers x0 = a*x_t - b*v
    xt = s.add_noise(x0, eps, t)
    assert torch.allclose(a * xt - b * s.target(x0, eps, t), x0, atol=1e-5)


def test_min_snr_weight_forms():
    eps = NoiseSchedule.create()
    v = NoiseSchedule.create(v_prediction=True)
    t = torch.tensor([0, 500, 999])
    snr = eps.snr(t)
    assert torch.allclose(eps.min_snr_weight(t, 5.0), torch.minimum(snr, torch.tensor(5.0)) / snr)
    assert torch.allclose(v.min_snr_weight(t, 5.0), torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))
    # low noise (high SNR) is down-weighted, high noise keeps weight 1 for epsilon
    w = eps.min_snr_weight(t, 5.0)
    assert w[0] < 0.01 and w[2].item() == pytest.approx(1.0)


def test_masked_loss_ignores_masked_pixels():
    pred, target = torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)
    target[..., 0, 0] = 10.0
    mask = torch.ones(1, 1, 2, 2)
    mask[..., 0, 0] = 0
    assert per_sample_loss(pred, target, "MSE", mask).item() == 0.0
    assert per_sample_loss(pred, target, "L1").item() == pytest.approx(10.0 / 4)


def test_timesteps_in_range_and_fixed_per_batch():
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(1000, 200, 400, False, g)
    assert t.min() >= 200 and t.max() <= 399 and len(set(t.tolist())) > 100
    t = sample_timesteps(4, 0, 1000, True, g)
    assert len(set(t.tolist())) == 1 and t.shape == (4,)
