"""A small deterministic text-to-image sampler for any loaded model (sample previews, tests).

``generate(components, prompts, ...)`` runs classifier-free-guided sampling on the DDPM
scaled-linear schedule of :mod:`trainer.diffusion` and decodes with the model's VAE:

- ``scheduler="ddim"``: DDIM with eta 0 (deterministic) on integer timesteps with "trailing"
  spacing (the first step is t = 999, so sampling starts from pure noise where the model was
  trained on it; Lin et al. 2023). The last step goes to alpha_bar = 1, i.e. returns the
  model's clean estimate.
- ``scheduler="euler"``: the Euler method of Karras et al. (k-diffusion / diffusers'
  ``EulerDiscreteScheduler``) on sigma = sqrt((1 - ab) / ab), at timesteps evenly spaced
  over [999, 0] ("linspace"), sigma interpolated between the integer steps, last sigma 0.

Both support epsilon and v prediction (``components.info.v_pred``). The initial noise of
image i comes from a CPU generator seeded with ``seed + i``, so an image does not depend on
the batch it was drawn in, nor on the device. Everything runs under ``torch.no_grad``.
"""
from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch

from .atomic import atomic_write
from .diffusion import NUM_TRAIN_TIMESTEPS, NoiseSchedule
from .models.families import Family

SCHEDULERS = ("ddim", "euler")

Prompts = Union[str, Sequence[str]]


# ---------------------------------------------------------------- schedules


def ddim_timesteps(steps: int) -> list[int]:
    """Integer timesteps, "trailing" spacing: 20 steps -> 999, 949, ..., 49."""
    if not 1 <= steps <= NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"steps must be in 1..{NUM_TRAIN_TIMESTEPS}, got {steps}")
    ratio = NUM_TRAIN_TIMESTEPS / steps
    ts = torch.arange(NUM_TRAIN_TIMESTEPS, 0, -ratio, dtype=torch.float64).round().long() - 1
    return [int(t) for t in ts]


def euler_sigmas(alphas_cumprod: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps [steps] float64, sigmas [steps + 1] float64 ending in 0), "linspace" spacing."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    ab = alphas_cumprod.double().cpu()
    all_sigmas = ((1 - ab) / ab).sqrt()
    ts = torch.linspace(0, NUM_TRAIN_TIMESTEPS - 1, steps, dtype=torch.float64).flip(0)
    lo = ts.floor().long()
    hi = (lo + 1).clamp(max=NUM_TRAIN_TIMESTEPS - 1)
    w = ts - lo.double()
    sigmas = all_sigmas[lo] * (1 - w) + all_sigmas[hi] * w
    return ts, torch.cat([sigmas, sigmas.new_zeros(1)])


def _x0_eps(model_output: torch.Tensor, x: torch.Tensor, ab: float, v_prediction: bool):
    """(predicted x0, predicted eps) from the model output at a point with alpha_bar ``ab``."""
    a, s = ab ** 0.5, (1 - ab) ** 0.5
    if v_prediction:
        return a * x - s * model_output, a * model_output + s * x
    return (x - s * model_output) / a, model_output


def ddim_step(model_output: torch.Tensor, x: torch.Tensor, ab_t: float, ab_prev: float,
              v_prediction: bool = False) -> torch.Tensor:
    """One deterministic DDIM step (eta 0): x_t at alpha_bar ``ab_t`` -> x at ``ab_prev``."""
    x0, eps = _x0_eps(model_output, x, ab_t, v_prediction)
    return ab_prev ** 0.5 * x0 + (1 - ab_prev) ** 0.5 * eps


def euler_step(model_output: torch.Tensor, x: torch.Tensor, sigma: float, sigma_next: float,
               v_prediction: bool = False) -> torch.Tensor:
    """One Euler step in the sigma parametrisation (x = x0 + sigma * eps; the U-Net sees
    x / sqrt(sigma^2 + 1))."""
    if v_prediction:
        denoised = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
    else:
        denoised = x - sigma * model_output
    derivative = (x - denoised) / sigma
    return x + derivative * (sigma_next - sigma)


# ---------------------------------------------------------------- networks


def _apply_networks(stack: ExitStack, networks) -> None:
    """Apply each network (a Network, or (Network, multiplier)) in order; undo on exit in
    reverse order. A network already applied stays as it is (only its multiplier is set)."""
    if networks is None:
        return
    if not isinstance(networks, (list, tuple)) or (
        isinstance(networks, tuple) and len(networks) == 2 and isinstance(networks[1], (int, float))
    ):
        networks = [networks]
    for entry in networks:
        net, mult = (entry if isinstance(entry, tuple) else (entry, None))
        if not net.applied:
            net.apply()
            stack.callback(net.remove)
        if mult is not None:
            stack.enter_context(net.multiplier(float(mult)))


# ---------------------------------------------------------------- generate


def _as_list(prompts: Prompts, n: Optional[int] = None, what: str = "prompts") -> list[str]:
    out = [prompts] if isinstance(prompts, str) else list(prompts)
    if n is not None and len(out) == 1 and n > 1:
        out = out * n
    if not out or (n is not None and len(out) != n):
        raise ValueError(f"{what}: expected 1 or {n} strings, got {len(out)}")
    return out


def vae_scale_factor(components) -> int:
    cfg = getattr(components.vae, "config", None)
    blocks = getattr(cfg, "block_out_channels", None) or (components.configs.vae["block_out_channels"]
                                                          if components.configs else [0] * 4)
    return 2 ** (len(blocks) - 1)


def initial_noise(batch: int, shape: tuple, seed: int) -> torch.Tensor:
    """[batch, *shape] standard normal noise, image i from a CPU generator seeded ``seed + i``."""
    out = []
    for i in range(batch):
        g = torch.Generator(device="cpu").manual_seed(int(seed) + i)
        out.append(torch.randn(shape, generator=g, dtype=torch.float32))
    return torch.stack(out)


def _encode(components, prompts: list[str], negatives: list[str], clip_skip: int):
    from .models.prompts import encode_prompts
    from .modes.base import pad_chunks

    pos = encode_prompts(components, prompts, clip_skip)
    neg = encode_prompts(components, negatives, clip_skip) if negatives else None
    if neg is not None and neg.hidden.shape[1] != pos.hidden.shape[1]:
        empty = encode_prompts(components, [""], clip_skip).hidden
        hidden = pad_chunks(list(neg.hidden.split(1)) + list(pos.hidden.split(1)), empty)
        neg_h, pos_h = hidden[: len(negatives)], hidden[len(negatives):]
    else:
        neg_h, pos_h = (neg.hidden if neg is not None else None), pos.hidden
    return pos_h, pos.pooled, neg_h, (neg.pooled if neg is not None else None)


def _sdxl_added(pooled: torch.Tensor, height: int, width: int) -> dict:
    ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=pooled.dtype, device=pooled.device)
    return {"text_embeds": pooled, "time_ids": ids.expand(pooled.shape[0], -1)}


@torch.no_grad()
def generate(
    components,
    prompts: Prompts,
    *,
    negative_prompt: Prompts = "",
    steps: int = 20,
    guidance: float = 5.0,
    seed: int = 0,
    height: Optional[int] = None,
    width: Optional[int] = None,
    scheduler: str = "ddim",
    networks=None,
    clip_skip: int = 1,
    zero_terminal_snr: bool = False,
    added_cond_kwargs: Optional[Mapping[str, torch.Tensor]] = None,
    decode: bool = True,
    seeds: Optional[Sequence[int]] = None,
    v_prediction: Optional[bool] = None,
) -> torch.Tensor:
    """Images [B, 3, H, W] float32 on the CPU in [0, 1] (or latents when ``decode=False``).

    ``prompts``: one string or a list (one image each). ``negative_prompt``: the prompt of the
    unconditional branch of classifier-free guidance (one string or one per prompt); with
    ``guidance == 1`` only the conditional branch runs. ``height``/``width`` default to the
    U-Net's native size and must be multiples of the VAE's downsampling factor. ``networks``:
    a Network, or a list of Networks or ``(Network, multiplier)`` pairs, applied for the call
    (in order) and removed after; networks already applied are left applied. SDXL's
    ``added_cond_kwargs`` (pooled text embeddings + size ids) are built from the prompts unless
    given (tensors with one row per prompt; the unconditional branch reuses them). ``seeds``: one
    seed per prompt instead of ``seed + i`` (the same seed for several prompts compares them on the
    same noise). ``v_prediction`` overrides what the model's info says (a setting can force it).
    """
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
    prompts = _as_list(prompts)
    B = len(prompts)
    do_cfg = float(guidance) != 1.0
    negatives = _as_list(negative_prompt, B, "negative_prompt") if do_cfg else []
    f = vae_scale_factor(components)
    native = int(getattr(components.unet.config, "sample_size", 64)) * f
    height, width = int(height or native), int(width or native)
    if height % f or width % f:
        raise ValueError(f"height and width must be multiples of {f}, got {height}x{width}")

    unet = components.unet
    param = next(unet.parameters())
    device, dtype = param.device, param.dtype
    v_pred = bool(components.info.v_pred if v_prediction is None else v_prediction)
    schedule = NoiseSchedule.create("cpu", v_pred, zero_terminal_snr)
    ab = schedule.alphas_cumprod  # float64

    with ExitStack() as stack:
        _apply_networks(stack, networks)
        pos_h, pos_pooled, neg_h, neg_pooled = _encode(components, prompts, negatives, clip_skip)
        hidden = torch.cat([neg_h, pos_h]) if do_cfg else pos_h
        hidden = hidden.to(device=device, dtype=dtype)
        added = None
        sdxl = components.info.family is Family.SDXL
        if added_cond_kwargs is not None:
            added = {k: v.to(device) for k, v in added_cond_kwargs.items()}
        elif sdxl and pos_pooled is not None:
            added = _sdxl_added(pos_pooled, height, width)
            if do_cfg:
                neg_added = _sdxl_added(neg_pooled, height, width)
                added = {k: torch.cat([neg_added[k], added[k]]) for k in added}
        if added is not None:
            if do_cfg and added_cond_kwargs is not None:
                added = {k: torch.cat([v, v]) for k, v in added.items()}
            added = {k: v.to(device=device, dtype=dtype) for k, v in added.items()}

        t_dtype = torch.long if scheduler == "ddim" else torch.float32

        def model(x_in: torch.Tensor, t: float) -> torch.Tensor:
            inp = torch.cat([x_in, x_in]) if do_cfg else x_in
            tt = torch.full((inp.shape[0],), t, device=device, dtype=t_dtype)
            kw = {"added_cond_kwargs": added} if added is not None else {}
            out = unet(inp.to(device=device, dtype=dtype), tt, encoder_hidden_states=hidden, **kw).sample.float()
            if not do_cfg:
                return out
            uncond, cond = out.chunk(2)
            return uncond + float(guidance) * (cond - uncond)

        shape = (int(unet.config.in_channels), height // f, width // f)
        if seeds is not None:
            if len(seeds) != B:
                raise ValueError(f"seeds: expected {B} seeds (one per prompt), got {len(seeds)}")
            noise = torch.cat([initial_noise(1, shape, int(s)) for s in seeds]).to(device)
        else:
            noise = initial_noise(B, shape, seed).to(device)
        if scheduler == "ddim":
            ts = ddim_timesteps(steps)
            x = noise
            for i, t in enumerate(ts):
                ab_t = float(ab[t])
                ab_prev = float(ab[ts[i + 1]]) if i + 1 < len(ts) else 1.0
                x = ddim_step(model(x, t), x, ab_t, ab_prev, v_pred)
        else:
            ts, sigmas = euler_sigmas(ab, steps)
            x = noise * float(sigmas[0])
            for i, t in enumerate(ts.tolist()):
                sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
                out = model(x / (sigma**2 + 1) ** 0.5, t)
                x = euler_step(out, x, sigma, sigma_next, v_pred)

        if not decode:
            return x.float().cpu()
        vae = components.vae
        vparam = next(vae.parameters())
        latents = (x / components.scaling_factor).to(device=vparam.device, dtype=vparam.dtype)
        images = vae.decode(latents).sample.float()
    return ((images + 1) / 2).clamp(0, 1).cpu()


# ---------------------------------------------------------------- files


def to_pil(image: torch.Tensor):
    """One [3, H, W] image in [0, 1] -> PIL RGB."""
    from PIL import Image

    arr = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr, "RGB")


def make_grid(images: torch.Tensor, nrow: Optional[int] = None, pad: int = 2, scale: int = 1,
              labels: Optional[Sequence[str]] = None, background=(255, 255, 255)):
    """Tile [B, 3, H, W] images into one PIL image, ``nrow`` per row, optionally enlarged
    ``scale`` times (nearest neighbour) and with a label under each tile."""
    from PIL import Image, ImageDraw

    B, _, H, W = images.shape
    nrow = nrow or min(B, 8)
    rows = (B + nrow - 1) // nrow
    th, tw = H * scale, W * scale
    label_h = 12 if labels else 0
    grid = Image.new("RGB", (nrow * (tw + pad) + pad, rows * (th + label_h + pad) + pad), background)
    draw = ImageDraw.Draw(grid)
    for i in range(B):
        r, c = divmod(i, nrow)
        x0, y0 = pad + c * (tw + pad), pad + r * (th + label_h + pad)
        tile = to_pil(images[i])
        if scale != 1:
            tile = tile.resize((tw, th), Image.NEAREST)
        grid.paste(tile, (x0, y0))
        if labels:
            draw.text((x0 + 1, y0 + th), str(labels[i])[: max(1, tw // 6)], fill=(0, 0, 0))
    return grid


def _atomic_save(img, path: Path) -> Path:
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def save_images(images: torch.Tensor, folder: Union[str, Path], prefix: str = "sample") -> list[Path]:
    """Write each image as ``<folder>/<prefix>_<i>.png`` (atomically); returns the paths."""
    folder = Path(folder)
    return [_atomic_save(to_pil(img), folder / f"{prefix}_{i:03d}.png") for i, img in enumerate(images)]


def save_grid(images: torch.Tensor, path: Union[str, Path], nrow: Optional[int] = None, pad: int = 2,
              scale: int = 1, labels: Optional[Sequence[str]] = None) -> Path:
    """Write a grid of ``images`` (see :func:`make_grid`) as one PNG, atomically."""
    return _atomic_save(make_grid(images, nrow, pad, scale, labels), Path(path))
