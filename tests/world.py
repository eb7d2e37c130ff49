"""A tiny text-to-image model that has really learned a small world, for tests that measure images.

The world: 64 px images of one coloured shape (circle / square / triangle; red / green / blue) on a
plain white or grey background, position and size jittered, captioned "red circle", "a blue
square", "green triangle on grey background", "red", "square", ...

The model is the embedded tiny SD1-architecture model (``tiny_components``: SD1 topology, tiny
widths, real CLIP tokenizer), trained in three stages, all seeded:

1. VAE: the encoder learns to produce :func:`designed_latents` (the image average-pooled 8x in an
   opponent colour basis: a tiny picture of the scene, as SD's latents roughly are), the decoder to
   reconstruct the image from them; posterior std fixed small; ``scaling_factor`` then set so the
   latents have unit std. A free autoencoder needs many times the steps to get colours right.
2. Text encoder: taught that its states after the words say which colour / shape / background a
   caption names, and that captions naming different things give different states (a random CLIP
   gives nearly the same states for every prompt).
3. U-Net: the standard epsilon objective (min-SNR 5) on the cached latents, text encoder frozen,
   10 % empty captions so classifier-free guidance works; EMA weights kept.

What it learned is measured in tests/test_world.py: colour, background and (roughly) shape follow
the prompt. Tests that prove what a training mode does (tests/test_mode_effects.py) train LoRAs on it.

The build takes about 13 CPU minutes on one thread, so the result is shipped:
``tests/assets/world-sd1.safetensors`` (single-file SD1 checkpoint, fp16, 9 MB). Its metadata says what
built it (:func:`fingerprint`: the spec, a digest of every function of this file and of trainer/ that
the build runs, the tokenizer's data, the torch version) and holds a digest of its tensors;
tests/test_world.py fails when any of them no longer matches, and replays the text-encoder stage
against the shipped weights. Rebuild with ``python tests/world.py build``; after a change that cannot
alter the weights, ``python tests/world.py restamp`` records the new fingerprint (metadata only);
``python tests/world.py`` writes a grid of samples to ``tests/artifacts/world_samples.png``.

Tests use it through the session fixture ``world_model`` (tests/conftest.py)::

    def test_something(world_model):
        images = generate(world_model, ["red circle"], ...)

Measure images with :func:`background_colour`, :func:`foreground_mask`, :func:`colour_stats`,
:func:`colour_scores` (red, green, blue, yellow), :func:`classify_colour`, :func:`foreground_fraction`,
:func:`shape_score` / :func:`classify_shape`.
"""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import json
import math
import os
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

COLOURS = {  # RGB 0..255
    "red": (220, 35, 35),
    "green": (35, 175, 60),
    "blue": (40, 70, 225),
}
BACKGROUNDS = {"white": (245, 245, 245), "grey": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
# What each shape fills of its bounding box: see shape_score.
SHAPE_FILL = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}


@dataclasses.dataclass(frozen=True)
class WorldSpec:
    """Everything that decides the built model; its hash (with the building code's) names the model."""

    size: int = 64
    colours: tuple = tuple(COLOURS.items())
    backgrounds: tuple = tuple(BACKGROUNDS.items())
    shapes: tuple = SHAPES
    images: int = 1536
    seed: int = 0
    vae_steps: int = 400
    vae_batch: int = 4
    vae_lr: float = 2e-3
    posterior_std: float = 0.02
    decoder_noise: float = 0.05
    unet_steps: int = 1200
    unet_batch: int = 32
    unet_lr: float = 2e-3
    te_steps: int = 100
    te_lr: float = 3e-3
    te_first_position: int = 10
    te_separation: float = 1.0
    ema: float = 0.98  # 0: no exponential moving average of the weights
    cfg_dropout: float = 0.1
    min_snr_gamma: float = 5.0

    def key(self) -> str:
        """Hash of :func:`fingerprint`: these fields, the sources the build runs, the tokenizer's
        data and the torch version."""
        return hashlib.sha256(json.dumps(fingerprint(self), sort_keys=True).encode()).hexdigest()[:16]


WORLD = WorldSpec()


# ---------------------------------------------------------------- drawing the world


@dataclasses.dataclass(frozen=True)
class Item:
    colour: str
    shape: str
    background: str
    caption: str


def draw_shape(shape: str, colour, background, size: int = 64, cx: float = 0.5, cy: float = 0.5,
               radius: float = 0.25, supersample: int = 4) -> np.ndarray:
    """One image [size, size, 3] uint8: ``shape`` of ``colour`` centred at (cx, cy) (fractions of
    the side) with half-extent ``radius`` (fraction of the side), antialiased by supersampling.
    The square has the circle's area; the triangle points up."""
    n = size * supersample
    c = (np.arange(n) + 0.5) / n
    x, y = c[None, :], c[:, None]
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= radius**2
    elif shape == "square":
        h = radius * math.sqrt(math.pi) / 2
        inside = (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)
    elif shape == "triangle":
        h = radius * 1.25
        inside = (y <= cy + 0.8 * h) & (np.abs(x - cx) <= (y - cy + h) / 1.8)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    cover = inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3))[..., None]
    img = np.asarray(background, np.float64) * (1 - cover) + np.asarray(colour, np.float64) * cover
    return np.round(img).astype(np.uint8)


def _caption(rng: np.random.Generator, colour: str, shape: str, background: str) -> str:
    templates = [
        (0.35, "{c} {s}"),
        (0.30, "{c} {s} on {b} background"),
        (0.10, "a {c} {s}"),
        (0.15, "{c}"),
        (0.10, "{s}"),
    ]
    p = np.array([w for w, _ in templates])
    tpl = templates[int(rng.choice(len(templates), p=p / p.sum()))][1]
    return tpl.format(c=colour, s=shape, b=background)


def draw_world(spec: WorldSpec = WORLD, count: Optional[int] = None, seed: Optional[int] = None):
    """(images uint8 [N, size, size, 3], items [Item]) with every (colour, shape, background)
    combination equally often, position and size jittered."""
    rng = np.random.default_rng(spec.seed if seed is None else seed)
    colours, backgrounds = dict(spec.colours), dict(spec.backgrounds)
    combos = [(c, s, b) for c in colours for s in spec.shapes for b in backgrounds]
    n = count or spec.images
    images, items = [], []
    for i in range(n):
        c, s, b = combos[i % len(combos)]
        radius = float(rng.uniform(0.2, 0.3))
        cx, cy = (float(v) for v in rng.uniform(0.5 - 0.12, 0.5 + 0.12, 2))
        images.append(draw_shape(s, colours[c], backgrounds[b], spec.size, cx, cy, radius))
        items.append(Item(c, s, b, _caption(rng, c, s, b)))
    order = rng.permutation(n)
    return np.stack(images)[order], [items[i] for i in order]


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


# ---------------------------------------------------------------- building the model


def designed_latents(x: torch.Tensor) -> torch.Tensor:
    """The latent the VAE is taught to produce for pixels ``x`` [B, 3, H, W] in [-1, 1]: the image
    average-pooled 8x in an opponent colour basis (luminance, red-green, yellow-blue) plus the
    detail (pixel std) inside each 8x8 cell. A latent that is a tiny picture of the scene, as SD's
    latents roughly are: it trains in a fraction of the steps of a free autoencoder."""
    p = torch.nn.functional.avg_pool2d(x, 8)
    r, g, b = p[:, 0], p[:, 1], p[:, 2]
    var = (torch.nn.functional.avg_pool2d(x * x, 8) - p * p).clamp_min(0).mean(dim=1)
    return torch.stack([(r + g + b) / 3, r - g, (r + g) / 2 - b, 2 * var.sqrt() - 0.5], dim=1)


def _train_vae(comps, pixels: torch.Tensor, spec: WorldSpec, log: Callable) -> None:
    """The encoder regresses :func:`designed_latents`; the decoder reconstructs the image from
    them (plus a little noise, so it tolerates imperfect latents from the encoder or the U-Net)."""
    vae = comps.vae
    with torch.no_grad():
        # quant_conv makes the posterior's (mean, logvar) from the encoder's output. A small fixed
        # std (the random init gives std ~1: all noise; these rows get no gradient below), and
        # a mean that starts near 0 instead of the random encoder's large values.
        qc = vae.quant_conv
        half = qc.out_channels // 2
        qc.weight[half:] = 0.0
        qc.bias[half:] = 2 * math.log(spec.posterior_std)
        qc.weight[:half] *= 0.02
        qc.bias[:half] = 0.0
    vae.requires_grad_(True)
    vae.train()
    vectors = [p for p in vae.parameters() if p.dim() == 1]
    matrices = [p for p in vae.parameters() if p.dim() > 1]
    # biases and norm scales must travel far (absolute colours): a larger step for them
    opt = torch.optim.Adam([{"params": matrices, "lr": spec.vae_lr}, {"params": vectors, "lr": spec.vae_lr * 10}],
                           betas=(0.9, 0.99))
    base_lrs = [pg["lr"] for pg in opt.param_groups]
    g = torch.Generator().manual_seed(spec.seed + 1)
    for step in range(spec.vae_steps):
        idx = torch.randint(0, pixels.shape[0], (spec.vae_batch,), generator=g)
        x = pixels[idx]
        target = designed_latents(x)
        enc = vae.encode(x).latent_dist.mean
        z = target + spec.decoder_noise * torch.randn(target.shape, generator=g)
        rec = vae.decode(z).sample
        enc_loss = torch.nn.functional.mse_loss(enc, target)
        mse = torch.nn.functional.mse_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        (mse + enc_loss).backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        f = min(1.0, (step + 1) / 10) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / spec.vae_steps)))
        for pg, lr in zip(opt.param_groups, base_lrs):
            pg["lr"] = lr * f
        opt.step()
        if step % 25 == 0 or step == spec.vae_steps - 1:
            log(f"vae {step:4d} decoder mse {mse.item():.4f} encoder mse {enc_loss.item():.4f}")
    vae.requires_grad_(False)
    vae.eval()


def _encode_latents(comps, pixels: torch.Tensor, batch: int = 64):
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, pixels.shape[0], batch):
            post = comps.vae.encode(pixels[i:i + batch]).latent_dist
            means.append(post.mean)
            stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def _attributes(caption: str, spec: WorldSpec) -> tuple:
    """(colour, shape, background) class indices a caption names; 0 = not named."""
    words = caption.split()
    out = []
    for names in ([c for c, _ in spec.colours], list(spec.shapes), [b for b, _ in spec.backgrounds]):
        hit = [i + 1 for i, n in enumerate(names) if n in words]
        out.append(hit[0] if hit else 0)
    return tuple(out)


def _train_text_encoder(comps, captions: Sequence[str], spec: WorldSpec, log: Callable) -> None:
    """Teach the (random) text encoder to say what a caption names, at every position after it.

    A random CLIP text model gives nearly the same 77 states for every prompt (cosine ~0.99:
    the padding positions dominate and carry little of the words), which leaves the U-Net to
    find a faint signal. Linear heads on each state after the words learn to read colour,
    shape and background; the encoder learns to make them readable. Real SD's CLIP does this
    (its padding states carry the prompt); the U-Net then learns the world in far fewer steps."""
    from trainer.models.prompts import encode_prompts

    te = comps.text_encoders[0]
    unique = sorted(set(captions) | {""})
    labels = torch.tensor([_attributes(c, spec) for c in unique])
    sizes = [len(spec.colours) + 1, len(spec.shapes) + 1, len(spec.backgrounds) + 1]
    dim = int(te.config.hidden_size)
    g = torch.Generator().manual_seed(spec.seed + 3)
    heads = [torch.nn.Linear(dim, n) for n in sizes]
    for h in heads:
        with torch.no_grad():
            h.weight.copy_(torch.randn(h.weight.shape, generator=g) / dim**0.5)
            h.bias.zero_()
    te.requires_grad_(True)
    te.train()
    params = list(te.parameters()) + [p for h in heads for p in h.parameters()]
    opt = torch.optim.Adam(params, lr=spec.te_lr)
    first = spec.te_first_position  # every caption's words end before this position
    differ = (labels[:, None, :] != labels[None, :, :]).any(-1)
    for step in range(spec.te_steps):
        full = encode_prompts(comps, unique).hidden
        hidden = full[:, first:]  # [N, 77 - first, dim]
        loss = sum(torch.nn.functional.cross_entropy(h(hidden).flatten(0, 1), labels[:, i].repeat_interleave(hidden.shape[1]))
                   for i, h in enumerate(heads))
        # Captions that name different things must give different states as a whole (not only
        # along the heads' directions): else a LoRA that edits "red" edits "" as much, and
        # classifier-free guidance cancels it.
        flat = torch.nn.functional.normalize(full.flatten(1), dim=1)
        sim = flat @ flat.T
        loss = loss + spec.te_separation * (sim[differ].clamp_min(0) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == spec.te_steps - 1:
            log(f"text encoder {step:4d} loss {loss.item():.4f}")
    te.requires_grad_(False)
    te.eval()


def _train_unet(comps, mean: torch.Tensor, std: torch.Tensor, captions: list, spec: WorldSpec,
                log: Callable) -> None:
    """The standard epsilon objective on the cached latents (sampled from the posterior), the
    text encoder frozen (its caption embeddings cached), ``cfg_dropout`` empty captions."""
    from trainer.diffusion import NoiseSchedule, weighted_loss
    from trainer.models.prompts import encode_prompts

    unet = comps.unet
    unique = sorted(set(captions) | {""})
    index = {c: i for i, c in enumerate(unique)}
    cap_idx = torch.tensor([index[c] for c in captions])
    empty = index[""]
    with torch.no_grad():
        table = encode_prompts(comps, unique).hidden
    unet.requires_grad_(True)
    unet.train()
    trained = list(unet.parameters())
    opt = torch.optim.AdamW(trained, lr=spec.unet_lr, weight_decay=0.0)
    ema = [p.detach().clone() for p in trained] if spec.ema else None
    schedule = NoiseSchedule.create()
    g = torch.Generator().manual_seed(spec.seed + 2)
    sf = comps.scaling_factor
    warmup = max(1, spec.unet_steps // 20)
    for step in range(spec.unet_steps):
        idx = torch.randint(0, mean.shape[0], (spec.unet_batch,), generator=g)
        x0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * sf
        ci = cap_idx[idx].clone()
        ci[torch.rand(ci.shape, generator=g) < spec.cfg_dropout] = empty
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (x0.shape[0],), generator=g)
        pred = unet(schedule.add_noise(x0, noise, t), t, encoder_hidden_states=table[ci]).sample
        loss = weighted_loss(pred, schedule.target(x0, noise, t), t, schedule, "MSE", spec.min_snr_gamma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        f = min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / spec.unet_steps)))
        for pg in opt.param_groups:
            pg["lr"] = spec.unet_lr * f
        opt.step()
        if ema is not None:
            d = min(spec.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in trained], 1 - d)
        if step % 25 == 0 or step == spec.unet_steps - 1:
            log(f"unet {step:4d} loss {loss.item():.4f}")
    if ema is not None:  # the averaged weights make cleaner samples after a short training
        with torch.no_grad():
            for p, e in zip(trained, ema):
                p.copy_(e)
    unet.requires_grad_(False)
    unet.eval()


def build_world_model(spec: WorldSpec = WORLD, log: Callable = print):
    """Train the tiny model on the world (minutes on one CPU thread); returns its Components."""
    from trainer.models.tiny import tiny_components

    t0 = time.time()
    torch.manual_seed(spec.seed)
    comps = tiny_components(spec.seed)
    images, items = draw_world(spec)
    pixels = to_tensor(images)
    log(f"world: {len(items)} images drawn in {time.time() - t0:.1f}s")
    _train_vae(comps, pixels, spec, log)
    log(f"world: VAE trained at {time.time() - t0:.1f}s")
    mean, std = _encode_latents(comps, pixels)
    sf = float(1.0 / mean.std())
    comps.scaling_factor = sf
    if comps.configs is not None:
        comps.configs = dataclasses.replace(comps.configs, scaling_factor=sf,
                                            vae=dict(comps.configs.vae, scaling_factor=sf))
    log(f"world: latents encoded at {time.time() - t0:.1f}s, scaling_factor {sf:.4f}, "
        f"latent mean {float(mean.mean()) * sf:+.3f}, posterior std {float(std.mean()) * sf:.4f} (scaled)")
    captions = [it.caption for it in items]
    _train_text_encoder(comps, captions, spec, log)
    log(f"world: text encoder trained at {time.time() - t0:.1f}s")
    _train_unet(comps, mean, std, captions, spec, log)
    comps.name = world_name(spec)
    log(f"world: built in {time.time() - t0:.1f}s")
    return comps


# ---------------------------------------------------------------- the shipped file


WORLD_FILE = REPO / "tests" / "assets" / "world-sd1.safetensors"


def world_name(spec: WorldSpec = WORLD) -> str:
    """The model name the build writes into the file: ties the shipped file to the building code."""
    return f"tiny-sd1-world-{spec.key()}"


# ---------------------------------------------------------------- freshness: is the file what the code builds?
#
# The file's metadata holds (see :func:`stamp`): ``world.spec`` (the WorldSpec's fields),
# ``world.sources`` (a digest per function / class the build runs, found by :func:`build_sources`),
# ``world.tokenizer`` (digest of the CLIP BPE data the prompts are tokenized with), ``world.torch``
# (the torch major.minor it was built with) and ``world.weights`` (digest of the tensors as stored).
# tests/test_world.py compares each with what the code says now, and replays the text-encoder stage.
#
# Why per function and not per module: the build uses a few functions of trainer/ (the tiny model,
# the prompt encoding and its tokenizer, the noise schedule and the loss), and those modules also hold
# much that the build never runs and that changes for other reasons (loading.py, configs.py). Hashing
# whole modules would make the check go stale on every unrelated edit, and a check that is always
# stale gets restamped without thought. Hashing what the build calls makes a failure name the function
# that changed; if the change cannot alter the built weights (a refactor), `python tests/world.py
# restamp` records the new sources after checking the tensors are untouched and the text-encoder stage
# still replays to the shipped weights (a change the replay cannot see, e.g. in the U-Net stage or the
# loss, needs `restamp --reviewed`: a person vouches for it); if it can, rebuild (`python tests/world.py
# build`).

#: Where the walk starts: the build's own stages. Saving (build_world_file -> save_ldm_checkpoint) is
#: left out: it decides the file's layout, not its weights; the loader tests cover the layout and
#: ``world.weights`` pins the stored tensors.
BUILD_ENTRY_POINTS = ("draw_shape", "_caption", "draw_world", "to_tensor", "designed_latents", "_train_vae",
                      "_encode_latents", "_attributes", "_train_text_encoder", "_train_unet", "build_world_model")
#: Reached from the build but not part of what it computes: the name is derived from this check,
#: and the spec's fields are stored on their own (``world.spec``).
_NOT_BUILD = {"world.world_name", "world.WorldSpec"}
#: Modules that only write files (the tokenizer's cache folder): what they write is covered by
#: ``world.tokenizer``, and a failure there is an error, not different weights.
_NOT_BUILD_MODULES = ("trainer.atomic",)
_PLAIN = (bool, int, float, str, bytes, tuple, frozenset, dict, list)


def _module_name(obj) -> str:
    mod = getattr(obj, "__module__", "") or ""
    return "world" if mod == "__main__" else mod


def _ours(obj) -> bool:
    mod = _module_name(obj)
    return (inspect.isfunction(obj) or inspect.isclass(obj)) and (mod == "world" or mod.startswith("trainer.")) \
        and mod not in _NOT_BUILD_MODULES


def _digest(obj) -> str:
    """sha256[:16] of the code of a function or class as its syntax tree, docstrings dropped: comments,
    docstrings, blank lines and line wrapping do not count, every change to the code does."""
    source = textwrap.dedent(inspect.getsource(obj))
    try:
        tree = ast.parse(source)
    except SyntaxError:  # a lambda's source is the line it sits on, not always a whole statement
        return hashlib.sha256(source.strip().encode()).hexdigest()[:16]
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.unparse(tree).encode()).hexdigest()[:16]


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _stable(v, todo: list) -> str:
    """repr of a constant without memory addresses; functions and classes in it are named and walked."""
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_stable(k, todo)}: {_stable(x, todo)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return type(v).__name__ + "(" + ", ".join(_stable(x, todo) for x in v) + ")"
    if isinstance(v, (set, frozenset)):
        return type(v).__name__ + "(" + ", ".join(sorted(_stable(x, todo) for x in v)) + ")"
    if inspect.isfunction(v) or inspect.isclass(v) or inspect.isbuiltin(v):
        if _ours(v):
            todo.append(v)
        return f"<{_module_name(v)}.{getattr(v, '__qualname__', v.__name__)}>"
    text = repr(v)
    return type(v).__qualname__ if " at 0x" in text else text


def _code_names(code) -> set:
    names = set(code.co_names)
    for c in code.co_consts:
        if inspect.iscode(c):
            names |= _code_names(c)
    return names


def build_sources(entry_points: Sequence[str] = BUILD_ENTRY_POINTS) -> dict:
    """{qualified name: sha256[:16] of its source} for every function and class of this file and of
    trainer/ that the build runs, found by following the names their code uses (globals, module
    attributes, imports inside functions, methods of the classes reached), plus ``=NAME`` entries
    for plain constants (dicts of sizes, numbers) that they read from module globals."""
    this = sys.modules[__name__]
    todo = [getattr(this, n) for n in entry_points]
    out: dict = {}
    while todo:
        obj = todo.pop()
        digest = _digest(obj)
        key = f"{_module_name(obj)}.{obj.__qualname__}"
        if obj.__name__ == "<lambda>":  # several lambdas share a name: tell them apart by their source
            key += f"#{digest}"
        if key in out or key in _NOT_BUILD:
            continue
        out[key] = digest
        funcs = [obj] if inspect.isfunction(obj) else []
        if inspect.isclass(obj):
            todo += [b for b in obj.__bases__ if _ours(b)]
            for v in vars(obj).values():
                v = v.fget if isinstance(v, property) else getattr(v, "__func__", v)
                if inspect.isfunction(v) and _ours(v):
                    funcs.append(v)
        for f in funcs:
            g = f.__globals__
            names = _code_names(f.__code__)
            modules = [v for v in g.values() if inspect.ismodule(v) and v.__name__.startswith("trainer")]
            pkg = g.get("__package__") or ""
            for n in names:  # imports inside the function: absolute or relative to its package
                for cand in {n, f"{pkg}.{n}" if pkg else n}:
                    if cand.startswith("trainer") and _is_module(cand):
                        modules.append(importlib.import_module(cand))
            for n in sorted(names):
                if n.startswith("__"):
                    continue
                found = ([(_module_name(f), g[n])] if n in g else []) + \
                    [(m.__name__, getattr(m, n)) for m in modules if hasattr(m, n)]
                for where, v in found:
                    v = inspect.unwrap(v) if callable(v) else v  # lru_cache and other wrappers
                    if _ours(v):
                        todo.append(v)
                    elif isinstance(v, _PLAIN):
                        out[f"{where}.={n}"] = hashlib.sha256(_stable(v, todo).encode()).hexdigest()[:16]
    return dict(sorted(out.items()))


def _tokenizer_digest() -> str:
    from trainer.models.tokenizer import find_bpe_file

    return hashlib.sha256(find_bpe_file().read_bytes()).hexdigest()[:16]


def _torch_version() -> str:
    return ".".join(torch.__version__.split("+")[0].split(".")[:2])


def fingerprint(spec: WorldSpec = WORLD) -> dict:
    """What decides the built weights, as stored in the file's metadata (``world.*``)."""
    return {
        "world.spec": json.dumps(dataclasses.asdict(spec), sort_keys=True, default=list),
        "world.sources": json.dumps(build_sources(), sort_keys=True),
        "world.tokenizer": _tokenizer_digest(),
        "world.torch": _torch_version(),
    }


def _read_safetensors(path: Path):
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def file_metadata(path: Path = WORLD_FILE) -> dict:
    return dict(_read_safetensors(path)[0].get("__metadata__") or {})


def weights_digest(path: Path = WORLD_FILE) -> str:
    """sha256 of the stored tensors: every tensor's name, dtype, shape and offsets, and the data bytes
    (the metadata left out, so restamping keeps it)."""
    header, data = _read_safetensors(path)
    h = hashlib.sha256(json.dumps({k: v for k, v in header.items() if k != "__metadata__"}, sort_keys=True).encode())
    h.update(data)
    return h.hexdigest()


def stamp(path: Path = WORLD_FILE, spec: WorldSpec = WORLD) -> dict:
    """Rewrite only the file's metadata: the current :func:`fingerprint`, the model name and the
    weights digest. The tensors' bytes stay byte-identical (the header's offsets are relative to the
    data, so a longer header moves nothing)."""
    header, data = _read_safetensors(path)
    meta = dict(header.get("__metadata__") or {})
    meta.update(fingerprint(spec))
    meta["traintrain.name"] = world_name(spec)
    meta["world.weights"] = weights_digest(path)
    header["__metadata__"] = meta
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_bytes(len(blob).to_bytes(8, "little") + blob + data)
    os.replace(tmp, path)
    assert weights_digest(path) == meta["world.weights"]
    return meta


def replay_text_encoder(spec: WorldSpec = WORLD):
    """The build's text-encoder stage run again from scratch (tiny model, world captions, prompt
    encoding, tokenizer): its weights, rounded to fp16 as the file stores them. About 20 CPU s."""
    from trainer.models.tiny import tiny_components

    torch.manual_seed(spec.seed)
    comps = tiny_components(spec.seed)
    _, items = draw_world(spec)
    _train_text_encoder(comps, [it.caption for it in items], spec, lambda m: None)
    return {k: v.half() for k, v in comps.text_encoders[0].state_dict().items()}


#: Largest difference allowed between the replayed text encoder and the shipped one: 4 fp16 steps at
#: |w| < 2 (a CPU that orders its sums differently may land one step off after rounding); measured 0.
#: A wrong build is far off: the untrained encoder differs by 0.24.
REPLAY_TOLERANCE = 4e-3


#: The code whose every effect on the weights the replay sees: the captions, the prompt encoding and
#: tokenizer (the text-encoder stage trains through them; the U-Net stage only reuses them on the same
#: captions) and the text-encoder stage itself. The tiny model's init, the drawing, the VAE and U-Net
#: stages, the schedule and the loss also reach weights the replay does not compare.
REPLAY_VERIFIES = ("trainer.models.prompts.", "trainer.models.tokenizer.", "world._train_text_encoder",
                   "world._attributes", "world._caption")


def replay_difference(comps) -> float:
    """Largest absolute difference between :func:`replay_text_encoder` and ``comps``' text encoder."""
    want = replay_text_encoder()
    got = comps.text_encoders[0].state_dict()
    missing = sorted(k for k in want if k not in got)
    if missing:
        raise AssertionError(f"text encoder keys differ: {missing[:5]}")
    return max(float((want[k].float() - got[k].float()).abs().max()) for k in want)


def build_world_file(path: Path = WORLD_FILE, spec: WorldSpec = WORLD, log: Callable = print) -> Path:
    """Build the model and write it as a single-file SD1 checkpoint in fp16 (half the bytes; the
    tests load it back as fp32), stamped with its fingerprint."""
    from trainer.models.loading import save_ldm_checkpoint

    comps = build_world_model(spec, log)
    for m in comps.modules():
        m.half()
    save_ldm_checkpoint(comps, path)
    stamp(path, spec)
    return path


def restamp(path: Path = WORLD_FILE, reviewed: bool = False) -> dict:
    """After a change the check flags that cannot alter the built weights (a refactor): record the
    current fingerprint. Refuses when the tensors are not the ones stamped or the text-encoder stage
    no longer replays to them: then rebuild. A changed function that the replay does not run (the VAE
    and U-Net stages, the noise schedule, the loss) is accepted only with ``reviewed`` (``restamp
    --reviewed``: someone read the change and vouches that it cannot alter the weights)."""
    meta = file_metadata(path)
    if "world.weights" in meta and meta["world.weights"] != weights_digest(path):
        raise SystemExit(f"{path}: its tensors are not the ones it was stamped with: rebuild it")
    old, now = json.loads(meta.get("world.sources", "{}")), build_sources()
    changed = sorted(k for k in set(old) | set(now) if old.get(k) != now.get(k))
    unchecked = [k for k in changed if not k.startswith(REPLAY_VERIFIES)]
    if unchecked and not reviewed:
        raise SystemExit(f"changed, and not run by the text-encoder replay: {unchecked}. Rebuild the file, or, "
                         "having read the change and found it cannot alter the weights, restamp --reviewed")
    diff = replay_difference(load_world_model(path))
    if diff > REPLAY_TOLERANCE:
        raise SystemExit(f"the text-encoder stage no longer replays to the shipped weights (max diff {diff:.4g}):"
                         " the build changed, rebuild the file")
    new = stamp(path)
    print(f"restamped {path}: text encoder replayed within {diff:.3g}; sources changed: {changed}"
          + (f" (not replayed, reviewed: {unchecked})" if unchecked else ""))
    return new


def load_world_model(path: Path = WORLD_FILE):
    """The shipped world model as fresh fp32 Components."""
    from trainer.models.loading import load_components

    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: build it with `python tests/world.py build` (about 13 CPU minutes)")
    return load_components(path)


# ---------------------------------------------------------------- measuring images


def _as_images(images: torch.Tensor) -> torch.Tensor:
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W] in [0, 1], got {tuple(images.shape)}")
    return images.detach().float().cpu()


def background_colour(images: torch.Tensor, border: int = 2) -> torch.Tensor:
    """[B, 3]: the per-channel median of each image's outer ``border`` pixels."""
    x = _as_images(images)
    B = x.shape[0]
    frame = torch.cat([
        x[:, :, :border, :].reshape(B, 3, -1), x[:, :, -border:, :].reshape(B, 3, -1),
        x[:, :, border:-border, :border].reshape(B, 3, -1), x[:, :, border:-border, -border:].reshape(B, 3, -1),
    ], dim=2)
    return frame.median(dim=2).values


def foreground_mask(images: torch.Tensor, background: Optional[torch.Tensor] = None,
                    threshold: float = 0.25) -> torch.Tensor:
    """[B, H, W] bool: pixels whose RGB distance from the background colour exceeds ``threshold``."""
    x = _as_images(images)
    bg = background_colour(x) if background is None else torch.as_tensor(background, dtype=x.dtype).reshape(-1, 3)
    return (x - bg.expand(x.shape[0], 3)[:, :, None, None]).norm(dim=1) > threshold


def colour_stats(images: torch.Tensor, background: Optional[torch.Tensor] = None,
                 threshold: float = 0.25) -> torch.Tensor:
    """[B, 3]: mean RGB (0..1) of each image's foreground pixels (the whole image where none)."""
    x = _as_images(images)
    mask = foreground_mask(x, background, threshold).unsqueeze(1).float()
    n = mask.sum(dim=(2, 3))
    fg = (x * mask).sum(dim=(2, 3)) / n.clamp_min(1)
    return torch.where(n > 0, fg, x.mean(dim=(2, 3)))


def colour_scores(images: torch.Tensor, background: Optional[torch.Tensor] = None) -> dict:
    """{"red", "green", "blue", "yellow"}: [B] scores of the foreground colour, each the margin by
    which its defining channels beat the others (e.g. red = R - max(G, B); yellow = min(R, G) - B)."""
    c = colour_stats(images, background)
    r, g, b = c[:, 0], c[:, 1], c[:, 2]
    return {
        "red": r - torch.maximum(g, b),
        "green": g - torch.maximum(r, b),
        "blue": b - torch.maximum(r, g),
        "yellow": torch.minimum(r, g) - b,
    }


def classify_colour(images: torch.Tensor, palette: Optional[dict] = None) -> list:
    """The palette colour nearest to each image's foreground colour."""
    palette = palette or COLOURS
    names = list(palette)
    ref = torch.tensor([palette[n] for n in names], dtype=torch.float32) / 255
    c = colour_stats(images)
    return [names[int(i)] for i in torch.cdist(c, ref).argmin(dim=1)]


def foreground_fraction(images: torch.Tensor) -> torch.Tensor:
    """[B]: share of the image's pixels that are foreground."""
    return foreground_mask(images).float().mean(dim=(1, 2))


def shape_score(images: torch.Tensor, min_pixels: int = 2) -> torch.Tensor:
    """[B]: how much of its bounding box the foreground fills (square 1.0, circle pi/4 = 0.79,
    triangle 0.5). Rows and columns with fewer than ``min_pixels`` foreground pixels do not
    count toward the box, so stray pixels do not stretch it. NaN for an image with no shape."""
    mask = foreground_mask(images)
    out = []
    for m in mask:
        rows = (m.sum(dim=1) >= min_pixels).nonzero().flatten()
        cols = (m.sum(dim=0) >= min_pixels).nonzero().flatten()
        if len(rows) == 0 or len(cols) == 0:
            out.append(float("nan"))
            continue
        box = m[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        out.append(float(box.float().mean()))
    return torch.tensor(out)


def classify_shape(images: torch.Tensor) -> list:
    """"square" / "circle" / "triangle" from :func:`shape_score` (thresholds halfway between)."""
    out = []
    for s in shape_score(images).tolist():
        if math.isnan(s):
            out.append("none")
        elif s > (SHAPE_FILL["square"] + SHAPE_FILL["circle"]) / 2:
            out.append("square")
        elif s > (SHAPE_FILL["circle"] + SHAPE_FILL["triangle"]) / 2:
            out.append("circle")
        else:
            out.append("triangle")
    return out


# ---------------------------------------------------------------- a look at it


SAMPLE_PROMPTS = [f"{c} {s}" for s in SHAPES for c in COLOURS]


def sample_grid(comps, path: Path, prompts: Sequence[str] = SAMPLE_PROMPTS, seed: int = 0, **kw) -> Path:
    from trainer.sampling import generate, save_grid

    images = generate(comps, list(prompts), seed=seed, **kw)
    return save_grid(images, path, nrow=len(COLOURS), scale=2, labels=list(prompts))


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("TT_THREADS", "1")))
    if sys.argv[1:] == ["build"]:
        print(build_world_file())
    elif sys.argv[1:2] == ["restamp"] and sys.argv[2:] in ([], ["--reviewed"]):
        restamp(reviewed=sys.argv[2:] == ["--reviewed"])
    elif sys.argv[1:]:
        raise SystemExit("usage: python tests/world.py [build | restamp [--reviewed]]")
    else:
        print(sample_grid(load_world_model(), REPO / "tests" / "artifacts" / "world_samples.png"))
