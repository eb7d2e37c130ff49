"""The quality matrix (issue 11): every mode trained on many concept pairs of the world model
(tests/world.py), not only the one case per mode that tests/test_mode_effects.py checks.

Each cell is a command-line run of a shipped preset with its mode's recipe: the overrides of
tests/_effect_jobs.py for that mode (the same for every cell of a mode, fixed before any cell was
measured), plus a variant's overrides (``--variant``) that are again the same for every cell of a mode.
Then images are generated with fixed seeds, the LoRA at 0 and at 1 on the same noise, and measured:

- **effect**: share of the cell's effect images that changed as intended (iLECO: the original colour
  became the target colour; erase: it is no longer the original colour; LoRA: the trigger prompts draw
  the subject's colour and background; pair modes: the trained object took the changed attribute).
  ``clean effect`` also asks that nothing else changed (shape, background unless intended) and that
  the image is clean.
- **damage**: share of the control images (prompts the training should leave alone) whose colour,
  shape or background class changed, minus the noise floor: the share that changes between two seeds
  of the base model for the same prompts (neighbouring seeds compared).
- **artefacts**: share of images with the LoRA that are unclean (stray foreground specks or an impure
  foreground: see :func:`unclean`), minus the base model's share on the same prompts.

    python tests/quality_matrix.py run [--only PREFIX ...] [--variant NAME] [--workers 2]
    python tests/quality_matrix.py table [--variant NAME]      # re-print the table from the JSONs

Results: tests/artifacts/quality/<variant>/<cell>.json (every image's measurements), <cell>.png (grid:
a row per prompt, its seeds without the LoRA then with it), matrix.md (the table). Variants are defined in VARIANTS.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import _effect_jobs  # noqa: E402
import world  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "artifacts" / "quality"
STEPS, GUIDANCE, SEEDS = 20, 2.0, 8  # as tests/test_mode_effects.py
C = list(world.COLOURS)
SHAPES = list(world.SHAPES)


# --------------------------------------------------------------------------- recipes per mode

def _overrides(job: str) -> tuple:
    return _effect_jobs.JOBS[job].overrides


RECIPES = {  # mode -> (preset, overrides): tests/_effect_jobs.py's, for every cell of the mode
    "iLECO": ("iLECO.json", _overrides("ileco_red_to_blue")),
    "LECO": ("iLECO.json", _overrides("leco_erase_red")),
    "LoRA": ("LoRA.json", _overrides("lora_trigger")),
    "Difference": ("Difference.json", _overrides("difference")),
    "ADDifT": ("ADDifT_Action_SD1.5.json", _overrides("addift")),
    "Multi-ADDifT": ("ADDifT_Action_SD1.5.json", _overrides("multi_addift")),
}

#: Variants: extra overrides per mode, the same for every cell of that mode ("base" = the recipes).
VARIANTS: dict[str, dict[str, tuple]] = {
    "base": {},
    # iLECO / LECO latents from the LoRA'd model's own 8-step DDIM trajectory (leco_trajectory_steps)
    "trajectory": {"iLECO": ("leco_trajectory_steps=8",), "LECO": ("leco_trajectory_steps=8",)},
}


# --------------------------------------------------------------------------- cells

@dataclasses.dataclass
class Cell:
    name: str
    mode: str  # a RECIPES key
    args: tuple  # CLI arguments ("{dir}" = the cell's input folder)
    effect: list  # prompts whose images should change
    intended: Callable  # (attrs_at0, attrs_at1) -> bool, per image
    controls: list  # prompts whose images should not change
    inputs: Callable | None = None  # writes the cell's input files into a folder
    keep: tuple = ("shape", "background")  # attributes an effect image must keep to count as clean


def _bg(name: str) -> str:
    return "" if name == "white" else " on grey background"


def _save(img, path: Path, caption: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)


def ileco_cells() -> list[Cell]:
    cells = []
    for x in C:
        for y in C:
            if x == y:
                continue
            z = next(c for c in C if c not in (x, y))
            for mode in ("iLECO", "LECO"):  # LECO: the erase objective with the target as its neutral
                cells.append(Cell(
                    f"{mode.lower()}_{x}_to_{y}", mode, ("--original-prompt", x, "--target-prompt", y),
                    [x, f"a {x}", f"{x} circle", f"{x} square", f"{x} triangle on grey background"],
                    lambda a, b, y=y: b["colour"] == y,
                    [z, f"{z} circle", f"{y} square", f"{z} triangle on grey background"]))
        others = [c for c in C if c != x]
        for mode in ("iLECO", "LECO"):
            cells.append(Cell(
                f"{mode.lower()}_erase_{x}", mode, ("--original-prompt", x, "--target-prompt", ""),
                [x, f"a {x}", f"{x} circle", f"{x} square", f"{x} triangle on grey background"],
                lambda a, b, x=x: b["colour"] != x,
                [others[0], f"{others[0]} circle", f"{others[1]} square", f"{others[1]} triangle on grey background"],
                keep=()))  # an erased concept may take any shape / background
    return cells


def _subject_writer(colour: str, shapes: list, background: str, captions: bool):
    def write(folder: Path) -> None:
        rng = np.random.default_rng(7)
        for i in range(12):
            shape = shapes[i % len(shapes)]
            cx, cy = rng.uniform(0.4, 0.6, 2)
            img = world.draw_shape(shape, world.COLOURS[colour], world.BACKGROUNDS[background], 64, cx, cy,
                                   rng.uniform(0.2, 0.3))
            _save(img, folder / "data" / f"{i:02d}.png", shape if captions else None)
    return write


LORA_CONTROLS = ["red circle", "green square", "blue triangle on grey background", "green circle on grey background"]


def lora_cells() -> list[Cell]:
    subjects = [("blue", SHAPES, "grey"), ("red", ["square"], "grey"), ("green", ["circle", "triangle"], "grey"),
                ("green", SHAPES, "white")]
    cells = []
    for colour, shapes, back in subjects:
        tag = f"{colour}_{'any' if len(shapes) == 3 else '_'.join(shapes)}_{back}"

        def intended(a, b, colour=colour, back=back):
            return b["colour"] == colour and b["background"] == back

        controls = [p for p in LORA_CONTROLS if not (p.startswith(colour) and (back == "grey") == ("grey" in p))]
        effect = [f"sks {s}" for s in shapes] + ["sks"]
        for captions in (True, False):
            cells.append(Cell(
                f"lora_{tag}_{'captions' if captions else 'nocaptions'}", "LoRA",
                ("--data", "{dir}/data", "--set", "lora_trigger_word=sks"), effect, intended, controls,
                _subject_writer(colour, shapes, back, captions), keep=()))
        if len(shapes) == 3:  # no trigger word: the captions (shape names) carry the subject
            cells.append(Cell(
                f"lora_{tag}_notrigger", "LoRA", ("--data", "{dir}/data", "--set", "lora_trigger_word="),
                list(SHAPES), intended, controls, _subject_writer(colour, shapes, back, True), keep=()))
    return cells


# pair cells: (tag, source (colour, shape, bg), target, the attribute that changes)
PAIRS = [
    ("red_to_blue", ("red", "circle", "white"), ("blue", "circle", "white"), "colour"),
    ("green_to_red", ("green", "square", "white"), ("red", "square", "white"), "colour"),
    ("blue_to_green", ("blue", "triangle", "grey"), ("green", "triangle", "grey"), "colour"),
    ("white_to_grey", ("red", "circle", "white"), ("red", "circle", "grey"), "background"),
    ("circle_to_square", ("green", "circle", "white"), ("green", "square", "white"), "shape"),
]
ATTR = {"colour": 0, "shape": 1, "background": 2}


def _pair_writer(src, dst, attr: str):
    def write(folder: Path) -> None:
        draw = lambda c, s, b, *geo: world.draw_shape(s, world.COLOURS[c], world.BACKGROUNDS[b], 64, *geo)  # noqa: E731
        _save(draw(*src, 0.5, 0.5, 0.25), folder / "a.png")
        _save(draw(*dst, 0.5, 0.5, 0.25), folder / "b.png")
        # Multi-ADDifT: the same change on every other value of the two attributes that do not change
        rng = np.random.default_rng(3)
        k = ATTR[attr]
        fixed = [i for i in range(3) if i != k]
        values = [C, SHAPES, list(world.BACKGROUNDS)]
        n = 0
        for v1 in values[fixed[0]]:
            for v2 in values[fixed[1]]:
                s, d = list(src), list(dst)
                s[fixed[0]] = d[fixed[0]] = v1
                s[fixed[1]] = d[fixed[1]] = v2
                geo = (*rng.uniform(0.4, 0.6, 2), rng.uniform(0.2, 0.3))
                _save(draw(*s, *geo), folder / "pairs" / f"{n:02d}.png")
                _save(draw(*d, *geo), folder / "pairs" / f"{n:02d}_b.png")
                n += 1
    return write


def pair_cells() -> list[Cell]:
    cells = []
    for tag, src, dst, attr in PAIRS:
        k = ATTR[attr]
        effect = [f"{src[0]} {src[1]}{_bg(src[2])}", f"a {src[0]} {src[1]}{_bg(src[2])}"]
        # controls: objects whose changed attribute has another value than the source's and the target's
        if attr == "colour":
            z = next(c for c in C if c not in (src[0], dst[0]))
            controls = [f"{z} {s}{_bg(b)}" for s, b in (("circle", "white"), ("square", "grey"), ("triangle", "white"))]
        elif attr == "shape":
            controls = [f"{c} triangle{_bg(b)}" for c, b in (("red", "white"), ("blue", "grey"), ("green", "white"))]
        else:
            controls = [f"{c} {s} on grey background" for c, s in (("blue", "square"), ("green", "triangle"))]

        def intended(a, b, dst=dst, k=k):
            return (b["colour"], b["shape"], b["background"])[k] == dst[k]

        keep = tuple(x for x in ("shape", "background") if x != attr)
        for mode, args in (("Difference", ("--original-image", "{dir}/a.png", "--target-image", "{dir}/b.png")),
                           ("ADDifT", ("--original-image", "{dir}/a.png", "--target-image", "{dir}/b.png")),
                           ("Multi-ADDifT", ("--mode", "Multi-ADDifT", "--data", "{dir}/pairs"))):
            cells.append(Cell(f"{mode.lower().replace('-', '')}_{tag}", mode, args, effect, intended, controls,
                              _pair_writer(src, dst, attr), keep=keep))
    return cells


def all_cells() -> list[Cell]:
    return ileco_cells() + lora_cells() + pair_cells()


# --------------------------------------------------------------------------- training

def train(cell: Cell, variant: str, folder: Path) -> _effect_jobs.Result:
    folder.mkdir(parents=True, exist_ok=True)
    done = folder / "result.json"
    if done.is_file():
        return _effect_jobs.Result(**json.loads(done.read_text()))
    if cell.inputs:
        cell.inputs(folder)
    preset, recipe = RECIPES[cell.mode]
    extra = VARIANTS[variant].get(cell.mode, ())
    args = [a.replace("{dir}", str(folder)) for a in cell.args]
    sets = [x for kv in (*_effect_jobs.TINY_WORLD, *recipe, *extra, f"save_lora_name={cell.name}")
            for x in ("--set", kv)]
    cmd = [sys.executable, "-m", "trainer", "train", "--preset", str(_effect_jobs.PRESETS / preset),
           "--model", str(world.WORLD_FILE), *args, *sets, "--workdir", str(folder / "work")]
    env = {**os.environ, "TT_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    t = time.time()
    p = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=3600)
    res = _effect_jobs.Result(p.returncode, p.stdout, p.stderr, time.time() - t)
    if p.returncode == 0:
        done.write_text(json.dumps(dataclasses.asdict(res)))
    return res


# --------------------------------------------------------------------------- measuring

def _components(mask: torch.Tensor) -> list[int]:
    """Sizes of the 4-connected components of a [H, W] bool mask (largest first)."""
    m = mask.numpy().copy()
    h, w = m.shape
    sizes = []
    for y0 in range(h):
        for x0 in range(w):
            if not m[y0, x0]:
                continue
            stack, n = [(y0, x0)], 0
            m[y0, x0] = False
            while stack:
                y, x = stack.pop()
                n += 1
                for yy, xx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                    if 0 <= yy < h and 0 <= xx < w and m[yy, xx]:
                        m[yy, xx] = False
                        stack.append((yy, xx))
            sizes.append(n)
    return sorted(sizes, reverse=True)


def cleanliness(images: torch.Tensor) -> list[dict]:
    """Per image: ``stray`` = share of foreground pixels outside the largest blob (specks, a broken
    shape); ``impure`` = share of the foreground whose nearest world colour is not the image's colour
    (halos, mixed colours)."""
    masks = world.foreground_mask(images)
    names = list(world.COLOURS)
    ref = torch.tensor([world.COLOURS[n] for n in names], dtype=torch.float32) / 255
    classes = world.classify_colour(images)
    out = []
    for img, m, cls in zip(images, masks, classes):
        sizes = _components(m)
        total = sum(sizes)
        stray = (total - sizes[0]) / total if total else 0.0
        px = img.permute(1, 2, 0)[m]
        if len(px):
            nearest = torch.cdist(px.float(), ref).argmin(dim=1)
            impure = float((nearest != names.index(cls)).float().mean())
        else:
            impure = 0.0
        out.append(dict(stray=round(stray, 4), impure=round(impure, 4)))
    return out


#: An image is unclean past these, fixed before measuring any cell. The base model's images of every
#: colour x shape x background prompt and every colour / shape word (192 images) have stray 0 and impure
#: at most 0.015 (99th percentile), 0.004 (95th).
UNCLEAN = dict(stray=0.02, impure=0.05)


def unclean(c: dict) -> bool:
    return c["stray"] > UNCLEAN["stray"] or c["impure"] > UNCLEAN["impure"]


def attributes(images: torch.Tensor) -> list[dict]:
    grey = torch.tensor(world.BACKGROUNDS["grey"]) / 255
    white = torch.tensor(world.BACKGROUNDS["white"]) / 255
    bgs = world.background_colour(images)
    backs = ["grey" if (b - grey).norm() < (b - white).norm() else "white" for b in bgs]
    return [dict(colour=c, shape=s, background=b, **cl) for c, s, b, cl in
            zip(world.classify_colour(images), world.classify_shape(images), backs, cleanliness(images))]


def _changed(a: dict, b: dict) -> bool:
    return any(a[k] != b[k] for k in ("colour", "shape", "background"))


def measure(cell: Cell, lora: Path, comps, folder: Path) -> dict:
    from trainer.networks.network import Network
    from trainer.sampling import generate, save_grid

    net = Network.from_file(lora, comps.unet, comps.text_encoders)
    groups = {"effect": cell.effect, "control": cell.controls}
    rows, tiles = {}, []
    for g, prompts in groups.items():
        ps = [p for p in prompts for _ in range(SEEDS)]
        seeds = [i for _ in prompts for i in range(SEEDS)]
        imgs = {m: generate(comps, ps, seeds=seeds, steps=STEPS, guidance=GUIDANCE, networks=[(net, float(m))])
                for m in (0, 1)}
        a0, a1 = attributes(imgs[0]), attributes(imgs[1])
        rows[g] = [dict(prompt=p, seed=s, at0=x, at1=y) for p, s, x, y in zip(ps, seeds, a0, a1)]
        for i in range(len(prompts)):  # one row per prompt: its seeds without the LoRA, then with it
            tiles += [imgs[0][i * SEEDS:(i + 1) * SEEDS], imgs[1][i * SEEDS:(i + 1) * SEEDS]]
    labels = [f"{p}{' +LoRA' if k else ''}" if i == 0 else "" for p in cell.effect + cell.controls
              for k in (0, 1) for i in range(SEEDS)]
    save_grid(torch.cat(tiles), folder.parent / f"{cell.name}.png", nrow=2 * SEEDS, scale=2, labels=labels)
    return dict(images=rows)


ATTRS = ("colour", "shape", "background")


def summarize(cell: Cell, rows: dict) -> dict:
    """The cell's figures from every image's measurements (see the module docstring)."""
    eff, ctl = rows["effect"], rows["control"]
    n = lambda xs: float(np.mean(xs)) if len(xs) else 0.0  # noqa: E731
    converted = [cell.intended(r["at0"], r["at1"]) for r in eff]
    clean = [ok and all(r["at0"][k] == r["at1"][k] for k in cell.keep) and not unclean(r["at1"])
             for ok, r in zip(converted, eff)]
    # damage, per attribute: controls whose class changed with the LoRA, beyond the noise floor (the
    # same prompt's neighbouring seeds of the base model differing in that attribute)
    pairs = [(ctl[i]["at0"], ctl[i + 1]["at0"]) for i in range(len(ctl) - 1) if ctl[i]["prompt"] == ctl[i + 1]["prompt"]]
    changed = {k: n([r["at0"][k] != r["at1"][k] for r in ctl]) for k in ATTRS}
    floor = {k: n([a[k] != b[k] for a, b in pairs]) for k in ATTRS}
    worst = max(ATTRS, key=lambda k: changed[k] - floor[k])
    every = eff + ctl
    return dict(
        effect=n(converted), effect_base=n([cell.intended(r["at0"], r["at0"]) for r in eff]), clean_effect=n(clean),
        damage=max(0.0, changed[worst] - floor[worst]), damaged=worst, control_changed=changed[worst],
        floor=floor[worst], changed=changed, floors=floor,
        artefacts=n([unclean(r["at1"]) for r in every]) - n([unclean(r["at0"]) for r in every]),
        unclean_base=n([unclean(r["at0"]) for r in every]))


# --------------------------------------------------------------------------- the table

COLUMNS = ("effect", "clean_effect", "effect_base", "damage", "damaged", "control_changed", "floor", "artefacts")


def _fmt(v) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def table(variant: str) -> str:
    folder = OUT / variant
    lines = [f"| cell | {' | '.join(COLUMNS)} | train s |", "|---" * (len(COLUMNS) + 2) + "|"]
    for cell in all_cells():
        f = folder / f"{cell.name}.json"
        if not f.is_file():
            continue
        r = json.loads(f.read_text())
        r.update(summarize(cell, r["images"]))
        ok = r["effect"] >= 0.8 and r["damage"] <= 0.1 and r["artefacts"] <= 0.1
        lines.append(f"| {cell.name}{'' if ok else ' ✗'} | " + " | ".join(_fmt(r[k]) for k in COLUMNS)
                     + f" | {r.get('train_seconds', 0):.0f} |")
    text = "\n".join(lines) + "\n"
    (folder / "matrix.md").write_text(text)
    return text


def run(cells: list[Cell], variant: str, workers: int, keep_dir: Path) -> None:
    torch.set_num_threads(1)
    comps = world.load_world_model()
    folder = OUT / variant
    folder.mkdir(parents=True, exist_ok=True)

    def one(cell: Cell):
        return cell, train(cell, variant, keep_dir / variant / cell.name)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for cell, res in pool.map(one, cells):
            if res.returncode != 0 or not res.files:
                print(f"{cell.name}: training FAILED\n{res.explain()}", flush=True)
                continue
            r = measure(cell, res.files[-1], comps, folder / cell.name)
            r["train_seconds"] = res.seconds
            (folder / f"{cell.name}.json").write_text(json.dumps(r, indent=1))
            r.update(summarize(cell, r["images"]))
            print(f"{cell.name}: " + " ".join(f"{k}={_fmt(r[k])}" for k in COLUMNS), flush=True)
    print(table(variant))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("run", "table", "list"))
    ap.add_argument("--only", nargs="*", default=[], help="cell-name prefixes")
    ap.add_argument("--variant", default="base", choices=list(VARIANTS))
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--keep", default="/tmp/traintrain-quality", help="training folders (reused when present)")
    a = ap.parse_args(argv)
    cells = [c for c in all_cells() if not a.only or any(c.name.startswith(p) for p in a.only)]
    if a.what == "list":
        print("\n".join(c.name for c in cells))
    elif a.what == "table":
        print(table(a.variant))
    else:
        run(cells, a.variant, a.workers, Path(a.keep))


if __name__ == "__main__":
    main()
