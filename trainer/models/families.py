"""Model families and their detection from checkpoint keys."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Mapping, Optional

from .errors import ModelError


class Family(str, Enum):
    SD1 = "sd1"
    SD2 = "sd2"
    SDXL = "sdxl"


@dataclass(frozen=True)
class ModelInfo:
    family: Family
    v_pred: bool = False
    zero_terminal_snr: bool = False  # the checkpoint was trained with a zero-terminal-SNR schedule

    @property
    def is_sdxl(self) -> bool:
        return self.family is Family.SDXL

    @property
    def text_encoder_count(self) -> int:
        return 2 if self.family is Family.SDXL else 1


# cross-attention K input width -> family
_CONTEXT_WIDTH = {768: Family.SD1, 1024: Family.SD2, 2048: Family.SDXL}

LDM_PROBE_KEY = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
DIFFUSERS_PROBE_KEY = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
# keys some trainers/UIs add to mark v-prediction checkpoints (ComfyUI, NoobAI-XL v-pred, ...)
V_PRED_MARKER_KEYS = ("v_pred",)


def family_from_context_width(width: int, where: str = "") -> Family:
    try:
        return _CONTEXT_WIDTH[int(width)]
    except KeyError:
        raise ModelError(
            f"{where or 'model'}: cross-attention width {width} is not SD1 (768), SD2 (1024) "
            f"or SDXL (2048); SDXL refiner, SD3, Flux and others are not supported"
        ) from None


def detect(state_dict: Mapping, v_pred_hint: Optional[bool] = None, where: str = "") -> ModelInfo:
    """Detect the family of an LDM/SGM single-file state dict (or a diffusers U-Net one).

    The family comes from the width of the cross-attention K projection of the
    first attention block at the second resolution. v-prediction cannot be read from
    the weights of SD2 (512-base and 768-v have the same layout): it is ``v_pred_hint``
    when given, else True when the checkpoint carries a ``v_pred`` marker key, else False.
    """
    label = where or "checkpoint"
    tensor = None
    for key in (LDM_PROBE_KEY, DIFFUSERS_PROBE_KEY, "unet." + DIFFUSERS_PROBE_KEY):
        if key in state_dict:
            tensor = state_dict[key]
            break
    if tensor is None:
        unet_keys = [k for k in state_dict if k.startswith("model.diffusion_model.")]
        hint = ""
        if any(k.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for k in state_dict):
            hint = " (looks like Flux)"
        elif any("joint_blocks." in k for k in state_dict):
            hint = " (looks like SD3)"
        elif not unet_keys:
            hint = " (no 'model.diffusion_model.*' U-Net keys: a VAE, LoRA or text-encoder file?)"
        raise ModelError(
            f"{label}: not a Stable Diffusion 1/2/XL checkpoint: key {LDM_PROBE_KEY!r} not found{hint}; "
            f"{len(state_dict)} keys, e.g. {sorted(state_dict)[:3]}"
        )
    family = family_from_context_width(tensor.shape[1], label)
    if v_pred_hint is not None:
        v_pred = bool(v_pred_hint)
    else:
        v_pred = any(k in state_dict for k in V_PRED_MARKER_KEYS)
    return ModelInfo(family, v_pred)
