"""Reading checkpoints safely and turning them into ready-to-use modules."""
from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Union

import torch

from ..atomic import atomic_write
from .configs import ConfigError, ModelConfigs, build_models, check_configs, check_section, configs_for
from .convert import (
    VAE_PREFIX,
    canonical_te_keys,
    diffusers_to_ldm,
    is_ldm_vae,
    ldm_to_diffusers,
    module_te_keys,
    vae_from_ldm,
)
from .errors import ModelError
from .families import DIFFUSERS_PROBE_KEY, LDM_PROBE_KEY, Family, ModelInfo, detect, family_from_context_width
from .tokenizer import clip_tokenizer

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# safetensors metadata written by save_ldm_checkpoint
META_CONFIGS = "traintrain.configs"
META_NAME = "traintrain.name"
META_V_PRED = "traintrain.v_pred"


@dataclass
class Components:
    """The frozen model parts a training run works with (all in eval mode, no grad).

    ``text_encoders`` / ``tokenizers``: one for SD1/SD2, two for SDXL (CLIP-L, OpenCLIP-bigG).
    Latents: ``vae.encode(x).latent_dist.sample() * scaling_factor`` with x in [-1, 1].
    ``extras``: LDM tensors kept only to write the checkpoint back (SD2 ``text_projection``).
    """

    info: ModelInfo
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list
    tokenizers: list
    scaling_factor: float
    name: str
    configs: Optional[ModelConfigs] = None
    extras: dict = field(default_factory=dict)

    @property
    def family(self) -> Family:
        return self.info.family

    def modules(self) -> list:
        return [self.unet, self.vae, *self.text_encoders]


# ---------------------------------------------------------------- reading files


def read_safetensors_metadata(path: Union[str, Path]) -> dict:
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - reported with the file name
        raise ModelError(f"{path}: not a readable safetensors file ({e})") from e


def read_state_dict(path: Union[str, Path]) -> dict:
    """Tensors of a ``.safetensors`` file, or of a ``.ckpt/.pt/.pth/.bin`` read with
    ``torch.load(weights_only=True)`` (a nested ``state_dict`` is unwrapped). A pickle
    that wants to run code is refused with :class:`ModelError`; nothing is executed."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001
            raise ModelError(f"{path}: not a readable safetensors file ({e})") from e
    if suffix not in PICKLE_SUFFIXES:
        raise ModelError(f"{path}: unsupported file type {suffix!r} (use .safetensors, .ckpt, .pt, .pth or .bin)")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ModelError(
            f"{path}: refused to load: the pickle contains objects other than tensors "
            f"(it may try to run code). Convert it to .safetensors with a tool you trust. Detail: {e}"
        ) from e
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from e
    while isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelError(f"{path}: checkpoint holds a {type(obj).__name__}, not a dict of tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ModelError(f"{path}: no tensors found")
    return tensors


# ---------------------------------------------------------------- loading into modules


def _cast(sd: Mapping, dtype: torch.dtype) -> dict:
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}


def load_into(module: torch.nn.Module, sd: Mapping, what: str, dtype: Optional[torch.dtype] = None) -> None:
    """Strictly load ``sd`` into ``module`` (built on meta or CPU) with ``assign=True``.

    Missing, unexpected or wrongly shaped keys raise :class:`ModelError` naming them.
    Non-persistent buffers left on the meta device (``position_ids``) are recreated.
    """
    sd = dict(sd)
    if dtype is not None:
        sd = _cast(sd, dtype)
    own = module.state_dict()
    for k in own:
        if k.endswith("embeddings.position_ids") and k not in sd:
            sd[k] = torch.arange(own[k].shape[-1]).expand(1, -1).clone()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))

    def show(keys):
        return ", ".join(keys[:10]) + (f" (and {len(keys) - 10} more)" if len(keys) > 10 else "")

    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {show(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {show(unexpected)}")
    if wrong:
        problems.append("shape mismatch: " + show([f"{k} {tuple(sd[k].shape)} != {tuple(own[k].shape)}" for k in wrong]))
    if problems:
        raise ModelError(f"{what}: " + "; ".join(problems))
    module.load_state_dict(sd, strict=True, assign=True)
    for name, buf in list(module.named_buffers()):
        if buf.is_meta:
            if name.endswith("position_ids"):
                owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
                owner.register_buffer(name.rsplit(".", 1)[-1], torch.arange(buf.shape[-1]).expand(1, -1).clone(),
                                      persistent=False)
            else:
                raise ModelError(f"{what}: buffer {name} was not initialised")
    for name, p in module.named_parameters():
        if p.is_meta:
            raise ModelError(f"{what}: parameter {name} was not loaded")
    module.requires_grad_(False)
    module.eval()


def components_from_state_dicts(converted: Mapping, info: ModelInfo, configs: ModelConfigs,
                                dtype: torch.dtype = torch.float32, name: str = "", where: str = "") -> Components:
    """Build modules on meta and load the converted state dicts (from :func:`ldm_to_diffusers`)."""
    unet, vae, tes = build_models(configs, device="meta", dtype=dtype)
    load_into(unet, converted["unet"], f"{where} U-Net", dtype)
    load_into(vae, converted["vae"], f"{where} VAE", dtype)
    for i, (te, sd) in enumerate(zip(tes, converted["text_encoders"])):
        load_into(te, module_te_keys(sd, te), f"{where} text encoder {i + 1}", dtype)
    return Components(
        info=info, unet=unet, vae=vae, text_encoders=tes,
        tokenizers=[clip_tokenizer(p) for p in configs.pad_tokens],
        scaling_factor=configs.scaling_factor, name=name, configs=configs,
        extras=dict(converted.get("extras") or {}),
    )


def load_vae_file(path: Union[str, Path], vae: torch.nn.Module, vae_config: Mapping,
                  dtype: torch.dtype = torch.float32) -> None:
    """Replace ``vae``'s weights with a separate VAE file (LDM keys with or without
    ``first_stage_model.``, or diffusers keys), strictly."""
    sd = read_state_dict(path)
    if any(k.startswith(VAE_PREFIX) for k in sd):
        sd = {k[len(VAE_PREFIX):]: v for k, v in sd.items() if k.startswith(VAE_PREFIX)}
    sd = {k: v for k, v in sd.items() if not k.startswith(("loss.", "model_ema."))}
    if is_ldm_vae(sd):
        sd = vae_from_ldm(sd, vae_config, where=str(path))
    load_into(vae, sd, f"VAE file {path}", dtype)


_YAML_V = re.compile(r"""^\s*parameterization\s*:\s*["']?(v|eps)["']?\s*(?:#.*)?$""", re.MULTILINE)
_TRUE = ("true", "1", "yes")


def prediction_hints(path: Path, meta: Mapping, keys) -> tuple:
    """What a single-file checkpoint says about its prediction type: ``(v_pred or None, zero_terminal_snr)``.

    SD2 768-v and 512-base have the same keys, so this reads, in order: our own save metadata
    (``traintrain.v_pred``), ``modelspec.prediction_type`` ("v" / "epsilon"), kohya's
    ``ss_v_parameterization``, a companion ``<name>.yaml`` next to the file with
    ``parameterization: "v"`` (as the Web-UI does), and a ``v_pred`` marker key. None: nothing said.
    Zero terminal SNR: a ``ztsnr`` marker key or ``ss_zero_terminal_snr`` metadata."""
    v_pred = None
    if meta.get(META_V_PRED) in ("true", "false"):
        v_pred = meta[META_V_PRED] == "true"
    elif str(meta.get("modelspec.prediction_type", "")).strip().lower() in ("v", "v_prediction", "v-prediction"):
        v_pred = True
    elif str(meta.get("modelspec.prediction_type", "")).strip().lower() in ("epsilon", "eps"):
        v_pred = False
    elif "ss_v_parameterization" in meta:
        v_pred = str(meta["ss_v_parameterization"]).strip().lower() in _TRUE
    else:
        for yaml_path in (path.with_suffix(".yaml"), path.with_suffix(".yml")):
            if yaml_path.is_file():
                try:
                    m = _YAML_V.search(yaml_path.read_text(encoding="utf-8", errors="replace"))
                except OSError:
                    m = None
                if m:
                    v_pred = m.group(1) == "v"
                    break
        if v_pred is None and "v_pred" in keys:
            v_pred = True
    ztsnr = "ztsnr" in keys or str(meta.get("ss_zero_terminal_snr", "")).strip().lower() in _TRUE
    return v_pred, ztsnr


def _is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and (path / "unet").is_dir() and (path / "vae").is_dir()


def _configs_from_metadata(meta: Mapping, path: Path) -> Optional[ModelConfigs]:
    raw = meta.get(META_CONFIGS)
    if not raw:
        return None
    try:
        d = json.loads(raw)
    except ValueError as e:
        raise ModelError(f"{path}: invalid {META_CONFIGS} metadata ({e})") from e
    try:  # allow-listed keys and classes, every value bounded: the file decides nothing else
        return check_configs(d, f"{path}: {META_CONFIGS}")
    except ConfigError as e:
        raise ModelError(str(e)) from None


def _folder_family(path: Path, unet_cfg: Mapping) -> Family:
    width = unet_cfg.get("cross_attention_dim", 0)
    try:
        return family_from_context_width(width, str(path))
    except ModelError:
        pass
    # non-standard widths (small test models): decide from the structure
    if unet_cfg.get("addition_embed_type") == "text_time" and (path / "text_encoder_2").is_dir():
        return Family.SDXL
    te_cfg = path / "text_encoder" / "config.json"
    if te_cfg.is_file() and unet_cfg.get("down_block_types") == configs_for(Family.SD1).unet["down_block_types"]:
        act = json.loads(te_cfg.read_text()).get("hidden_act")
        return Family.SD2 if act == "gelu" else Family.SD1
    return family_from_context_width(width, str(path))  # raises with the message


def _check_folder_configs(path: Path, unet_cfg) -> None:
    """A folder's config.json files are bounded as a file's metadata is (keys are diffusers' own to check)."""
    parts = [("unet", "unet", unet_cfg)]
    for section, sub in (("vae", "vae"), ("text_encoders[0]", "text_encoder"), ("text_encoders[1]", "text_encoder_2")):
        f = path / sub / "config.json"
        if f.is_file():
            try:
                parts.append((section, sub, json.loads(f.read_text())))
            except ValueError as e:
                raise ModelError(f"{f}: not a JSON config ({e})") from e
    for section, sub, cfg in parts:
        try:
            check_section(section, cfg, str(path / sub / "config.json"), strict=False)
        except ConfigError as e:
            raise ModelError(str(e)) from None


def _load_diffusers_folder(path: Path, v_pred: Optional[bool], dtype: torch.dtype) -> Components:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    import transformers

    unet_cfg_file = path / "unet" / "config.json"
    if not unet_cfg_file.is_file():
        raise ModelError(f"{path}: diffusers folder without unet/config.json")
    unet_cfg = json.loads(unet_cfg_file.read_text())
    _check_folder_configs(path, unet_cfg)
    family = _folder_family(path, unet_cfg)
    sched = path / "scheduler" / "scheduler_config.json"
    sched_cfg = json.loads(sched.read_text()) if sched.is_file() else {}
    if v_pred is None:
        v_pred = sched_cfg.get("prediction_type") == "v_prediction"
    info = ModelInfo(family, bool(v_pred), bool(sched_cfg.get("rescale_betas_zero_snr", False)))
    base = configs_for(family)
    kw = dict(local_files_only=True, torch_dtype=dtype)
    try:
        unet = UNet2DConditionModel.from_pretrained(str(path), subfolder="unet", **kw)
        vae = AutoencoderKL.from_pretrained(str(path), subfolder="vae", **kw)
        tes = []
        for i, cls_name in enumerate(base.text_encoder_classes):
            sub = "text_encoder" if i == 0 else "text_encoder_2"
            tes.append(getattr(transformers, cls_name).from_pretrained(str(path), subfolder=sub, **kw))
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: cannot load diffusers folder ({e})") from e
    for m in (unet, vae, *tes):
        m.requires_grad_(False)
        m.eval()
    def plain(d: Mapping) -> dict:
        return {k: v for k, v in dict(d).items() if not k.startswith("_") and k != "transformers_version"}

    cfgs = ModelConfigs(
        name=path.name, family=family, unet=plain(unet.config), vae=plain(vae.config),
        text_encoders=tuple(plain(te.config.to_diff_dict()) for te in tes),
        text_encoder_classes=base.text_encoder_classes, pad_tokens=base.pad_tokens,
        scaling_factor=float(vae.config.get("scaling_factor") or base.scaling_factor),
    )
    return Components(
        info=info, unet=unet, vae=vae, text_encoders=tes,
        tokenizers=[clip_tokenizer(p) for p in base.pad_tokens],
        scaling_factor=cfgs.scaling_factor, name=path.name, configs=cfgs,
    )


def load_components(path: Union[str, Path, None] = None, vae_path: Union[str, Path, None] = None,
                    v_pred: Optional[bool] = None, dtype: torch.dtype = torch.float32) -> Components:
    """Load a model: a single-file LDM/SGM checkpoint, a diffusers folder, or (``path=None``)
    the embedded tiny model. ``vae_path`` replaces the VAE (strictly). ``v_pred`` overrides
    what the files say (SD2 768-v cannot be told from its weights)."""
    if path is None:
        from .tiny import tiny_components

        comps = tiny_components()
        if dtype != torch.float32:
            for m in comps.modules():
                torch.nn.Module.to(m, dtype=dtype)
        if v_pred is not None:
            comps.info = ModelInfo(comps.info.family, bool(v_pred), comps.info.zero_terminal_snr)
    else:
        p = Path(path)
        if p.is_dir():
            if not _is_diffusers_folder(p):
                raise ModelError(f"{p}: folder is not a diffusers model (needs unet/ and vae/ subfolders)")
            comps = _load_diffusers_folder(p, v_pred, dtype)
        else:
            sd = read_state_dict(p)
            meta = read_safetensors_metadata(p)
            cfgs = _configs_from_metadata(meta, p)
            hint, ztsnr = prediction_hints(p, meta, sd)
            if v_pred is None:
                v_pred = hint
            if cfgs is not None:
                info = ModelInfo(cfgs.family, bool(v_pred), ztsnr)
            else:
                info = detect(sd, v_pred, where=str(p))
                info = ModelInfo(info.family, info.v_pred, ztsnr)
                cfgs = configs_for(info.family)
            converted = ldm_to_diffusers(sd, info, cfgs, where=str(p))
            del sd
            comps = components_from_state_dicts(converted, info, cfgs, dtype, meta.get(META_NAME) or p.stem, str(p))
    if vae_path is not None:
        load_vae_file(vae_path, comps.vae, comps.configs.vae if comps.configs else configs_for(comps.family).vae, dtype)
    return comps


def checkpoint_state_dict(components: Components) -> dict:
    """The LDM/SGM single-file state dict of ``components``."""
    cfgs = components.configs or configs_for(components.family)
    return diffusers_to_ldm(
        components.unet.state_dict(), components.vae.state_dict(),
        [canonical_te_keys(te.state_dict()) for te in components.text_encoders],
        components.info, extras=components.extras, configs=cfgs,
    )


def save_ldm_checkpoint(components: Components, path: Union[str, Path]) -> Path:
    """Write ``components`` as one LDM/SGM ``.safetensors`` file (atomically).

    The architecture configs go into the metadata, so models with non-standard sizes
    (the tiny model) load back without detection."""
    from safetensors.torch import save_file

    path = Path(path)
    cfgs = components.configs or configs_for(components.family)
    sd = {k: v.detach().contiguous() for k, v in checkpoint_state_dict(components).items()}
    meta = {
        META_NAME: components.name,
        META_V_PRED: "true" if components.info.v_pred else "false",
        META_CONFIGS: json.dumps({
            "name": cfgs.name, "family": cfgs.family.value, "unet": cfgs.unet, "vae": cfgs.vae,
            "text_encoders": list(cfgs.text_encoders), "text_encoder_classes": list(cfgs.text_encoder_classes),
            "pad_tokens": list(cfgs.pad_tokens), "scaling_factor": cfgs.scaling_factor,
        }, default=list),
    }
    return atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=meta))


def peek_family(path: Union[str, Path]) -> Optional[Family]:
    """The family of a ``.safetensors`` checkpoint or a diffusers folder from its header and config files only
    (no tensor is read), for lists shown before a model loads (the tab's block list). None when that cannot be
    told cheaply: a pickle checkpoint (reading it means reading it whole), an unreadable or foreign file."""
    p = Path(path)
    try:
        if p.is_dir():
            unet_cfg = p / "unet" / "config.json"
            return _folder_family(p, json.loads(unet_cfg.read_text(encoding="utf-8"))) if unet_cfg.is_file() else None
        if p.suffix.lower() != ".safetensors" or not p.is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_CONFIGS)
            if raw:  # our own saves (models of non-standard sizes): the family is written down
                return Family(json.loads(raw)["family"])
            keys = set(f.keys())
            for key in (LDM_PROBE_KEY, DIFFUSERS_PROBE_KEY, "unet." + DIFFUSERS_PROBE_KEY):
                if key in keys:  # the same probe as detect(): the cross-attention K width, from the header
                    return family_from_context_width(f.get_slice(key).get_shape()[1], str(p))
    except Exception:  # noqa: BLE001 - a list shown ahead of training never fails the tab; loading says why
        return None
    return None
