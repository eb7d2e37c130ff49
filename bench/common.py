"""What the benchmarks share: random-weight real-size models, images on disk, peak-memory probes."""
from __future__ import annotations

import ctypes
import gc
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

GB = 1024 ** 3


# --- models ------------------------------------------------------------------------------------
def _materialise(module: torch.nn.Module) -> None:
    """Meta tensors -> CPU memory, initialised the way PyTorch initialises each layer."""
    if any(True for _ in module.buffers()):
        raise RuntimeError(f"{type(module).__name__} has buffers; to_empty would leave them uninitialised")
    module.to_empty(device="cpu")
    with torch.no_grad():
        for m in module.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()


MODELS = {"sd15": "SD1", "sdxl": "SDXL"}


def random_components(name: str = "sd15", seed: int = 0):
    """`Components` with random weights: "sd15" / "sdxl" are the real architectures (U-Net 860 M /
    2.57 G parameters, built on the meta device, then materialised: 4.3 / 13 GB in fp32 with the
    text encoders), "tiny" the embedded tiny model."""
    if name == "tiny":
        from trainer.models.tiny import tiny_components

        return tiny_components(seed)
    if name not in MODELS:
        raise SystemExit(f"--model: {name!r} is not known (sd15, sdxl, tiny)")
    from trainer.models.configs import build_models, build_text_encoder, configs_for
    from trainer.models.families import Family, ModelInfo
    from trainer.models.loading import Components
    from trainer.models.tokenizer import clip_tokenizer

    family = getattr(Family, MODELS[name])
    cfgs = configs_for(family)
    torch.manual_seed(seed)
    unet, vae, _ = build_models(cfgs, device="meta")
    _materialise(unet)
    _materialise(vae)
    # The text encoder has a non-persistent buffer (position ids): build it for real (123 M parameters).
    tes = [build_text_encoder(c, k) for c, k in zip(cfgs.text_encoders, cfgs.text_encoder_classes)]
    for m in [unet, vae, *tes]:
        m.eval()
        m.requires_grad_(False)
    return Components(info=ModelInfo(family, False), unet=unet, vae=vae, text_encoders=tes,
                      tokenizers=[clip_tokenizer(p) for p in cfgs.pad_tokens], scaling_factor=cfgs.scaling_factor,
                      name=f"{name}-random-seed{seed}", configs=cfgs)


def attention_processors(unet) -> list[str]:
    return sorted({type(p).__name__ for p in unet.attn_processors.values()})


# --- data --------------------------------------------------------------------------------------
def make_images(folder: Path, count: int, size: int, seed: int = 0) -> Path:
    """`count` smooth random RGB images of size x size with one distinct caption each (kept
    between runs: the latent cache is keyed by content, so unchanged images reuse it)."""
    folder.mkdir(parents=True, exist_ok=True)
    done = folder / ".complete"
    if done.exists() and done.read_text() == f"{count} {size} {seed}":
        return folder
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for i in range(count):
        channels = []
        for _ in range(3):
            a, b, c, d = rng.uniform(-1, 1, 4)
            channels.append(np.sin(6 * (a * xx + b * yy) + 3 * c) * np.cos(5 * d * xx * yy))
        arr = ((np.stack(channels, -1) * 0.5 + 0.5) * 255).clip(0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"img_{i:03d}.png")
        (folder / f"img_{i:03d}.txt").write_text(f"bench picture, item {i}, style {i % 7}", encoding="utf-8")
    done.write_text(f"{count} {size} {seed}")
    return folder


# --- memory ------------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class PeakRSS:
    """Peak resident memory of this process between `reset()` and `read()` (Linux: VmHWM, reset
    through /proc/self/clear_refs; elsewhere the lifetime peak from getrusage)."""

    def __init__(self) -> None:
        self.exact = os.path.exists("/proc/self/clear_refs")
        try:
            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
        except OSError:
            self._trim = None

    def reset(self) -> None:
        gc.collect()
        if self._trim is not None:
            self._trim(0)  # give freed heap back, so the new window starts at what is really in use
        if self.exact:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")

    def read(self) -> float:
        if self.exact:
            return _status_kb("VmHWM") * 1024 / GB
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB

    @staticmethod
    def current() -> float:
        return _status_kb("VmRSS") * 1024 / GB


def cuda_peak_reset() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def cuda_peak() -> float:
    return torch.cuda.max_memory_allocated() / GB if torch.cuda.is_available() else 0.0


def environment() -> dict:
    return {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "time": time.strftime("%Y-%m-%d %H:%M")}
