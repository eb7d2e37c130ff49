"""Offline, bidirectional conversion between LDM/SGM single-file checkpoints and
diffusers / transformers module state dicts.

One table per component serves both directions:

* U-Net: :func:`unet_ldm_module_map` (diffusers module path -> LDM/SGM module path),
  computed from the U-Net config alone; keys are renamed by longest module-path prefix.
* VAE: :func:`vae_ldm_module_map`; the mid-block attention projections are 1x1 convs
  in LDM and linears in diffusers (reshaped).
* Text encoders: HF CLIP (SD1, SDXL encoder 1) only moves a prefix; OpenCLIP (SD2,
  SDXL encoder 2) renames per layer and splits / joins the fused ``in_proj`` q,k,v.

Text-encoder state dicts are in the canonical transformers naming
(``text_model.encoder.layers.0...``, plus ``text_projection.weight`` for encoders
with projection) whatever transformers version is installed; :func:`canonical_te_keys`
normalises the keys of a module's own ``state_dict()``.

Keys that cannot be converted raise :class:`ModelError`; only the keys listed in
:data:`IGNORED_LDM_KEYS` / :data:`IGNORED_LDM_PREFIXES` are dropped on purpose.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch

from .configs import ModelConfigs, configs_for
from .errors import ModelError
from .families import Family, ModelInfo

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

# Dropped on purpose when reading LDM checkpoints:
IGNORED_LDM_PREFIXES = (
    "model_ema.",  # EMA copy of the U-Net (the live weights are used)
    "first_stage_model.loss.",  # VAE training loss (LPIPS / discriminator)
    "cond_stage_model.model.visual.",  # OpenCLIP image tower (unused by SD)
    "conditioner.embedders.1.model.visual.",
)
IGNORED_LDM_KEYS = frozenset(
    [
        # DDPM schedule buffers (recomputed by the scheduler)
        "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
        "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
        "logvar",
        # markers (read by detect(), carry no weights)
        "v_pred", "ztsnr",
        # constant buffers
        "cond_stage_model.transformer.text_model.embeddings.position_ids",
        "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
        "cond_stage_model.model.attn_mask",
        "conditioner.embedders.1.model.attn_mask",
        # SGM denoiser constants
        "denoiser.sigmas", "denoiser.log_sigmas",
    ]
)
IGNORED_TE_SUFFIXES = ("embeddings.position_ids",)  # diffusers/transformers side

_RESNET_UNET = {  # diffusers ResnetBlock2D child -> LDM ResBlock child
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def _per_block(value, n: int) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ModelError(f"U-Net config: {value!r} has {len(value)} entries, expected {n}")
        return list(value)
    return [value] * n


def unet_ldm_module_map(unet_config: Mapping) -> dict:
    """diffusers U-Net module path -> LDM/SGM module path (without ``model.diffusion_model.``).

    Block-level entries (``down_blocks.1.attentions.0`` -> ``input_blocks.4.1``) and,
    for every ResNet, its children (``...resnets.0.conv1`` -> ``...0.in_layers.2``).
    Only modules that exist for this config are listed. Attention blocks keep their
    inner names in both layouts. Works from the config alone.
    """
    cfg = dict(unet_config)
    downs = list(cfg["down_block_types"])
    ups = list(cfg["up_block_types"])
    n = len(downs)
    if len(ups) != n:
        raise ModelError("U-Net config: down and up block counts differ")
    chans = list(cfg["block_out_channels"])
    layers = _per_block(cfg.get("layers_per_block", 2), n)
    if cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        raise ModelError(f"U-Net config: mid_block_type {cfg.get('mid_block_type')!r} is not supported")

    m: dict = {}

    def resnet(d: str, l: str, cin: int, cout: int) -> None:
        m[d] = l
        for dc, lc in _RESNET_UNET.items():
            if dc == "conv_shortcut" and cin == cout:
                continue
            m[f"{d}.{dc}"] = f"{l}.{lc}"

    m["conv_in"] = "input_blocks.0.0"
    m["time_embedding.linear_1"] = "time_embed.0"
    m["time_embedding.linear_2"] = "time_embed.2"
    if cfg.get("addition_embed_type") == "text_time":
        m["add_embedding.linear_1"] = "label_emb.0.0"
        m["add_embedding.linear_2"] = "label_emb.0.2"
    elif cfg.get("addition_embed_type") or cfg.get("class_embed_type"):
        raise ModelError("U-Net config: class/addition embeddings other than SDXL's text_time are not supported")
    m["conv_norm_out"] = "out.0"
    m["conv_out"] = "out.2"

    idx = 1
    prev = chans[0]
    for i, kind in enumerate(downs):
        has_attn = kind.startswith("CrossAttn")
        for j in range(layers[i]):
            resnet(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{idx}.0", prev if j == 0 else chans[i], chans[i])
            if has_attn:
                m[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{idx}.1"
            idx += 1
        prev = chans[i]
        if i < n - 1:
            m[f"down_blocks.{i}.downsamplers.0"] = f"input_blocks.{idx}.0"
            m[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{idx}.0.op"
            idx += 1

    resnet("mid_block.resnets.0", "middle_block.0", chans[-1], chans[-1])
    m["mid_block.attentions.0"] = "middle_block.1"
    resnet("mid_block.resnets.1", "middle_block.2", chans[-1], chans[-1])

    rchans = chans[::-1]
    rlayers = layers[::-1]
    idx = 0
    prev_out = rchans[0]
    for i, kind in enumerate(ups):
        has_attn = kind.startswith("CrossAttn")
        out_c = rchans[i]
        in_c = rchans[min(i + 1, n - 1)]
        count = rlayers[i] + 1
        for j in range(count):
            skip = in_c if j == count - 1 else out_c
            res_in = prev_out if j == 0 else out_c
            resnet(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{idx}.0", res_in + skip, out_c)
            if has_attn:
                m[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{idx}.1"
            if j == count - 1 and i < n - 1:
                pos = 2 if has_attn else 1
                m[f"up_blocks.{i}.upsamplers.0"] = f"output_blocks.{idx}.{pos}"
                m[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{idx}.{pos}.conv"
            idx += 1
        prev_out = out_c
    return m


def vae_ldm_module_map(vae_config: Mapping) -> dict:
    """diffusers AutoencoderKL module path -> LDM VAE module path (without ``first_stage_model.``)."""
    n = len(vae_config["block_out_channels"])
    lpb = int(vae_config.get("layers_per_block", 2))
    m = {
        "encoder.conv_in": "encoder.conv_in",
        "encoder.conv_norm_out": "encoder.norm_out",
        "encoder.conv_out": "encoder.conv_out",
        "decoder.conv_in": "decoder.conv_in",
        "decoder.conv_norm_out": "decoder.norm_out",
        "decoder.conv_out": "decoder.conv_out",
        "quant_conv": "quant_conv",
        "post_quant_conv": "post_quant_conv",
    }

    def resnet(d: str, l: str) -> None:
        m[d] = l
        m[d + ".conv_shortcut"] = l + ".nin_shortcut"

    for part in ("encoder", "decoder"):
        resnet(f"{part}.mid_block.resnets.0", f"{part}.mid.block_1")
        resnet(f"{part}.mid_block.resnets.1", f"{part}.mid.block_2")
        a, b = f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1"
        m[a + ".group_norm"] = b + ".norm"
        for dq, lq in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            m[f"{a}.{dq}"] = f"{b}.{lq}"
    for i in range(n):
        for j in range(lpb):
            resnet(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}")
        if i < n - 1:
            m[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
        li = n - 1 - i
        for j in range(lpb + 1):
            resnet(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{li}.block.{j}")
        if i < n - 1:
            m[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{li}.upsample.conv"
    return m


def translate(key: str, module_map: Mapping) -> Optional[str]:
    """Rename ``key`` by the longest module-path prefix found in ``module_map`` (None if none)."""
    parts = key.split(".")
    for cut in range(len(parts), 0, -1):
        head = ".".join(parts[:cut])
        if head in module_map:
            new = module_map[head]
            rest = parts[cut:]
            return ".".join([new, *rest]) if rest else new
    return None


def _invert(module_map: Mapping) -> dict:
    inv = {v: k for k, v in module_map.items()}
    if len(inv) != len(module_map):
        raise AssertionError("module map is not one-to-one")
    return inv


def _is_vae_attn_proj(diffusers_key: str) -> bool:
    return ".mid_block.attentions.0.to_" in diffusers_key and diffusers_key.endswith(".weight")


def _raise_unconverted(what: str, keys: list, where: str) -> None:
    if keys:
        shown = ", ".join(sorted(keys)[:12])
        more = f" (and {len(keys) - 12} more)" if len(keys) > 12 else ""
        raise ModelError(f"{where or 'state dict'}: {len(keys)} {what} key(s) cannot be converted: {shown}{more}")


# ---------------------------------------------------------------- U-Net / VAE


def unet_to_ldm(unet_sd: Mapping, unet_config: Mapping, where: str = "") -> dict:
    mp = unet_ldm_module_map(unet_config)
    out, bad = {}, []
    for k, v in unet_sd.items():
        new = translate(k, mp)
        if new is None:
            bad.append(k)
        else:
            out[UNET_PREFIX + new] = v
    _raise_unconverted("U-Net", bad, where)
    return out


def unet_from_ldm(ldm_unet_sd: Mapping, unet_config: Mapping, where: str = "") -> dict:
    """``ldm_unet_sd`` keys without ``model.diffusion_model.``."""
    inv = _invert(unet_ldm_module_map(unet_config))
    out, bad = {}, []
    for k, v in ldm_unet_sd.items():
        new = translate(k, inv)
        if new is None:
            bad.append(UNET_PREFIX + k)
        else:
            out[new] = v
    _raise_unconverted("U-Net", bad, where)
    return out


def vae_to_ldm(vae_sd: Mapping, vae_config: Mapping, prefix: str = VAE_PREFIX, where: str = "") -> dict:
    mp = vae_ldm_module_map(vae_config)
    out, bad = {}, []
    for k, v in vae_sd.items():
        new = translate(k, mp)
        if new is None:
            bad.append(k)
            continue
        if _is_vae_attn_proj(k) and v.ndim == 2:
            v = v.reshape(*v.shape, 1, 1)
        out[prefix + new] = v
    _raise_unconverted("VAE", bad, where)
    return out


def vae_from_ldm(ldm_vae_sd: Mapping, vae_config: Mapping, where: str = "") -> dict:
    """``ldm_vae_sd`` keys without ``first_stage_model.``."""
    inv = _invert(vae_ldm_module_map(vae_config))
    out, bad = {}, []
    for k, v in ldm_vae_sd.items():
        new = translate(k, inv)
        if new is None:
            bad.append(k)
            continue
        if _is_vae_attn_proj(new) and v.ndim == 4:
            v = v.reshape(v.shape[0], v.shape[1])
        out[new] = v
    _raise_unconverted("VAE", bad, where)
    return out


def is_ldm_vae(sd: Mapping) -> bool:
    return any(k.startswith(("encoder.down.", "decoder.up.", "encoder.mid.", "first_stage_model.")) for k in sd)


# ---------------------------------------------------------------- text encoders


def canonical_te_keys(sd: Mapping) -> dict:
    """Normalise a CLIP text-model state dict to ``text_model.*`` (+ ``text_projection.weight``).

    transformers >= 5 drops the ``text_model.`` level inside ``CLIPTextModel``; the
    canonical form keeps it so files and maps do not depend on the installed version.
    """
    out = {}
    for k, v in sd.items():
        if k.startswith(("text_model.", "text_projection.")):
            out[k] = v
        else:
            out["text_model." + k] = v
    return out


def module_te_keys(canonical_sd: Mapping, module: torch.nn.Module) -> dict:
    """Rename canonical text-encoder keys to the installed module's own key names."""
    own = set(module.state_dict().keys())
    if any(k.startswith("text_model.") for k in own):
        return dict(canonical_sd)
    out = {}
    for k, v in canonical_sd.items():
        out[k[len("text_model."):] if k.startswith("text_model.") else k] = v
    return out


_OC_LAYER = {  # OpenCLIP resblock child -> transformers CLIPEncoderLayer child
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_HF_LAYER = {v: k for k, v in _OC_LAYER.items()}


def openclip_to_hf(oc_sd: Mapping, where: str = "", label: str = "") -> tuple[dict, dict]:
    """OpenCLIP text tower (keys without the checkpoint prefix) -> canonical HF keys.

    Returns (text-encoder state dict, extras) where extras keeps ``text_projection``
    and ``logit_scale`` (OpenCLIP names) when the HF module has no place for them.
    """
    out, extras, bad = {}, {}, []
    for k, v in oc_sd.items():
        if k == "token_embedding.weight":
            out["text_model.embeddings.token_embedding.weight"] = v
        elif k == "positional_embedding":
            out["text_model.embeddings.position_embedding.weight"] = v
        elif k.startswith("ln_final."):
            out["text_model.final_layer_norm." + k[len("ln_final."):]] = v
        elif k in ("text_projection", "logit_scale"):
            extras[k] = v
        elif k.startswith("transformer.resblocks."):
            rest = k[len("transformer.resblocks."):]
            num, _, tail = rest.partition(".")
            base = f"text_model.encoder.layers.{num}."
            if tail in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = "weight" if tail.endswith("weight") else "bias"
                q, kk, vv = (t.clone() for t in v.chunk(3, dim=0))
                out[base + f"self_attn.q_proj.{kind}"] = q
                out[base + f"self_attn.k_proj.{kind}"] = kk
                out[base + f"self_attn.v_proj.{kind}"] = vv
                continue
            mod, _, param = tail.rpartition(".")
            if mod in _OC_LAYER:
                out[base + f"{_OC_LAYER[mod]}.{param}"] = v
            else:
                bad.append(label + k)
        else:
            bad.append(label + k)
    _raise_unconverted("text-encoder", bad, where)
    return out, extras


def hf_to_openclip(hf_sd: Mapping, where: str = "") -> dict:
    """Canonical HF CLIP text keys -> OpenCLIP keys (q,k,v joined into ``in_proj``)."""
    sd = canonical_te_keys(hf_sd)
    out, bad, qkv = {}, [], {}
    for k, v in sd.items():
        if k.endswith(IGNORED_TE_SUFFIXES):
            continue
        if k == "text_model.embeddings.token_embedding.weight":
            out["token_embedding.weight"] = v
        elif k == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = v
        elif k.startswith("text_model.final_layer_norm."):
            out["ln_final." + k[len("text_model.final_layer_norm."):]] = v
        elif k == "text_projection.weight":
            out["text_projection"] = v.t().contiguous()
        elif k.startswith("text_model.encoder.layers."):
            rest = k[len("text_model.encoder.layers."):]
            num, _, tail = rest.partition(".")
            mod, _, param = tail.rpartition(".")
            if mod in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((num, param), {})[mod[-6]] = v
            elif mod in _HF_LAYER:
                out[f"transformer.resblocks.{num}.{_HF_LAYER[mod]}.{param}"] = v
            else:
                bad.append(k)
        else:
            bad.append(k)
    for (num, param), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            bad.append(f"text_model.encoder.layers.{num}.self_attn.*_proj.{param} (incomplete q/k/v)")
            continue
        out[f"transformer.resblocks.{num}.attn.in_proj_{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
    _raise_unconverted("text-encoder", bad, where)
    return out


# ---------------------------------------------------------------- whole checkpoints


def _te_layout(family: Family) -> list:
    """(LDM prefix, kind) per text encoder."""
    if family is Family.SD1:
        return [("cond_stage_model.transformer.", "hf")]
    if family is Family.SD2:
        return [("cond_stage_model.model.", "openclip")]
    return [("conditioner.embedders.0.transformer.", "hf"), ("conditioner.embedders.1.model.", "openclip")]


_HF_LEGACY = ("embeddings.", "encoder.", "final_layer_norm.")


def _ignored(key: str) -> bool:
    return key in IGNORED_LDM_KEYS or key.startswith(IGNORED_LDM_PREFIXES)


def ldm_to_diffusers(state_dict: Mapping, info: ModelInfo, configs: Optional[ModelConfigs] = None,
                     where: str = "") -> dict:
    """Split an LDM/SGM single-file state dict into diffusers/transformers state dicts.

    Returns ``{"unet": sd, "vae": sd, "text_encoders": [sd, ...], "extras": {ldm_key: tensor}}``.
    ``extras`` holds LDM tensors that have no place in the diffusers modules (SD2's
    OpenCLIP ``text_projection`` and ``logit_scale``, SDXL's ``logit_scale``) so that
    :func:`diffusers_to_ldm` can write them back. Any other key that is neither
    converted nor in :data:`IGNORED_LDM_KEYS` raises :class:`ModelError`.
    """
    cfgs = configs or configs_for(info.family)
    layout = _te_layout(info.family)
    unet_l, vae_l, te_l = {}, {}, [dict() for _ in layout]
    bad = []
    for k, v in state_dict.items():
        if k.startswith(UNET_PREFIX):
            unet_l[k[len(UNET_PREFIX):]] = v
        elif k.startswith(VAE_PREFIX):
            if not _ignored(k):
                vae_l[k[len(VAE_PREFIX):]] = v
        elif _ignored(k):
            continue
        else:
            for i, (prefix, _) in enumerate(layout):
                if k.startswith(prefix):
                    te_l[i][k[len(prefix):]] = v
                    break
            else:
                bad.append(k)
    _raise_unconverted("unrecognised", bad, where)

    tes, extras = [], {}
    for i, (prefix, kind) in enumerate(layout):
        if not te_l[i]:
            raise ModelError(f"{where or 'checkpoint'}: no text-encoder keys under {prefix!r}")
        if kind == "hf":
            # very old checkpoints (transformers < 4.18) lack the ``text_model.`` level
            te = {(k if k.startswith("text_model.") or not k.startswith(_HF_LEGACY) else "text_model." + k): v
                  for k, v in te_l[i].items()}
            te.pop("text_model.embeddings.position_ids", None)
            wrong = [prefix + k for k in te if not k.startswith("text_model.")]
            _raise_unconverted("text-encoder", wrong, where)
            tes.append(te)
        else:
            te, ex = openclip_to_hf(te_l[i], where, prefix)
            if cfgs.text_encoder_classes[i] == "CLIPTextModelWithProjection" and "text_projection" in ex:
                te["text_projection.weight"] = ex.pop("text_projection").t().contiguous()
            extras.update({prefix + name: t for name, t in ex.items()})
            tes.append(te)
    return {
        "unet": unet_from_ldm(unet_l, cfgs.unet, where),
        "vae": vae_from_ldm(vae_l, cfgs.vae, where),
        "text_encoders": tes,
        "extras": extras,
    }


def diffusers_to_ldm(unet_sd: Mapping, vae_sd: Mapping, te_sds: list, info: ModelInfo,
                     extras: Optional[Mapping] = None, configs: Optional[ModelConfigs] = None,
                     where: str = "") -> dict:
    """Join diffusers/transformers state dicts into one LDM/SGM single-file state dict."""
    cfgs = configs or configs_for(info.family)
    layout = _te_layout(info.family)
    if len(te_sds) != len(layout):
        raise ModelError(f"{info.family.value}: expected {len(layout)} text encoder(s), got {len(te_sds)}")
    out = unet_to_ldm(unet_sd, cfgs.unet, where)
    out.update(vae_to_ldm(vae_sd, cfgs.vae, where=where))
    for (prefix, kind), te in zip(layout, te_sds):
        te = canonical_te_keys(te)
        if kind == "hf":
            for k, v in te.items():
                if k.endswith(IGNORED_TE_SUFFIXES):
                    continue
                if k.startswith("text_projection."):
                    raise ModelError(f"{where or 'state dict'}: {k} has no place in an LDM CLIP-L text encoder")
                out[prefix + k] = v
        else:
            out.update({prefix + k: v for k, v in hf_to_openclip(te, where).items()})
    for k, v in (extras or {}).items():
        out[k] = v
    return out
