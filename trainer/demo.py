"""`python -m trainer demo`: a complete LoRA run on the tiny built-in model, offline, in minutes on a CPU.

It draws a small image set (a concept named by a trigger word), trains a LoRA on it, saves the
file, the CSV log and a loss plot, and measures what the LoRA learned: the model's denoising
error on those images for the trigger prompt, with the LoRA off and on.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

TRIGGER = "ttdemo"


def draw_demo_images(folder: Path, count: int = 8, size: int = 64, seed: int = 0) -> Path:
    """Orange rings on a teal background, captioned with the trigger word."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        img = Image.new("RGB", (size, size), (20, 120, 130))
        d = ImageDraw.Draw(img)
        r = int(rng.integers(size // 6, size // 3))
        cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=(250, 150, 30), width=max(2, r // 3))
        img.save(folder / f"ring_{i:02d}.png")
        (folder / f"ring_{i:02d}.txt").write_text("orange ring", encoding="utf-8")
    return folder


def image_latents(components, folder: Path) -> torch.Tensor:
    """The VAE means of every PNG in folder (all the same size)."""
    pixels = [torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
              for p in sorted(folder.glob("*.png"))]
    with torch.no_grad():
        return components.vae.encode(torch.stack(pixels)).latent_dist.mean * components.scaling_factor


def denoising_loss(components, network, latents: torch.Tensor, prompt: str, multiplier: float,
                   seed: int = 1234, repeats: int = 4) -> float:
    """Mean noise-prediction error on `latents` for `prompt`, with the network at `multiplier`.

    The same noise and timesteps for every call, so two multipliers compare like for like."""
    from .diffusion import NoiseSchedule
    from .models.prompts import encode_prompts

    g = torch.Generator().manual_seed(seed)
    x0 = latents.repeat(repeats, 1, 1, 1)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.linspace(50, 950, x0.shape[0]).long()
    schedule = NoiseSchedule.create()
    with torch.no_grad(), network.multiplier(multiplier):
        hidden = encode_prompts(components, [prompt] * x0.shape[0]).hidden
        pred = components.unet(schedule.add_noise(x0, noise, t), t, encoder_hidden_states=hidden).sample
    return float(torch.nn.functional.mse_loss(pred.float(), noise))


def loss_change(before: float, after: float) -> str:
    """'27% lower' when the LoRA lowered the loss, '5% higher' when it raised it, 'unchanged' otherwise."""
    if after == before:
        return "unchanged"
    word = "lower" if after < before else "higher"
    return f"{abs(before - after) / before:.0%} {word}" if before else word


def before_after(components, network, prompt: str, path: Path) -> Path:
    """Images of the trigger prompt without the LoRA and with it (two seeds), as one labelled PNG."""
    from .samples import GridSpec, strength_grid

    spec = GridSpec(prompts=[prompt], multipliers=[0.0, 1.0], seeds=[0, 1], steps=20, cfg_scale=5.0, size=(64, 64))
    return strength_grid(components, network, spec, path, title="demo LoRA: before (0) and after (1) training")


def demo_config(data: Path, steps: int | None):
    from .config import Config

    return Config.load_preset(Path(__file__).resolve().parent.parent / "presets" / "LoRA.json").with_overrides({
        "lora_data_directory": str(data), "lora_trigger_word": TRIGGER, "save_lora_name": "demo",
        "image_size": "64", "image_min_length": 64, "image_buckets_step": 64,
        "network_rank": 8, "network_alpha": 8, "train_learning_rate": 1e-3, "train_batch_size": 4,
        "train_iterations": steps or 300, "train_seed": 0, "train_model_precision": "fp32",
        "logging_save_csv": True, "save_overwrite": True, "save_precision": "fp32",
    })


def run_demo(workdir: Path, steps: int | None = None) -> int:
    from .__main__ import ProgressPrinter
    from .engine import OutputPaths, TrainingRun
    from .models.tiny import tiny_components
    from .modes import mode_for
    from .networks.files import load_network_file
    from .networks.network import Network
    from .plot import plot_log

    workdir = Path(workdir)
    data = draw_demo_images(workdir / "images")
    cfg = demo_config(data, steps)
    components = tiny_components()
    paths = OutputPaths.under(workdir)
    t0 = time.time()
    run = TrainingRun(cfg, components, paths, on_progress=ProgressPrinter(), log=lambda m: print(m, file=sys.stderr),
                      device=torch.device("cpu"))
    result = run.run(mode_for(cfg.mode))
    if not result.ok:
        print(f"error: {result.message}", file=sys.stderr)
        return 1
    png = plot_log(result.csv, result.csv.with_suffix(".png")) and result.csv.with_suffix(".png")
    tensors, _ = load_network_file(result.files[-1])
    net = Network.create(components.unet, components.text_encoders, algo=cfg.network_type, rank=cfg.network_rank,
                         alpha=cfg.network_alpha, conv_rank=cfg.network_rank, conv_alpha=cfg.network_alpha,
                         blocks=cfg.network_blocks, element=cfg.network_element, unet_key_style="diffusers",
                         train_text_encoder="BASE" in cfg.network_blocks, dtype=torch.float32)
    net.load_kohya(tensors)
    latents = image_latents(components, data)
    prompt = f"{TRIGGER}, orange ring"
    with net.apply():
        before = denoising_loss(components, net, latents, prompt, 0.0)
        after = denoising_loss(components, net, latents, prompt, 1.0)
    grid = before_after(components, net, prompt, workdir / "samples" / "demo" / "before_after.png")
    print(f"LoRA file:  {result.files[-1]}")
    print(f"Log (CSV):  {result.csv}")
    print(f"Loss plot:  {png}")
    print(f"Denoising loss on the training images for '{prompt}': {before:.4f} without the LoRA, "
          f"{after:.4f} with it ({loss_change(before, after)})")
    print(f"Before/after: {grid}")
    print(f"Done in {time.time() - t0:.0f} s")
    return 0
