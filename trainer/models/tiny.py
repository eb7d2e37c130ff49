"""The embedded tiny default model: SD1 topology, tiny widths, deterministic weights.

Same module names as SD1.5 (4 down blocks: CrossAttnDown x3 + Down, 2 layers per block,
cross-attention mid block, mirrored up blocks), a 4-block AutoencoderKL (8x downsampling,
4 latent channels) and a 2-layer CLIP text model with the real CLIP tokenizer. Weights
are drawn from a seeded CPU generator in sorted canonical key order, independent of the
libraries' own initialisers, so one torch version always gives the same model.
"""
from __future__ import annotations

import math

import torch

from .configs import CLIP_TEXT, PAD_EOS, ModelConfigs, configs_for
from .families import Family, ModelInfo

TINY_NAME = "tiny-sd1"
_TEXT_DIM = 32


def tiny_configs() -> ModelConfigs:
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


def tiny_components(seed: int = 0):
    """The tiny SD1-architecture model (about 2.6 M parameters), float32 on CPU."""
    from .convert import canonical_te_keys
    from .loading import Components
    from .configs import build_models
    from .tokenizer import clip_tokenizer

    cfgs = tiny_configs()
    unet, vae, tes = build_models(cfgs, device="cpu")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    _fill(unet, gen, lambda k: k)
    _fill(vae, gen, lambda k: k)
    for te in tes:
        _fill(te, gen, lambda k: next(iter(canonical_te_keys({k: None}))))
    return Components(
        info=ModelInfo(Family.SD1, False), unet=unet, vae=vae, text_encoders=tes,
        tokenizers=[clip_tokenizer(p) for p in cfgs.pad_tokens],
        scaling_factor=cfgs.scaling_factor, name=TINY_NAME, configs=cfgs,
    )
