"""What each training mode's LoRA does to generated images, on a model that has learned a world.

The world model (tests/world.py) draws red / green / blue circles, squares and triangles on white or
grey. Each LoRA is trained from the command line with a shipped preset (tests/_effect_jobs.py says
what is overridden and why; the jobs run in the background while the rest of the suite runs), then
images are generated with a fixed seed and sampler, with the LoRA at 0 and at 1, and measured:
foreground colour class and score (tests/world.py), background colour, and the foreground's outline.

The numbers in the comments were measured on the shipped world model (torch 2.13, CPU, one thread);
the assertions keep a margin below them.
"""
import json
from pathlib import Path

import pytest
import torch

import _effect_jobs
import world
from trainer.networks.network import Network
from trainer.sampling import generate, save_grid

ARTIFACTS = Path(__file__).resolve().parent / "artifacts" / "mode_effects"
STEPS = 20
GUIDANCE = 2.0  # classifier-free guidance of every sample here
SEEDS = 4  # images per prompt

RED = ["red", "a red"]
GREEN = ["green circle", "green square", "green triangle", "green on grey background"]
FREE = ["circle", "square", "triangle", "circle on grey background"]  # no colour named


def trained(name: str, components) -> Network:
    res = _effect_jobs.result(name)
    assert res.returncode == 0, res.explain()
    assert res.files and all(p.is_file() for p in res.files), res.explain()
    return Network.from_file(res.files[-1], components.unet, components.text_encoders)


def samples(components, prompts, net: Network, name: str, seed: int = 0) -> dict:
    """{0: images without the LoRA, 1: with it at 1}; both grids are kept as artefacts."""
    batch = [p for p in prompts for _ in range(SEEDS)]
    out = {m: generate(components, batch, seed=seed, steps=STEPS, guidance=GUIDANCE, networks=[(net, float(m))])
           for m in (0, 1)}
    save_grid(torch.cat([out[0], out[1]]), ARTIFACTS / f"{name}.png", nrow=len(batch), scale=2,
              labels=batch + [f"{p} +LoRA" for p in batch])
    return out


def share(images, colour: str) -> float:
    names = world.classify_colour(images)
    return sum(n == colour for n in names) / len(names)


def score(images, colour: str) -> float:
    return float(world.colour_scores(images)[colour].mean())


def outline_iou(a, b) -> float:
    """Mean intersection over union of the foreground masks of two image sets (same seeds)."""
    ma, mb = world.foreground_mask(a), world.foreground_mask(b)
    return float(((ma & mb).sum((1, 2)) / (ma | mb).sum((1, 2)).clamp_min(1)).mean())


def kept(a, b, classify=world.classify_shape) -> float:
    """Share of images whose class (shape, or colour with world.classify_colour) is the same in both sets."""
    return sum(x == y for x, y in zip(classify(a), classify(b))) / len(a)


def on_grey(images) -> float:
    """Share of images whose background is the world's grey."""
    grey = torch.tensor(world.BACKGROUNDS["grey"]) / 255
    return float(((world.background_colour(images) - grey).abs().max(dim=1).values < 0.1).float().mean())


def background_shift(a, b) -> float:
    """Mean over images of the largest channel change of the background colour (0..1)."""
    return float((world.background_colour(a) - world.background_colour(b)).abs().max(dim=1).values.mean())


def report(name, **numbers):
    """Print the measurements and keep them in artifacts/mode_effects/<name>.json."""
    print(name, " ".join(f"{k}={v:.3f}" for k, v in numbers.items()))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / f"{name}.json").write_text(json.dumps(numbers, indent=1))


# ---------------------------------------------------------------- iLECO


def test_ileco_turns_red_into_blue_and_leaves_green(world_model):
    net = trained("ileco_red_to_blue", world_model)
    red = samples(world_model, RED, net, "ileco_red_to_blue")
    green = samples(world_model, ["green", "a green"], net, "ileco_red_to_blue_green", seed=1)
    n = dict(red_share_0=share(red[0], "red"), blue_share_1=share(red[1], "blue"),
             blue_gain=score(red[1], "blue") - score(red[0], "blue"),
             green_share_1=share(green[1], "green"),
             green_blue_gain=score(green[1], "blue") - score(green[0], "blue"))
    report("ileco_red_to_blue", **n)
    # measured: red share 1.0 without the LoRA; with it blue share 1.0, blue score +1.16;
    # green prompts all still green, their blue score +0.006
    assert n["red_share_0"] == 1.0, n  # the base model draws red for "red"
    assert n["blue_share_1"] >= 0.75, n
    assert n["blue_gain"] > 0.6, n
    assert n["green_share_1"] >= 0.875, n
    assert abs(n["green_blue_gain"]) < n["blue_gain"] / 5, n


@pytest.mark.parametrize("job", ["ileco_erase_red", "leco_erase_red"])
def test_erase_takes_the_red_away(world_model, job):
    net = trained(job, world_model)
    red = samples(world_model, RED, net, job)
    green = samples(world_model, ["green", "a green"], net, f"{job}_green", seed=1)
    n = dict(red_share_1=share(red[1], "red"), red_drop=score(red[0], "red") - score(red[1], "red"),
             green_share_1=share(green[1], "green"),
             green_change=abs(score(green[1], "green") - score(green[0], "green")))
    report(job, **n)
    # measured (iLECO / LECO erase objective): red share 1.0 -> 0.625 / 0.0 (iLECO's erased prompt
    # draws what "" draws: any colour; LECO's pushes away from red), red score -0.37 / -1.10; green
    # prompts all still green, their green score changed 0.015 / 0.040
    assert n["red_share_1"] <= 0.75, n
    assert n["red_drop"] > 0.2, n
    assert n["green_share_1"] >= 0.875, n
    assert n["green_change"] < n["red_drop"] / 5, n


# ---------------------------------------------------------------- pair modes: red circle -> blue circle


@pytest.mark.parametrize("job", ["difference", "addift", "multi_addift"])
def test_pair_lora_moves_the_colour_and_keeps_the_rest(world_model, job):
    net = trained(job, world_model)
    free = samples(world_model, FREE, net, job)
    green = samples(world_model, GREEN, net, f"{job}_green", seed=1)
    n = dict(blue_share_0=share(free[0], "blue"), blue_share_1=share(free[1], "blue"),
             blue_gain=score(free[1], "blue") - score(free[0], "blue"),
             background_shift=background_shift(free[0], free[1]), outline_iou=outline_iou(free[0], free[1]),
             shape_kept=kept(free[0], free[1]), green_share_1=share(green[1], "green"),
             # the same measures between two seeds of the base model: what "unrelated" looks like
             seeds_background_shift=background_shift(free[0][::2], free[0][1::2]),
             seeds_outline_iou=outline_iou(free[0][::2], free[0][1::2]))
    report(job, **n)
    # measured (difference / addift / multi_addift): blue share 0.375 -> 0.875 / 1.0 / 1.0, blue score
    # +0.51 / +0.70 / +0.65; background shift 0.044 / 0.081 / 0.056 (two seeds: 0.19); outline IoU
    # 0.69 / 0.58 / 0.53 (two seeds: 0.49); shape class kept 0.88 / 0.81 / 0.94; green prompts still
    # green 1.0 / 1.0 / 0.81
    assert n["blue_share_1"] - n["blue_share_0"] >= 0.3, n
    assert n["blue_gain"] > 0.25, n
    assert n["background_shift"] < 0.12 < n["seeds_background_shift"], n
    assert n["outline_iou"] > n["seeds_outline_iou"], n
    assert n["shape_kept"] >= 0.6, n
    assert n["green_share_1"] >= 0.7, n


# ---------------------------------------------------------------- LoRA: a new concept behind a trigger word


def test_lora_teaches_a_concept_behind_its_trigger_word(world_model):
    net = trained("lora_trigger", world_model)
    sks = samples(world_model, ["sks circle", "sks square", "sks triangle"], net, "lora_trigger")
    others = samples(world_model, ["red circle", "green square"], net, "lora_trigger_others", seed=1)
    n = dict(blue_share_0=share(sks[0], "blue"), blue_share_1=share(sks[1], "blue"),
             grey_0=on_grey(sks[0]), grey_1=on_grey(sks[1]),
             others_kept=kept(others[0], others[1], world.classify_colour))
    report("lora_trigger", **n)
    # measured: blue share for "sks ..." 0.0 -> 0.67; on grey 0.50 -> 0.58; other prompts' colour kept 1.0
    assert n["blue_share_1"] - n["blue_share_0"] >= 0.4, n
    assert n["grey_1"] >= n["grey_0"], n
    assert n["others_kept"] >= 0.8, n
