"""Checks of a job's settings that need more than the settings table: run by every front end (CLI,
tab, queue, Web-UI) after the mode's own input check and before any model is loaded, so a bad value
costs seconds, not a model load, and is reported with the setting's name.

- ``train_optimizer_settings`` / ``train_lr_scheduler_settings``: names against the real signature
  of the optimizer / scheduler, values by kind, then a dry build on one parameter (trainer.optim).
- ``network_resume``: the file exists and is a readable ``.safetensors`` network file (a pickle is
  never read: DESIGN allows ``torch.load`` only for checkpoints).
"""
from __future__ import annotations

import os

from .config import SettingError


def check_inputs(cfg, *, mode_inputs: bool = True):
    """What every front end checks before a model loads, in this order: the mode's own inputs (images,
    prompts; ``mode_inputs`` False skips them, e.g. for a settings file written ahead of its data), then
    check_settings. Returns the mode object; raises a ValueError (SettingError, DataError) naming the setting."""
    from .modes import mode_for

    try:
        mode = mode_for(cfg.mode)
    except NotImplementedError as e:
        raise SettingError(str(e), setting="mode", value=cfg.mode) from None
    if mode_inputs and hasattr(mode, "check"):
        mode.check(cfg)
    check_settings(cfg)
    return mode


def check_settings(cfg) -> None:
    """Raise SettingError (a ValueError) for the first bad value, naming the setting."""
    from .optim import OptimizerError, check_optimizer_settings, check_scheduler_settings

    passes = [("", cfg)]
    if getattr(cfg, "second_pass", None) is not None:
        passes.append(("2nd pass: ", cfg.second_pass))
    for prefix, c in passes:
        try:
            check_optimizer_settings(c.train_optimizer, c.train_optimizer_settings, c.train_learning_rate)
            check_scheduler_settings(
                c.train_lr_scheduler, c.train_lr_scheduler_settings, optimizer_name=c.train_optimizer,
                lr=c.train_learning_rate, iterations=c.train_iterations, warmup_steps=c.train_lr_warmup_steps,
                num_cycles=c.train_lr_scheduler_num_cycles, power=c.train_lr_scheduler_power,
                step_rules=c.train_lr_step_rules)
        except OptimizerError as e:
            raise SettingError(prefix + str(e)) from None
    if cfg.network_resume:
        check_network_file(cfg.network_resume, "network_resume")


def check_network_file(path: str, setting: str) -> None:
    """A LoRA file to start from: present, ``.safetensors``, with a readable header."""
    shown = repr(path)
    if not os.path.exists(path):
        raise SettingError(f"{setting}: {shown} does not exist (give the path of a .safetensors LoRA file)",
                           setting=setting, value=path)
    if not os.path.isfile(path):
        raise SettingError(f"{setting}: {shown} is not a file", setting=setting, value=path)
    if not path.lower().endswith(".safetensors"):
        raise SettingError(f"{setting}: {shown} is not a .safetensors file; only .safetensors LoRA files are "
                           f"read (a .pt/.ckpt pickle could run code)", setting=setting, value=path)
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt", device="cpu") as f:
            keys = list(f.keys())
    except Exception as e:  # SafetensorError (not an OSError), OSError, …
        raise SettingError(f"{setting}: {shown} is not a readable .safetensors file ({e})",
                           setting=setting, value=path) from None
    if not any(k.endswith((".lora_down.weight", ".hada_w1_a", ".lokr_w1", ".alpha")) or k.endswith("alpha")
               for k in keys):
        raise SettingError(f"{setting}: {shown} holds no LoRA weights ({len(keys)} tensors, none named like "
                           f"lora_down / hada_w1_a)", setting=setting, value=path)
