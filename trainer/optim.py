"""Optimizers and learning-rate schedulers by the names the original lists.

Optional packages are imported only when their optimizer is chosen, and a missing one gives a
message that names the setting and the package to install.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import math
from typing import Any, Callable

import torch

SCHEDULE_FREE = {"RAdamScheduleFree", "AdamWScheduleFree", "SGDScheduleFree"}
ADAPTIVE_LR = {"Prodigy", "DadaptAdam", "DadaptLion", "DAdaptAdaGrad", "DAdaptAdan", "DAdaptSGD"}


class OptimizerError(ValueError):
    pass


def _attr(module: str, name: str, package: str, optimizer: str) -> Callable:
    try:
        try:
            return getattr(importlib.import_module(module), name)
        except ImportError as e:
            if not (e.name or "").startswith("bitsandbytes") or not _allow_bitsandbytes():
                raise
            # the package imports bitsandbytes itself (pytorch_optimizer does): let it
            return getattr(importlib.import_module(module), name)
    except ImportError as e:
        raise OptimizerError(
            f"train_optimizer: {optimizer!r} needs the package {package!r} (pip install {package}); "
            f"it could not be imported: {e}") from e
    except AttributeError as e:
        raise OptimizerError(
            f"train_optimizer: {optimizer!r} is not in the installed {package!r}; upgrade it") from e


def _bnb(name):
    def load(opt):
        _allow_bitsandbytes()  # chosen now: see keep_bitsandbytes_unloaded
        return _attr("bitsandbytes.optim", name, "bitsandbytes", opt)

    return load


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


DIFFUSERS_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                        "piecewise_constant")
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
    if name in DIFFUSERS_SCHEDULERS:
        # The schedule function itself, not diffusers' get_scheduler, which drops every argument it
        # does not know (cosine's num_cycles, polynomial's lr_end) instead of passing it on.
        fn = _diffusers_schedule(name)
        ours = {"num_warmup_steps": warmup_steps, "num_training_steps": iterations, "step_rules": step_rules or "1",
                "num_cycles": num_cycles if name == "cosine_with_restarts" else None,
                "power": power if name == "polynomial" else None}
        params = inspect.signature(fn).parameters
        kwargs = {k: v for k, v in ours.items() if k in params and v is not None}
        kwargs.update(settings)
        return fn(optimizer, **kwargs)
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


def _diffusers_schedule(name: str) -> Callable:
    from diffusers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

    return TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]


# --- checking the k=v settings before any model is loaded -------------------------------------------

# Arguments the trainer passes itself, and the setting that controls each.
_SCHEDULER_OWNED = {"optimizer": "train_lr_scheduler", "num_warmup_steps": "train_lr_warmup_steps",
                    "num_training_steps": "train_iterations", "step_rules": "train_lr_step_rules"}
_OPTIMIZER_OWNED = {"params": "network_blocks", "lr": "train_learning_rate", "model": "network_blocks"}


def _scheduler_callable(name: str) -> tuple[Callable, dict[str, str]]:
    """What make_scheduler calls for `name`, and the arguments it fills from other settings."""
    lrs = torch.optim.lr_scheduler
    owned = dict(_SCHEDULER_OWNED)
    if name in DIFFUSERS_SCHEDULERS:
        if name == "cosine_with_restarts":
            owned["num_cycles"] = "train_lr_scheduler_num_cycles"
        if name == "polynomial":
            owned["power"] = "train_lr_scheduler_power"
        return _diffusers_schedule(name), owned
    torch_classes = {"cosine_annealing": lrs.CosineAnnealingLR,
                     "cosine_annealing_with_restarts": lrs.CosineAnnealingWarmRestarts,
                     "exponential": lrs.ExponentialLR, "step": lrs.StepLR, "multi_step": lrs.MultiStepLR,
                     "reduce_on_plateau": lrs.ReduceLROnPlateau, "cyclic": lrs.CyclicLR, "one_cycle": lrs.OneCycleLR}
    if name not in torch_classes:
        raise OptimizerError(f"train_lr_scheduler: {name!r} is not known (allowed: {', '.join(SCHEDULER_NAMES)})")
    return torch_classes[name], owned


def _type_problem(value: Any, default: Any) -> str | None:
    """Why `value` cannot stand where the signature's default is `default` (None: it can)."""
    if default is inspect.Parameter.empty or default is None:
        return None
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "True or False"
    if isinstance(default, (int, float)):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else "a number"
    if isinstance(default, str):
        return None if isinstance(value, str) else "a quoted string"
    if isinstance(default, (tuple, list)):
        if not isinstance(value, (tuple, list)) or len(value) != len(default):
            return f"a tuple of {len(default)} like {tuple(default)!r}"
        for v, d in zip(value, default):
            if _type_problem(v, d):
                return f"a tuple of {len(default)} like {tuple(default)!r}"
    return None


def _check_against(fn: Callable, settings: dict[str, Any], setting: str, what: str,
                   owned: dict[str, str]) -> None:
    """Each key of `settings` must be an argument of `fn` that the trainer does not fill itself,
    with a value of the default's kind."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature: the dry run decides
        return
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    own = [n for n, p in params.items() if n not in owned and n != "self"
           and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    for key, value in settings.items():
        if key in owned:
            raise OptimizerError(f"{setting}: {key}={value!r} is set by {owned[key]}; change that setting instead")
        if key not in params and not takes_any:
            close = difflib.get_close_matches(key, own, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            err = OptimizerError(f"{setting}: {key!r} is not an argument of {what} "
                                 f"(its arguments: {', '.join(own) or 'none'}){hint}")
            err.unknown_key = key
            raise err
        if key in params:
            need = _type_problem(value, params[key].default)
            if need:
                raise OptimizerError(f"{setting}: {key}={value!r} must be {need} for {what}")


def check_optimizer_settings(name: str, settings: dict[str, Any], lr: float) -> None:
    """Refuse (OptimizerError naming train_optimizer_settings) arguments the optimizer does not take
    or values it rejects, by its real signature and a dry build on one parameter."""
    if name not in _OPTIMIZERS:
        raise OptimizerError(f"train_optimizer: {name!r} is not known (allowed: {', '.join(OPTIMIZER_NAMES)})")
    if not settings:
        return  # the optional package is imported when training starts, as before
    factory, _ = _OPTIMIZERS[name]
    cls = factory(name)
    _check_against(cls.__init__, settings, "train_optimizer_settings", f"the optimizer {name}", _OPTIMIZER_OWNED)
    probe = torch.nn.Linear(2, 2)
    try:
        make_optimizer(name, [{"params": list(probe.parameters())}], lr, settings, network=probe,
                       warn=lambda m: None)
    except OptimizerError:
        raise
    except Exception as e:  # ValueError("Invalid beta parameter …"), TypeError, …
        raise OptimizerError(f"train_optimizer_settings: {format_settings(settings)} does not work with "
                             f"{name}: {e}") from None


def check_scheduler_settings(name: str, settings: dict[str, Any], *, optimizer_name: str, lr: float,
                             iterations: int, warmup_steps: int = 0, num_cycles: int = 1, power: float = 1.0,
                             step_rules: str = "") -> None:
    """Refuse (OptimizerError naming train_lr_scheduler_settings) arguments the scheduler does not
    take, arguments other settings control, and values it rejects (a dry build, a few steps)."""
    fn, owned = _scheduler_callable(name)
    what = f"the {name} scheduler"
    if settings:
        try:
            _check_against(fn, settings, "train_lr_scheduler_settings", what, owned)
        except OptimizerError as e:
            key = getattr(e, "unknown_key", None)
            others = [n for n in SCHEDULER_NAMES if n != name and key is not None
                      and key in _parameters(_scheduler_callable(n)[0])]
            if others:  # e.g. eta_min with cosine
                raise OptimizerError(f"{e}; {key} belongs to {', '.join(others)} (train_lr_scheduler)") from None
            raise
    probe = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([probe], lr=lr)
    try:
        sched = make_scheduler(name, optimizer, iterations=iterations, warmup_steps=warmup_steps,
                               num_cycles=num_cycles, power=power, step_rules=step_rules, settings=settings)
        for _ in range(min(iterations, 3)):  # some values fail only when stepped (one_cycle's total_steps)
            optimizer.step()
            sched.step(*([1.0] if getattr(sched, "wants_metric", False) else []))
    except OptimizerError:
        raise
    except Exception as e:
        label = "train_lr_scheduler_settings" if settings else "train_lr_scheduler"
        raise OptimizerError(f"{label}: {format_settings(settings) or name} does not work with {what}: {e}") from None


def _parameters(fn: Callable) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def format_settings(settings: dict[str, Any]) -> str:
    return "; ".join(f"{k}={v!r}" for k, v in settings.items())


class _DeferBitsandbytes:
    """An import hook that makes `import bitsandbytes` fail (ImportError) until an 8-bit optimizer
    asks for it: libraries that merely probe for it (peft does `try: import bitsandbytes`) then
    treat it as absent, which is right, since TrainTrain uses it only for those optimizers."""

    def find_spec(self, name, path=None, target=None):
        if name == "bitsandbytes" or name.startswith("bitsandbytes."):
            raise ImportError(f"{name} is loaded only when an 8-bit optimizer is chosen", name=name)
        return None


def keep_bitsandbytes_unloaded() -> None:
    """Keep bitsandbytes out of the process until an 8-bit optimizer is chosen. diffusers (for its
    quantizers) and peft import it whenever it is installed; importing it prints "Failed to load CPU
    gemm_4bit_forward from kernels-community" on CPUs with AVX-512 bf16, and tries to fetch a kernel
    from the Hub when `kernels` is installed. For our own processes only (the CLI and the standalone
    app): inside the Web-UI the libraries belong to the host."""
    import sys

    if "bitsandbytes" in sys.modules or any(isinstance(f, _DeferBitsandbytes) for f in sys.meta_path):
        return
    try:
        import diffusers.utils.import_utils as flags
    except ImportError:
        flags = None
    if flags is not None and hasattr(flags, "_bitsandbytes_available"):
        # diffusers imports it unguarded when it believes it is installed
        flags._bitsandbytes_available = False
    sys.meta_path.insert(0, _DeferBitsandbytes())


def _allow_bitsandbytes() -> bool:
    """Lift the hook; True when there was one."""
    import sys

    before = len(sys.meta_path)
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _DeferBitsandbytes)]
    return len(sys.meta_path) != before
