"""What each training mode's LoRA does to generated images, on a model that has learned a world.

The world model (tests/world.py) draws red / green / blue circles, squares and triangles on white or
grey. Each LoRA is trained from the command line with a shipped preset (tests/_effect_jobs.py says
what is overridden and why; the jobs run in the background while the rest of the suite runs), then
images are generated with fixed seeds and sampler, with the LoRA at 0 and at 1, and measured:
foreground colour class and score (tests/world.py), background colour, and the foreground's outline.

Every figure of the README's mode-effect table is one of the numbers below; each test's MEASURED
holds what the shipped world model gave (torch 2.13, CPU, one thread), and every bound is derived from
it with one of these margins (see the functions below):

- a count of images: 1/8 of the images measured, at least 2 (2 of 16, 3 of 24, 4 of 32); with 8
  seeds per prompt one image flipping is never the whole margin;
- the size of an effect (a colour score gained or lost): 70 % of the measured change;
- a quantity the README says stays put (a colour score that should not move, the background's
  shift): the measured value plus 0.05 (a twentieth of the 0..1 colour scale, a tenth or less of
  the effects measured).

Each test writes its numbers, their bounds and every image's measurements (prompt, seed, LoRA
strength, colour class, colour scores, shape class, background) to
tests/artifacts/mode_effects/<job>.json, and merges them into tests/artifacts/mode_effects.json.
"""
import json
from pathlib import Path

import torch

import _effect_jobs
import world
from trainer.networks.network import Network
from trainer.sampling import generate, save_grid

ARTIFACTS = Path(__file__).resolve().parent / "artifacts" / "mode_effects"
STEPS = 20
GUIDANCE = 2.0  # classifier-free guidance of every sample here
SEEDS = 8  # images per prompt

RED = ["red", "a red"]
GREEN_WORD = ["green", "a green"]
GREEN = ["green circle", "green square", "green triangle", "green on grey background"]
FREE = ["circle", "square", "triangle", "circle on grey background"]  # no colour named


# ---------------------------------------------------------------- margins (see the module docstring)


def count_margin(n: int) -> int:
    return max(2, n // 8)


def at_least_count(measured: int, n: int) -> int:
    return measured - count_margin(n)


def at_most_count(measured: int, n: int) -> int:
    return measured + count_margin(n)


def at_least_effect(measured: float) -> float:
    return 0.7 * measured


def at_most_small(measured: float) -> float:
    return measured + 0.05


# ---------------------------------------------------------------- sampling and measuring


def trained(name: str, components) -> Network:
    res = _effect_jobs.result(name)
    assert res.returncode == 0, res.explain()
    assert res.files and all(p.is_file() for p in res.files), res.explain()
    return Network.from_file(res.files[-1], components.unet, components.text_encoders)


class Samples:
    """Images of ``prompts`` x SEEDS seeds (``first_seed`` ..), without the LoRA (``at0``) and with it
    at 1 (``at1``), on the same noise; both grids are kept as artefacts."""

    def __init__(self, components, prompts, net: Network, name: str, first_seed: int = 0):
        self.prompts = [p for p in prompts for _ in range(SEEDS)]
        self.seeds = [first_seed + i for _ in prompts for i in range(SEEDS)]
        self.name = name
        out = {m: generate(components, self.prompts, seeds=self.seeds, steps=STEPS, guidance=GUIDANCE,
                           networks=[(net, float(m))]) for m in (0, 1)}
        self.at0, self.at1 = out[0], out[1]
        save_grid(torch.cat([self.at0, self.at1]), ARTIFACTS / f"{name}.png", nrow=len(self.prompts), scale=2,
                  labels=self.prompts + [f"{p} +LoRA" for p in self.prompts])

    def __len__(self):
        return len(self.prompts)

    def per_image(self) -> list:
        rows = []
        for strength, images in ((0, self.at0), (1, self.at1)):
            scores = world.colour_scores(images)
            for i, (colour, shape, bg) in enumerate(zip(world.classify_colour(images), world.classify_shape(images),
                                                        world.background_colour(images).tolist())):
                rows.append(dict(set=self.name, prompt=self.prompts[i], seed=self.seeds[i], lora=strength,
                                 colour=colour, shape=shape, background=[round(v, 4) for v in bg],
                                 scores={c: round(float(s[i]), 4) for c, s in scores.items()}))
        return rows


def count(images, colour: str) -> int:
    return sum(n == colour for n in world.classify_colour(images))


def score(images, colour: str) -> float:
    return float(world.colour_scores(images)[colour].mean())


def outline_iou(a, b) -> float:
    """Mean intersection over union of the foreground masks of two image sets (same seeds)."""
    ma, mb = world.foreground_mask(a), world.foreground_mask(b)
    return float(((ma & mb).sum((1, 2)) / (ma | mb).sum((1, 2)).clamp_min(1)).mean())


def kept(a, b, classify=world.classify_shape) -> int:
    """Images whose class (shape, or colour with world.classify_colour) is the same in both sets."""
    return sum(x == y for x, y in zip(classify(a), classify(b)))


def on_grey(images) -> int:
    """Images whose background is the world's grey."""
    grey = torch.tensor(world.BACKGROUNDS["grey"]) / 255
    return int(((world.background_colour(images) - grey).abs().max(dim=1).values < 0.1).sum())


def background_shift(a, b) -> float:
    """Mean over images of the largest channel change of the background colour (0..1)."""
    return float((world.background_colour(a) - world.background_colour(b)).abs().max(dim=1).values.mean())


def report(name: str, numbers: dict, bounds: dict, *sets: Samples) -> None:
    """Print the measurements; keep them, their bounds and every image's measurements as JSON."""
    print(name, " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in numbers.items()))
    entry = dict(numbers=numbers, bounds=bounds, images=[row for s in sets for row in s.per_image()])
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / f"{name}.json").write_text(json.dumps(entry, indent=1))
    combined = ARTIFACTS.parent / "mode_effects.json"
    everything = json.loads(combined.read_text()) if combined.is_file() else {}
    everything[name] = entry
    combined.write_text(json.dumps(everything, indent=1))


def check(numbers: dict, bounds: dict) -> None:
    """Each bound is ('>=' | '<=', value); all failures are reported together with the numbers."""
    bad = {k: (numbers[k], op, v) for k, (op, v) in bounds.items()
           if not (numbers[k] >= v if op == ">=" else numbers[k] <= v)}
    assert not bad, f"outside the bounds: {bad}; all numbers: {numbers}"


# ---------------------------------------------------------------- iLECO


ILECO_MEASURED = dict(red_0=16, blue_0=0, blue_1=16, blue_gain=1.161, green_kept=16, green_blue_gain=0.002,
                      compound_blue_1=1)


def test_ileco_turns_red_into_blue_and_leaves_green(world_model):
    """README: iLECO "red" -> "blue"."""
    m = ILECO_MEASURED
    net = trained("ileco_red_to_blue", world_model)
    red = Samples(world_model, RED, net, "ileco_red_to_blue")
    green = Samples(world_model, GREEN_WORD, net, "ileco_red_to_blue_green", first_seed=100)
    compound = Samples(world_model, ["red circle"], net, "ileco_red_to_blue_compound", first_seed=200)
    n = dict(red_0=count(red.at0, "red"), blue_0=count(red.at0, "blue"), blue_1=count(red.at1, "blue"),
             blue_gain=score(red.at1, "blue") - score(red.at0, "blue"),
             green_kept=kept(green.at0, green.at1, world.classify_colour),
             green_blue_gain=abs(score(green.at1, "blue") - score(green.at0, "blue")),
             compound_blue_1=count(compound.at1, "blue"))
    b = dict(red_0=(">=", at_least_count(m["red_0"], len(red))),  # the base model draws red for "red"
             blue_0=("<=", at_most_count(m["blue_0"], len(red))),
             blue_1=(">=", at_least_count(m["blue_1"], len(red))),
             blue_gain=(">=", at_least_effect(m["blue_gain"])),
             green_kept=(">=", at_least_count(m["green_kept"], len(green))),
             green_blue_gain=("<=", at_most_small(m["green_blue_gain"])),
             # the tiny text encoder keeps "red circle" apart from "red": the edit does not reach it
             compound_blue_1=("<=", at_most_count(m["compound_blue_1"], len(compound))))
    report("ileco_red_to_blue", n, b, red, green, compound)
    check(n, b)


ERASE_MEASURED = {
    # iLECO's erased prompt draws what "" draws: any colour; LECO's objective pushes away from red
    "ileco_erase_red": dict(red_0=16, red_1=11, red_drop=0.325, green_kept=16, green_change=0.012),
    "leco_erase_red": dict(red_0=16, red_1=1, red_drop=1.067, green_kept=16, green_change=0.036),
}


def _erase(world_model, job):
    m = ERASE_MEASURED[job]
    net = trained(job, world_model)
    red = Samples(world_model, RED, net, job)
    green = Samples(world_model, GREEN_WORD, net, f"{job}_green", first_seed=100)
    n = dict(red_0=count(red.at0, "red"), red_1=count(red.at1, "red"),
             red_drop=score(red.at0, "red") - score(red.at1, "red"),
             green_kept=kept(green.at0, green.at1, world.classify_colour),
             green_change=abs(score(green.at1, "green") - score(green.at0, "green")))
    b = dict(red_0=(">=", at_least_count(m["red_0"], len(red))),
             red_1=("<=", at_most_count(m["red_1"], len(red))),
             red_drop=(">=", at_least_effect(m["red_drop"])),
             green_kept=(">=", at_least_count(m["green_kept"], len(green))),
             green_change=("<=", at_most_small(m["green_change"])))
    report(job, n, b, red, green)
    check(n, b)


def test_ileco_erase_takes_the_red_away(world_model):
    """README: iLECO erase ("red" -> "")."""
    _erase(world_model, "ileco_erase_red")


def test_leco_erase_objective_takes_the_red_away(world_model):
    """README: iLECO erase with leco_objective=erase."""
    _erase(world_model, "leco_erase_red")


# ---------------------------------------------------------------- pair modes: red circle -> blue circle


PAIR_MEASURED = {
    # outline IoU 0.70 / 0.57 / 0.54 against 0.46 between two halves of the seeds; the background's
    # shift against 0.18 between them
    "difference": dict(blue_0=13, blue_1=28, blue_gain=0.509, background_shift=0.033, shape_kept=28,
                       green_kept=32),
    # ADDifT / Multi-ADDifT on the original's timestep cycle (diff_timestep_schedule's default since 8f10dde;
    # uniform draws measured blue_gain 0.687 / 0.619, background 0.071 / 0.080, green kept 31 / 20)
    "addift": dict(blue_0=13, blue_1=32, blue_gain=0.646, background_shift=0.039, shape_kept=26, green_kept=31),
    # trained on red -> blue pairs of every shape: it also turns some green shapes blue
    "multi_addift": dict(blue_0=13, blue_1=31, blue_gain=0.628, background_shift=0.101, shape_kept=29,
                         green_kept=28),
}


def _pair(world_model, job):
    m = PAIR_MEASURED[job]
    net = trained(job, world_model)
    free = Samples(world_model, FREE, net, job)
    green = Samples(world_model, GREEN, net, f"{job}_green", first_seed=100)
    half = SEEDS // 2  # two halves of the seeds of the base model: what "unrelated images" look like
    first = torch.cat([free.at0[i * SEEDS:i * SEEDS + half] for i in range(len(FREE))])
    second = torch.cat([free.at0[i * SEEDS + half:(i + 1) * SEEDS] for i in range(len(FREE))])
    n = dict(blue_0=count(free.at0, "blue"), blue_1=count(free.at1, "blue"),
             blue_gain=score(free.at1, "blue") - score(free.at0, "blue"),
             background_shift=background_shift(free.at0, free.at1), outline_iou=outline_iou(free.at0, free.at1),
             shape_kept=kept(free.at0, free.at1), green_kept=kept(green.at0, green.at1, world.classify_colour),
             seeds_background_shift=background_shift(first, second), seeds_outline_iou=outline_iou(first, second))
    b = dict(blue_0=("<=", at_most_count(m["blue_0"], len(free))),
             blue_1=(">=", at_least_count(m["blue_1"], len(free))),
             blue_gain=(">=", at_least_effect(m["blue_gain"])),
             background_shift=("<=", at_most_small(m["background_shift"])),
             # the outline moves less than between two seeds of the base model
             outline_iou=(">=", n["seeds_outline_iou"]),
             shape_kept=(">=", at_least_count(m["shape_kept"], len(free))),
             green_kept=(">=", at_least_count(m["green_kept"], len(green))))
    report(job, n, b, free, green)
    check(n, b)
    assert n["background_shift"] < n["seeds_background_shift"], n  # and far less than another seed's


def test_difference_moves_the_colour_and_keeps_the_rest(world_model):
    """README: Difference (Difference.json)."""
    _pair(world_model, "difference")


def test_addift_moves_the_colour_and_keeps_the_rest(world_model):
    """README: ADDifT (ADDifT_Action_SD1.5.json)."""
    _pair(world_model, "addift")


def test_multi_addift_moves_the_colour_and_keeps_the_rest(world_model):
    """README: Multi-ADDifT."""
    _pair(world_model, "multi_addift")


# ---------------------------------------------------------------- LoRA: a new concept behind a trigger word


LORA_MEASURED = dict(blue_0=1, blue_1=14, grey_0=10, grey_1=13, others_kept=16)


def test_lora_teaches_a_concept_behind_its_trigger_word(world_model):
    """README: LoRA (LoRA.json), trigger word "sks"."""
    m = LORA_MEASURED
    net = trained("lora_trigger", world_model)
    sks = Samples(world_model, ["sks circle", "sks square", "sks triangle"], net, "lora_trigger")
    others = Samples(world_model, ["red circle", "green square"], net, "lora_trigger_others", first_seed=100)
    n = dict(blue_0=count(sks.at0, "blue"), blue_1=count(sks.at1, "blue"), grey_0=on_grey(sks.at0),
             grey_1=on_grey(sks.at1), others_kept=kept(others.at0, others.at1, world.classify_colour))
    b = dict(blue_0=("<=", at_most_count(m["blue_0"], len(sks))),
             blue_1=(">=", at_least_count(m["blue_1"], len(sks))),
             grey_1=(">=", at_least_count(m["grey_1"], len(sks))),
             others_kept=(">=", at_least_count(m["others_kept"], len(others))))
    report("lora_trigger", n, b, sks, others)
    check(n, b)
