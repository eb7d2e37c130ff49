"""A set of adapters over one U-Net and its text encoders, with kohya-format I/O."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from .modules import ALGO_MODULES, AdapterModule, LoHaModule, LoRAModule, loha_shapes, lora_shapes, resolve_alpha
from .targets import (
    KEY_STYLES,
    Target,
    default_ldm_map,
    filter_targets,
    model_block_ids,
    normalise_algo,
    normalise_blocks,
    normalise_element,
    select_blocks,
    te_targets,
    unet_targets,
)

__all__ = ["Network", "LoadResult"]


def _untucker_loha(name: str, subs: Mapping[str, torch.Tensor]) -> dict:
    """LyCORIS's Tucker LoHa (what LoHa conv layers of the original TrainTrain are, ``use_tucker``):
    ``W_i[o, c, kh, kw] = Σ_ab t_i[a, b, kh, kw] · w_ia[a, o] · w_ib[b, c]`` with ``w_ia`` [rank, out],
    ``w_ib`` [rank, in].  The same ΔW in our flat form: ``w_ia.T`` @ (t_i contracted with ``w_ib``,
    flattened to [rank, in·kh·kw]), so a Tucker file resumes with the same effect."""
    out = dict(subs)
    for i in ("1", "2"):
        t = subs.get(f"hada_t{i}")
        if t is None:
            raise ValueError(f"{name}: hada_t1 and hada_t2 come together (Tucker LoHa), the file has only one")
        wa, wb = subs[f"hada_w{i}_a"].float(), subs[f"hada_w{i}_b"].float()
        if t.dim() != 4 or wa.dim() != 2 or wb.dim() != 2 or t.shape[0] != wa.shape[0] or t.shape[1] != wb.shape[0]:
            raise ValueError(f"{name}: Tucker LoHa tensors of shapes {tuple(t.shape)}, {tuple(wa.shape)}, "
                             f"{tuple(wb.shape)} do not fit together")
        core = torch.einsum("abhw,bc->achw", t.float(), wb)
        out[f"hada_w{i}_a"] = wa.t().contiguous()
        out[f"hada_w{i}_b"] = core.reshape(core.shape[0], -1).contiguous()
        del out[f"hada_t{i}"]
    return out

_LORA_SUBKEYS = ("lora_down.weight", "lora_up.weight")
_LOHA_SUBKEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
_SGM_UNET_PREFIXES = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")


@dataclass
class LoadResult:
    loaded: list = field(default_factory=list)    # module names filled from the file
    created: list = field(default_factory=list)   # of those, modules (re)built with the file's rank/algo
    missing: list = field(default_factory=list)   # modules of this network the file had no tensors for
    skipped: dict = field(default_factory=dict)   # part ("te" / "unet") -> file module names not loaded

    def skipped_line(self, what: str) -> str:
        """One line saying what of the file was not loaded (empty when nothing was skipped)."""
        parts = {"te": "text-encoder", "unet": "U-Net"}
        said = [f"{len(v)} {parts.get(k, k)} module(s)" for k, v in sorted(self.skipped.items()) if v]
        return f"{what}: skipped {', '.join(said)} of the file (this pass does not train them)" if said else ""


class _Undo:
    """Returned by apply() / multiplier(): the action is already done; as a context
    manager it is undone on exit."""

    def __init__(self, undo):
        self._undo = undo

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._undo()
        return False


def _as_list(text_encoders) -> list:
    if text_encoders is None:
        return []
    if isinstance(text_encoders, nn.Module):
        return [text_encoders]
    return [t for t in text_encoders if t is not None]


class Network(nn.Module):
    """Adapters registered under their kohya names, so ``state_dict()`` keys are
    ``<lora_name>.lora_down.weight`` etc.  The wrapped models are referenced, never
    registered as submodules."""

    def __init__(
        self,
        unet: nn.Module,
        text_encoders: Sequence[nn.Module] = (),
        *,
        unet_key_style: str = "diffusers",
        ldm_map: Optional[Mapping[str, str]] = None,
        dtype: torch.dtype = torch.float32,
        algo: str = "lierla",
        rank: int = 0,
        alpha: float = 0,
        conv_rank: int = 0,
        conv_alpha: float = 0,
    ):
        super().__init__()
        if unet_key_style not in KEY_STYLES:
            raise ValueError(f"unet_key_style must be one of {KEY_STYLES}, got {unet_key_style!r}")
        self._models = (unet, tuple(_as_list(text_encoders)))
        self.unet_key_style = unet_key_style
        self._ldm_map = ldm_map
        self.dtype = dtype
        self.algo = algo
        self.rank, self.alpha = rank, alpha
        self.conv_rank, self.conv_alpha = conv_rank, conv_alpha
        self._parts: dict = {}          # adapter name -> "unet" | "te"
        self._applied = False
        self._multiplier = (1.0, 1.0)   # (unet, te)
        self.metadata: dict = {}

    # -- construction ------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        unet: nn.Module,
        text_encoders: Sequence[nn.Module] = (),
        *,
        algo: str = "lierla",
        rank: int = 16,
        alpha: Optional[float] = 8,
        conv_rank: int = 0,
        conv_alpha: Optional[float] = 0,
        blocks: Optional[Iterable[str]] = None,
        element: Optional[str] = "Full",
        unet_key_style: str = "diffusers",
        train_text_encoder: bool = False,
        dtype: torch.dtype = torch.float32,
        ldm_map: Optional[Mapping[str, str]] = None,
        multiplier: float = 1.0,
        te_layer_limits: Optional[Sequence[Optional[int]]] = None,
        warn: Optional[Callable[[str], None]] = None,
    ) -> "Network":
        """Build fresh adapters.  ``conv_rank``/``conv_alpha`` 0 inherit ``rank``/``alpha``
        (they apply to k×k convs only; 1×1 convs use the linear values).  Text-encoder
        adapters exist only if ``train_text_encoder`` and BASE is among ``blocks``;
        ``te_layer_limits`` (per encoder) keeps them below a layer index (see ``te_targets``).
        ``warn`` gets one line when ``blocks`` names blocks this U-Net lacks (``select_blocks``)."""
        algo = normalise_algo(algo)
        element = normalise_element(element)
        blocks = normalise_blocks(blocks)
        rank = int(rank)
        if rank < 1:
            raise ValueError(f"network_rank must be >= 1, got {rank}")
        conv_rank = int(conv_rank or 0) or rank
        conv_alpha = conv_alpha if conv_alpha else alpha
        if ldm_map is None and (unet_key_style == "sgm" or blocks is not None):
            ldm_map = default_ldm_map(unet)
        if blocks is not None:
            blocks = select_blocks(blocks, model_block_ids(ldm_map), warn)
        net = cls(
            unet, text_encoders, unet_key_style=unet_key_style, ldm_map=ldm_map, dtype=dtype,
            algo=algo, rank=rank, alpha=alpha, conv_rank=conv_rank, conv_alpha=conv_alpha,
        )
        targets = unet_targets(unet, algo=algo, key_style=unet_key_style, ldm_map=ldm_map)
        if train_text_encoder and (blocks is None or "BASE" in blocks):
            targets += te_targets(net._models[1], te_layer_limits)
        targets = filter_targets(targets, blocks=blocks, element=element)
        module_cls = LoHaModule if algo == "loha" else LoRAModule
        for t in targets:
            r, a = (conv_rank, conv_alpha) if t.conv_kxk else (rank, alpha)
            net._add(t, module_cls(t.name, t.module, r, a, multiplier, dtype=dtype))
        net._multiplier = (float(multiplier), float(multiplier))
        return net

    @classmethod
    def from_file(
        cls,
        path,
        unet: nn.Module,
        text_encoders: Sequence[nn.Module] = (),
        *,
        unet_key_style: Optional[str] = None,
        ldm_map: Optional[Mapping[str, str]] = None,
        dtype: torch.dtype = torch.float32,
        multiplier: float = 1.0,
    ) -> "Network":
        """A network holding exactly the modules of a kohya-format file (e.g. a copier LoRA).
        The U-Net key style is detected from the keys when not given."""
        from .files import load_network_file

        tensors, metadata = load_network_file(path)
        if unet_key_style is None:
            unet_key_style = "sgm" if any(k.startswith(_SGM_UNET_PREFIXES) for k in tensors) else "diffusers"
        if unet_key_style == "sgm" and ldm_map is None:
            ldm_map = default_ldm_map(unet)
        net = cls(unet, text_encoders, unet_key_style=unet_key_style, ldm_map=ldm_map, dtype=dtype, algo="")
        net.load_kohya(tensors)
        net.set_multiplier(multiplier)
        net.metadata = dict(metadata)
        net.algo = net._infer_algo()
        return net

    def _add(self, target: Target, module: AdapterModule, *, replace: bool = False) -> None:
        if not replace and target.name in self._modules:
            raise ValueError(f"duplicated adapter name {target.name}")
        self.add_module(target.name, module)
        self._parts[target.name] = target.part

    def _infer_algo(self) -> str:
        mods = list(self.adapters())
        if any(isinstance(m, LoHaModule) for m in mods):
            return "loha"
        if any(m.is_conv and m.kernel_size != (1, 1) for m in mods):
            return "c3lier"
        return "lierla"

    # -- views ----------------------------------------------------------------------------
    def adapters(self):
        for m in self.children():
            if isinstance(m, AdapterModule):
                yield m

    @property
    def unet_modules(self) -> list:
        return [m for m in self.adapters() if self._parts.get(m.lora_name) == "unet"]

    @property
    def te_modules(self) -> list:
        return [m for m in self.adapters() if self._parts.get(m.lora_name) == "te"]

    def counts(self) -> tuple:
        """(number of U-Net adapters, number of text-encoder adapters)."""
        return len(self.unet_modules), len(self.te_modules)

    @property
    def applied(self) -> bool:
        return self._applied

    # -- apply / remove ---------------------------------------------------------------------
    def apply(self) -> _Undo:
        """Wrap every target's forward.  Usable as ``net.apply()`` or ``with net.apply(): …``."""
        if self._applied:
            raise RuntimeError("network is already applied")
        done = []
        try:
            for m in self.adapters():
                m.apply_to()
                done.append(m)
        except Exception:
            for m in reversed(done):
                m.restore()
            raise
        self._applied = True
        return _Undo(self.remove)

    def remove(self) -> None:
        """Restore every wrapped forward.  Networks stacked on the same model must be
        removed in reverse order of application (checked before anything changes)."""
        if not self._applied:
            return
        mods = list(self.adapters())
        for m in mods:
            if m.applied and m.org_module.__dict__.get("forward") != m.forward:
                raise RuntimeError(
                    f"cannot remove this network: {m.lora_name} has another adapter applied on top; "
                    "remove networks in reverse order of application"
                )
        for m in reversed(mods):
            m.restore()
        self._applied = False

    # -- multiplier ---------------------------------------------------------------------------
    def set_multiplier(self, unet: float, te: Optional[float] = None) -> None:
        """Set the strength of every adapter (text encoders get ``te`` when given)."""
        te = unet if te is None else te
        for m in self.adapters():
            m.multiplier = float(te if self._parts.get(m.lora_name) == "te" else unet)
        self._multiplier = (float(unet), float(te))

    def multiplier(self, unet: float, te: Optional[float] = None) -> _Undo:
        """Set the multiplier now; as a context manager, restore the previous one on exit."""
        previous = self._multiplier
        self.set_multiplier(unet, te)
        return _Undo(lambda: self.set_multiplier(*previous))

    @property
    def current_multiplier(self) -> tuple:
        return self._multiplier

    # -- optimisation ---------------------------------------------------------------------------
    def param_groups(self, unet_lr: float, te_lr: Optional[float] = None) -> list:
        """Optimizer parameter groups: text encoder first (as the original), then U-Net;
        empty groups are skipped.  ``te_lr`` None/0 uses ``unet_lr``."""
        te_lr = te_lr if te_lr else unet_lr
        groups = []
        te_params = [p for m in self.te_modules for p in m.parameters()]
        unet_params = [p for m in self.unet_modules for p in m.parameters()]
        if te_params:
            groups.append({"params": te_params, "lr": te_lr, "name": "text_encoder"})
        if unet_params:
            groups.append({"params": unet_params, "lr": unet_lr, "name": "unet"})
        return groups

    # -- kohya I/O ------------------------------------------------------------------------------
    @torch.no_grad()
    def state_dict_kohya(self, dtype: Optional[torch.dtype] = torch.float16, strength: float = 1.0) -> dict:
        """Flat {kohya key: CPU tensor}.  ``strength`` s scales ΔW by s: LoRA up and down by
        √|s| each (up takes the sign), LoHa ``hada_w1_a`` by s."""
        s = float(strength)
        root = math.sqrt(abs(s))
        out = {}
        for m in self.adapters():
            for sub, t in m.file_state().items():
                t = t.detach().float().cpu().clone()
                if s != 1.0:
                    if sub == "lora_down.weight":
                        t = t * root
                    elif sub == "lora_up.weight":
                        t = t * math.copysign(root, s)
                    elif sub == "hada_w1_a":
                        t = t * s
                if dtype is not None:
                    t = t.to(dtype)
                out[f"{m.lora_name}.{sub}"] = t.contiguous()
        return out

    def _candidates(self) -> dict:
        """Every module name a file may use for a module of this model → its Target under our own
        name.  Files in the wild name the U-Net either way: kohya writes SGM paths for SDXL, while the
        original TrainTrain (and diffusers' kohya export) wrote diffusers paths for every family; both
        come from one module map (trainer.models.convert via targets.unet_targets).  A file for a
        one-encoder model may say ``lora_te1_`` where we say ``lora_te_`` (A1111 reads both)."""
        unet, tes = self._models
        own = unet_targets(unet, algo="c3lier", key_style=self.unet_key_style, ldm_map=self._ldm_map)
        reg = {t.name: t for t in own}
        other = "diffusers" if self.unet_key_style == "sgm" else "sgm"
        try:
            ldm_map = self._ldm_map if self._ldm_map is not None else default_ldm_map(unet)
            alt = unet_targets(unet, algo="c3lier", key_style=other, ldm_map=ldm_map)
        except (ValueError, RuntimeError, KeyError):
            alt = []  # a U-Net the module map does not cover: only our own names are read
        by_path = {t.path: t for t in own}
        for t in alt:
            if t.path in by_path:
                reg.setdefault(t.name, by_path[t.path])
        te = te_targets(tes)
        for t in te:
            reg[t.name] = t
            if len(tes) == 1 and t.name.startswith("lora_te_"):
                reg.setdefault("lora_te1_" + t.name[len("lora_te_"):], t)
        return reg

    @staticmethod
    def _part_of_name(name: str) -> Optional[str]:
        if name.startswith("lora_unet_"):
            return "unet"
        if name.startswith("lora_te"):
            return "te"
        return None

    @torch.no_grad()
    def load_kohya(self, state_dict: Mapping[str, torch.Tensor], *, parts: Optional[Iterable[str]] = None) -> LoadResult:
        """Fill (or create) adapters from kohya-format tensors: resume, or load a copier.

        Module names may be in any key style the ecosystem writes (see ``_candidates``); the
        adapters keep our own names.  ``parts`` ("unet", "te"): only those parts of the file are
        loaded, the others are listed in the result's ``skipped`` (a pass that does not train the
        text encoder resumes from a file that has it); None loads everything.
        The rank of each module comes from the file's shapes; a module whose rank or
        algorithm differs from the existing one is rebuilt.  Unknown module names,
        unsupported tensors, and shapes that do not fit the model raise ValueError.
        Modules of this network absent from the file are left as they are (listed in
        the result's ``missing``)."""
        grouped: dict = {}
        for key, tensor in state_dict.items():
            name, _, sub = key.partition(".")
            grouped.setdefault(name, {})[sub] = tensor
        result = LoadResult()
        if parts is not None:
            keep = set(parts)
            for name in list(grouped):
                part = self._part_of_name(name)
                if part is not None and part not in keep:
                    result.skipped.setdefault(part, []).append(name)
                    del grouped[name]
        candidates = self._candidates()
        unknown = sorted(n for n in grouped if n not in candidates)
        if unknown:
            raise ValueError(
                f"{len(unknown)} module name(s) in the file match nothing in this model "
                f"(wrong model family or key style?), e.g. {', '.join(unknown[:4])}"
            )
        seen: dict = {}
        for name in grouped:
            own = candidates[name].name
            if own in seen:
                raise ValueError(f"the file has two entries for the same module: {seen[own]} and {name}")
            seen[own] = name
        plans = []
        for name, subs in grouped.items():
            target = candidates[name]
            if all(k in subs for k in _LORA_SUBKEYS):
                kind, known, rank = "lora", _LORA_SUBKEYS, int(subs["lora_down.weight"].shape[0])
                expected = lora_shapes(target.module, rank)
            elif all(k in subs for k in _LOHA_SUBKEYS):
                if "hada_t1" in subs or "hada_t2" in subs:
                    subs = _untucker_loha(name, subs)
                kind, known, rank = "loha", _LOHA_SUBKEYS, int(subs["hada_w1_b"].shape[0])
                expected = loha_shapes(target.module, rank)
            else:
                raise ValueError(
                    f"{name}: unsupported or incomplete tensors {sorted(subs)} "
                    "(expected lora_down.weight + lora_up.weight, or hada_w1_a/w1_b/w2_a/w2_b)"
                )
            extra = sorted(set(subs) - set(known) - {"alpha"})
            if extra:
                raise ValueError(f"{name}: unsupported tensor(s) {', '.join(extra)} (only plain {kind} is supported)")
            for sub, shape in expected.items():
                got = tuple(subs[sub].shape)
                if got != tuple(shape):
                    raise ValueError(
                        f"{name}.{sub}: shape {got} in the file, but this model needs {tuple(shape)}"
                    )
            alpha = resolve_alpha(subs["alpha"], rank) if "alpha" in subs else float(rank)
            plans.append((target, kind, rank, alpha, {k: subs[k] for k in known}))

        for target, kind, rank, alpha, tensors in plans:
            existing = self._modules.get(target.name)
            cls = ALGO_MODULES[kind]
            reuse = type(existing) is cls and existing.rank == rank
            if reuse:
                module = existing
            else:
                if self._applied:
                    raise RuntimeError(f"{target.name}: cannot rebuild an adapter while the network is applied")
                mult = self._multiplier[1] if target.part == "te" else self._multiplier[0]
                module = cls(target.name, target.module, rank, alpha, mult, dtype=self.dtype)
                result.created.append(target.name)
            for sub, t in tensors.items():
                param = module.get_parameter(sub) if "." in sub else getattr(module, sub)
                param.copy_(t.to(device=param.device, dtype=param.dtype))
            module.alpha.fill_(alpha)
            module.scale = alpha / rank
            if not reuse:
                self._add(target, module, replace=True)
            result.loaded.append(target.name)
        loaded = set(result.loaded)
        result.missing = [m.lora_name for m in self.adapters() if m.lora_name not in loaded]
        return result
