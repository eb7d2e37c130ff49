"""Every TrainTrain setting, in one typed table.

``SETTINGS`` lists the 59 rows of the original extension (same order, same JSON
keys, same defaults, with its bugs fixed) followed by a few clearly marked
additions.  Presets, saved JSON files, CLI flags, UI widgets and validation are
all derived from that table.

Values are parsed and validated once, here, at the edge: ``Config`` holds typed
values only (``cfg.network_rank`` is an ``int``, ``cfg.image_size`` a
``(height, width)`` tuple, ``cfg.train_optimizer_settings`` a ``dict``) and every
bad input raises :class:`SettingError`, whose message names the setting, the
value and what is allowed.

This module imports nothing heavy (no torch, no gradio) so it loads instantly.
"""
from __future__ import annotations

import argparse
import ast
import difflib
import errno
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

__all__ = [
    "MODES", "PANELS", "BLOCK_IDS", "NETWORK_TYPES", "NETWORK_RANKS", "NETWORK_ALPHAS",
    "NETWORK_CONV_RANKS", "NETWORK_CONV_ALPHAS", "NETWORK_ELEMENTS", "IMAGE_BUCKET_STEPS",
    "OPTIMIZERS", "SCHEDULE_FREE_OPTIMIZERS", "LR_SCHEDULERS", "LOSS_FUNCTIONS",
    "MODEL_PRECISIONS", "LORA_PRECISIONS", "SAVE_PRECISIONS", "VAE_PRECISIONS", "LECO_OBJECTIVES", "SAMPLE_SAMPLERS",
    "DIFF_TIMESTEP_SCHEDULES",
    "Setting", "SettingError", "SETTINGS", "ORIGINAL_SETTINGS", "ADDED_SETTINGS", "SETTINGS_BY_NAME",
    "get_setting", "settings_for_mode", "parse_kwargs_string", "format_kwargs_string",
    "Config", "load_preset", "save_preset", "describe_settings", "add_arguments", "apply_args",
    "overrides_from_args", "shortcut_overrides",
]

# ---------------------------------------------------------------------------------------------
# Choice lists
# ---------------------------------------------------------------------------------------------

#: Training modes, in the order of the original's mode radio.
MODES: tuple[str, ...] = ("LoRA", "iLECO", "Difference", "ADDifT", "Multi-ADDifT")
#: Visibility panels: the modes plus "Difference2", the 2nd-pass panel of Difference mode.
PANELS: tuple[str, ...] = ("LoRA", "iLECO", "Difference", "Difference2", "ADDifT", "Multi-ADDifT")

#: U-Net block ids (the original's BLOCKID26); BASE stands for the text encoder(s).
BLOCK_IDS: tuple[str, ...] = (
    ("BASE",) + tuple(f"IN{i:02d}" for i in range(12)) + ("M00",) + tuple(f"OUT{i:02d}" for i in range(12))
)
NETWORK_TYPES: tuple[str, ...] = ("lierla", "c3lier", "loha")
NETWORK_RANKS: tuple[int, ...] = tuple(2 ** i for i in range(2, 11))  # 4 … 1024
NETWORK_ALPHAS: tuple[float, ...] = tuple(float(2.0 ** i) for i in range(-5, 11))  # 0.03125 … 1024
NETWORK_CONV_RANKS: tuple[int, ...] = (0,) + NETWORK_RANKS
NETWORK_CONV_ALPHAS: tuple[float, ...] = (0.0,) + NETWORK_ALPHAS
NETWORK_ELEMENTS: tuple[str, ...] = ("Full", "CrossAttention", "SelfAttention")
#: Bucket increments. The original also offered 0, which crashed (ZeroDivisionError).
IMAGE_BUCKET_STEPS: tuple[int, ...] = tuple(range(64, 577, 64))
#: Optimizers in the original's UI order, without its "-----" separator entries.
OPTIMIZERS: tuple[str, ...] = (
    "AdamW", "AdamW8bit", "AdaFactor", "Lion", "Prodigy",
    "DadaptAdam", "DadaptLion", "DAdaptAdaGrad", "DAdaptAdan", "DAdaptSGD",
    "Adam8bit", "SGDNesterov8bit", "Lion8bit", "PagedAdamW8bit", "PagedLion8bit",
    "RAdamScheduleFree", "AdamWScheduleFree", "SGDScheduleFree",
    "CAME", "Tiger", "AdamMini", "PagedAdamW", "PagedAdamW32bit", "SGDNesterov", "Adam",
)
SCHEDULE_FREE_OPTIMIZERS: frozenset[str] = frozenset({"RAdamScheduleFree", "AdamWScheduleFree", "SGDScheduleFree"})
#: The 15 learning-rate schedulers: 8 from torch.optim.lr_scheduler, 7 from diffusers.optimization.
LR_SCHEDULERS: tuple[str, ...] = (
    "cosine_annealing", "cosine_annealing_with_restarts", "exponential", "step", "multi_step",
    "reduce_on_plateau", "cyclic", "one_cycle",
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "piecewise_constant",
)
LOSS_FUNCTIONS: tuple[str, ...] = ("MSE", "L1", "Smooth-L1")
MODEL_PRECISIONS: tuple[str, ...] = ("model", "fp32", "bf16", "fp16")  # no int8: see _parse_model_precision
LORA_PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
SAVE_PRECISIONS: tuple[str, ...] = ("model", "fp32", "bf16", "fp16")
VAE_PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
#: iLECO objective (addition): the original's fast iLECO, or the full LECO erase / enhance objective.
LECO_OBJECTIVES: tuple[str, ...] = ("iLECO", "erase", "enhance")
#: ADDifT timestep schedules: the original's fixed cycle of 5 values, or uniform draws (trainer.modes.addift).
DIFF_TIMESTEP_SCHEDULES: tuple[str, ...] = ("cycle", "uniform")

WIDGETS = frozenset({"dropdown", "text", "checkbox", "checkgroup", "radio"})
MAX_TIMESTEPS = 1000
_WINDOWS_RESERVED = frozenset(
    {"CON", "PRN", "AUX", "NUL"} | {f"COM{i}" for i in range(1, 10)} | {f"LPT{i}" for i in range(1, 10)}
)
_BAD_NAME_CHARS = set('<>:"/\\|?*')


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

class SettingError(ValueError):
    """A setting value (or a settings file) is invalid.

    ``str(err)`` is a complete message for the user, e.g.
    ``train_batch_size: "abc" is not a whole number (allowed: 1 or more)``.
    ``setting`` and ``value`` name the first offending setting where there is one;
    ``problems`` lists every message when several were found at once.
    """

    def __init__(self, message: str, *, setting: str | None = None, value: Any = None,
                 problems: Iterable[str] | None = None):
        super().__init__(message)
        self.setting = setting
        self.value = value
        self.problems: tuple[str, ...] = tuple(problems) if problems is not None else (message,)


def _show(value: Any, limit: int = 80) -> str:
    """A value as it should appear in an error message (strings in double quotes)."""
    if isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
    else:
        try:
            text = json.dumps(value, ensure_ascii=False)
        except (TypeError, ValueError, RecursionError):
            text = repr(value)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text


def _suggest(word: str, candidates: Iterable[str]) -> str:
    cands = list(candidates)
    lower = {c.lower(): c for c in cands}
    match = difflib.get_close_matches(word.lower(), list(lower), n=1, cutoff=0.6)
    return f' (did you mean "{lower[match[0]]}"?)' if match else ""


# ---------------------------------------------------------------------------------------------
# Value formatting and the optimizer / scheduler settings strings
# ---------------------------------------------------------------------------------------------

def _fmt_number(x: int | float) -> str:
    """Shortest text that parses back to the same number ("8", "0.0001", "5e-05")."""
    if isinstance(x, bool):
        return str(int(x))
    if isinstance(x, int):
        return str(x)
    if math.isfinite(x) and x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return repr(float(x))


def _literal_text(v: Any) -> str:
    """``repr`` for Python literals, except that infinities are written so literal_eval reads them."""
    if isinstance(v, float) and math.isinf(v):
        return "1e999" if v > 0 else "-1e999"
    if isinstance(v, tuple):
        inner = ", ".join(_literal_text(x) for x in v)
        return f"({inner},)" if len(v) == 1 else f"({inner})"
    if isinstance(v, list):
        return "[" + ", ".join(_literal_text(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_literal_text(k)}: {_literal_text(x)}" for k, x in v.items()) + "}"
    return repr(v)


def _split_top_level(text: str) -> list[str]:
    """Split at ``;`` and newlines that are outside quotes and brackets."""
    parts, buf = [], []
    depth, quote, i = 0, "", 0
    while i < len(text):
        ch = text[i]
        if quote:
            buf.append(ch)
            if ch == "\\" and i + 1 < len(text):
                buf.append(text[i + 1])
                i += 1
            elif text.startswith(quote, i):
                if len(quote) == 3:
                    buf.append(text[i + 1: i + 3])
                    i += 2
                quote = ""
        elif ch in "'\"":
            quote = text[i: i + 3] if text.startswith(ch * 3, i) else ch
            buf.append(quote)
            i += len(quote) - 1
        elif ch in "([{":
            depth += 1
            buf.append(ch)
        elif ch in ")]}":
            depth = max(0, depth - 1)
            buf.append(ch)
        elif ch in ";\n\r" and depth == 0:
            parts.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
        i += 1
    parts.append("".join(buf))
    return parts


def parse_kwargs_string(text: Any, *, setting: str = "train_optimizer_settings") -> dict[str, Any]:
    """Parse ``"k=v"`` entries (one a line, or ``;``-separated) into a dict of Python literals.

    Values go through :func:`ast.literal_eval`: numbers, ``True``/``False``/``None``, quoted
    strings, tuples, lists, dicts.  A bare word such as ``mode=min`` is an error (write
    ``mode='min'``).  A dict is accepted as it is (keys checked).  Raises SettingError.
    """
    if isinstance(text, Mapping):
        out = {}
        for k, v in text.items():
            if not isinstance(k, str) or not k.isidentifier():
                raise SettingError(f"{setting}: {_show(k)} is not a valid argument name "
                                   "(allowed: a Python identifier such as eta_min)", setting=setting, value=text)
            if not _is_literal(v):
                raise SettingError(f"{setting}: value {_show(v)} for {k!r} is not a plain value "
                                   "(allowed: numbers, strings, booleans, None, lists/tuples of those)",
                                   setting=setting, value=text)
            out[k] = v
        return out
    if text is None:
        return {}
    if not isinstance(text, str):
        raise SettingError(f"{setting}: {_show(text)} is not text "
                           "(allowed: k=v entries, one a line or separated by ';', e.g. eta_min=1e-5)",
                           setting=setting, value=text)
    out: dict[str, Any] = {}
    for part in _split_top_level(text):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key.isidentifier():
            raise SettingError(f"{setting}: {_show(part)} is not a k=v entry "
                               "(allowed: k=v entries, one a line or separated by ';', e.g. betas=(0.9,0.99))",
                               setting=setting, value=text)
        if key in out:
            raise SettingError(f"{setting}: {_show(key)} is given twice", setting=setting, value=text)
        try:
            out[key] = ast.literal_eval(value)
        except Exception:  # SyntaxError, ValueError, MemoryError, RecursionError …
            hint = f" (strings need quotes, e.g. {key}='{value}')" if re.fullmatch(r"[A-Za-z_][\w.\-]*", value) \
                else " (allowed: a Python literal: number, 'quoted string', True/False/None, tuple, list)"
            raise SettingError(f"{setting}: value {_show(value)} for {key!r} is not a Python literal{hint}",
                               setting=setting, value=text) from None
    return out


def _is_literal(v: Any, depth: int = 0) -> bool:
    if depth > 20:
        return False
    if v is None or isinstance(v, (bool, int, float, str, bytes, complex)):
        return True
    if isinstance(v, (list, tuple, set, frozenset)):
        return all(_is_literal(x, depth + 1) for x in v)
    if isinstance(v, dict):
        return all(_is_literal(k, depth + 1) and _is_literal(x, depth + 1) for k, x in v.items())
    return False


def format_kwargs_string(d: Mapping[str, Any]) -> str:
    """Inverse of :func:`parse_kwargs_string`: ``{"eta_min": 1e-05}`` → ``"eta_min=1e-05"``."""
    return "; ".join(f"{k}={_literal_text(v)}" for k, v in d.items())


# ---------------------------------------------------------------------------------------------
# The Setting row
# ---------------------------------------------------------------------------------------------

_ALL_PANELS = frozenset(PANELS)


def _panels(spec: str) -> frozenset:
    """'all' or a comma list of L, I, D1, D2, A, M (the spec's visibility columns)."""
    if spec == "all":
        return _ALL_PANELS
    names = {"L": "LoRA", "I": "iLECO", "D1": "Difference", "D2": "Difference2", "A": "ADDifT", "M": "Multi-ADDifT"}
    return frozenset(names[p.strip()] for p in spec.split(","))


@dataclass(frozen=True)
class Setting:
    """One row of the settings table.

    ``type`` is the type of the parsed value (``tuple`` for image_size / network_blocks,
    ``dict`` for the kwargs strings).  ``choices`` are typed values; when
    ``strict_choices`` is false they are only suggestions (rank, alpha).
    ``modes`` holds the PANELS in which the row is visible ("Difference2" = 2nd-pass panel).
    """
    name: str
    key: str
    widget: str
    type: type
    default: Any
    choices: tuple | None
    modes: frozenset
    help_en: str
    help_ja: str
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False
    multiple_of: int | None = None
    allow_empty: bool = False  # "" (and None) accepted, meaning ``empty_value``
    empty_value: Any = None
    strict_choices: bool = True
    addition: bool = False  # not in the original extension
    parser: Callable[["Setting", Any], Any] | None = field(default=None, compare=False, repr=False)
    formatter: Callable[[Any], Any] | None = field(default=None, compare=False, repr=False)

    @property
    def label(self) -> str:
        """The UI label, as the original shows it (name with ``_`` → space)."""
        return self.key.replace("_", " ")

    def visible_in(self, panel: str) -> bool:
        return panel in self.modes

    # -- allowed values, for messages and --list-settings -------------------------------------
    def allowed(self) -> str:
        if self.name in _SAMPLE_ALLOWED:
            return _SAMPLE_ALLOWED[self.name]
        if self.choices is not None and self.strict_choices:
            text = ", ".join(_fmt_choice(c) for c in self.choices)
            if self.type is tuple and self.name == "network_blocks":
                return f"any of: {text}"
            return f"one of: {text}"
        if self.type is bool:
            return "true or false"
        if self.name == "image_size":
            return '"N" or "H,W", multiples of 8, 64 or more'
        if self.type in (int, float):
            lo, hi = self.min, self.max
            lo_t = None if lo is None else _fmt_number(lo)
            hi_t = None if hi is None else _fmt_number(hi)
            if lo is not None and hi is not None:
                text = f"{lo_t} to {hi_t}"
            elif lo is not None:
                text = f"more than {lo_t}" if self.min_exclusive else f"{lo_t} or more"
            elif hi is not None:
                text = f"{hi_t} or less"
            else:
                text = "any whole number" if self.type is int else "any number"
            if self.multiple_of:
                text += f", a multiple of {self.multiple_of}"
            if self.choices is not None:
                text += "; usual: " + ", ".join(_fmt_choice(c) for c in self.choices)
            if self.allow_empty:
                text += "; empty = default"
            return text
        if self.type is dict:
            return "k=v entries, one a line or separated by ';' (values are Python literals)"
        return "text"

    # -- parse / format -----------------------------------------------------------------------
    def parse(self, raw: Any) -> Any:
        """Raw value (from JSON, the UI or the CLI) → typed, validated value.  Raises SettingError."""
        if self.allow_empty and (raw is None or (isinstance(raw, str) and not raw.strip())):
            return self.empty_value
        if self.parser is not None:
            return self.parser(self, raw)
        if self.type is bool:
            return _parse_bool(self, raw)
        if self.type is int:
            value = _parse_int(self, raw)
        elif self.type is float:
            value = _parse_float(self, raw)
        elif self.type is str:
            if not isinstance(raw, str):
                raise self.error(raw, "is not text")
            value = raw.strip()
            if self.choices is not None:
                return _match_choice(self, value)
            return value
        else:  # pragma: no cover - every other type has a parser
            raise TypeError(self.type)
        if self.choices is not None and self.strict_choices and value not in self.choices:
            raise self.error(raw, "is not one of the choices")
        self._check_range(raw, value)
        return value

    def format(self, value: Any) -> Any:
        """Typed value → JSON value as the original writes it (strings for text boxes and
        dropdowns, bools for checkboxes, a list for the block group)."""
        if self.formatter is not None:
            return self.formatter(value)
        if self.type is bool:
            return bool(value)
        if value is None:
            return ""
        if self.type in (int, float):
            return _fmt_number(value)
        return str(value)

    def error(self, raw: Any, what: str, allowed: str | None = None) -> SettingError:
        return SettingError(f"{self.name}: {_show(raw)} {what} (allowed: {allowed or self.allowed()})",
                            setting=self.name, value=raw)

    def _check_range(self, raw: Any, value: float) -> None:
        if self.min is not None and (value <= self.min if self.min_exclusive else value < self.min):
            raise self.error(raw, "is out of range")
        if self.max is not None and value > self.max:
            raise self.error(raw, "is out of range")
        if self.multiple_of and value % self.multiple_of:
            raise self.error(raw, f"is not a multiple of {self.multiple_of}")


def _fmt_choice(c: Any) -> str:
    return _fmt_number(c) if isinstance(c, (int, float)) and not isinstance(c, bool) else str(c)


def _parse_bool(s: Setting, raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, int) and raw in (0, 1):
        return bool(raw)
    if isinstance(raw, str):
        t = raw.strip().lower()
        if t in ("true", "1", "yes", "on", "y", "t"):
            return True
        if t in ("false", "0", "no", "off", "n", "f", ""):  # "" : the original's logging_save_csv default
            return False
    raise s.error(raw, "is not true/false")


def _parse_int(s: Setting, raw: Any) -> int:
    if isinstance(raw, bool):
        raise s.error(raw, "is not a whole number")
    if isinstance(raw, int):
        return raw
    if isinstance(raw, float):
        if math.isfinite(raw) and raw.is_integer():
            return int(raw)
        raise s.error(raw, "is not a whole number")
    if isinstance(raw, str):
        t = raw.strip()
        try:
            return int(t)
        except ValueError:
            pass
        try:
            f = float(t)
        except (ValueError, OverflowError):
            raise s.error(raw, "is not a whole number") from None
        if math.isfinite(f) and f.is_integer():
            return int(f)
    raise s.error(raw, "is not a whole number")


def _parse_float(s: Setting, raw: Any) -> float:
    if isinstance(raw, bool):
        raise s.error(raw, "is not a number")
    if not isinstance(raw, (int, float, str)):
        raise s.error(raw, "is not a number")
    try:
        f = float(raw.strip() if isinstance(raw, str) else raw)
    except (ValueError, OverflowError):
        raise s.error(raw, "is not a number") from None
    if not math.isfinite(f):
        raise s.error(raw, "is not a finite number")
    return f


def _match_choice(s: Setting, value: str) -> str:
    for c in s.choices:
        if c == value:
            return c
    folded = value.casefold()
    for c in s.choices:
        if str(c).casefold() == folded:
            return c
    raise SettingError(f"{s.name}: {_show(value)} is not a known choice{_suggest(value, map(str, s.choices))} "
                       f"(allowed: {s.allowed()})", setting=s.name, value=value)


# -- special parsers ----------------------------------------------------------------------------

def _parse_model_precision(s: Setting, raw: Any) -> str:
    """The original offered int8 (torchao weight-only); here it could only ever fail, so it is not
    listed, and a preset or saved JSON that carries it is told why rather than "not a choice"."""
    if isinstance(raw, str) and raw.strip().casefold() == "int8":
        raise SettingError(
            f"{s.name}: 'int8' is not offered here: 8-bit frozen weights (the original used torchao) are not "
            f"implemented in this trainer, so every int8 run would fail; use fp16 or bf16 (bf16 halves the "
            f"model's memory too) (allowed: {s.allowed()})", setting=s.name, value=raw)
    if not isinstance(raw, str):
        raise s.error(raw, "is not text")
    return _match_choice(s, raw.strip())


def _parse_sides(s: Setting, raw: Any, largest: int) -> list[int]:
    """"N", "H,W", "HxW", a number or a pair -> 1 or 2 sides in pixels, each a multiple of 8 in 64..largest."""
    if isinstance(raw, (list, tuple)):
        parts = list(raw)
    elif isinstance(raw, bool):
        raise s.error(raw, "is not a size")
    elif isinstance(raw, (int, float)):
        parts = [raw]
    elif isinstance(raw, str):
        parts = [p for p in re.split(r"[,x×*\s]+", raw.strip()) if p]
    else:
        raise s.error(raw, "is not a size")
    if not 1 <= len(parts) <= 2:
        raise s.error(raw, "is not a size")
    sizes = []
    for p in parts:
        try:
            v = _parse_int(s, p)
        except SettingError:
            raise s.error(raw, "is not a size") from None
        if v < 64 or v > largest:
            raise s.error(raw, "is out of range")
        if v % 8:
            raise s.error(raw, "is not a multiple of 8")
        sizes.append(v)
    return sizes


def _parse_image_size(s: Setting, raw: Any) -> tuple[int, int]:
    sizes = sorted(_parse_sides(s, raw, 8192))  # as the original does: the product (max bucket area) is what counts
    return (sizes[0], sizes[-1])


def _format_image_size(v: tuple[int, int]) -> str:
    return str(v[0]) if v[0] == v[1] else f"{v[0]},{v[1]}"


def _parse_blocks(s: Setting, raw: Any) -> tuple[str, ...]:
    if isinstance(raw, str):
        if raw.strip().lower() == "all":
            return BLOCK_IDS
        items: list = [p for p in re.split(r"[,\s]+", raw.strip()) if p]
    elif isinstance(raw, (list, tuple)):
        items = list(raw)
    else:
        raise s.error(raw, "is not a list of blocks")
    chosen = set()
    canon = {b.casefold(): b for b in BLOCK_IDS}
    for it in items:
        if not isinstance(it, str) or it.strip().casefold() not in canon:
            word = it if isinstance(it, str) else str(it)
            raise SettingError(f"{s.name}: {_show(it)} is not a block{_suggest(word, BLOCK_IDS)} "
                               f"(allowed: {s.allowed()})", setting=s.name, value=raw)
        chosen.add(canon[it.strip().casefold()])
    if not chosen:
        raise s.error(raw, "selects no block")
    return tuple(b for b in BLOCK_IDS if b in chosen)


def _parse_kwargs(s: Setting, raw: Any) -> dict:
    return parse_kwargs_string(raw, setting=s.name)


def _parse_te_lr(s: Setting, raw: Any) -> float | None:
    f = _parse_float(s, raw)
    if f == 0:
        return None  # 0 means "same as the U-Net learning rate", as in the original
    if f < 0:
        raise s.error(raw, "is out of range")
    return f


def _parse_seed(s: Setting, raw: Any) -> int:
    v = _parse_int(s, raw)
    if v < 0:
        return -1  # any negative seed means "random", as in the original
    s._check_range(raw, v)
    return v


def _parse_lora_name(s: Setting, raw: Any) -> str:
    if raw is None:
        return "untitled"
    if not isinstance(raw, str):
        raise s.error(raw, "is not text")
    name = raw.strip()
    if name.lower().endswith(".safetensors"):
        name = name[: -len(".safetensors")].strip()
    if not name:
        return "untitled"  # as the original
    bad = sorted({c for c in name if c in _BAD_NAME_CHARS or ord(c) < 32 or ord(c) == 127})
    if bad:
        shown = " ".join(repr(c) for c in bad)
        raise s.error(raw, f"contains characters not allowed in a file name: {shown}")
    if ".." in name:
        raise s.error(raw, 'contains ".."')
    if name.endswith(".") or name.startswith("."):
        raise s.error(raw, "starts or ends with a dot")
    if name.split(".")[0].strip().upper() in _WINDOWS_RESERVED:
        raise s.error(raw, "is a reserved device name on Windows")
    if len(name.encode("utf-8")) > 150:
        raise s.error(raw, "is too long")
    return name


def _parse_step_rules(s: Setting, raw: Any) -> str:
    if not isinstance(raw, str):
        raise s.error(raw, "is not text")
    text = re.sub(r"\s+", "", raw)
    if not text:
        return ""
    rules = text.split(",")
    try:
        for rule in rules[:-1]:
            value, steps = rule.split(":")
            float(value)
            int(steps)
        float(rules[-1])
    except ValueError:
        raise s.error(raw, "is not a step-rules string") from None
    return text


# -- sample settings (previews during training) --------------------------------------------------

SAMPLE_SAMPLERS: tuple[str, ...] = ("euler", "ddim")
_MAX_SAMPLE_PROMPTS = 16
_MAX_SAMPLE_SEEDS = 8
_MAX_SAMPLE_MULTIPLIERS = 12
_SAMPLE_ALLOWED = {
    "sample_multipliers": f"numbers from -10 to 10 separated by commas, at most {_MAX_SAMPLE_MULTIPLIERS}; "
                          "empty = the mode's default",
    "sample_seed": f"whole numbers from 0 to {2 ** 32 - 1} separated by commas, at most {_MAX_SAMPLE_SEEDS}",
    "sample_prompts": f"text, one prompt a line, at most {_MAX_SAMPLE_PROMPTS}",
    "sample_size": '"N" or "H,W", multiples of 8 from 64 to 4096; empty = the training size',
}


def _sample_items(s: Setting, raw: Any) -> list:
    """A list, or text separated by commas, semicolons or spaces -> its items."""
    if isinstance(raw, (list, tuple)):
        return list(raw)
    if isinstance(raw, bool):
        raise s.error(raw, "is not a list of numbers")
    if isinstance(raw, (int, float)):
        return [raw]
    if isinstance(raw, str):
        return [p for p in re.split(r"[,;\s]+", raw.strip()) if p]
    raise s.error(raw, "is not a list of numbers")


def _parse_sample_multipliers(s: Setting, raw: Any) -> tuple[float, ...]:
    items = _sample_items(s, raw)
    if len(items) > _MAX_SAMPLE_MULTIPLIERS:
        raise s.error(raw, f"has more than {_MAX_SAMPLE_MULTIPLIERS} multipliers")
    out = []
    for it in items:
        try:
            v = _parse_float(s, it)
        except SettingError:
            raise s.error(raw, f"contains {_show(it)}, which is not a number") from None
        if abs(v) > 10:
            raise s.error(raw, f"contains {_show(it)}, which is out of range")
        out.append(v)
    return tuple(out)


def _format_numbers(v: tuple) -> str:
    return ", ".join(_fmt_number(x) for x in v)


def _parse_sample_seeds(s: Setting, raw: Any) -> tuple[int, ...]:
    items = _sample_items(s, raw)
    if len(items) > _MAX_SAMPLE_SEEDS:
        raise s.error(raw, f"has more than {_MAX_SAMPLE_SEEDS} seeds")
    out = []
    for it in items:
        try:
            v = _parse_int(s, it)
        except SettingError:
            raise s.error(raw, f"contains {_show(it)}, which is not a whole number") from None
        if not 0 <= v <= 2 ** 32 - 1:
            raise s.error(raw, f"contains {_show(it)}, which is out of range")
        out.append(v)
    return tuple(out)


def _parse_sample_prompts(s: Setting, raw: Any) -> str:
    if isinstance(raw, (list, tuple)) and all(isinstance(x, str) for x in raw):
        raw = "\n".join(raw)
    if not isinstance(raw, str):
        raise s.error(raw, "is not text")
    lines = [line.strip() for line in raw.replace("\r\n", "\n").split("\n")]
    lines = [line for line in lines if line]
    if len(lines) > _MAX_SAMPLE_PROMPTS:
        raise s.error(raw, f"has {len(lines)} prompts, more than {_MAX_SAMPLE_PROMPTS}")
    return "\n".join(lines)


def _parse_sample_size(s: Setting, raw: Any) -> tuple[int, int]:
    """"N" or "H,W" in pixels, multiples of 8; unlike image_size the sides keep their order."""
    sizes = _parse_sides(s, raw, 4096)
    return (sizes[0], sizes[-1])


def _format_sample_size(v: tuple[int, int] | None) -> str:
    return "" if v is None else _format_image_size(v)


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------

def _row(name: str, widget: str, typ: type, default: Any, modes: str, help_en: str, help_ja: str,
         *, key: str | None = None, choices: tuple | None = None, **kw: Any) -> Setting:
    return Setting(name=name, key=key or name, widget=widget, type=typ, default=default, choices=choices,
                   modes=_panels(modes), help_en=help_en, help_ja=help_ja, **kw)


_EVERY = "all"
_DATA = "L,D1,M"
_NOT_D2 = "L,I,D1,A,M"
_kw = dict(parser=_parse_kwargs, formatter=format_kwargs_string)

ORIGINAL_SETTINGS: tuple[Setting, ...] = (
    # ---- required parameters, column 1 ----
    _row("network_type", "dropdown", str, "lierla", _EVERY,
         "Network kind: lierla = plain LoRA (linear layers), c3lier = LoCon (adds 3x3 convolutions), "
         "loha = LoHa (Hadamard product).",
         "ネットワークの種類。lierlaが通常のLoRA、c3lier(LoCon)は3x3畳み込みも学習、lohaはLoHa。",
         choices=NETWORK_TYPES),
    _row("network_rank", "dropdown", int, 16, _EVERY,
         "LoRA rank (dim): the size of the LoRA. Start around 16; too large is not better.",
         "LoRAのランク(dim)。LoRAのサイズです。大きすぎても良くないので16程度から始めてください。",
         choices=NETWORK_RANKS, strict_choices=False, min=1),
    _row("network_alpha", "dropdown", float, 8.0, _EVERY,
         "LoRA alpha: the output is scaled by alpha/rank. Usually equal to or below the rank; "
         "iLECO can do better above it. 0 = same as the rank.",
         "LoRAのアルファ。出力はalpha/rank倍されます。通常はrank以下、iLECOではrankより大きい方が良い場合も。"
         "0でrankと同じ値。",
         choices=NETWORK_ALPHAS, strict_choices=False, min=0),
    _row("lora_data_directory", "text", str, "", _DATA,
         "Folder with the training images (and .txt/.caption captions); subfolders are included.",
         "学習画像(とキャプションの.txt/.caption)のフォルダ。サブフォルダも含みます。"),
    _row("diff_target_name", "text", str, "", "M",
         "Multi-ADDifT: suffix that marks the target image of a pair, e.g. _closed_eyes "
         "(a.png + a_closed_eyes.png).",
         "Multi-ADDifT用: ペアのターゲット画像を示す接尾辞。例: _closed_eyes (a.png と a_closed_eyes.png)。"),
    _row("lora_trigger_word", "text", str, "", "L,D1,A,M",
         "Text put in front of every caption (used alone when an image has no caption file).",
         "全てのキャプションの先頭に付けるテキスト。キャプションファイルが無い画像ではこれだけで学習します。"),
    # ---- column 2 ----
    _row("image_size", "text", tuple, (512, 512), "L,I,M",
         'Training resolution: "512" or "768,512". The two sides are sorted; their product is the largest '
         "bucket area (and the latent size in iLECO).",
         "学習解像度。「512」または「768,512」。2辺は昇順に並べ替えられ、その積が最大のbucket面積"
         "(iLECOでは潜在画像の大きさ)になります。",
         key="image_size(height, width)", parser=_parse_image_size, formatter=_format_image_size),
    _row("train_iterations", "text", int, 1000, _EVERY,
         "Number of training steps. iLECO and Difference usually converge in 500-1000.",
         "学習ステップ数。iLECOやDifferenceでは500〜1000程度が目安。", min=1),
    _row("train_batch_size", "text", int, 2, _EVERY,
         "Images per step. Keep it small enough that VRAM does not spill into shared memory; "
         "1-3 is enough for Difference.",
         "1ステップで学習する画像の枚数。VRAMが共有メモリにはみ出さない範囲で。Differenceでは1〜3で十分。", min=1),
    _row("train_learning_rate", "text", float, 1e-4, _EVERY,
         "Learning rate (U-Net, and the text encoder unless set separately). About 1e-4 to 1e-3.",
         "学習率(U-Net用。個別に設定しなければText Encoderも同じ)。1e-4〜1e-3程度。",
         min=0, min_exclusive=True),
    # ---- column 3 ----
    _row("train_optimizer", "dropdown", str, "AdamW", _EVERY,
         "Optimizer. AdamW is recommended; 8-bit variants save memory but lose precision "
         "(AdamW8bit does poorly in Difference). Schedule-free optimizers ignore the scheduler.",
         "最適化関数。AdamW推奨。8bit版は省メモリですが精度が落ちます(DifferenceではAdamW8bitは不向き)。"
         "ScheduleFree系ではスケジューラーは使われません。",
         choices=OPTIMIZERS),
    _row("train_optimizer_settings", "text", dict, {}, _EVERY,
         "Extra optimizer arguments as k=v, one a line or separated by ';'. Values are Python literals: "
         "weight_decay=0.01; betas=(0.9,0.99); strings need quotes.",
         "最適化関数の追加引数。k=v形式で1行に1つ、または';'区切り。値はPythonリテラル"
         "(例: weight_decay=0.01; betas=(0.9,0.99))。文字列は引用符が必要。", **_kw),
    _row("train_lr_scheduler", "dropdown", str, "cosine", _EVERY,
         "How the learning rate changes during training. cosine is a good default. "
         "Ignored with AdaFactor and schedule-free optimizers.",
         "学習中に学習率を変化させる方法。cosineで十分です。AdaFactorやScheduleFree系では無視されます。",
         choices=LR_SCHEDULERS),
    _row("train_lr_scheduler_settings", "text", dict, {}, _EVERY,
         "Extra scheduler arguments as k=v (same syntax as the optimizer settings), checked against the "
         "chosen scheduler before training, e.g. eta_min=1e-5 for cosine_annealing, num_cycles=0.5 for cosine, "
         "lr_end=1e-6 for polynomial.",
         "スケジューラーの追加引数。最適化関数の設定と同じ書式で、学習前に選んだスケジューラーに対して検査されます"
         "(例: cosine_annealingならeta_min=1e-5、cosineならnum_cycles=0.5、polynomialならlr_end=1e-6)。", **_kw),
    _row("save_lora_name", "text", str, "untitled", _NOT_D2,
         'File name (without extension) of the saved LoRA; also names the JSON and CSV. Empty = "untitled".',
         "保存するLoRAのファイル名(拡張子なし)。JSONやCSVの名前にも使われます。空欄ならuntitled。",
         parser=_parse_lora_name),
    _row("use_gradient_checkpointing", "checkbox", bool, False, _EVERY,
         "Use less VRAM at the cost of slightly slower steps (sometimes faster overall with a larger batch).",
         "VRAM使用量を抑える代わりに少し遅くなります。バッチサイズを上げられるので結果的に速くなる場合も。"),
    # ---- block group ----
    _row("network_blocks", "checkgroup", tuple, BLOCK_IDS, _EVERY,
         "U-Net blocks to train (block-wise training). BASE = the text encoder(s). SDXL has IN00-IN08, M00, "
         "OUT00-OUT08 (numbered as in the original); IDs a model lacks select nothing, and the log names them.",
         "学習する層(層別学習)。BASEはText Encoderです。SDXLの層はIN00〜IN08、M00、OUT00〜OUT08(元の拡張と同じ番号)。"
         "モデルにない層は何も選ばず、ログにその名前が出ます。",
         key="network_blocks(BASE = TextEncoder)", choices=BLOCK_IDS, parser=_parse_blocks, formatter=list),
    # ---- option parameters, column 1 ----
    _row("network_resume", "text", str, "", _DATA,
         "Path of an existing LoRA file whose weights start the training (resume).",
         "学習の初期値として読み込む既存のLoRAファイルのパス(学習の再開)。"),
    _row("network_strength", "text", float, 1.0, _EVERY,
         "Strength baked into the saved file (lierla/c3lier): the weights are scaled so the LoRA at weight 1 "
         "acts like this strength.",
         "保存時にLoRAへ焼き込む強さ(lierla/c3lier)。適用強度1でこの値の強さになるよう重みを調整します。",
         min=0, min_exclusive=True),
    _row("network_conv_rank", "dropdown", int, 0, _EVERY,
         "Rank of the 3x3 convolution layers (c3lier, loha). 0 = same as network rank.",
         "c3lier, loha使用時の畳み込み層のrank。0でnetwork rankと同じ値。",
         choices=NETWORK_CONV_RANKS, strict_choices=False, min=0),
    _row("network_conv_alpha", "dropdown", float, 0.0, _EVERY,
         "Alpha of the 3x3 convolution layers (c3lier, loha). 0 = same as network alpha.",
         "c3lier, loha使用時の畳み込み層のalpha。0でnetwork alphaと同じ値。",
         choices=NETWORK_CONV_ALPHAS, strict_choices=False, min=0),
    _row("network_element", "dropdown", str, "Full", _EVERY,
         "Which layers inside the blocks: Full (all, like a normal LoRA), CrossAttention (only layers driven "
         "by the prompt), SelfAttention (only layers not using the prompt). Not used by loha.",
         "学習対象の細かい指定。Full: 通常のLoRAと同じ、CrossAttention: プロンプトで処理する層のみ、"
         "SelfAttention: プロンプトを使わない層のみ。lohaでは無効。",
         choices=NETWORK_ELEMENTS, allow_empty=True, empty_value="Full"),
    _row("network_train_text_encoder", "checkbox", bool, False, "I",
         "Train the text encoder in iLECO (unused by the original; kept for preset compatibility).",
         "iLECOでText Encoderを学習する(元の実装では未使用。プリセット互換のため残しています)。"),
    _row("image_buckets_step", "dropdown", int, 256, _DATA,
         "Bucket size increment in pixels: images are sorted into size buckets by aspect ratio; "
         "a smaller step gives more buckets.",
         "画像をアスペクト比ごとに分類するときの刻み幅(ピクセル)。小さいほど分類が細かくなります。",
         choices=IMAGE_BUCKET_STEPS),
    _row("image_num_multiply", "text", int, 1, _DATA,
         "Repeat the image list this many times.",
         "画像リストを繰り返す回数。", min=1),
    _row("image_min_length", "text", int, 512, _DATA,
         "Smallest bucket side in pixels (smaller sides give the downscaled sub-image buckets).",
         "bucketの最小の辺の長さ(ピクセル)。縮小用の枠にも使われます。", min=64, multiple_of=8),
    _row("image_max_ratio", "text", float, 2.0, _DATA,
         "Largest bucket aspect ratio (long side / short side).",
         "bucketの最大アスペクト比(長辺/短辺)。", min=1),
    # ---- column 2 ----
    _row("sub_image_num", "text", int, 0, _DATA,
         "Extra downscaled copies of each image, in smaller buckets of a similar aspect ratio.",
         "各画像を縮小して、アスペクト比の近い小さい枠にも格納する回数。", min=0),
    _row("image_mirroring", "checkbox", bool, False, _DATA,
         "Also train on horizontally flipped copies.",
         "左右反転した画像も学習に使います。"),
    _row("image_use_filename_as_tag", "checkbox", bool, False, _DATA,
         'Use the file name as the caption ("_" becomes ","; text before "_id_" only).',
         "ファイル名をキャプションとして使います(「_」は「,」に、「_id_」より前の部分のみ)。"),
    _row("image_disable_upscale", "checkbox", bool, False, _DATA,
         "Never upscale an image to fit a bucket; skip that bucket instead.",
         "bucketに合わせるための画像の拡大をしません(その枠には入れません)。"),
    _row("train_fixed_timsteps_in_batch", "checkbox", bool, False, _EVERY,
         "Use one timestep for the whole batch instead of one per image.",
         "バッチ内で同じタイムステップを使います。"),
    _row("train_textencoder_learning_rate", "text", float, None, "L",
         "Text encoder learning rate; empty or 0 = same as train learning rate.",
         "Text Encoderの学習率。空欄または0でtrain learning rateと同じ値。",
         min=0, min_exclusive=True, allow_empty=True, empty_value=None, parser=_parse_te_lr),
    _row("train_seed", "text", int, -1, _EVERY,
         "Random seed; -1 (any negative) = a new random seed each run.",
         "学習時のシード。-1(負の値)で毎回ランダム。", min=-1, max=2 ** 32 - 1, parser=_parse_seed),
    _row("train_min_timesteps", "text", int, 0, _EVERY,
         "Lowest timestep used for training (0-999); must be below the maximum.",
         "学習に使うタイムステップの下限(0〜999)。上限より小さくしてください。", min=0, max=MAX_TIMESTEPS - 1),
    _row("train_max_timesteps", "text", int, 1000, _EVERY,
         "Upper timestep bound (exclusive, 1-1000).",
         "学習に使うタイムステップの上限(この値は含まない、1〜1000)。", min=1, max=MAX_TIMESTEPS),
    # ---- column 3 ----
    _row("train_loss_function", "dropdown", str, "MSE", _EVERY,
         "Loss function: MSE, L1 or Smooth-L1.",
         "損失関数: MSE、L1、Smooth-L1。", choices=LOSS_FUNCTIONS),
    _row("train_lr_step_rules", "text", str, "", _EVERY,
         'Steps for the piecewise_constant scheduler: "multiplier:step,...,final", e.g. "1:100,0.5:200,0.1".',
         "piecewise_constantスケジューラー用のステップ指定。「倍率:ステップ,...,最終倍率」(例: 1:100,0.5:200,0.1)。",
         parser=_parse_step_rules),
    _row("train_lr_warmup_steps", "text", int, 0, _EVERY,
         "Steps over which the learning rate rises from 0 at the start (diffusers schedulers).",
         "学習初期に学習率を徐々に上げるステップ数(diffusers系スケジューラー)。", min=0),
    _row("train_lr_scheduler_num_cycles", "text", int, 1, _EVERY,
         "Number of restarts for cosine_with_restarts.",
         "cosine_with_restartsの反復回数。", min=1),
    _row("train_lr_scheduler_power", "text", float, 1.0, _EVERY,
         "Exponent of the polynomial scheduler.",
         "polynomialスケジューラーの指数。", min=0, min_exclusive=True),
    _row("train_snr_gamma", "text", float, 5.0, _EVERY,
         "Min-SNR-gamma loss weighting (0 = off, typically 1-20, 5 recommended).",
         "Min-SNR-gammaによるタイムステップ補正(0で無効、0〜20、推奨値5)。", min=0),
    _row("save_per_steps", "text", int, 0, _EVERY,
         "Also save the LoRA every N steps (0 = only at the end).",
         "指定ステップごとにLoRAを保存します(0で最後のみ)。", min=0),
    # ---- ADDifT ----
    _row("diff_alt_ratio", "text", float, 1.0, "A,M",
         "Scale of the negative-direction multiplier in ADDifT; below 0 the negative step learns to keep "
         "the original (null regulariser).",
         "ADDifTで負方向の倍率にかける係数。0未満では負方向で元画像を維持するように学習します。"),
    _row("diff_revert_original_target", "checkbox", bool, False, "A,M",
         "Swap the original and target images.",
         "元画像とターゲット画像を入れ替えます。"),
    _row("diff_use_diff_mask", "checkbox", bool, False, "A,M",
         "Restrict the loss to the image mask (alpha channel) / the region that differs.",
         "画像のマスク(アルファチャンネル)や差分のある領域だけで損失を計算します。"),
    # ---- precisions ----
    _row("train_model_precision", "dropdown", str, "fp16", _EVERY,
         "Precision of the frozen model weights: fp16 is fine; bf16 on recent GPUs; fp32 for exactness; "
         "model = fp16, as in the original (not the file's own dtype). On a CPU fp16 runs as bf16 where the "
         "CPU has bf16 instructions, else as fp32.",
         "学習対象以外(モデル本体)の精度。fp16で問題ありません。bf16は新しいGPU向け、fp32は厳密な計算用。"
         "modelは元の拡張と同じくfp16です(ファイルの精度ではありません)。CPUではfp16はbf16命令があればbf16、"
         "なければfp32で動きます。",
         choices=MODEL_PRECISIONS, parser=_parse_model_precision),
    _row("train_lora_precision", "dropdown", str, "fp32", _EVERY,
         "Precision of the trained LoRA weights (fp32 recommended).",
         "学習対象(LoRA)の精度。fp32で問題ありません。", choices=LORA_PRECISIONS),
    _row("save_precision", "dropdown", str, "fp16", _EVERY,
         "Precision of the saved file (model = fp16).",
         "保存時の精度(modelはfp16)。", choices=SAVE_PRECISIONS),
    _row("train_VAE_precision", "dropdown", str, "fp32", _EVERY,
         "Precision of the VAE when encoding images (fp32 avoids NaN with some VAEs).",
         "画像をエンコードするときのVAEの精度(fp32ならNaNを避けられます)。", choices=VAE_PRECISIONS),
    # ---- Difference ----
    _row("diff_load_1st_pass", "text", str, "", "D1",
         "Difference: load the copier LoRA from this file instead of training it (ADDifT: resume from it). "
         "Searched in the LoRA folder; .safetensors is optional.",
         "Difference: コピー機LoRAを学習せずにこのファイルから読み込みます(ADDifTでは学習再開用)。"
         "LoRAフォルダから検索、拡張子は省略可。"),
    _row("diff_save_1st_pass", "checkbox", bool, False, "D1",
         "Difference: also save the copier LoRA as <name>_copy.",
         "Difference: コピー機LoRAも<name>_copyとして保存します。"),
    _row("diff_1st_pass_only", "checkbox", bool, False, "D1",
         "Difference: train (and save) only the copier LoRA.",
         "Difference: コピー機LoRAのみを学習(して保存)します。"),
    _row("logging_save_csv", "checkbox", bool, False, _NOT_D2,
         "Write step, loss and learning rate of every step to a CSV file in logs/ (see the Plot tab).",
         "ステップ、loss、学習率をcsv形式でlogsフォルダに記録します(Plotタブで表示)。"),
    _row("logging_verbose", "checkbox", bool, False, _NOT_D2,
         "Print details (file counts, trained modules) to the console.",
         "詳細(ファイル数、学習モジュールなど)をコンソールに出力します。"),
    _row("save_overwrite", "checkbox", bool, False, _EVERY,
         "Allow overwriting an existing LoRA file of the same name.",
         "同名のLoRAファイルがある場合に上書きします。"),
    _row("save_as_json", "checkbox", bool, False, _NOT_D2,
         "Save the settings as JSON in jsons/<date>/ when training starts.",
         "学習開始時に設定をjsons/<日付>/フォルダにJSONで保存します。"),
    _row("model_v_pred", "checkbox", bool, False, _EVERY,
         "The model predicts v (v-prediction, e.g. SD2.x 768-v, NoobAI-v).",
         "v-predictionモデル(SD2.x 768-vなど)の場合にチェックします。"),
    _row("use_2nd_pass_settings", "checkbox", bool, False, "D2",
         "Difference: train the difference LoRA (2nd pass) with the settings of the 2nd-pass panel.",
         "Difference: 差分LoRA(2nd pass)を2nd pass欄の設定で学習します。"),
)

ADDED_SETTINGS: tuple[Setting, ...] = (
    # captions are read literally, as the original and kohya read them; prompts typed in the
    # iLECO / pair modes keep the Web-UI's emphasis syntax, as the original encoded them
    _row("caption_emphasis", "checkbox", bool, False, "L",
         "Read the Web-UI emphasis syntax in captions: (word) x1.1, [word] /1.1, (word:1.3), BREAK. "
         "Off (default): captions are read literally, brackets and all, as the original TrainTrain and kohya do.",
         "キャプション中のWeb-UIの強調構文((word)で1.1倍、[word]、(word:1.3)、BREAK)を解釈します。"
         "オフ(既定)ではキャプションを括弧も含めてそのまま読みます(元のTrainTrainやkohyaと同じ)。",
         addition=True),
    _row("clip_skip", "text", int, 1, "L,I,D1,D2,A,M",
         "Use the text-encoder output this many layers from the end (2 for most anime models). "
         "SD2 always uses the penultimate layer. Inside the Web-UI, 1 follows the Web-UI's Clip skip option for SD1 models "
         "(Settings > Stable Diffusion), as the original did; 2 or more overrides it.",
         "Text Encoderの最後から何層目の出力を使うか(アニメ系モデルは2が多い)。SD2は常に最後から2層目。"
         "Web-UI内ではSD1モデルで1のときWeb-UIのClip skip設定(設定 > Stable Diffusion)に従います(元のTrainTrainと同じ)。"
         "2以上ならそちらが優先されます。",
         min=1, max=12, addition=True),
    _row("leco_objective", "radio", str, "iLECO", "I",
         "iLECO objective: iLECO (the fast original), erase or enhance (the full LECO objective with guidance).",
         "iLECOの目的関数: iLECO(高速な元の方式)、erase/enhance(ガイダンス付きの本来のLECO)。",
         choices=LECO_OBJECTIVES, addition=True),
    _row("leco_guidance_scale", "text", float, 1.0, "I",
         "Guidance scale of the full LECO objective (erase / enhance).",
         "本来のLECO(erase/enhance)のガイダンススケール。", min=0, addition=True),
    _row("lora_trigger_preservation", "text", float, 0.0, "L",
         "0 = off. W = keep prompts without the trigger word as the base model draws them: each step also trains "
         "the batch's captions with the trigger word taken out to give the frozen model's prediction on the same "
         "noisy images, with weight W (ai-toolkit's differential output preservation; 1 is a good start). Stops the "
         "LoRA from carrying what the captions do not name (a background, a colour) onto other prompts. Needs "
         "lora_trigger_word; costs one frozen and one trained U-Net pass more per step.",
         "0 = 無効。W = トリガーワードのないプロンプトをベースモデルのままに保ちます。毎ステップ、トリガーワードを除いた"
         "キャプションで、同じノイズ画像に対する元モデルの予測を出すように重みWで学習します(ai-toolkitのdifferential "
         "output preservation。1が目安)。キャプションにない要素(背景や色)が他のプロンプトに移るのを防ぎます。"
         "lora_trigger_wordが必要。1ステップあたりU-Net計算が凍結1回・学習1回増えます。", min=0, addition=True),
    _row("leco_trajectory_steps", "text", int, 0, "I",
         "0 = train on pure noise at every timestep (the original). N = take each step's noisy latents from the "
         "model's own DDIM denoising of the original prompt, with the LoRA, in N steps (LECO's method): the LoRA "
         "learns on the images it will really change. Costs up to N extra guided U-Net calls per step (half on average).",
         "0 = 各タイムステップで純粋なノイズで学習(元の方式)。N = 元プロンプトをLoRA込みでN段のDDIMでデノイズした途中の"
         "潜在画像で学習します(LECOの方式)。実際に変える画像で学習できます。1ステップあたり最大N回(平均その半分)の"
         "ガイダンス付きU-Net計算が増えます。", min=0, max=1000, addition=True),
    _row("model_zero_terminal_snr", "checkbox", bool, False, "all",
         "Rescale the noise schedule to zero terminal SNR (for v-prediction models trained that way).",
         "ノイズスケジュールをzero terminal SNRに補正します(そのように学習されたv-predモデル用)。",
         addition=True),
    _row("train_max_grad_norm", "text", float, 0.0, "all",
         "Clip the gradient norm to this value (0 = off).",
         "勾配のノルムをこの値で制限します(0で無効)。", min=0, addition=True),
    _row("latent_cache_on_disk", "checkbox", bool, True, "L,D1,A,M",
         "Keep encoded latents and text embeddings in cache/ so later runs on the same data skip encoding.",
         "エンコード済みの潜在画像とテキスト埋め込みをcacheに保存し、同じデータでの再学習を速くします。",
         addition=True),    # ---- samples during training (issue 12): all neutral by default, so presets without them are unchanged
    _row("sample_every_n_steps", "text", int, 0, _NOT_D2,
         "Draw a grid of sample images every N steps, plus one before training and one at the end "
         "(samples/<name>/). 0 = off. Sampling does not change the trained LoRA.",
         "Nステップごとにサンプル画像のグリッドを生成します(学習前と最後にも。samples/<名前>/)。0で無効。"
         "サンプル生成は学習結果に影響しません。", min=0, addition=True),
    _row("sample_prompts", "text", str, "", _NOT_D2,
         "Sample prompts, one per line. Empty = the mode's own: the trigger word and first captions (LoRA, "
         "Multi-ADDifT), the original and target prompts (iLECO), the pair's prompts (Difference, ADDifT).",
         "サンプル用のプロンプト(1行に1つ)。空欄ならモードに応じて自動: トリガーワードと最初のキャプション"
         "(LoRA、Multi-ADDifT)、元とターゲットのプロンプト(iLECO)、ペアのプロンプト(Difference、ADDifT)。",
         parser=_parse_sample_prompts, addition=True),
    _row("sample_negative_prompt", "text", str, "", _NOT_D2,
         "Negative prompt of the samples.",
         "サンプル用のネガティブプロンプト。", addition=True),
    _row("sample_multipliers", "text", tuple, (), _NOT_D2,
         'LoRA strengths, one grid column each, e.g. "0, 0.5, 1". Empty = "0, 0.5, 1" ("-1, 0, 1" for the '
         "ADDifT sliders).",
         "LoRAの適用強度(グリッドの列)。例: 「0, 0.5, 1」。空欄なら「0, 0.5, 1」(スライダーのADDifTでは"
         "「-1, 0, 1」)。",
         parser=_parse_sample_multipliers, formatter=_format_numbers, allow_empty=True, empty_value=(),
         addition=True),
    _row("sample_seed", "text", tuple, (0,), _NOT_D2,
         'Seed of the samples; several ("0, 1") give a row per prompt and seed. Separate from the training seed.',
         "サンプルのシード。複数指定(「0, 1」)するとプロンプトとシードごとに1行。学習のシードとは別です。",
         parser=_parse_sample_seeds, formatter=_format_numbers, allow_empty=True, empty_value=(0,),
         addition=True),
    _row("sample_steps", "text", int, 20, _NOT_D2,
         "Sampling steps per image.",
         "サンプル1枚あたりのサンプリングステップ数。", min=1, max=MAX_TIMESTEPS, addition=True),
    _row("sample_cfg_scale", "text", float, 7.0, _NOT_D2,
         "CFG scale of the samples (1 = no guidance, faster).",
         "サンプルのCFGスケール(1でガイダンスなし、高速)。", min=0, max=30, addition=True),
    _row("sample_sampler", "dropdown", str, "euler", _NOT_D2,
         "Sampler of the samples: euler or ddim (both deterministic).",
         "サンプルのサンプラー: euler または ddim(どちらも決定的)。", choices=SAMPLE_SAMPLERS, addition=True),
    _row("sample_size", "text", tuple, None, _NOT_D2,
         'Sample size in pixels: "512" or "H,W" (multiples of 8). Empty = the training size.',
         "サンプルの大きさ(ピクセル): 「512」または「高さ,幅」(8の倍数)。空欄なら学習の解像度。",
         parser=_parse_sample_size, formatter=_format_sample_size, allow_empty=True, empty_value=None,
         addition=True),
    # cycle is the default so every ADDifT file made by the original (the shipped presets, its users'
    # saved JSONs, none of which has this row) trains as it did there; its presets were tuned on it
    _row("diff_timestep_schedule", "radio", str, "cycle", "A,M",
         "ADDifT timesteps. cycle (the original's): 5 fixed values min + (max-min)*k/10 for k = 1, 3, 5, 7, 9 "
         "(550, 650, 750, 850, 950 for 500-1000), in turn, each for one +/- pair of steps. uniform: a random "
         "timestep in [min, max) every step, shared by the +/- branches of that step.",
         "ADDifTのタイムステップ。cycle(元の拡張と同じ): 最小値 + (最大値-最小値)×k/10(k = 1, 3, 5, 7, 9)の"
         "5つの固定値を順に使い、それぞれを+/-の2ステップで共有します(500〜1000なら550, 650, 750, 850, 950)。"
         "uniform: 毎ステップ[最小値, 最大値)から一様にランダムに選びます(そのステップの+/-両方で共通)。",
         choices=DIFF_TIMESTEP_SCHEDULES, addition=True),
)

#: Every setting: the 59 original rows in their order, then the additions.
SETTINGS: tuple[Setting, ...] = ORIGINAL_SETTINGS + ADDED_SETTINGS
SETTINGS_BY_NAME: Mapping[str, Setting] = {s.name: s for s in SETTINGS}
_BY_KEY: dict[str, Setting] = {}
for _s in SETTINGS:
    for _alias in (_s.name, _s.key, _s.label, _s.name.replace("_", " ")):
        _BY_KEY.setdefault(_alias.casefold(), _s)
_BY_KEY["train_fixed_timesteps_in_batch"] = SETTINGS_BY_NAME["train_fixed_timsteps_in_batch"]
_BY_KEY["train fixed timesteps in batch"] = SETTINGS_BY_NAME["train_fixed_timsteps_in_batch"]
#: Keys that contain "=" themselves ("network_blocks(BASE = TextEncoder)"), longest first.
_KEYS_WITH_EQUALS = sorted((k for k in _BY_KEY if "=" in k), key=len, reverse=True)
_D2_NAMES = frozenset(s.name for s in SETTINGS if "Difference2" in s.modes)

#: Non-setting fields of a job: attribute → JSON key as the original writes it.
META_KEYS: dict[str, str] = {
    "mode": "mode", "model": "model", "vae": "vae", "te": "te",
    "original_prompt": "original prompt", "target_prompt": "target prompt",
    "negative_prompt": "negative prompt", "original_image": "original image", "target_image": "target image",
}
_META_BY_KEY = {}
for _attr, _key in META_KEYS.items():
    _META_BY_KEY[_attr] = _attr
    _META_BY_KEY[_key] = _attr
_SECOND_KEYS = ("2nd pass", "2nd_pass", "second_pass", "second pass")


def get_setting(name_or_key: str) -> Setting:
    """Find a row by attribute name, full JSON key or UI label (case-insensitive)."""
    s = _BY_KEY.get(name_or_key.strip().casefold()) if isinstance(name_or_key, str) else None
    if s is None:
        word = str(name_or_key)
        raise SettingError(f"unknown setting {_show(name_or_key)}{_suggest(word, _all_key_names())}",
                           setting=None, value=name_or_key)
    return s


def _all_key_names() -> list[str]:
    return [s.name for s in SETTINGS] + [s.key for s in SETTINGS if s.key != s.name] + list(META_KEYS)


def settings_for_mode(mode: str) -> tuple[Setting, ...]:
    """The rows visible in a mode (or in the "Difference2" panel), in table order."""
    panel = _parse_mode(mode, allow_panel=True)
    return tuple(s for s in SETTINGS if panel in s.modes)


def _parse_mode(raw: Any, *, allow_panel: bool = False) -> str:
    names = PANELS if allow_panel else MODES
    if isinstance(raw, str):
        folded = re.sub(r"[\s_\-]", "", raw).casefold()
        for m in names:
            if re.sub(r"[\s_\-]", "", m).casefold() == folded:
                return m
    word = raw if isinstance(raw, str) else str(raw)
    raise SettingError(f"mode: {_show(raw)} is not a mode{_suggest(word, names)} (allowed: {', '.join(names)})",
                       setting="mode", value=raw)


def _parse_meta(attr: str, raw: Any) -> str:
    if attr == "mode":
        return _parse_mode(raw)
    if raw is None:
        return ""
    if not isinstance(raw, str):
        raise SettingError(f"{attr}: {_show(raw)} is not text (allowed: text)", setting=attr, value=raw)
    if attr in ("model", "vae", "te", "original_image", "target_image"):
        raw = raw.strip()
        if raw == "None":  # the original's dropdown entry for "no VAE / no text encoder"
            return ""
    return raw


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

_MISSING = object()


class Config:
    """The typed, validated settings of one training job (immutable).

    Every row of ``SETTINGS`` is an attribute (``cfg.network_rank``), plus ``mode``, ``model``,
    ``vae``, ``te``, ``original_prompt``, ``target_prompt``, ``negative_prompt``,
    ``original_image``, ``target_image`` (strings, "" = not set) and ``second_pass``.

    ``second_pass`` is a Config only in Difference mode with ``use_2nd_pass_settings`` on:
    its rows visible in the "Difference2" panel are the 2nd-pass values, every other row equals
    pass 1.  Otherwise it is None and pass 2 uses this Config (``cfg.second_pass or cfg``).

    Build with :meth:`defaults`, :meth:`from_dict`, :meth:`load_preset`, ``Config(mode, **values)``;
    derive with :meth:`replace` / :meth:`with_overrides`.
    """

    mode: str
    model: str
    vae: str
    te: str
    original_prompt: str
    target_prompt: str
    negative_prompt: str
    original_image: str
    target_image: str
    second_pass: "Config | None"

    def __init__(self, mode: str = "LoRA", **values: Any):
        base = Config._assemble(_default_meta(_parse_mode(mode)), _default_values(), None)
        built = base.replace(**values) if values else base
        object.__setattr__(self, "__dict__", dict(built.__dict__))

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def defaults(cls, mode: str = "LoRA") -> "Config":
        """The table's defaults in the given mode."""
        return cls._assemble(_default_meta(_parse_mode(mode)), _default_values(), None)

    @classmethod
    def _assemble(cls, meta: dict, values: dict, second: dict | None) -> "Config":
        """Build from typed values; ``second`` = the 2nd-pass values of the D2 rows (or None)."""
        problems = _cross_check(values, "")
        enabled = meta["mode"] == "Difference" and values["use_2nd_pass_settings"]
        second_cfg = None
        if enabled:
            merged = dict(values)
            if second:
                merged.update({k: v for k, v in second.items() if k in _D2_NAMES})
            merged["use_2nd_pass_settings"] = True
            problems += _cross_check(merged, "2nd pass: ")
            second_cfg = cls._raw(dict(meta), merged, None)
        if problems:
            raise _combine(problems)
        return cls._raw(meta, values, second_cfg)

    @classmethod
    def _raw(cls, meta: dict, values: dict, second: "Config | None") -> "Config":
        obj = object.__new__(cls)
        d = {}
        d.update(meta)
        d.update(values)
        d["second_pass"] = second
        object.__setattr__(obj, "__dict__", d)
        return obj

    @classmethod
    def from_dict(cls, d: Any, *, strict: bool = True) -> "Config":
        """Build from a settings dict in the original's preset format (full row keys such as
        ``"image_size(height, width)"``) or with short names, plus "mode", "model", "vae", "te",
        "original prompt", "target prompt", "negative prompt", "original image", "target image"
        and "2nd pass" (a dict or null).  Missing rows take their defaults.  With ``strict``
        unknown keys are an error, otherwise they are ignored.  Raises SettingError."""
        if not isinstance(d, Mapping):
            raise SettingError(f"settings must be a JSON object ({{\"key\": value, …}}), not {_kind(d)}",
                               value=d)
        problems: list[SettingError] = []
        meta = _default_meta("LoRA")
        values = _default_values()
        seen_meta: dict[str, Any] = {}
        second_raw: Any = _MISSING
        unknown: list[str] = []
        given = _collect(d, problems, unknown, "")
        for key, raw in d.items():
            if isinstance(key, str) and key.strip().casefold() in _SECOND_KEYS:
                second_raw = raw
            elif isinstance(key, str) and key.strip() in _META_BY_KEY:
                attr = _META_BY_KEY[key.strip()]
                try:
                    val = _parse_meta(attr, raw)
                except SettingError as e:
                    problems.append(e)
                    continue
                if attr in seen_meta and seen_meta[attr] != val:
                    problems.append(SettingError(f"{attr}: given twice with different values", setting=attr))
                seen_meta[attr] = val
                meta[attr] = val
        values.update(given)

        second: dict | None = None
        second_flag = False
        if second_raw is not _MISSING and second_raw is not None:
            if not isinstance(second_raw, Mapping):
                problems.append(SettingError(f'"2nd pass": expected an object or null, not {_kind(second_raw)}',
                                             setting="2nd pass", value=second_raw))
            else:
                second_unknown: list[str] = []
                second = _collect(second_raw, problems, second_unknown, "2nd pass: ", only=_D2_NAMES)
                unknown += [f"2nd pass: {k}" for k in second_unknown]
                second_flag = bool(second.get("use_2nd_pass_settings", False))
        if unknown and strict:
            problems.append(_unknown_error(unknown))
        if problems:
            raise _combine(problems)
        # The original's Difference_Use2ndPass preset sets the flag only at the top level while
        # "2nd pass".use_2nd_pass_settings is false: either one switches the 2nd pass on.
        values["use_2nd_pass_settings"] = bool(values["use_2nd_pass_settings"] or second_flag)
        return cls._assemble(meta, values, second)

    @classmethod
    def load_preset(cls, path: str | os.PathLike, *, strict: bool = True) -> "Config":
        """Read a preset / settings JSON file.  Raises SettingError naming the file."""
        return load_preset(path, strict=strict)

    # -- derivation ---------------------------------------------------------------------------
    def replace(self, **kw: Any) -> "Config":
        """A copy with some values changed.  Keys: setting names (or full keys via from_dict),
        meta fields (mode, model, …) and ``second_pass`` (a Config, a dict of 2nd-pass values,
        or None to switch the 2nd pass off).  Raw values are parsed like JSON/CLI input."""
        meta = {a: getattr(self, a) for a in META_KEYS}
        values = self.values
        second = self._second_values()
        problems: list[SettingError] = []
        second_kw = kw.pop("second_pass", _MISSING)
        for name, raw in kw.items():
            if name in META_KEYS:
                try:
                    meta[name] = _parse_meta(name, raw)
                except SettingError as e:
                    problems.append(e)
                continue
            try:
                s = SETTINGS_BY_NAME.get(name) or get_setting(name)
                values[s.name] = s.parse(raw)
            except SettingError as e:
                problems.append(e)
        if second_kw is not _MISSING:
            if second_kw is None:
                values["use_2nd_pass_settings"] = False
                second = None
            elif isinstance(second_kw, Config):
                values["use_2nd_pass_settings"] = True
                second = {k: getattr(second_kw, k) for k in _D2_NAMES}
            elif isinstance(second_kw, Mapping):
                values["use_2nd_pass_settings"] = True
                base = second if second is not None else {k: values[k] for k in _D2_NAMES}
                unknown: list[str] = []
                base.update(_collect(second_kw, problems, unknown, "2nd pass: ", only=_D2_NAMES))
                if unknown:
                    problems.append(_unknown_error([f"2nd pass: {k}" for k in unknown]))
                second = base
            else:
                problems.append(SettingError(f"second_pass: expected a Config, a dict or None, not "
                                             f"{_kind(second_kw)}", setting="second_pass", value=second_kw))
        if problems:
            raise _combine(problems)
        return Config._assemble(meta, values, second)

    def with_overrides(self, pairs: Iterable[str] | Mapping[str, Any] | None) -> "Config":
        """Apply CLI-style overrides: ``["train_iterations=500", "image_size(height, width)=768,512"]``
        or a dict.  Keys are short names, full keys, labels or meta fields; prefix a key with
        ``2nd.`` (or ``2nd pass.``) to set the 2nd-pass value of a Difference job."""
        if pairs is None:
            return self
        if isinstance(pairs, Mapping):
            items = list(pairs.items())
        else:
            items = []
            for p in pairs:
                if not isinstance(p, str) or "=" not in p:
                    raise SettingError(f"--set: {_show(p)} is not KEY=VALUE (e.g. train_iterations=500)",
                                       value=p)
                k, _, v = p.partition("=")
                low = p.strip().casefold()
                for full in _KEYS_WITH_EQUALS:  # the key itself may contain "="
                    if low.startswith(full) and low[len(full):].lstrip().startswith("="):
                        k, v = full, p.strip()[len(full):].lstrip()[1:]
                        break
                items.append((k, v))
        kw: dict[str, Any] = {}
        second: dict[str, Any] = {}
        problems: list[SettingError] = []
        for k, v in items:
            if not isinstance(k, str):
                problems.append(SettingError(f"--set: {_show(k)} is not a setting name", value=k))
                continue
            key = k.strip()
            m = re.match(r"(?i)^(2nd(?:[ _]pass)?|second_pass)\.(.+)$", key)
            target = kw
            if m:
                key, target = m.group(2).strip(), second
            if key in _META_BY_KEY and target is kw:
                kw[_META_BY_KEY[key]] = v
                continue
            try:
                s = get_setting(key)
            except SettingError as e:
                problems.append(e)
                continue
            if target is second and s.name not in _D2_NAMES:
                problems.append(SettingError(f"2nd pass: {s.name} cannot differ in the 2nd pass "
                                             f"(allowed: {', '.join(sorted(_D2_NAMES))})", setting=s.name))
                continue
            target[s.name] = v
        if second and not problems:
            # only Difference has a 2nd pass: elsewhere the values would vanish without a word
            try:
                mode = _parse_mode(kw["mode"]) if "mode" in kw else self.mode
            except SettingError:
                mode = "Difference"  # replace() reports the bad mode itself
            if mode != "Difference":
                names = ", ".join(f"2nd.{k}" for k in second)
                problems.append(SettingError(f"{names}: {mode} mode has no 2nd pass (only Difference has one); "
                                             f"drop the 2nd. prefix or use --mode Difference",
                                             setting=next(iter(second)), value=mode))
        if problems:
            raise _combine(problems)
        if second:
            kw["second_pass"] = second
        return self.replace(**kw)

    def unused_in_mode(self, pairs: Iterable[str] | Mapping[str, Any] | None) -> str | None:
        """One line naming the settings among ``pairs`` (as given to with_overrides) that this job's
        mode does not use, or None.  A warning, not an error: presets and saved jobs carry every
        row, and a command line reused for another mode should still run."""
        if not pairs:
            return None
        keys = list(pairs) if isinstance(pairs, Mapping) else [str(p).partition("=")[0] for p in pairs]
        mode_panels = {self.mode} | ({"Difference2"} if self.mode == "Difference" else set())
        unused = []
        for k in keys:
            k = str(k).strip()
            if re.match(r"(?i)^(2nd(?:[ _]pass)?|second_pass)\.", k) or k in _META_BY_KEY:
                continue
            s = _BY_KEY.get(k.casefold())
            if s is not None and not (s.modes & mode_panels) and s.name not in unused:
                unused.append(s.name)
        if not unused:
            return None
        return (f"warning: not used in {self.mode} mode, ignored: {', '.join(unused)} "
                f"(python -m trainer settings --mode {self.mode} lists the settings it uses)")

    # -- views --------------------------------------------------------------------------------
    @property
    def values(self) -> dict[str, Any]:
        """name → typed value for every row of SETTINGS (a fresh dict)."""
        return {s.name: self.__dict__[s.name] for s in SETTINGS}

    @property
    def train_fixed_timesteps_in_batch(self) -> bool:
        """Correctly spelled alias of the original's ``train_fixed_timsteps_in_batch``."""
        return self.__dict__["train_fixed_timsteps_in_batch"]

    def values_for_mode(self, mode: str | None = None) -> dict[str, Any]:
        """name → value of the rows visible in ``mode`` (default: this job's mode)."""
        return {s.name: self.__dict__[s.name] for s in settings_for_mode(mode or self.mode)}

    def settings_for_mode(self, mode: str | None = None) -> tuple[Setting, ...]:
        return settings_for_mode(mode or self.mode)

    def _second_values(self) -> dict | None:
        sp = self.__dict__.get("second_pass")
        return None if sp is None else {k: sp.__dict__[k] for k in _D2_NAMES}

    def to_dict(self) -> dict[str, Any]:
        """The original's JSON format: every row under its full key, values as the original
        writes them, then "mode", "model", "vae", "te", the prompts and images, and "2nd pass":
        a dict of the same keys (Difference with the 2nd pass on), else null."""
        out: dict[str, Any] = {s.key: s.format(self.__dict__[s.name]) for s in SETTINGS}
        for attr, key in META_KEYS.items():
            v = self.__dict__[attr]
            out[key] = "None" if attr in ("vae", "te") and v == "" else v
        sp = self.second_pass
        out["2nd pass"] = None if sp is None else {s.key: s.format(sp.__dict__[s.name]) for s in SETTINGS}
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=4, ensure_ascii=False) + "\n"

    def save_preset(self, path: str | os.PathLike, *, overwrite: bool = False) -> str:
        """Write ``to_dict()`` as JSON, atomically; refuses to replace an existing file unless
        ``overwrite``.  Returns the path written."""
        return save_preset(self, path, overwrite=overwrite)

    # -- dunder -------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:  # only called for names that do not exist
        if name.startswith("_"):
            raise AttributeError(name)
        raise AttributeError(f"Config has no setting {name!r}{_suggest(name, list(SETTINGS_BY_NAME) + list(META_KEYS))}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"Config is immutable; use cfg.replace({name}=...)")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("Config is immutable")

    def __eq__(self, other: Any) -> bool:
        if not isinstance(other, Config):
            return NotImplemented
        return self.__dict__ == other.__dict__

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        defaults = _default_values()
        parts = [f"mode={self.mode!r}"]
        parts += [f"{a}={self.__dict__[a]!r}" for a in META_KEYS if a != "mode" and self.__dict__[a]]
        parts += [f"{k}={v!r}" for k, v in self.values.items() if v != defaults[k]]
        if self.second_pass is not None:
            sv = self._second_values()
            diff = {k: v for k, v in sv.items() if v != self.__dict__[k]}
            parts.append(f"second_pass={diff!r}")
        return f"Config({', '.join(parts)})"


def _default_values() -> dict[str, Any]:
    return {s.name: s.default for s in SETTINGS}


def _default_meta(mode: str) -> dict[str, str]:
    meta = {a: "" for a in META_KEYS}
    meta["mode"] = mode
    return meta


def _kind(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def _collect(d: Mapping, problems: list, unknown: list, prefix: str, only: frozenset | None = None) -> dict:
    """Parse the setting keys of a dict; meta and 2nd-pass keys are skipped (handled by the caller).
    With ``only``, rows outside it are recognised but not parsed (pass-2 inherits them)."""
    out: dict[str, Any] = {}
    for key, raw in d.items():
        if not isinstance(key, str):
            unknown.append(_show(key))
            continue
        k = key.strip()
        if k in _META_BY_KEY or k.casefold() in _SECOND_KEYS:
            continue
        s = _BY_KEY.get(k.casefold())
        if s is None:
            unknown.append(key)
            continue
        if only is not None and s.name not in only:
            continue
        try:
            v = s.parse(raw)
        except SettingError as e:
            problems.append(SettingError(prefix + str(e), setting=e.setting, value=e.value) if prefix else e)
            continue
        if s.name in out and out[s.name] != v:
            problems.append(SettingError(f"{prefix}{s.name}: given twice with different values "
                                         f"({_show(s.format(out[s.name]))} and {_show(raw)})", setting=s.name))
            continue
        out[s.name] = v
    return out


def _unknown_error(unknown: list[str]) -> SettingError:
    names = _all_key_names()
    parts = []
    for u in unknown:
        bare = u.split(": ", 1)[-1] if u.startswith("2nd pass: ") else u
        parts.append(_show(u) + _suggest(bare, names))
    word = "setting" if len(unknown) == 1 else "settings"
    return SettingError(f"unknown {word}: {', '.join(parts)} (see --list-settings)", setting=None,
                        value=unknown[0])


def _cross_check(values: dict, prefix: str) -> list[SettingError]:
    lo, hi = values["train_min_timesteps"], values["train_max_timesteps"]
    if lo >= hi:
        return [SettingError(f"{prefix}train_min_timesteps: {lo} is not below train_max_timesteps {hi} "
                             f"(allowed: 0 <= min < max <= {MAX_TIMESTEPS})",
                             setting="train_min_timesteps", value=lo)]
    return []


def _combine(problems: list[SettingError]) -> SettingError:
    if len(problems) == 1:
        return problems[0]
    msgs = [str(p) for p in problems]
    return SettingError(f"{len(msgs)} problems:\n" + "\n".join(f"- {m}" for m in msgs),
                        setting=problems[0].setting, value=problems[0].value, problems=msgs)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

def load_preset(path: str | os.PathLike, *, strict: bool = True) -> Config:
    """Read a preset / settings JSON file into a Config.  Every problem is a SettingError
    whose message starts with the file name."""
    p = os.fspath(path)
    try:
        with open(p, "r", encoding="utf-8-sig") as f:
            text = f.read()
    except FileNotFoundError:
        raise SettingError(f"{p}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SettingError(f"{p}: cannot read the file ({e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise SettingError(f"{p}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except RecursionError:
        raise SettingError(f"{p}: not valid JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise SettingError(f"{p}: expected a JSON object {{\"key\": value, …}}, found {_kind(data)}")
    try:
        return Config.from_dict(data, strict=strict)
    except SettingError as e:
        raise SettingError(f"{p}: {e}", setting=e.setting, value=e.value,
                           problems=[f"{p}: {m}" for m in e.problems]) from None


def save_preset(cfg: Config, path: str | os.PathLike, *, overwrite: bool = False) -> str:
    """Write ``cfg.to_dict()`` to ``path`` atomically (temp file in the same folder, then rename).
    An existing file is kept unless ``overwrite``: FileExistsError.  Returns the path."""
    p = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(p))
    os.makedirs(folder, exist_ok=True)
    if not overwrite and os.path.lexists(p):
        raise FileExistsError(errno.EEXIST, "file exists (use overwrite=True to replace it)", p)
    text = cfg.to_json()
    from .atomic import temp_file  # the umask's permissions, not mkstemp's 0600

    fd, tmp = temp_file(p)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, p)
        else:
            try:
                os.link(tmp, p)  # atomic "create only if absent"
            except FileExistsError:
                raise FileExistsError(errno.EEXIST, "file exists (use overwrite=True to replace it)", p) from None
            except OSError:  # no hard links on this file system
                if os.path.lexists(p):
                    raise FileExistsError(errno.EEXIST, "file exists (use overwrite=True to replace it)", p) \
                        from None
                os.replace(tmp, p)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    return p


# ---------------------------------------------------------------------------------------------
# CLI helpers
# ---------------------------------------------------------------------------------------------

def describe_settings(mode: str | None = None, lang: str = "en") -> str:
    """A plain-text table of the settings (name, default, allowed values, help) for --list-settings.
    ``mode`` limits it to the rows visible in that mode; ``lang`` is "en" or "ja"."""
    if lang not in ("en", "ja"):
        raise SettingError(f'lang: {_show(lang)} is not a language (allowed: "en", "ja")', value=lang)
    rows = settings_for_mode(mode) if mode else SETTINGS
    name_w = max(len(s.name) for s in rows)
    lines = []
    title = f"Settings ({mode})" if mode else "Settings (all modes)"
    lines.append(title)
    lines.append("=" * len(title))
    for s in rows:
        default = s.format(s.default)
        if isinstance(default, list):
            default = "all" if tuple(default) == BLOCK_IDS else ",".join(default)
        default = '""' if default == "" else str(default)
        tag = "  [addition]" if s.addition else ""
        modes = "all modes" if s.modes >= frozenset(MODES) else ", ".join(m for m in PANELS if m in s.modes)
        lines.append(f"{s.name.ljust(name_w)}  default {default}  ({s.type.__name__}; {modes}){tag}")
        if s.key != s.name:
            lines.append(f"{'':{name_w}}  JSON key: {s.key}")
        lines.append(f"{'':{name_w}}  allowed: {s.allowed()}")
        lines.append(f"{'':{name_w}}  {s.help_ja if lang == 'ja' else s.help_en}")
    return "\n".join(lines) + "\n"


_SHORTCUTS = (
    ("--iterations", "train_iterations", "number of training steps"),
    ("--lr", "train_learning_rate", "learning rate"),
    ("--rank", "network_rank", "LoRA rank (dim)"),
    ("--alpha", "network_alpha", "LoRA alpha"),
    ("--batch-size", "train_batch_size", "batch size"),
    ("--name", "save_lora_name", "output name (without extension)"),
    ("--seed", "train_seed", "random seed (-1 = random)"),
)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--set KEY=VALUE`` (repeatable, ``args.set``), the shortcuts ``--iterations --lr --rank
    --alpha --batch-size --name --seed`` (read them with :func:`shortcut_overrides`) and
    ``--list-settings`` (``args.list_settings``) to an argparse parser.  :func:`apply_args` applies
    all of them to a Config."""
    group = parser.add_argument_group("training settings")
    group.add_argument("--set", dest="set", action="append", default=[], metavar="KEY=VALUE",
                       help="set any setting by short name or JSON key (repeatable), e.g. "
                            "--set network_type=c3lier --set image_size=768,512; prefix 2nd. for the "
                            "Difference 2nd pass (--set 2nd.network_rank=4)")
    for flag, name, text in _SHORTCUTS:
        group.add_argument(flag, dest="cfg_" + name, default=None, metavar=name.upper().split("_")[-1],
                           help=f"{text} (= --set {name}=...)")
    group.add_argument("--list-settings", dest="list_settings", action="store_true",
                       help="list every setting with its default, allowed values and help, then exit")
    return parser


def shortcut_overrides(args: argparse.Namespace) -> list[str]:
    """``KEY=VALUE`` overrides from the named shortcuts (--iterations, --lr, …) that were given."""
    pairs = []
    for _flag, name, _text in _SHORTCUTS:
        v = getattr(args, "cfg_" + name, None)
        if v is not None:
            pairs.append(f"{name}={v}")
    return pairs


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    """Every ``KEY=VALUE`` override of the command line: --set entries, then the shortcuts."""
    return list(getattr(args, "set", None) or []) + shortcut_overrides(args)


def apply_args(cfg: Config, args: argparse.Namespace) -> Config:
    """``cfg`` with the command line's --set overrides and shortcuts applied."""
    return cfg.with_overrides(overrides_from_args(args))
