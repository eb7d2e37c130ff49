"""Model layer: family detection, bundled configs, offline checkpoint conversion,
the offline CLIP tokenizer, prompt encoding and the embedded tiny model."""
from .errors import ModelError
from .families import Family, ModelInfo, detect

__all__ = [
    "ModelError", "Family", "ModelInfo", "detect",
    "Components", "load_components", "read_state_dict", "save_ldm_checkpoint",
    "encode_prompts", "Conditioning", "tiny_components",
]


def __getattr__(name):  # lazy: importing the package must not import torch-heavy modules
    if name in ("Components", "load_components", "read_state_dict", "save_ldm_checkpoint"):
        from . import loading
        return getattr(loading, name)
    if name in ("encode_prompts", "Conditioning"):
        from . import prompts
        return getattr(prompts, name)
    if name == "tiny_components":
        from .tiny import tiny_components
        return tiny_components
    raise AttributeError(name)
