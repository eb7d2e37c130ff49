"""The noise schedule and the per-sample loss shared by every mode.

SD1, SD2 and SDXL were all trained with the same DDPM schedule (scaled-linear betas from
0.00085 to 0.012 over 1000 steps), so one schedule serves every family. Zero-terminal-SNR
rescales it so the last step is pure noise (for v-prediction models trained that way).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

NUM_TRAIN_TIMESTEPS = 1000


def scaled_linear_alphas_cumprod(zero_terminal_snr: bool = False) -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, NUM_TRAIN_TIMESTEPS, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    if zero_terminal_snr:
        alphas_cumprod = _rescale_zero_terminal_snr(alphas_cumprod)
    return alphas_cumprod


def _rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    # Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Alg. 1:
    # shift and scale sqrt(alpha_bar) so the last value is exactly 0 and the first is unchanged.
    sqrt_ab = alphas_cumprod.sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alphas_cumprod = sqrt_ab**2
    # alpha_bar = 0 at the last step makes SNR 0; keep it a hair above so 1/SNR stays finite.
    alphas_cumprod[-1] = max(float(alphas_cumprod[-1]), 1e-10)
    return alphas_cumprod


@dataclass
class NoiseSchedule:
    """DDPM forward process: q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I)."""

    alphas_cumprod: torch.Tensor  # float64, [1000], on the training device
    v_prediction: bool = False

    @classmethod
    def create(cls, device: torch.device | str = "cpu", v_prediction: bool = False,
               zero_terminal_snr: bool = False) -> "NoiseSchedule":
        return cls(scaled_linear_alphas_cumprod(zero_terminal_snr).to(device), v_prediction)

    def _coefs(self, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ab = self.alphas_cumprod[timesteps]
        shape = (-1,) + (1,) * (like.dim() - 1)
        return ab.sqrt().to(like.dtype).view(shape), (1 - ab).sqrt().to(like.dtype).view(shape)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        a, s = self._coefs(timesteps, x0)
        return a * x0 + s * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the U-Net should predict: the noise, or v = sqrt(ab) eps - sqrt(1-ab) x0."""
        if not self.v_prediction:
            return noise
        a, s = self._coefs(timesteps, x0)
        return a * noise - s * x0

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        ab = self.alphas_cumprod[timesteps]
        return (ab / (1 - ab).clamp_min(1e-20)).float()

    def min_snr_weight(self, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
        """Min-SNR-gamma loss weight (Hang et al. 2023), in the form that fits the prediction type.

        For epsilon prediction the weight is min(SNR, gamma) / SNR; for v prediction the loss
        on v already carries a factor (SNR + 1), so it is min(SNR, gamma) / (SNR + 1). The
        original used the epsilon form for both.
        """
        snr = self.snr(timesteps)
        clipped = snr.clamp(max=gamma)
        return clipped / (snr + 1) if self.v_prediction else clipped / snr.clamp_min(1e-20)


LOSS_FUNCTIONS = {
    "MSE": lambda p, t: F.mse_loss(p, t, reduction="none"),
    "L1": lambda p, t: F.l1_loss(p, t, reduction="none"),
    "Smooth-L1": lambda p, t: F.smooth_l1_loss(p, t, reduction="none"),
}


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "MSE",
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """Loss per batch item, computed in fp32, averaged over channels and pixels (of the mask)."""
    loss = LOSS_FUNCTIONS[kind](pred.float(), target.float())
    if mask is None:
        return loss.mean(dim=tuple(range(1, loss.dim())))
    mask = mask.float().expand_as(loss)
    dims = tuple(range(1, loss.dim()))
    return (loss * mask).sum(dim=dims) / mask.sum(dim=dims).clamp_min(1.0)


def weighted_loss(pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor,
                  schedule: NoiseSchedule, kind: str, snr_gamma: float,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    loss = per_sample_loss(pred, target, kind, mask)
    if snr_gamma > 0:
        loss = loss * schedule.min_snr_weight(timesteps, snr_gamma)
    return loss.mean()


def sample_timesteps(batch: int, low: int, high: int, fixed_in_batch: bool,
                     generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """t ~ U{low, ..., high-1}; one t for the whole batch when fixed_in_batch."""
    n = 1 if fixed_in_batch else batch
    t = torch.randint(low, high, (n,), generator=generator)
    return t.expand(batch).clone().to(device) if fixed_in_batch else t.to(device)
