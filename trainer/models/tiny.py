"""The embedded tiny models: real topologies, tiny widths, deterministic weights.

* ``tiny-sd1`` (the default model): same module names as SD1.5 (4 down blocks: CrossAttnDown x3 +
  Down, 2 layers per block, cross-attention mid block, mirrored up blocks), a 4-block AutoencoderKL
  (8x downsampling, 4 latent channels) and a 2-layer CLIP text model with the real CLIP tokenizer.
* ``tiny-sd2``: the SD2 topology (linear projections in the transformers, attention upcast, per-block
  head counts) and an OpenCLIP-H-like text encoder (GELU, pad token "!"); usually built as v-prediction.
* ``tiny-sdxl``: the SDXL topology: 3 down blocks [Down, CrossAttnDown, CrossAttnDown], 2 layers per
  block, several transformer layers per block ([1, 2, 3] instead of [1, 2, 10], so SGM names such as
  ``transformer_blocks_1`` exist), linear projections, ``addition_embed_type="text_time"`` (pooled text
  embedding + 6 size ids), and two text encoders: CLIP-L-like and OpenCLIP-bigG-like with projection.

Weights are drawn from a seeded CPU generator in sorted canonical key order, independent of the
libraries' own initialisers, so one torch version always gives the same model.
"""
from __future__ import annotations

import math

import torch

from .configs import CLIP_TEXT, CLIP_TEXT_PROJ, PAD_EOS, PAD_ZERO, ModelConfigs, configs_for
from .families import Family, ModelInfo

TINY_NAME = "tiny-sd1"
TINY_NAMES = {Family.SD1: TINY_NAME, Family.SD2: "tiny-sd2", Family.SDXL: "tiny-sdxl"}
_TEXT_DIM = 32
_SDXL_TIME_DIM = 8  # addition_time_embed_dim (256 in SDXL)


def tiny_configs(family: Family | str = Family.SD1) -> ModelConfigs:
    """The architecture configs of the tiny model of a family."""
    family = Family(family)
    if family is Family.SD2:
        return _tiny_sd2_configs()
    if family is Family.SDXL:
        return _tiny_sdxl_configs()
    base = configs_for(Family.SD1)
    unet = dict(
        base.unet,
        sample_size=8,
        block_out_channels=[32, 32, 64, 64],
        norm_num_groups=8,
        attention_head_dim=2,  # number of heads (diffusers' historical name)
        cross_attention_dim=_TEXT_DIM,
    )
    vae = dict(
        base.vae,
        block_out_channels=[16, 32, 32, 32],
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
    )
    te = dict(
        base.text_encoders[0],
        hidden_size=_TEXT_DIM,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=_TEXT_DIM,
    )
    return ModelConfigs(TINY_NAME, Family.SD1, unet, vae, (te,), (CLIP_TEXT,), (PAD_EOS,), base.scaling_factor)


def _tiny_vae(base: ModelConfigs) -> dict:
    return dict(base.vae, block_out_channels=[16, 32, 32, 32], layers_per_block=1, norm_num_groups=8, sample_size=64)


def _tiny_te(base_te: dict, hidden: int, act: str, pad_id: int) -> dict:
    return dict(base_te, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                num_attention_heads=2, projection_dim=hidden, hidden_act=act, pad_token_id=pad_id)


def _tiny_sd2_configs() -> ModelConfigs:
    base = configs_for(Family.SD2)
    unet = dict(
        base.unet,
        sample_size=8,
        block_out_channels=[32, 32, 64, 64],
        norm_num_groups=8,
        attention_head_dim=[2, 2, 4, 4],  # per-block head counts, like SD2's [5, 10, 20, 20]
        cross_attention_dim=_TEXT_DIM,
    )
    te = _tiny_te(base.text_encoders[0], _TEXT_DIM, "gelu", 0)
    return ModelConfigs("tiny-sd2", Family.SD2, unet, _tiny_vae(base), (te,), base.text_encoder_classes,
                        base.pad_tokens, base.scaling_factor)


def _tiny_sdxl_configs() -> ModelConfigs:
    base = configs_for(Family.SDXL)
    te1 = _tiny_te(base.text_encoders[0], 16, "quick_gelu", 49407)  # CLIP-L-like
    te2 = _tiny_te(base.text_encoders[1], 32, "gelu", 0)  # OpenCLIP-bigG-like, with projection
    unet = dict(
        base.unet,
        sample_size=8,
        block_out_channels=[32, 64, 64],
        norm_num_groups=8,
        transformer_layers_per_block=[1, 2, 3],
        attention_head_dim=[2, 2, 4],
        cross_attention_dim=te1["hidden_size"] + te2["hidden_size"],
        addition_time_embed_dim=_SDXL_TIME_DIM,
        projection_class_embeddings_input_dim=6 * _SDXL_TIME_DIM + te2["projection_dim"],
    )
    return ModelConfigs("tiny-sdxl", Family.SDXL, unet, _tiny_vae(base), (te1, te2), (CLIP_TEXT, CLIP_TEXT_PROJ),
                        (PAD_EOS, PAD_ZERO), base.scaling_factor)


def _init_tensor(name: str, shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    is_norm = any(s in name for s in ("norm", "layer_norm", "ln_"))
    if name.endswith(".bias"):
        if is_norm:
            return torch.zeros(shape)
        return torch.randn(shape, generator=gen) * 0.02
    if is_norm and len(shape) == 1:
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if "embedding" in name and len(shape) == 2:
        return torch.randn(shape, generator=gen) * 0.1
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    return torch.randn(shape, generator=gen) / math.sqrt(max(fan_in, 1))


def _fill(module: torch.nn.Module, gen: torch.Generator, canonical) -> None:
    own = module.state_dict()
    names = {canonical(k): k for k in own}
    new = {}
    for cname in sorted(names):
        k = names[cname]
        t = own[k]
        if not t.is_floating_point():
            new[k] = t
        else:
            new[k] = _init_tensor(cname, t.shape, gen).to(t.dtype)
    module.load_state_dict(new, strict=True)


def tiny_components(seed: int = 0, family: Family | str = Family.SD1, v_pred: bool | None = None):
    """A tiny model of ``family`` (SD1 about 2.6 M parameters), float32 on CPU.

    ``v_pred`` defaults to True for SD2 (the 768-v flavour this model stands for), else False."""
    from .convert import canonical_te_keys
    from .loading import Components
    from .configs import build_models
    from .tokenizer import clip_tokenizer

    family = Family(family)
    if v_pred is None:
        v_pred = family is Family.SD2
    cfgs = tiny_configs(family)
    unet, vae, tes = build_models(cfgs, device="cpu")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    _fill(unet, gen, lambda k: k)
    _fill(vae, gen, lambda k: k)
    for te in tes:
        _fill(te, gen, lambda k: next(iter(canonical_te_keys({k: None}))))
    return Components(
        info=ModelInfo(family, bool(v_pred)), unet=unet, vae=vae, text_encoders=tes,
        tokenizers=[clip_tokenizer(p) for p in cfgs.pad_tokens],
        scaling_factor=cfgs.scaling_factor, name=cfgs.name, configs=cfgs,
    )
