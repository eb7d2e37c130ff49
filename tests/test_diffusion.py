import math

import pytest
import torch

from trainer.diffusion import (NoiseSchedule, per_sample_loss, sample_timesteps, scaled_linear_alphas_cumprod,
                               weighted_loss)


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


def test_zero_terminal_snr_schedule_is_the_published_rescale():
    """Lin et al. 2023, as diffusers implements it (a separate implementation): every step's alpha_bar, and a
    last step a hair above 0 so that 1/SNR stays finite."""
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    ref = torch.cumprod(1.0 - rescale_zero_terminal_snr(betas), dim=0)
    ab = NoiseSchedule.create(zero_terminal_snr=True).alphas_cumprod
    torch.testing.assert_close(ab[:-1], ref[:-1], rtol=1e-9, atol=1e-12)
    assert 0 < ab[-1].item() <= 1e-10
    snr = NoiseSchedule.create(zero_terminal_snr=True).snr(torch.tensor([999]))
    assert 0 < snr.item() < 1e-9 and math.isfinite(1 / snr.item())
    assert NoiseSchedule.create().alphas_cumprod[-1].item() == pytest.approx(0.00466, rel=1e-2)  # off: no rescale


def test_noisy_latents_are_the_ddpm_forward_process():
    """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps per batch item, as diffusers' DDPMScheduler.add_noise."""
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    x0, eps = torch.randn(3, 4, 5, 6), torch.randn(3, 4, 5, 6)
    t = torch.tensor([0, 450, 999])
    for v in (False, True):
        got = NoiseSchedule.create(v_prediction=v).add_noise(x0, eps, t)
        torch.testing.assert_close(got, ref.add_noise(x0, eps, t), rtol=1e-5, atol=1e-6)
    assert NoiseSchedule.create().target(x0, eps, t) is eps  # epsilon models predict the noise


def test_weighted_loss_applies_min_snr_only_when_gamma_is_set():
    s = NoiseSchedule.create()
    pred, target = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([5, 300, 900])
    per_item = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    assert weighted_loss(pred, target, t, s, "MSE", 0.0).item() == pytest.approx(per_item.mean().item(), rel=1e-6)
    for gamma in (1.0, 5.0):
        snr = s.snr(t)
        want = (per_item * torch.minimum(snr, torch.tensor(gamma)) / snr).mean()
        assert weighted_loss(pred, target, t, s, "MSE", gamma).item() == pytest.approx(want.item(), rel=1e-6)


@pytest.mark.parametrize("kind,fn", [("MSE", torch.nn.functional.mse_loss), ("L1", torch.nn.functional.l1_loss),
                                     ("Smooth-L1", torch.nn.functional.smooth_l1_loss)])
def test_loss_functions_are_the_named_ones(kind, fn):
    pred, target = torch.randn(2, 4, 3, 3) * 2, torch.randn(2, 4, 3, 3)
    got = per_sample_loss(pred.half(), target.half(), kind)
    assert got.dtype == torch.float32 and got.shape == (2,)
    want = torch.stack([fn(pred[i].half().float(), target[i].half().float()) for i in range(2)])
    torch.testing.assert_close(got, want)


def test_masked_loss_is_the_mean_over_the_kept_pixels():
    pred, target = torch.zeros(2, 1, 2, 2), torch.arange(8.0).view(2, 1, 2, 2)
    mask = torch.zeros(2, 1, 2, 2)
    mask[0, 0, 1, 1] = 1  # one pixel kept in the first item
    mask[1, 0, 0] = 1  # the top row in the second
    torch.testing.assert_close(per_sample_loss(pred, target, "MSE", mask), torch.tensor([9.0, (16 + 25) / 2]))
    assert per_sample_loss(pred, target, "L1", torch.zeros(2, 1, 2, 2)).tolist() == [0.0, 0.0]  # nothing kept: 0


def test_timesteps_follow_the_seed_and_go_to_the_device():
    a = sample_timesteps(6, 0, 1000, False, torch.Generator().manual_seed(3), device="cpu")
    b = sample_timesteps(6, 0, 1000, False, torch.Generator().manual_seed(3), device="meta")
    c = sample_timesteps(6, 0, 1000, True, torch.Generator().manual_seed(3), device="meta")
    assert a.tolist() == sample_timesteps(6, 0, 1000, False, torch.Generator().manual_seed(3)).tolist()
    assert b.device.type == "meta" and c.device.type == "meta" and c.shape == (6,)
    assert len(set(a.tolist())) > 1
    assert NoiseSchedule.create(device="meta").alphas_cumprod.device.type == "meta"


def test_weighted_loss_keeps_the_mask_and_mse_is_the_default():
    s = NoiseSchedule.create()
    pred, target = torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)
    target[..., 0, 0] = 10.0  # only the masked-out pixel differs
    mask = torch.ones(1, 1, 2, 2)
    mask[..., 0, 0] = 0
    t = torch.tensor([500])
    assert weighted_loss(pred, target, t, s, "MSE", 5.0, mask).item() == 0.0
    assert weighted_loss(pred, target, t, s, "MSE", 0.0).item() == pytest.approx(100 / 4)
    assert per_sample_loss(pred, target).item() == pytest.approx(100 / 4)  # MSE unless told otherwise
