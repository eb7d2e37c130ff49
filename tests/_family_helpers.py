"""Helpers for tests/test_sdxl*.py and tests/test_sd2v*.py: every mode's inputs, a few steps of
training on a tiny model of a family with the U-Net's calls recorded, and the CLI."""
import os
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from trainer.config import Config
from trainer.engine import OutputPaths, TrainingRun
from trainer.modes import mode_for

ROOT = Path(__file__).resolve().parent.parent
MODES = ("LoRA", "iLECO", "Difference", "ADDifT", "Multi-ADDifT")
SMALL = dict(image_size="64", image_min_length=64, image_buckets_step=64, network_rank=2, network_alpha=2,
             train_iterations=2, train_seed=0, train_model_precision="fp32", save_precision="fp32",
             latent_cache_on_disk=False, train_batch_size=1)


def shape_image(path: Path, colour, size=(64, 64)) -> Path:
    img = Image.new("RGB", size, (240, 240, 240))
    w, h = size
    ImageDraw.Draw(img).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def mode_inputs(root: Path) -> dict:
    """{mode: (meta fields, settings)} with small inputs under root."""
    a = shape_image(root / "pair" / "a.png", (220, 30, 30))
    b = shape_image(root / "pair" / "b.png", (30, 30, 220))
    shape_image(root / "multi" / "x.png", (220, 30, 30))
    shape_image(root / "multi" / "x_b.png", (30, 30, 220))
    shape_image(root / "images" / "wide.png", (30, 160, 30), size=(128, 64))
    (root / "images" / "wide.txt").write_text("a green ball")
    pair = {"original_image": str(a), "target_image": str(b)}
    return {
        "LoRA": ({}, {"lora_data_directory": str(root / "images")}),
        "iLECO": ({"original_prompt": "a cat", "target_prompt": "a dog"}, {}),
        "Difference": (pair, {}),
        "ADDifT": (pair, {}),
        "Multi-ADDifT": ({}, {"lora_data_directory": str(root / "multi"), "diff_target_name": "_b"}),
    }


def train_mode(mode: str, components, root: Path, inputs: dict, **settings):
    """Train `mode` on `components` for 2 steps; returns (result, run, [added_cond_kwargs per U-Net call])."""
    meta, extra = inputs[mode]
    cfg = Config.defaults(mode).replace(**meta).with_overrides(
        {**SMALL, **extra, "save_lora_name": f"{components.name}_{mode}", **settings})
    calls = []
    forward = components.unet.forward

    def recording(*args, **kw):
        calls.append(kw.get("added_cond_kwargs"))
        return forward(*args, **kw)

    components.unet.forward = recording
    try:
        run = TrainingRun(cfg, components, OutputPaths.under(root / "work"), log=lambda m: None,
                          device=torch.device("cpu"))
        result = run.run(mode_for(mode))
    finally:
        del components.unet.forward
    return result, run, calls


def cli(*args, cwd):
    env = {**os.environ, "TT_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "trainer", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
