"""One file per training mode; each says how a step's loss is computed."""
from __future__ import annotations


def mode_for(name: str):
    """The mode object for a mode name from trainer.config.MODES."""
    if name == "LoRA":
        from .lora import LoRAMode
        return LoRAMode()
    raise NotImplementedError(f"mode: {name!r} is not available yet (available: LoRA)")
