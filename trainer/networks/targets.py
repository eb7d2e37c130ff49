"""Which modules of the U-Net and text encoders get an adapter, and their kohya names.

U-Net targets (by class name, matched along the MRO):
  - lierla: Linear and 1×1 Conv2d inside every ``Transformer2DModel``
    (proj_in/proj_out, attn1/attn2 to_q/to_k/to_v/to_out.0, ff.net.0.proj, ff.net.2);
  - c3lier and loha: additionally every Linear/Conv2d inside ``ResnetBlock2D``
    (conv1, conv2, time_emb_proj, conv_shortcut), ``Downsample2D`` and ``Upsample2D``
    (their ``conv``).  k×k convs use the conv rank/alpha, 1×1 convs and Linears the
    linear rank/alpha.
Text-encoder targets (by structure, not class name, so ``CLIPAttention``,
``CLIPSdpaAttention``, … all qualify): in any module with Linear children
q_proj/k_proj/v_proj/out_proj, those four; in any module with Linear children
fc1/fc2, those two.

Names follow kohya exactly: ``lora_unet_`` + module path with "." → "_", where the
path is the diffusers path (key style "diffusers", SD1/SD2) or the SGM/LDM path
(key style "sgm", SDXL); text encoders ``lora_te_`` (one TE) or ``lora_te1_`` /
``lora_te2_`` (two), followed by the HF CLIP path normalised to start with
``text_model.`` whatever transformers version named the modules.

Block IDs (BASE, IN00–IN11, M00, OUT00–OUT11) come from the LDM path of a U-Net
module, obtained through a diffusers→LDM prefix map (``trainer.models.convert.
unet_ldm_module_map``); this module never encodes the conversion rules itself. Which IDs a model
has comes from the same map (``model_block_ids``: SDXL has IN00–IN08, M00, OUT00–OUT08), and
``select_blocks`` fits an SD1.5-style selection to it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence

import torch.nn as nn

__all__ = [
    "BLOCK_IDS", "ALGOS", "ELEMENTS", "KEY_STYLES", "Target",
    "unet_targets", "te_targets", "filter_targets", "te_prefixes",
    "to_ldm_path", "ldm_block_id", "normalise_blocks", "normalise_element", "default_ldm_map",
    "model_block_ids", "family_block_ids", "select_blocks",
]

BLOCK_IDS: tuple = (
    ("BASE",)
    + tuple(f"IN{i:02d}" for i in range(12))
    + ("M00",)
    + tuple(f"OUT{i:02d}" for i in range(12))
)
ALGOS = ("lierla", "c3lier", "loha")
ELEMENTS = ("Full", "CrossAttention", "SelfAttention")
KEY_STYLES = ("diffusers", "sgm")

UNET_TRANSFORMER_CLASSES = ("Transformer2DModel",)
UNET_CONV_CLASSES = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TE_ATTN_CHILDREN = ("q_proj", "k_proj", "v_proj", "out_proj")
TE_MLP_CHILDREN = ("fc1", "fc2")

UNET_PREFIX = "lora_unet"


@dataclass(frozen=True)
class Target:
    name: str                 # kohya module name, e.g. lora_unet_down_blocks_0_attentions_0_proj_in
    module: nn.Module         # the Linear / Conv2d to wrap
    path: str                 # path inside its model (as named_modules() says)
    part: str                 # "unet" or "te"
    block: Optional[str]      # block ID; "BASE" for text encoders; None if unknown
    conv_kxk: bool            # a conv with a kernel larger than 1×1 (uses conv rank/alpha)
    te_index: int = 0         # which text encoder (part == "te")


def _has_class(module: nn.Module, names: Sequence[str]) -> bool:
    return any(c.__name__ in names for c in type(module).__mro__)


def _is_kxk(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1)


def normalise_algo(algo: str) -> str:
    a = str(algo).strip().lower()
    if a not in ALGOS:
        raise ValueError(f"network_type: unknown algorithm {algo!r}; choose one of {', '.join(ALGOS)}")
    return a


def normalise_element(element: Optional[str]) -> str:
    if element is None or str(element).strip() == "":
        return "Full"
    for e in ELEMENTS:
        if str(element).strip().lower() == e.lower():
            return e
    raise ValueError(f"network_element: unknown value {element!r}; choose one of {', '.join(ELEMENTS)}")


def normalise_blocks(blocks: Optional[Iterable[str]]) -> Optional[frozenset]:
    """None (or every ID) means "all blocks"; otherwise a validated set of IDs."""
    if blocks is None:
        return None
    if isinstance(blocks, str):
        blocks = [b for b in re.split(r"[,\s]+", blocks) if b]
    out = set()
    for b in blocks:
        u = str(b).strip().upper()
        if u not in BLOCK_IDS:
            raise ValueError(f"network_blocks: unknown block {b!r}; valid: BASE, IN00–IN11, M00, OUT00–OUT11")
        out.add(u)
    if out >= set(BLOCK_IDS):
        return None
    return frozenset(out)


def te_prefixes(n_text_encoders: int) -> list:
    if n_text_encoders <= 0:
        return []
    if n_text_encoders == 1:
        return ["lora_te"]
    return [f"lora_te{i + 1}" for i in range(n_text_encoders)]


# -- LDM paths and block IDs ---------------------------------------------------------

_BLOCK_RE = re.compile(r"(?:^|\.)(input_blocks|output_blocks)\.(\d+)(?:\.|$)|(?:^|\.)(middle_block)(?:\.|$)")


def to_ldm_path(path: str, ldm_map: Mapping[str, str]) -> Optional[str]:
    """Translate a diffusers module path by its longest mapped prefix (at a "." boundary)."""
    parts = path.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in ldm_map:
            rest = ".".join(parts[n:])
            return ldm_map[prefix] + ("." + rest if rest else "")
    return None


def ldm_block_id(ldm_path: Optional[str]) -> Optional[str]:
    """``input_blocks.N`` → INnn, ``middle_block`` → M00, ``output_blocks.N`` → OUTnn, else None."""
    if not ldm_path:
        return None
    m = _BLOCK_RE.search(ldm_path)
    if not m:
        return None
    if m.group(3):
        return "M00"
    kind, n = m.group(1), int(m.group(2))
    return f"IN{n:02d}" if kind == "input_blocks" else f"OUT{n:02d}"


def default_ldm_map(unet: nn.Module) -> Mapping[str, str]:
    """The project's diffusers→LDM prefix map for this U-Net (trainer.models.convert)."""
    try:
        from trainer.models.convert import unet_ldm_module_map  # type: ignore
    except ImportError as e:  # pragma: no cover - depends on the models layer
        raise RuntimeError(
            "block selection / SGM key names need trainer.models.convert.unet_ldm_module_map, "
            f"which could not be imported ({e}); pass ldm_map= explicitly"
        ) from e
    return unet_ldm_module_map(unet.config)


# -- the blocks a model has ------------------------------------------------------------

_UNET_IDS = tuple(b for b in BLOCK_IDS if b != "BASE")


def model_block_ids(ldm_map: Mapping[str, str]) -> tuple:
    """The block IDs a U-Net has (BASE first, then in BLOCK_IDS order), read from its diffusers→LDM
    module map, i.e. from the family's own U-Net layout: SD1/SD2 IN00–IN11, M00, OUT00–OUT11; SDXL
    IN00–IN08, M00, OUT00–OUT08 (3 levels of 3 input and 3 output blocks)."""
    have = {ldm_block_id(v) for v in ldm_map.values()}
    return ("BASE",) + tuple(b for b in _UNET_IDS if b in have)


def family_block_ids(family) -> tuple:
    """The block IDs of a family (trainer.models.families.Family or its value), from its bundled U-Net
    config, before any weights are loaded (for block lists shown ahead of training)."""
    from trainer.models.configs import configs_for  # type: ignore
    from trainer.models.convert import unet_ldm_module_map  # type: ignore

    return model_block_ids(unet_ldm_module_map(configs_for(family).unet))


def _span(ids: Sequence[str]) -> str:
    """IN00, IN01, IN02, OUT05 -> "IN00–IN02, OUT05" (runs of consecutive numbers of one kind)."""
    out, run = [], []
    for b in ids:
        if run and b[:-2] == run[-1][:-2] and b[-2:].isdigit() and int(b[-2:]) == int(run[-1][-2:]) + 1:
            run.append(b)
            continue
        if run:
            out.append(run[0] if len(run) == 1 else f"{run[0]}–{run[-1]}")
        run = [b]
    if run:
        out.append(run[0] if len(run) == 1 else f"{run[0]}–{run[-1]}")
    return ", ".join(out)


def select_blocks(blocks: Optional[frozenset], available: Sequence[str], warn=None) -> Optional[frozenset]:
    """Fit a selection of block IDs (normalised, None = all) to a model that has ``available``.

    Block numbers mean the model's own blocks, as they did in the original (its SD1-style IDs named
    SDXL's blocks by SDXL's own numbers, IN00–IN08 / OUT00–OUT08, as in the Web-UI's LoRA Block Weight
    for SDXL), so a selection keeps selecting the modules it selected there. Two rules on top:
    - the full SD1.5-style U-Net list (IN00–IN11, M00, OUT00–OUT11, what every shipped preset holds)
      means every U-Net block of any family: no warning;
    - otherwise IDs the model lacks select nothing: one ``warn`` line names them and the model's blocks.
    """
    if blocks is None:
        return None
    unet = [b for b in _UNET_IDS if b in blocks]
    if set(unet) == set(_UNET_IDS):
        return blocks
    missing = [b for b in unet if b not in available]
    if missing and warn is not None:
        warn(f"network_blocks: this model has no block {', '.join(missing)}; they select nothing. "
             f"Its blocks: {_span([b for b in BLOCK_IDS if b in available])}")
    return blocks


# -- candidate enumeration -------------------------------------------------------------

def _unet_candidates(unet: nn.Module, include_conv: bool) -> list:
    parents = UNET_TRANSFORMER_CLASSES + (UNET_CONV_CLASSES if include_conv else ())
    found = {}
    for pname, parent in unet.named_modules():
        if not _has_class(parent, parents):
            continue
        for cname, child in parent.named_modules():
            if not isinstance(child, (nn.Linear, nn.Conv2d)):
                continue
            if not include_conv and _is_kxk(child):
                continue
            path = f"{pname}.{cname}" if pname else cname
            found.setdefault(path, child)
    return list(found.items())


_RESNET_LEAVES = ("conv1", "conv2", "time_emb_proj", "conv_shortcut")


def unet_targets(
    unet: nn.Module,
    *,
    algo: str = "lierla",
    key_style: str = "diffusers",
    ldm_map: Optional[Mapping[str, str]] = None,
) -> list:
    """Every U-Net module the algorithm could wrap (no block/element filtering)."""
    algo = normalise_algo(algo)
    if key_style not in KEY_STYLES:
        raise ValueError(f"unet_key_style must be one of {KEY_STYLES}, got {key_style!r}")
    if key_style == "sgm" and ldm_map is None:
        raise ValueError("unet_key_style='sgm' needs the diffusers→SGM module map (ldm_map)")
    include_conv = algo in ("c3lier", "loha")
    targets = []
    for path, mod in _unet_candidates(unet, include_conv):
        ldm = to_ldm_path(path, ldm_map) if ldm_map is not None else None
        if key_style == "sgm":
            if ldm is None:
                raise ValueError(f"no SGM name for U-Net module {path!r} in the module map")
            if ".resnets." in path and ldm.rsplit(".", 1)[-1] in _RESNET_LEAVES:
                raise ValueError(
                    f"the module map translates {path!r} to {ldm!r}: it lacks the ResNet leaf names "
                    "(in_layers.2, out_layers.3, emb_layers.1, skip_connection) SGM keys need"
                )
            name = f"{UNET_PREFIX}_{ldm.replace('.', '_')}"
        else:
            name = f"{UNET_PREFIX}_{path.replace('.', '_')}"
        targets.append(Target(name, mod, path, "unet", ldm_block_id(ldm), _is_kxk(mod)))
    return targets


def _te_path(path: str) -> str:
    """Normalise a CLIP text-model path so it starts with ``text_model.`` (transformers ≥ 5.6
    drops that level in CLIPTextModel; older versions and CLIPTextModelWithProjection keep it)."""
    i = path.find("encoder.layers.")
    if i < 0:
        return path
    return "text_model." + path[i:]


_TE_LAYER_RE = re.compile(r"encoder\.layers\.(\d+)\.")


def te_targets(text_encoders: Sequence[nn.Module], layer_limits: Optional[Sequence[Optional[int]]] = None) -> list:
    """Every text-encoder module that gets an adapter (attention q/k/v/out_proj, MLP fc1/fc2).

    ``layer_limits``: per encoder, only layers with an index below the limit (None: all). SD2 uses
    it: the last of OpenCLIP-H's 24 layers never reaches the conditioning, and kohya and diffusers
    build SD2's text encoder with 23 layers, so an adapter there would be a key no loader consumes."""
    targets = []
    prefixes = te_prefixes(len(text_encoders))
    limits = list(layer_limits or [])
    for ti, (te, prefix) in enumerate(zip(text_encoders, prefixes)):
        limit = limits[ti] if ti < len(limits) else None
        found = {}
        for pname, parent in te.named_modules():
            children = dict(parent.named_children())
            for group in (TE_ATTN_CHILDREN, TE_MLP_CHILDREN):
                if all(isinstance(children.get(c), nn.Linear) for c in group):
                    for c in group:
                        path = f"{pname}.{c}" if pname else c
                        found.setdefault(path, children[c])
        for path, mod in found.items():
            m = _TE_LAYER_RE.search(path)
            if limit is not None and m and int(m.group(1)) >= limit:
                continue
            name = f"{prefix}_{_te_path(path).replace('.', '_')}"
            targets.append(Target(name, mod, path, "te", "BASE", False, ti))
    return targets


def filter_targets(targets: Sequence[Target], *, blocks=None, element: Optional[str] = "Full") -> list:
    """Keep U-Net targets whose block is selected and whose name fits the element.

    ``blocks``: None = all; otherwise a set of IDs (``BASE`` concerns text encoders
    only, which the caller handles).  A U-Net target with no known block is kept
    only when all blocks are selected.
    ``element``: Full keeps all; CrossAttention keeps paths containing ``attn2``,
    SelfAttention those containing ``attn1`` (U-Net and text encoder alike, so
    Self/Cross leave no text-encoder module, as in the original).
    """
    blocks = normalise_blocks(blocks) if not isinstance(blocks, frozenset) else blocks
    element = normalise_element(element)
    out = []
    for t in targets:
        if element == "CrossAttention" and "attn2" not in t.path:
            continue
        if element == "SelfAttention" and "attn1" not in t.path:
            continue
        if t.part == "unet" and blocks is not None and (t.block is None or t.block not in blocks):
            continue
        out.append(t)
    return out
