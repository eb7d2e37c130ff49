"""Adapter modules: one small base class, one subclass per algorithm.

An adapter wraps an existing ``nn.Linear`` or ``nn.Conv2d`` by replacing that
module's ``forward`` *on the instance* (the class is never touched).  The
previous forward is kept so :meth:`AdapterModule.restore` can put it back; two
adapters on the same module stack (the second wraps the first) and are removed
in reverse order.

Adapter parameters may live in another dtype than the wrapped module (fp32
adapter on an fp16/bf16 model): the input is cast to the adapter dtype and the
adapter's contribution is cast back to the output dtype.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["AdapterModule", "LoRAModule", "LoHaModule", "resolve_alpha"]


def resolve_alpha(alpha: Optional[float], rank: int) -> float:
    """alpha 0 / None means "no scaling": alpha = rank."""
    if alpha is None:
        return float(rank)
    if isinstance(alpha, torch.Tensor):
        alpha = float(alpha.detach().float().cpu().item())
    alpha = float(alpha)
    return float(rank) if alpha == 0 else alpha


def _is_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d)


class AdapterModule(nn.Module):
    """Base class: wraps one Linear/Conv2d by replacing its ``forward``.

    Subclasses implement :meth:`adapter_forward` (the added output for input
    ``x`` already cast to the adapter dtype, *without* multiplier) and
    :meth:`delta_weight` (ΔW·scale shaped like the wrapped weight).
    """

    #: tensor names (relative to the module) that go into a kohya file
    file_tensors: tuple = ()

    def __init__(
        self,
        lora_name: str,
        org_module: nn.Module,
        rank: int,
        alpha: Optional[float] = None,
        multiplier: float = 1.0,
    ):
        super().__init__()
        if not isinstance(org_module, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"{lora_name}: can only wrap Linear or Conv2d, got {type(org_module).__name__}")
        if _is_conv(org_module) and (org_module.groups != 1 or org_module.padding_mode != "zeros"):
            raise ValueError(
                f"{lora_name}: only plain convolutions are supported "
                f"(groups={org_module.groups}, padding_mode={org_module.padding_mode!r})"
            )
        if int(rank) < 1:
            raise ValueError(f"{lora_name}: rank must be >= 1, got {rank}")
        self.lora_name = lora_name
        self.rank = int(rank)
        alpha = resolve_alpha(alpha, self.rank)
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32))
        self.scale = alpha / self.rank
        self.multiplier = float(multiplier)
        self.is_conv = _is_conv(org_module)
        if self.is_conv:
            self.in_dim, self.out_dim = org_module.in_channels, org_module.out_channels
            self.kernel_size = tuple(org_module.kernel_size)
        else:
            self.in_dim, self.out_dim = org_module.in_features, org_module.out_features
            self.kernel_size = ()
        # Held in a tuple so nn.Module does not register the wrapped module as a
        # child (it must not appear in our state_dict or parameters()).
        self._org = (org_module,)
        self._prev_forward: Optional[Callable] = None
        self._prev_had_instance_forward = False

    # -- wrapping --------------------------------------------------------------
    @property
    def org_module(self) -> nn.Module:
        return self._org[0]

    @property
    def applied(self) -> bool:
        return self._prev_forward is not None

    @property
    def weight_shape(self) -> torch.Size:
        return self.org_module.weight.shape

    def apply_to(self) -> None:
        """Route the wrapped module's forward through this adapter."""
        if self.applied:
            raise RuntimeError(f"{self.lora_name}: adapter is already applied")
        org = self.org_module
        self._prev_had_instance_forward = "forward" in org.__dict__
        self._prev_forward = org.forward
        org.forward = self.forward

    def restore(self) -> None:
        """Remove this adapter: the wrapped module's forward is what it was before apply_to()."""
        if not self.applied:
            return
        org = self.org_module
        current = org.__dict__.get("forward")
        if current != self.forward:
            raise RuntimeError(
                f"{self.lora_name}: another adapter was applied on top of this one; "
                "remove adapters in reverse order of application"
            )
        if self._prev_had_instance_forward:
            org.forward = self._prev_forward
        else:
            del org.forward
        self._prev_forward = None

    # -- maths -------------------------------------------------------------------
    @property
    def adapter_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:  # pragma: no cover - abstract
        """ΔW · scale (multiplier not included), shaped like the wrapped weight."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._prev_forward is None:
            raise RuntimeError(f"{self.lora_name}: adapter is not applied")
        out = self._prev_forward(x, *args, **kwargs)
        m = self.multiplier
        if m == 0:
            return out
        delta = self.adapter_forward(x.to(self.adapter_dtype))
        return out + (delta * m).to(out.dtype)

    def file_state(self) -> dict:
        """Tensors of this module by kohya sub-key (``lora_down.weight`` …, ``alpha``)."""
        sd = self.state_dict()
        return {k: sd[k] for k in self.file_tensors}

    def extra_repr(self) -> str:
        return f"{self.lora_name}, rank={self.rank}, alpha={float(self.alpha):g}, multiplier={self.multiplier:g}"


class LoRAModule(AdapterModule):
    """LoRA / LoCon: ``org(x) + up(down(x)) · multiplier · alpha/rank``."""

    file_tensors = ("lora_down.weight", "lora_up.weight", "alpha")

    def __init__(self, lora_name, org_module, rank, alpha=None, multiplier=1.0, *, dtype=torch.float32):
        super().__init__(lora_name, org_module, rank, alpha, multiplier)
        device = org_module.weight.device
        fk = dict(device=device, dtype=dtype)
        if self.is_conv:
            self.lora_down = nn.Conv2d(
                self.in_dim, self.rank, org_module.kernel_size, org_module.stride, org_module.padding,
                dilation=org_module.dilation, bias=False, **fk,
            )
            self.lora_up = nn.Conv2d(self.rank, self.out_dim, (1, 1), (1, 1), bias=False, **fk)
        else:
            self.lora_down = nn.Linear(self.in_dim, self.rank, bias=False, **fk)
            self.lora_up = nn.Linear(self.rank, self.out_dim, bias=False, **fk)
        self.alpha = self.alpha.to(device)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    def adapter_forward(self, x):
        return self.lora_up(self.lora_down(x)) * self.scale

    def delta_weight(self):
        up = self.lora_up.weight
        down = self.lora_down.weight
        if self.is_conv:
            w = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
        else:
            w = up @ down
        return w * self.scale

    def expected_shapes(self, rank: Optional[int] = None) -> dict:
        r = self.rank if rank is None else rank
        return lora_shapes(self.org_module, r)


def lora_shapes(org_module: nn.Module, rank: int) -> dict:
    if isinstance(org_module, nn.Conv2d):
        k = tuple(org_module.kernel_size)
        return {
            "lora_down.weight": (rank, org_module.in_channels, *k),
            "lora_up.weight": (org_module.out_channels, rank, 1, 1),
        }
    return {
        "lora_down.weight": (rank, org_module.in_features),
        "lora_up.weight": (org_module.out_features, rank),
    }


def loha_shapes(org_module: nn.Module, rank: int) -> dict:
    if isinstance(org_module, nn.Conv2d):
        out_dim = org_module.out_channels
        in_dim = org_module.in_channels * math.prod(org_module.kernel_size)
    else:
        out_dim, in_dim = org_module.out_features, org_module.in_features
    return {
        "hada_w1_a": (out_dim, rank),
        "hada_w1_b": (rank, in_dim),
        "hada_w2_a": (out_dim, rank),
        "hada_w2_b": (rank, in_dim),
    }


class LoHaModule(AdapterModule):
    """LoHa (Hadamard product), written from the LyCORIS formula:
    ``ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) · alpha/rank`` reshaped to the weight.

    Conv kernels are flattened (``hada_w1_b`` is ``[rank, in·kh·kw]``); the
    Tucker variant (``hada_t1``/``hada_t2``) is not used.  Init as LyCORIS:
    w1_a ~ N(0, 0.1), w1_b ~ N(0, 1), w2_b ~ N(0, 1), w2_a = 0 → initial ΔW = 0.
    Forward is ``org(x) + F.linear/conv2d(x, ΔW·m)`` (exact, differentiable).
    """

    file_tensors = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha")

    def __init__(self, lora_name, org_module, rank, alpha=None, multiplier=1.0, *, dtype=torch.float32):
        super().__init__(lora_name, org_module, rank, alpha, multiplier)
        device = org_module.weight.device
        shapes = loha_shapes(org_module, self.rank)
        for n, s in shapes.items():
            setattr(self, n, nn.Parameter(torch.empty(s, device=device, dtype=dtype)))
        self.alpha = self.alpha.to(device)
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.normal_(self.hada_w1_b, std=1.0)
        nn.init.normal_(self.hada_w2_b, std=1.0)
        nn.init.zeros_(self.hada_w2_a)
        if self.is_conv:
            self._conv_args = (org_module.stride, org_module.padding, org_module.dilation)

    def delta_weight(self):
        w = (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b)
        return (w * self.scale).reshape(self.weight_shape)

    def adapter_forward(self, x):
        dw = self.delta_weight()
        if self.is_conv:
            stride, padding, dilation = self._conv_args
            return F.conv2d(x, dw, None, stride, padding, dilation)
        return F.linear(x, dw)

    def expected_shapes(self, rank: Optional[int] = None) -> dict:
        return loha_shapes(self.org_module, self.rank if rank is None else rank)


ALGO_MODULES = {"lora": LoRAModule, "loha": LoHaModule}
