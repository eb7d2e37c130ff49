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


#: The only transformers classes a text encoder may be (a name read from a file must never pick the attribute).
TEXT_ENCODER_CLASSES = (CLIP_TEXT, CLIP_TEXT_PROJ)
PAD_TOKENS = (PAD_EOS, PAD_ZERO)


class ConfigError(ValueError):
    """An architecture config read from a file names something not allowed or a value out of bounds."""


def _int(lo: int, hi: int):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            return f"a whole number from {lo} to {hi}"
    return check


def _num(lo: float, hi: float):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo <= v <= hi):  # also refuses NaN
            return f"a number from {lo} to {hi}"
    return check


def _one_of(*allowed):
    def check(v):
        if v not in allowed:
            return "one of " + ", ".join(repr(a) for a in allowed)
    return check


def _int_or_list(lo: int, hi: int, max_len: int = 6):
    one = _int(lo, hi)

    def check(v):
        if isinstance(v, (list, tuple)):
            if not 1 <= len(v) <= max_len or any(one(x) for x in v):
                return f"a whole number from {lo} to {hi}, or a list of 1 to {max_len} of them"
            return None
        if one(v):
            return f"a whole number from {lo} to {hi}, or a list of 1 to {max_len} of them"
    return check


def _list_of(allowed: tuple, max_len: int = 6):
    def check(v):
        if not isinstance(v, (list, tuple)) or not 1 <= len(v) <= max_len or any(x not in allowed for x in v):
            return f"a list of 1 to {max_len} of " + ", ".join(repr(a) for a in allowed)
    return check


_ACTS = ("silu", "swish", "gelu", "gelu_new", "quick_gelu", "relu", "mish")
#: Values that decide a module's size get explicit bounds (generous for SD1, SD2, SDXL and their small test
#: versions); every other constructor keyword may only be a small scalar (see _generic).
_UNET_RULES = {
    "sample_size": _int_or_list(1, 1024, 2), "in_channels": _int(1, 64), "out_channels": _int(1, 64),
    "block_out_channels": _int_or_list(1, 4096), "layers_per_block": _int_or_list(1, 8),
    "down_block_types": _list_of(("CrossAttnDownBlock2D", "DownBlock2D")),
    "up_block_types": _list_of(("CrossAttnUpBlock2D", "UpBlock2D")),
    "mid_block_type": _one_of("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None),
    "transformer_layers_per_block": _int_or_list(1, 20), "attention_head_dim": _int_or_list(1, 512),
    "num_attention_heads": lambda v: None if v is None else _int_or_list(1, 512)(v),
    "cross_attention_dim": _int_or_list(1, 4096), "norm_num_groups": _int(1, 128), "act_fn": _one_of(*_ACTS),
    "projection_class_embeddings_input_dim": lambda v: None if v is None else _int(1, 16384)(v),
    "addition_time_embed_dim": lambda v: None if v is None else _int(1, 4096)(v),
    "addition_embed_type": _one_of(None, "text_time"),
}
_VAE_RULES = {
    "sample_size": _int_or_list(1, 4096, 2), "in_channels": _int(1, 64), "out_channels": _int(1, 64),
    "block_out_channels": _int_or_list(1, 4096), "layers_per_block": _int(1, 8), "latent_channels": _int(1, 64),
    "down_block_types": _list_of(("DownEncoderBlock2D",)), "up_block_types": _list_of(("UpDecoderBlock2D",)),
    "norm_num_groups": _int(1, 128), "act_fn": _one_of(*_ACTS), "scaling_factor": _num(1e-4, 100.0),
}
_TEXT_RULES = {
    "vocab_size": _int(1, 100_000), "hidden_size": _int(1, 4096), "intermediate_size": _int(1, 16384),
    "num_hidden_layers": _int(1, 48), "num_attention_heads": _int(1, 64), "max_position_embeddings": _int(1, 1024),
    "projection_dim": _int(1, 4096), "hidden_act": _one_of(*_ACTS), "layer_norm_eps": _num(0.0, 1.0),
    "bos_token_id": _int(0, 100_000), "eos_token_id": _int(0, 100_000), "pad_token_id": _int(0, 100_000),
}


def _generic(v):
    """Any other constructor keyword: a small scalar, or a short list of them."""
    scalar = (lambda x: x is None or isinstance(x, bool) or (isinstance(x, int) and abs(x) <= 8192)
              or (isinstance(x, float) and abs(x) <= 1e4) or (isinstance(x, str) and len(x) <= 64))
    if isinstance(v, (list, tuple)):
        if len(v) <= 8 and all(scalar(x) for x in v):
            return None
    elif scalar(v):
        return None
    return "a short value (a flag, a number up to 8192, a name, or a list of up to 8 of them)"


def _allowed_keys(section: str) -> frozenset:
    """The constructor keywords of the class a section builds: nothing else is passed to it."""
    import inspect

    if section == "unet":
        from diffusers import UNet2DConditionModel as cls
    elif section == "vae":
        from diffusers import AutoencoderKL as cls
    else:
        import transformers

        keys = set(transformers.CLIPTextConfig().to_dict()) | set(_TEXT_RULES)
        return frozenset(k for k in keys if not k.startswith("_") and k not in ("auto_map", "transformers_version"))
    return frozenset(n for n in inspect.signature(cls.__init__).parameters if n != "self")


def check_section(section: str, cfg, where: str, *, strict: bool = True) -> None:
    """Refuse a config dict read from a file unless every key is allowed (``strict``) and every value is
    within its bounds: a file must not pick what gets called nor build millions of layers."""
    rules = {"unet": _UNET_RULES, "vae": _VAE_RULES}.get(section.split("[")[0], _TEXT_RULES)
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where}: {section} is {type(cfg).__name__}, not an object of settings")
    allowed = _allowed_keys(section.split("[")[0]) if strict else None
    for key, value in cfg.items():
        if allowed is not None and key not in allowed:
            raise ConfigError(f"{where}: {section}.{key} = {value!r:.80}: not an allowed setting of this model part")
        why = (rules.get(key) or (_generic if strict else (lambda v: None)))(value)
        if why:
            raise ConfigError(f"{where}: {section}.{key} = {value!r:.80}: out of bounds (allowed: {why})")


def check_configs(d, where: str) -> "ModelConfigs":
    """``ModelConfigs`` from the JSON object a model file carries, checked key by key (see check_section)."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: the configs are {type(d).__name__}, not an object")
    top = ("name", "family", "unet", "vae", "text_encoders", "text_encoder_classes", "pad_tokens", "scaling_factor")
    for key in d:
        if key not in top:
            raise ConfigError(f"{where}: {key} = {d[key]!r:.80}: not an allowed key (allowed: {', '.join(top)})")
    missing = [k for k in top if k not in d]
    if missing:
        raise ConfigError(f"{where}: missing {', '.join(missing)}")
    name = d["name"]
    if not isinstance(name, str) or len(name) > 200:
        raise ConfigError(f"{where}: name = {name!r:.80}: not a name (allowed: text up to 200 characters)")
    try:
        family = Family(d["family"])
    except ValueError:
        raise ConfigError(f"{where}: family = {d['family']!r:.80}: unknown (allowed: "
                          f"{', '.join(f.value for f in Family)})") from None
    check_section("unet", d["unet"], where)
    check_section("vae", d["vae"], where)
    tes, classes, pads = d["text_encoders"], d["text_encoder_classes"], d["pad_tokens"]
    for key, value in (("text_encoders", tes), ("text_encoder_classes", classes), ("pad_tokens", pads)):
        if not isinstance(value, list) or not 1 <= len(value) <= 2:
            raise ConfigError(f"{where}: {key} = {value!r:.80}: not a list of 1 or 2 entries")
    if not len(tes) == len(classes) == len(pads):
        raise ConfigError(f"{where}: text_encoders, text_encoder_classes and pad_tokens differ in length")
    for i, te in enumerate(tes):
        check_section(f"text_encoders[{i}]", te, where)
    for key, values, allowed in (("text_encoder_classes", classes, TEXT_ENCODER_CLASSES), ("pad_tokens", pads, PAD_TOKENS)):
        for i, v in enumerate(values):
            if v not in allowed:
                raise ConfigError(f"{where}: {key}[{i}] = {v!r:.80}: not allowed (allowed: "
                                  f"{', '.join(repr(a) for a in allowed)})")
    scale = d["scaling_factor"]
    if _num(1e-4, 100.0)(scale):
        raise ConfigError(f"{where}: scaling_factor = {scale!r:.80}: out of bounds (allowed: a number from 0.0001 to 100)")
    return ModelConfigs(name=name, family=family, unet=dict(d["unet"]), vae=dict(d["vae"]), text_encoders=tuple(tes),
                        text_encoder_classes=tuple(classes), pad_tokens=tuple(pads), scaling_factor=float(scale))


def build_text_encoder(cfg: dict, cls_name: str):
    import transformers

    if cls_name not in TEXT_ENCODER_CLASSES:  # never getattr(transformers, <a name from a file>)
        raise ConfigError(f"text_encoder_classes: {cls_name!r} is not allowed (allowed: "
                          f"{', '.join(TEXT_ENCODER_CLASSES)})")
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
