"""Helpers for tests/test_modes_*.py: small configs, runs on the tiny model, a pair of images."""
import os
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from trainer.config import Config
from trainer.engine import OutputPaths, TrainingRun
from trainer.models.tiny import tiny_components

ROOT = Path(__file__).resolve().parent.parent
PRESETS = ROOT / "presets"

# Fast settings for the random tiny model: 64 px, fp32, a few steps.
SMALL = {"image_size": "64", "image_min_length": 64, "image_buckets_step": 64, "train_model_precision": "fp32",
         "save_precision": "fp32", "train_iterations": 2, "train_batch_size": 1, "train_seed": 0,
         "latent_cache_on_disk": False, "save_as_json": False}
SMALL_ARGS = [a for k, v in SMALL.items() for a in ("--set", f"{k}={v}")]


def draw(path: Path, colour, shape="circle", size=(64, 64), background=(240, 240, 240)) -> Path:
    img = Image.new("RGB", size, background)
    d = ImageDraw.Draw(img)
    box = (16, 16, 48, 48)
    (d.ellipse if shape == "circle" else d.rectangle)(box, fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def config(preset: str | None, mode: str | None = None, **overrides) -> Config:
    cfg = Config.load_preset(PRESETS / preset) if preset else Config.defaults(mode)
    if mode:
        cfg = cfg.replace(mode=mode)
    meta = {k: overrides.pop(k) for k in list(overrides) if k in (
        "original_prompt", "target_prompt", "negative_prompt", "original_image", "target_image")}
    cfg = cfg.replace(**{k: str(v) for k, v in meta.items()})
    return cfg.with_overrides({**SMALL, **overrides})


def train(cfg, tmp_path, mode, components=None, logs=None):
    components = components or tiny_components()
    run = TrainingRun(cfg, components, OutputPaths.under(tmp_path), log=(logs.append if logs is not None else
                                                                            (lambda m: None)),
                      device=torch.device("cpu"))
    return run, run.run(mode), components


def cli(*args, cwd):
    env = {**os.environ, "TT_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "trainer", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def give_effect(network, scale: float) -> None:
    """Add seeded noise of ``scale`` to every network tensor, so the LoRA visibly changes predictions
    (a fresh LoRA's up weights are zero: it changes nothing)."""
    with torch.no_grad():
        for q in network.parameters():
            q.add_(torch.randn(q.shape, generator=torch.Generator().manual_seed(q.numel())) * scale)
