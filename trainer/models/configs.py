"""Bundled architecture configs (plain dicts) and module construction.

The dicts are diffusers / transformers constructor arguments, limited to keys that
exist in diffusers 0.31 and transformers 4.30, so the same dicts build the same
modules on the Web-UI's pinned versions and on current releases.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Union

import torch

from .families import Family

SCALING_FACTOR = {Family.SD1: 0.18215, Family.SD2: 0.18215, Family.SDXL: 0.13025}

_SD_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
}

_SD1_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "use_linear_projection": False,
    "upcast_attention": False,
}

_SD2_UNET = dict(
    _SD1_UNET,
    sample_size=96,
    cross_attention_dim=1024,
    attention_head_dim=[5, 10, 20, 20],
    use_linear_projection=True,
    # SD2 (768-v) needs attention upcast in fp16; harmless for 512-base.
    upcast_attention=True,
)

_SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 2048,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "use_linear_projection": True,
    "upcast_attention": False,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}

_CLIP_L = {  # OpenAI CLIP ViT-L/14 text tower (SD1, SDXL encoder 1)
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}

_OPENCLIP_H = dict(  # OpenCLIP ViT-H/14 text tower (SD2), all 24 layers kept
    _CLIP_L,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    hidden_act="gelu",
    projection_dim=1024,
    pad_token_id=0,
)

_OPENCLIP_BIGG = dict(  # OpenCLIP ViT-bigG/14 text tower (SDXL encoder 2)
    _CLIP_L,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    hidden_act="gelu",
    projection_dim=1280,
    pad_token_id=0,
)

CLIP_TEXT = "CLIPTextModel"
CLIP_TEXT_PROJ = "CLIPTextModelWithProjection"
PAD_EOS = "<|endoftext|>"
PAD_ZERO = "!"


@dataclass(frozen=True)
class ModelConfigs:
    """Everything needed to build one model's modules."""

    name: str
    family: Family
    unet: dict
    vae: dict
    text_encoders: tuple  # transformers CLIPTextConfig kwargs, one per encoder
    text_encoder_classes: tuple  # CLIP_TEXT or CLIP_TEXT_PROJ, one per encoder
    pad_tokens: tuple  # tokenizer pad token, one per encoder
    scaling_factor: float

    def copy(self) -> "ModelConfigs":
        return copy.deepcopy(self)


def configs_for(family: Family) -> ModelConfigs:
    """The bundled configs of a family (fresh copies; mutate freely)."""
    family = Family(family)
    vae = dict(copy.deepcopy(_SD_VAE), scaling_factor=SCALING_FACTOR[family])
    if family is Family.SD1:
        return ModelConfigs("sd1", family, copy.deepcopy(_SD1_UNET), vae, (dict(_CLIP_L),),
                            (CLIP_TEXT,), (PAD_EOS,), SCALING_FACTOR[family])
    if family is Family.SD2:
        vae["sample_size"] = 768
        return ModelConfigs("sd2", family, copy.deepcopy(_SD2_UNET), vae, (dict(_OPENCLIP_H),),
                            (CLIP_TEXT,), (PAD_ZERO,), SCALING_FACTOR[family])
    vae["sample_size"] = 1024
    return ModelConfigs("sdxl", family, copy.deepcopy(_SDXL_UNET), vae,
                        (dict(_CLIP_L), dict(_OPENCLIP_BIGG)), (CLIP_TEXT, CLIP_TEXT_PROJ),
                        (PAD_EOS, PAD_ZERO), SCALING_FACTOR[family])


def build_text_encoder(cfg: dict, cls_name: str):
    import transformers

    cls = getattr(transformers, cls_name)
    return cls(transformers.CLIPTextConfig(**cfg))


def build_models(family_or_configs: Union[Family, str, ModelConfigs], device: str = "meta",
                 dtype: torch.dtype = torch.float32):
    """Build (unet, vae, [text encoders]) from bundled configs.

    ``device="meta"`` builds without allocating weights (about 2 s for SDXL); load
    weights afterwards with ``load_state_dict(sd, assign=True)``. ``device="cpu"``
    builds randomly initialised modules. All modules are in eval mode.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    cfgs = family_or_configs if isinstance(family_or_configs, ModelConfigs) else configs_for(family_or_configs)
    with torch.device(device):
        unet = UNet2DConditionModel(**cfgs.unet)
        vae = AutoencoderKL(**cfgs.vae)
        tes = [build_text_encoder(c, k) for c, k in zip(cfgs.text_encoders, cfgs.text_encoder_classes)]
    mods = [unet, vae, *tes]
    for m in mods:
        if dtype != torch.float32:
            torch.nn.Module.to(m, dtype=dtype)  # diffusers' .to() warns on plain casts
        m.eval()
        m.requires_grad_(False)
    return unet, vae, tes
