"""Sample grids: what a LoRA does at several strengths, drawn with trainer.sampling.

A grid has one row per (prompt, seed), prompts first, and one column per multiplier (LoRA strength),
with the prompts, seeds and multipliers written on it in PIL's default font (no font files).

- :class:`TrainingSamples` is the engine's hook: a grid before training (step 0), every
  ``sample_every_n_steps`` and at the end of each pass, saved as
  ``samples/<save_lora_name>/<start time>-step<N>.png`` (``-pass1-`` / ``-pass2-`` in Difference mode).
  It never changes what is trained: its noise comes from its own generators, the global RNG state is
  restored, and so are the networks' multipliers, the modules' train/eval flags and where the text
  encoders and the VAE were; everything runs without autograd.
- :func:`strength_grid` draws the grid of a LoRA file on a model (``python -m trainer sample``, the demo).
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from .atomic import atomic_write
from .sampling import generate, to_pil

DEFAULT_MULTIPLIERS = (0.0, 0.5, 1.0)
SLIDER_MULTIPLIERS = (-1.0, 0.0, 1.0)  # ADDifT trains a slider: both directions are the result
SLIDER_MODES = frozenset({"ADDifT", "Multi-ADDifT"})
MAX_DEFAULT_PROMPTS = 2
BATCH = 4  # images per sampler call: bounded memory at large sizes, batched work at small ones


@dataclass
class GridSpec:
    """What one grid draws. ``size`` is (height, width) in pixels; None = the model's native size."""

    prompts: list
    multipliers: list
    seeds: list = field(default_factory=lambda: [0])
    negative_prompt: str = ""
    steps: int = 20
    cfg_scale: float = 7.0
    sampler: str = "euler"
    size: Optional[tuple] = None
    clip_skip: int = 1
    zero_terminal_snr: bool = False
    v_prediction: Optional[bool] = None

    @property
    def rows(self) -> list:
        """(prompt, seed) per row: each prompt with every seed."""
        return [(p, s) for p in self.prompts for s in self.seeds]


def config_multipliers(cfg) -> list:
    """``sample_multipliers``, or the mode's default (sliders: -1, 0, 1)."""
    if cfg.sample_multipliers:
        return list(cfg.sample_multipliers)
    return list(SLIDER_MULTIPLIERS if cfg.mode in SLIDER_MODES else DEFAULT_MULTIPLIERS)


def config_prompts(cfg, mode=None) -> list:
    """``sample_prompts`` (one a line), else the mode's ``sample_prompts(cfg)``, else the empty prompt."""
    if cfg.sample_prompts.strip():
        return [line.strip() for line in cfg.sample_prompts.splitlines() if line.strip()]
    default = getattr(mode, "sample_prompts", None)
    prompts = list(dict.fromkeys(default(cfg))) if default is not None else []
    return prompts[:MAX_DEFAULT_PROMPTS] or [""]


def spec_from_config(cfg, mode=None, *, size=None, v_prediction=None, zero_terminal_snr=False) -> GridSpec:
    """The grid of a training job. ``size``: the training size the mode used (pair modes: the images'),
    used when ``sample_size`` is empty; else ``image_size``."""
    return GridSpec(
        prompts=config_prompts(cfg, mode), multipliers=config_multipliers(cfg), seeds=list(cfg.sample_seed),
        negative_prompt=cfg.sample_negative_prompt, steps=cfg.sample_steps, cfg_scale=cfg.sample_cfg_scale,
        sampler=cfg.sample_sampler, size=tuple(cfg.sample_size or size or cfg.image_size), clip_skip=cfg.clip_skip,
        zero_terminal_snr=zero_terminal_snr, v_prediction=v_prediction)


# ---------------------------------------------------------------- drawing


class Cancelled(Exception):
    """Stop was pressed while a grid was being drawn."""


def draw_columns(components, network, spec: GridSpec, *, zero_column: Optional[torch.Tensor] = None,
                 cancelled=lambda: False) -> list:
    """One [rows, 3, H, W] tensor per multiplier, with ``network`` (applied) at that multiplier.
    ``zero_column``: the images of multiplier 0 when already known (the model without the LoRA).
    ``cancelled()`` is asked between sampler calls; when true, :class:`Cancelled` is raised."""
    columns = []
    for m in spec.multipliers:
        if m == 0 and zero_column is not None:
            columns.append(zero_column)
            continue
        with network.multiplier(float(m)):
            columns.append(draw_rows(components, spec, cancelled=cancelled))
    return columns


def draw_rows(components, spec: GridSpec, *, cancelled=lambda: False) -> torch.Tensor:
    """[rows, 3, H, W]: one image per (prompt, seed) of ``spec`` on the model as it is now."""
    rows = spec.rows
    h, w = spec.size if spec.size else (None, None)
    chunks = []
    for i in range(0, len(rows), BATCH):
        if cancelled():
            raise Cancelled()
        part = rows[i:i + BATCH]
        chunks.append(generate(
            components, [p for p, _ in part], negative_prompt=spec.negative_prompt, steps=spec.steps,
            guidance=spec.cfg_scale, height=h, width=w, scheduler=spec.sampler, clip_skip=spec.clip_skip,
            zero_terminal_snr=spec.zero_terminal_snr, seeds=[s for _, s in part],
            v_prediction=spec.v_prediction))
    return torch.cat(chunks)


def _font(size: int = 12):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font built into Pillow
    except TypeError:  # older Pillow (the Web-UI's 9.5): the small bitmap font
        return ImageFont.load_default()


def _text(draw, xy, text: str, font, fill=(0, 0, 0)) -> None:
    try:
        draw.text(xy, text, font=font, fill=fill)
    except UnicodeEncodeError:  # the bitmap font knows Latin-1 only
        draw.text(xy, text.encode("latin-1", "replace").decode("latin-1"), font=font, fill=fill)


def _width(draw, text: str, font) -> float:
    try:
        return draw.textlength(text, font=font)
    except (AttributeError, UnicodeEncodeError):
        return 6 * len(text)


def _wrap(draw, text: str, font, width: int, max_lines: int) -> list:
    """Words in lines no wider than ``width`` (long words are cut); an ellipsis if it does not fit."""
    lines, line = [], ""
    for word in text.split():
        while _width(draw, word, font) > width and len(word) > 1:  # a word wider than the column
            cut = len(word)
            while cut > 1 and _width(draw, word[:cut], font) > width:
                cut -= 1
            if line:
                lines.append(line)
                line = ""
            lines.append(word[:cut])
            word = word[cut:]
        candidate = f"{line} {word}".strip()
        if _width(draw, candidate, font) <= width:
            line = candidate
        else:
            lines.append(line)
            line = word
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and _width(draw, last + "...", font) > width:
            last = last[:-1]
        lines[-1] = last + "..."
    return lines


def _fmt_mult(m: float) -> str:
    return f"{m:g}"


def render_grid(columns: Sequence[torch.Tensor], rows: Sequence[tuple], multipliers: Sequence[float],
                title: str = "", headers: Optional[Sequence[str]] = None):
    """A PIL image: a title line, one header per column (LoRA strength), one label per row (prompt,
    seed) and the images. Small images are enlarged (nearest neighbour) so the labels stay readable."""
    from PIL import Image, ImageDraw

    n_rows, _, h, w = columns[0].shape
    scale = max(1, 128 // min(h, w))
    th, tw = h * scale, w * scale
    font = _font(12)
    line_h = 15
    pad, label_w = 4, 170
    title_h = line_h + 2 * pad if title else 0
    head_h = line_h + pad
    grid = Image.new("RGB", (label_w + len(columns) * (tw + pad) + pad, title_h + head_h + n_rows * (th + pad) + pad),
                     (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    if title:
        _text(draw, (pad, pad), title, font)
    top = title_h + head_h
    for c, m in enumerate(multipliers):
        x = label_w + c * (tw + pad)
        _text(draw, (x, title_h), headers[c] if headers else f"strength {_fmt_mult(m)}", font)
    max_lines = max(1, (th - line_h) // line_h)
    for r, (prompt, seed) in enumerate(rows):
        y = top + r * (th + pad)
        lines = _wrap(draw, prompt, font, label_w - 2 * pad, max_lines) if prompt.strip() else ["(empty prompt)"]
        for i, line in enumerate(lines + [f"seed {seed}"]):
            _text(draw, (pad, y + i * line_h), line, font, fill=(0, 0, 0) if i < len(lines) else (90, 90, 90))
        for c, column in enumerate(columns):
            tile = to_pil(column[r])
            if scale != 1:
                tile = tile.resize((tw, th), Image.NEAREST)
            grid.paste(tile, (label_w + c * (tw + pad), y))
    return grid


def grid_info(spec: GridSpec, **extra) -> dict:
    """What a grid shows, stored in its PNG (text chunk "traintrain") so tools can read it back."""
    return {**extra, "rows": [[p, s] for p, s in spec.rows], "multipliers": list(spec.multipliers),
            "negative_prompt": spec.negative_prompt, "steps": spec.steps, "cfg_scale": spec.cfg_scale,
            "sampler": spec.sampler, "size": list(spec.size) if spec.size else None}


def read_grid_info(path) -> dict:
    from PIL import Image

    with Image.open(path) as img:
        return json.loads(img.text["traintrain"])


def save_png(image, path: Path, info: Optional[dict] = None) -> Path:
    """Write a PIL image as PNG, atomically (a reader never sees half a file), with ``info`` in it."""
    from PIL.PngImagePlugin import PngInfo

    meta = None
    if info is not None:
        meta = PngInfo()
        meta.add_itxt("traintrain", json.dumps(info, ensure_ascii=False))
    return atomic_write(Path(path), lambda tmp: image.save(tmp, format="PNG", pnginfo=meta))


# ---------------------------------------------------------------- a LoRA file on a model


def strength_grid(components, network, spec: GridSpec, path: Path, title: str = "") -> Path:
    """Draw ``network`` (a Network on ``components``) at ``spec.multipliers`` and save the grid."""
    applied_here = not network.applied
    if applied_here:
        network.apply()
    try:
        columns = draw_columns(components, network, spec)
    finally:
        if applied_here:
            network.remove()
    return save_png(render_grid(columns, spec.rows, spec.multipliers, title), path, grid_info(spec, title=title))


def prompt_preview(components, spec: GridSpec, path: Path, labels: Sequence[str], title: str = "") -> Path:
    """What the model alone (no LoRA) draws for each prompt of ``spec``, one row per (prompt, seed):
    iLECO's Generate Original / Target / All. ``labels``: one per prompt ("original", "target"),
    written before it on its row, so the rows say which box they come from."""
    images = draw_rows(components, spec)
    rows = [(f"{label}: {p or '(empty prompt)'}", s) for p, label in zip(spec.prompts, labels) for s in spec.seeds]
    grid = render_grid([images], rows, [0.0], title, headers=["model, no LoRA"])
    return save_png(grid, path, grid_info(spec, title=title, labels=list(labels)))


def sampling_device(components, device=None):
    """Put ``components`` where sampling is fast: the device (fp16 on CUDA for the U-Net and text
    encoders; the VAE in fp32, since half-precision SD VAEs can overflow to black images)."""
    from .engine import PRECISIONS, pick_device, place

    device = torch.device(device) if device is not None else pick_device()
    dtype = PRECISIONS["fp16"] if device.type == "cuda" else PRECISIONS["fp32"]
    for m in [components.unet, *components.text_encoders]:
        place(m, device, dtype)
    place(components.vae, device)
    return device


# ---------------------------------------------------------------- during training


def _device_of(module: torch.nn.Module):
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


class TrainingSamples:
    """The engine's sample hook for one run (see the module's docstring)."""

    def __init__(self, run, mode):
        cfg = run.cfg
        self.run, self.mode, self.cfg = run, mode, cfg
        self.every = int(cfg.sample_every_n_steps)
        root = getattr(run.paths, "sample_dir", None) or Path(run.paths.log_dir).parent / "samples"
        self.folder = Path(root) / cfg.save_lora_name
        self.stamp = time.strftime("%Y%m%d_%H%M%S", time.localtime(run.started_at))
        self.seconds = 0.0  # spent sampling so far, all passes
        self.grids = 0
        self.files: list = []
        self._drawn: set = set()
        self._spec: Optional[GridSpec] = None
        self._zero: Optional[torch.Tensor] = None  # multiplier 0 = the model without our networks: drawn once
        self.off = False  # set when sampling ran out of memory: training goes on without samples

    @classmethod
    def for_run(cls, run, mode) -> Optional["TrainingSamples"]:
        return cls(run, mode) if getattr(run.cfg, "sample_every_n_steps", 0) > 0 else None

    def due(self, step: int) -> bool:
        return not self.off and step > 0 and step % self.every == 0

    def to_come(self, step: int, total: int) -> int:
        """Grids still to draw in this pass after ``step`` (every N, and the end)."""
        regular = total // self.every - step // self.every
        return regular + (1 if total % self.every else 0)

    @property
    def seconds_per_grid(self) -> float:
        return self.seconds / self.grids if self.grids else 0.0

    def spec(self) -> GridSpec:
        if self._spec is None:  # after the mode prepared: its captions and image size are known now
            run = self.run
            self._spec = spec_from_config(self.cfg, self.mode, size=getattr(self.mode, "size", None),
                                          v_prediction=run.schedule.v_prediction,
                                          zero_terminal_snr=run.zero_terminal_snr)
        return self._spec

    def filename(self, p, step: int) -> str:
        width = max(5, len(str(p.cfg.train_iterations)))
        stage = ""
        if self.cfg.mode == "Difference":
            stage = "pass2-" if p.name == self.cfg.save_lora_name else "pass1-"
        return f"{self.stamp}-{stage}step{step:0{width}d}.png"

    def draw(self, p, net, step: int, total: int) -> Optional[Path]:
        """The grid of pass ``p`` at ``step`` with its network ``net``; once per (pass, step)."""
        if self.off or self.run.stopping or (p.name, step) in self._drawn:
            return None  # after Stop, finishing quickly matters more than a preview
        self._drawn.add((p.name, step))
        t0 = time.perf_counter()
        spec = self.spec()
        try:
            with self._isolated(net):
                columns = draw_columns(self.run.components, net, spec, zero_column=self._zero,
                                       cancelled=lambda: self.run.stopping)
        except Cancelled:
            self.seconds += time.perf_counter() - t0
            return None
        except Exception as e:
            from .engine import is_out_of_memory

            if not is_out_of_memory(e):
                raise
            self.off = True  # a preview is not worth the training: go on without
            self.seconds += time.perf_counter() - t0
            self.run.log(f"Out of memory while drawing samples at step {step}: sampling is off for the rest of "
                         f"this run (lower sample_size, now {spec.size[0]},{spec.size[1]}, or the number of "
                         f"sample_prompts and sample_seed)")
            return None
        if self._zero is None and 0.0 in spec.multipliers:
            self._zero = columns[spec.multipliers.index(0.0)]
        when = "before training" if step == 0 else f"step {step}/{total}"
        title = f"{p.name}: {when} · seed {', '.join(map(str, spec.seeds))} · {spec.sampler} {spec.steps} steps, " \
                f"CFG {spec.cfg_scale:g}"
        info = grid_info(spec, title=title, name=p.name, step=step, total=total)
        try:
            path = save_png(render_grid(columns, spec.rows, spec.multipliers, title),
                            self.folder / self.filename(p, step), info)
        except OSError as e:  # a full disk or a read-only folder costs the preview, never the training
            self.seconds += time.perf_counter() - t0
            self.run.log(f"Could not save the sample grid of step {step} in {self.folder}: {e}; training goes on")
            return None
        self.seconds += time.perf_counter() - t0
        self.grids += 1
        self.files.append(path)
        self.run.progress(phase="sample", step=step, total=total, message=str(path), sample_s=self.seconds)
        return path

    @contextlib.contextmanager
    def _isolated(self, net):
        """Sampling leaves no trace on training: RNG, multipliers, train/eval flags, devices, autograd."""
        from .engine import place

        run = self.run
        c = run.components
        models = [c.unet, *c.text_encoders, c.vae]
        flags = [[m.training for m in model.modules()] for model in models]
        multipliers = [(n, n.current_multiplier) for n in run.networks]
        where = [(m, _device_of(m)) for m in [*c.text_encoders, c.vae]]
        cuda = [run.device.index if run.device.index is not None else torch.cuda.current_device()] \
            if run.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            try:
                for model in models:
                    model.eval()
                for n in run.networks:
                    if n is not net:  # e.g. Difference's copier: show the LoRA as it will be used, alone
                        n.set_multiplier(0.0)
                for m, _ in where:
                    place(m, run.device)  # the prompts are encoded and the images decoded on the device
                yield
            finally:
                for model, saved in zip(models, flags):
                    for m, training in zip(model.modules(), saved):
                        m.training = training
                for n, mult in multipliers:
                    n.set_multiplier(*mult)
                for m, device in where:
                    place(m, device)
                if run.device.type == "cuda":
                    torch.cuda.empty_cache()


# ---------------------------------------------------------------- python -m trainer sample


class SampleArgsError(ValueError):
    """A bad ``python -m trainer sample`` argument; the message names the flag and the value."""


def _flag(flag: str, setting: str, raw):
    from .config import SettingError, get_setting

    try:
        return get_setting(setting).parse(raw)
    except SettingError as e:
        raise SampleArgsError(f"{flag}{str(e)[len(setting):]}") from None


def spec_from_args(args, default_prompt: str = "", v_prediction=None) -> GridSpec:
    """The grid of ``python -m trainer sample``, each flag checked like the setting it mirrors."""
    prompts = [p.strip() for p in (args.prompt or [default_prompt])]
    if len(prompts) > 16:
        raise SampleArgsError(f"--prompt: {len(prompts)} prompts given (allowed: at most 16)")
    if not 1 <= args.seeds <= 8:
        raise SampleArgsError(f"--seeds: {args.seeds} (allowed: 1 to 8 seeds per prompt)")
    first = _flag("--seed", "sample_seed", str(args.seed))[0]
    multipliers = list(_flag("--multipliers", "sample_multipliers", args.multipliers))
    if not multipliers:
        raise SampleArgsError(f'--multipliers: "{args.multipliers}" lists no strength (e.g. "0, 0.5, 1")')
    return GridSpec(
        prompts=prompts, multipliers=multipliers, seeds=[first + i for i in range(args.seeds)],
        negative_prompt=args.negative, steps=_flag("--steps", "sample_steps", args.steps),
        cfg_scale=_flag("--cfg", "sample_cfg_scale", args.cfg), sampler=_flag("--sampler", "sample_sampler", args.sampler),
        size=_flag("--size", "sample_size", args.size), clip_skip=_flag("--clip-skip", "clip_skip", args.clip_skip),
        v_prediction=v_prediction)


def sample_command(args) -> int:
    """``python -m trainer sample``: load the model and the LoRA, draw, save, print the PNG's path."""
    import sys

    from .engine import pick_device
    from .host.standalone import load_components
    from .networks.files import load_network_file
    from .networks.network import Network

    try:
        _, metadata = load_network_file(args.lora)
        v_pred = True if (metadata.get("modelspec.prediction_type") == "v"
                          or str(metadata.get("ss_v_parameterization", "")).lower() == "true") else None
        spec = spec_from_args(args, (metadata.get("modelspec.trigger_phrase") or "").strip(), v_pred)
        components = load_components(args.model or None, args.vae or None, model_dir=args.model_dir, v_pred=v_pred)
        device = pick_device()
        network = Network.from_file(args.lora, components.unet, components.text_encoders, dtype=torch.float32)
    except (ValueError, OSError) as e:  # HostError, SampleArgsError, a file that is no LoRA or does not fit
        print(f"error: {e}", file=sys.stderr)
        return 2
    sampling_device(components, device)
    network.to(device)
    out = args.out or Path(args.workdir) / "samples" / Path(args.lora).stem / \
        f"{time.strftime('%Y%m%d_%H%M%S')}-strength.png"
    t0 = time.perf_counter()
    path = strength_grid(components, network, spec, out, title=f"{Path(args.lora).name} on {components.name}")
    print(f"{len(spec.rows)} x {len(spec.multipliers)} images in {time.perf_counter() - t0:.1f} s on {device}",
          file=sys.stderr)
    print(path)
    return 0
