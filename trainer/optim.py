"""Optimizers and learning-rate schedulers by the names the original lists.

Optional packages are imported only when their optimizer is chosen, and a missing one gives a
message that names the setting and the package to install.
"""
from __future__ import annotations

import importlib
import math
from typing import Any, Callable

import torch

SCHEDULE_FREE = {"RAdamScheduleFree", "AdamWScheduleFree", "SGDScheduleFree"}
ADAPTIVE_LR = {"Prodigy", "DadaptAdam", "DadaptLion", "DAdaptAdaGrad", "DAdaptAdan", "DAdaptSGD"}


class OptimizerError(ValueError):
    pass


def _attr(module: str, name: str, package: str, optimizer: str) -> Callable:
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as e:
        raise OptimizerError(
            f"train_optimizer: {optimizer!r} needs the package {package!r} (pip install {package}); "
            f"it could not be imported: {e}") from e
    except AttributeError as e:
        raise OptimizerError(
            f"train_optimizer: {optimizer!r} is not in the installed {package!r}; upgrade it") from e


def _bnb(name):
    return lambda opt: _attr("bitsandbytes.optim", name, "bitsandbytes", opt)


# name -> (factory of the class, default keyword arguments)
_OPTIMIZERS: dict[str, tuple[Callable[[str], Callable], dict[str, Any]]] = {
    "AdamW": (lambda o: torch.optim.AdamW, {}),
    "Adam": (lambda o: torch.optim.Adam, {}),
    "SGDNesterov": (lambda o: torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
    "AdamW8bit": (_bnb("AdamW8bit"), {}),
    "Adam8bit": (_bnb("Adam8bit"), {}),
    "Lion8bit": (_bnb("Lion8bit"), {}),
    "PagedAdamW8bit": (_bnb("PagedAdamW8bit"), {}),
    "PagedLion8bit": (_bnb("PagedLion8bit"), {}),
    "PagedAdamW": (_bnb("PagedAdamW"), {}),
    "PagedAdamW32bit": (_bnb("PagedAdamW32bit"), {}),
    "SGDNesterov8bit": (_bnb("SGD8bit"), {"momentum": 0.9, "nesterov": True}),
    "Lion": (lambda o: _attr("lion_pytorch", "Lion", "lion-pytorch", o), {}),
    "Prodigy": (lambda o: _attr("prodigyopt", "Prodigy", "prodigyopt", o), {}),
    "DadaptAdam": (lambda o: _attr("dadaptation", "DAdaptAdam", "dadaptation", o), {}),
    "DadaptLion": (lambda o: _attr("dadaptation", "DAdaptLion", "dadaptation", o), {}),
    "DAdaptAdaGrad": (lambda o: _attr("dadaptation", "DAdaptAdaGrad", "dadaptation", o), {}),
    "DAdaptAdan": (lambda o: _attr("dadaptation", "DAdaptAdan", "dadaptation", o), {}),
    "DAdaptSGD": (lambda o: _attr("dadaptation", "DAdaptSGD", "dadaptation", o), {}),
    "RAdamScheduleFree": (lambda o: _attr("schedulefree", "RAdamScheduleFree", "schedulefree", o), {}),
    "AdamWScheduleFree": (lambda o: _attr("schedulefree", "AdamWScheduleFree", "schedulefree", o), {}),
    "SGDScheduleFree": (lambda o: _attr("schedulefree", "SGDScheduleFree", "schedulefree", o), {}),
    "CAME": (lambda o: _attr("pytorch_optimizer", "CAME", "pytorch-optimizer", o), {}),
    "Tiger": (lambda o: _attr("pytorch_optimizer", "Tiger", "pytorch-optimizer", o), {}),
    "AdamMini": (lambda o: _attr("pytorch_optimizer", "AdamMini", "pytorch-optimizer", o), {}),
    "AdaFactor": (lambda o: _attr("transformers.optimization", "Adafactor", "transformers", o), {}),
}
OPTIMIZER_NAMES = tuple(_OPTIMIZERS)


def make_optimizer(name: str, param_groups: list[dict], lr: float, settings: dict[str, Any],
                   network: torch.nn.Module | None = None, warn: Callable[[str], None] = print
                   ) -> torch.optim.Optimizer:
    if name not in _OPTIMIZERS:
        raise OptimizerError(f"train_optimizer: {name!r} is not known (allowed: {', '.join(OPTIMIZER_NAMES)})")
    factory, defaults = _OPTIMIZERS[name]
    cls = factory(name)
    kwargs = {**defaults, **settings}
    if name in ADAPTIVE_LR and lr <= 0.1:
        warn(f"{name} adapts the step size itself; a learning rate near 1.0 is usual (train_learning_rate={lr})")
    if name == "AdaFactor":
        kwargs.setdefault("relative_step", True)
        kwargs.setdefault("scale_parameter", kwargs["relative_step"])
        kwargs.setdefault("warmup_init", False)
        if kwargs["relative_step"]:
            # Adafactor then computes its own step size; the set learning rate is not used.
            warn("AdaFactor with relative_step=True ignores train_learning_rate and the scheduler")
            return cls([{"params": g["params"]} for g in param_groups], lr=None, **kwargs)
    if name == "AdamMini":
        # Adam-mini partitions parameters by module name, so it needs the module, not groups.
        if network is None:
            raise OptimizerError("train_optimizer: AdamMini needs the network module")
        return cls(network, lr=lr, **kwargs)
    try:
        optimizer = cls(param_groups, lr=lr, **kwargs)
    except TypeError as e:
        raise OptimizerError(f"train_optimizer_settings: {settings!r} does not fit {name}: {e}") from e
    if name in SCHEDULE_FREE:
        optimizer.train()
    return optimizer


class ConstantScheduler:
    """For optimizers that schedule themselves (schedule-free, relative-step AdaFactor)."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def step(self, *args, **kwargs) -> None:
        pass

    def get_last_lr(self) -> list[float]:
        return [g.get("scheduled_lr", g.get("lr") or 0.0) or 0.0 for g in self.optimizer.param_groups]


class PlateauScheduler:
    """ReduceLROnPlateau needs a metric; the engine passes the smoothed loss."""

    wants_metric = True

    def __init__(self, optimizer, **kwargs):
        self.inner = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, **{"mode": "min", **kwargs})
        self.optimizer = optimizer

    def step(self, metric: float | None = None) -> None:
        if metric is not None:
            self.inner.step(metric)

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]


SCHEDULER_NAMES = ("cosine_annealing", "cosine_annealing_with_restarts", "exponential", "step", "multi_step",
                   "reduce_on_plateau", "cyclic", "one_cycle", "linear", "cosine", "cosine_with_restarts",
                   "polynomial", "constant", "constant_with_warmup", "piecewise_constant")


def make_scheduler(name: str, optimizer: torch.optim.Optimizer, *, iterations: int, warmup_steps: int = 0,
                   num_cycles: int = 1, power: float = 1.0, step_rules: str = "",
                   settings: dict[str, Any] | None = None, optimizer_name: str = ""):
    """A scheduler stepped once per optimizer step. Warmup works for every scheduler."""
    settings = dict(settings or {})
    if optimizer_name in SCHEDULE_FREE or (optimizer_name == "AdaFactor" and optimizer.defaults.get("relative_step")):
        return ConstantScheduler(optimizer)
    lrs = torch.optim.lr_scheduler
    main_steps = max(1, iterations - warmup_steps)
    if name in ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                "piecewise_constant"):
        from diffusers.optimization import get_scheduler
        kwargs: dict[str, Any] = {"num_warmup_steps": warmup_steps, "num_training_steps": iterations}
        if name == "cosine_with_restarts":
            kwargs["num_cycles"] = num_cycles
        if name == "polynomial":
            kwargs["power"] = power
        if name == "piecewise_constant":
            kwargs["step_rules"] = step_rules or "1"
        kwargs.update(settings)
        return get_scheduler(name, optimizer, **kwargs)
    if name == "reduce_on_plateau":
        return PlateauScheduler(optimizer, **settings)
    builders = {
        "cosine_annealing": lambda: lrs.CosineAnnealingLR(optimizer, **{"T_max": main_steps, **settings}),
        "cosine_annealing_with_restarts": lambda: lrs.CosineAnnealingWarmRestarts(
            optimizer, **{"T_0": max(1, math.ceil(main_steps / max(1, num_cycles))), **settings}),
        "exponential": lambda: lrs.ExponentialLR(optimizer, **{"gamma": 0.9, **settings}),
        "step": lambda: lrs.StepLR(optimizer, **{"step_size": 10, **settings}),
        "multi_step": lambda: lrs.MultiStepLR(optimizer, **{"milestones": [30, 60, 90], **settings}),
        "cyclic": lambda: lrs.CyclicLR(optimizer, **{"base_lr": 1e-5, "max_lr": 1e-3, "mode": "triangular",
                                                     "cycle_momentum": False, **settings}),
        "one_cycle": lambda: lrs.OneCycleLR(optimizer, **{"max_lr": [g["lr"] for g in optimizer.param_groups],
                                                          "total_steps": main_steps, **settings}),
    }
    if name not in builders:
        raise OptimizerError(f"train_lr_scheduler: {name!r} is not known (allowed: {', '.join(SCHEDULER_NAMES)})")
    if warmup_steps <= 0:
        return builders[name]()
    warm = lrs.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup_steps))
    main = builders[name]()
    return lrs.SequentialLR(optimizer, [warm, main], milestones=[warmup_steps])
