"""One file per training mode; each says how a step's loss is computed."""
from __future__ import annotations


def mode_for(name: str):
    """The mode object for a mode name from trainer.config.MODES.

    A mode has ``passes(run)``; it may also have ``check(cfg)``, which raises a ValueError
    (DataError) for bad inputs (missing images, empty prompts) before any model is loaded."""
    if name == "LoRA":
        from .lora import LoRAMode
        return LoRAMode()
    if name == "iLECO":
        from .ileco import ILECOMode
        return ILECOMode()
    if name == "Difference":
        from .difference import DifferenceMode
        return DifferenceMode()
    if name == "ADDifT":
        from .addift import ADDifTMode
        return ADDifTMode()
    if name == "Multi-ADDifT":
        from .addift import MultiADDifTMode
        return MultiADDifTMode()
    raise NotImplementedError(f"mode: {name!r} is not available (available: LoRA, iLECO, Difference, ADDifT, "
                              f"Multi-ADDifT)")
