"""Sample grids (issue 12): drawn before training, every N steps and at the end in every mode, with the
mode's own prompts by default; never changing the trained LoRA; `python -m trainer sample` draws a LoRA
file's strength grid; the demo ends with a before/after image."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _family_helpers import MODES, mode_inputs
from _modes_helpers import cli
from trainer.config import Config, SettingError
from trainer.demo import draw_demo_images
from trainer.engine import OutputPaths, TrainingRun
from trainer.models.tiny import tiny_components
from trainer.modes import mode_for
from trainer.networks.files import load_network_file
from trainer.samples import read_grid_info

SMALL = dict(image_size="64", image_min_length=64, image_buckets_step=64, network_rank=2, network_alpha=2,
             train_iterations=2, train_seed=0, train_model_precision="fp32", save_precision="fp32",
             latent_cache_on_disk=False, train_batch_size=1)
FAST = dict(sample_steps=1, sample_cfg_scale=1)  # one U-Net call per image: what is tested is where grids go


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return mode_inputs(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return draw_demo_images(tmp_path_factory.mktemp("rings"), count=2)  # captioned "orange ring"


def make_cfg(mode, inputs, **settings):
    meta, extra = inputs[mode]
    return Config.defaults(mode).replace(**meta).with_overrides({**SMALL, **extra, "save_lora_name": "s", **settings})


def run_job(cfg, root: Path, components=None):
    events = []
    run = TrainingRun(cfg, components or tiny_components(), OutputPaths.under(root), log=lambda m: None,
                      device=torch.device("cpu"), on_progress=events.append)
    result = run.run(mode_for(cfg.mode))
    assert result.ok, result.message
    return result, events


def grids(root: Path, name="s") -> list:
    return sorted((root / "samples" / name).glob("*.png"))


def tile_bands(path) -> tuple:
    """([(top, bottom)] of the rows, [(left, right)] of the columns) of images on a grid, as a user sees
    them: bands of picture between white space and text."""
    ink = np.asarray(Image.open(path).convert("L")) < 245

    def bands(fraction):  # runs of mostly-inked lines, taller than a line of text
        on = np.concatenate([[False], fraction > 0.5 * fraction.max(), [False]]).astype(int)
        starts, ends = np.flatnonzero(np.diff(on) == 1), np.flatnonzero(np.diff(on) == -1)
        return [(int(a), int(b)) for a, b in zip(starts, ends) if b - a >= 32]

    return bands(ink.mean(axis=1)), bands(ink.mean(axis=0))


def tile_layout(path) -> tuple:
    rows, columns = tile_bands(path)
    return len(rows), len(columns)


def tile(path, row: int, column: int) -> np.ndarray:
    rows, columns = tile_bands(path)
    (top, bottom), (left, right) = rows[row], columns[column]
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)[top:bottom, left:right] / 255


def test_grids_before_training_every_n_steps_and_at_the_end(images, tmp_path):
    cfg = Config.defaults("LoRA").with_overrides({
        **SMALL, "lora_data_directory": str(images), "lora_trigger_word": "ttdemo", "save_lora_name": "rings",
        "train_iterations": 5, "sample_every_n_steps": 2, "sample_steps": 2, "sample_seed": "3, 4",
        "sample_multipliers": "0, 1"})
    _, events = run_job(cfg, tmp_path)
    files = grids(tmp_path, "rings")
    assert [f.name.split("-", 1)[1] for f in files] == ["step00000.png", "step00002.png", "step00004.png",
                                                         "step00005.png"]
    # the engine announces each grid as it is written (the tab shows the latest), in order
    announced = [(e.step, e.message) for e in events if e.phase == "sample"]
    assert announced == [(s, str(f)) for s, f in zip((0, 2, 4, 5), files)]
    for f in files:
        info = read_grid_info(f)
        # rows: each default prompt (trigger word, then the first caption) with each seed; columns: strengths
        assert info["rows"] == [["ttdemo", 3], ["ttdemo", 4], ["ttdemo, orange ring", 3], ["ttdemo, orange ring", 4]]
        assert info["multipliers"] == [0, 1] and info["size"] == [64, 64]
        assert tile_layout(f) == (4, 2)
    # the progress line's figure: the time spent sampling so far
    train = [e for e in events if e.phase == "train"]
    assert 0 < train[0].sample_s < train[-1].sample_s


def test_samples_are_off_by_default(images, tmp_path):
    cfg = Config.defaults("LoRA").with_overrides({**SMALL, "lora_data_directory": str(images)})
    _, events = run_job(cfg, tmp_path)
    assert not (tmp_path / "samples").exists() and not [e for e in events if e.phase == "sample"]


@pytest.mark.parametrize("mode", ["LoRA", "Difference", "ADDifT"])
def test_samples_never_change_the_trained_lora(mode, inputs, tmp_path):
    # gradient checkpointing (train-mode U-Net), a trained text encoder (LoRA), a frozen copier under the
    # trained network (Difference), a multiplier set by the mode at each step (ADDifT)
    settings = dict(train_iterations=3, use_gradient_checkpointing=True, diff_save_1st_pass=True,
                    network_blocks="all", **FAST)
    plain, _ = run_job(make_cfg(mode, inputs, **settings), tmp_path / "plain")
    sampled, _ = run_job(make_cfg(mode, inputs, sample_every_n_steps=1, **settings), tmp_path / "sampled")
    assert grids(tmp_path / "sampled") and not grids(tmp_path / "plain")
    assert [f.name for f in plain.files] == [f.name for f in sampled.files]
    for a, b in zip(plain.files, sampled.files):
        ta, tb = load_network_file(a)[0], load_network_file(b)[0]
        assert ta.keys() == tb.keys()
        assert all(torch.equal(ta[k], tb[k]) for k in ta), f"{b.name} changed by sampling"


DEFAULTS = {  # mode: (prompts of the rows, strengths of the columns, files)
    "LoRA": (["a green ball"], [0, 0.5, 1], ["step00000", "step00001"]),
    "iLECO": (["a cat", "a dog"], [0, 0.5, 1], ["step00000", "step00001"]),
    "Difference": ([""], [0, 0.5, 1], ["pass1-step00000", "pass1-step00001", "pass2-step00000", "pass2-step00001"]),
    "ADDifT": ([""], [-1, 0, 1], ["step00000", "step00001"]),
    "Multi-ADDifT": ([""], [-1, 0, 1], ["step00000", "step00001"]),
}


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_draws_its_own_prompts_by_default(mode, inputs, tmp_path):
    prompts, multipliers, names = DEFAULTS[mode]
    run_job(make_cfg(mode, inputs, train_iterations=1, sample_every_n_steps=1, **FAST), tmp_path)
    files = grids(tmp_path)
    assert [f.stem.split("-", 1)[1] for f in files] == names
    info = read_grid_info(files[-1])
    assert [p for p, _ in info["rows"]] == prompts and info["multipliers"] == multipliers
    assert info["size"] == [64, 64]  # the training size (LoRA: image_size; pairs: the images')
    assert tile_layout(files[-1]) == (len(prompts), len(multipliers))


def test_sample_settings_override_the_defaults(inputs, tmp_path):
    cfg = make_cfg("iLECO", inputs, train_iterations=1, sample_every_n_steps=5, sample_prompts="red\nblue\ngreen",
                   sample_multipliers="1", sample_size="64,128", sample_sampler="ddim", **FAST)
    run_job(cfg, tmp_path)
    files = grids(tmp_path)
    assert [f.stem.split("-", 1)[1] for f in files] == ["step00000", "step00001"]  # 1 step < N: start and end
    info = read_grid_info(files[-1])
    assert [p for p, _ in info["rows"]] == ["red", "blue", "green"] and info["multipliers"] == [1]
    assert info["size"] == [64, 128] and info["sampler"] == "ddim"
    assert tile_layout(files[-1]) == (3, 1)


@pytest.mark.parametrize("key, value, needle", [
    ("sample_every_n_steps", "-1", "out of range"),
    ("sample_multipliers", "0, half", '"half", which is not a number'),
    ("sample_multipliers", "0, 50", '"50", which is out of range'),
    ("sample_seed", "-5", "out of range"),
    ("sample_steps", "0", "out of range"),
    ("sample_cfg_scale", "lots", "is not a number"),
    ("sample_sampler", "dpm++", "is not a known choice"),
    ("sample_size", "100", "is not a multiple of 8"),
    ("sample_prompts", "\n".join(f"p{i}" for i in range(17)), "more than 16"),
])
def test_bad_sample_settings_name_the_setting_and_the_value(key, value, needle):
    with pytest.raises(SettingError) as e:
        Config.defaults("LoRA").with_overrides({key: value})
    message = str(e.value)
    assert message.startswith(f"{key}: ") and needle in message and "allowed:" in message


def test_the_cli_prints_each_grid_and_the_sampling_time(images, tmp_path):
    r = cli("train", "--data", images, "--name", "cli_s", "--iterations", 2, "--set", "sample_every_n_steps=1",
            *[a for k, v in {**SMALL, **FAST}.items() for a in ("--set", f"{k}={v}")], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    files = grids(tmp_path, "cli_s")
    assert len(files) == 3
    printed = [line for line in r.stdout.splitlines() if line.endswith(".png")]
    assert [(tmp_path / line).resolve() for line in printed] == files
    assert "sample: " in r.stderr and "(sampling 0:00:0" in r.stderr


def test_a_bad_sample_setting_stops_the_cli_before_training(images, tmp_path):
    r = cli("train", "--data", images, "--set", "sample_size=65", cwd=tmp_path)
    assert r.returncode == 2
    assert 'sample_size: "65" is not a multiple of 8' in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "output").exists() and not (tmp_path / "samples").exists()


@pytest.fixture(scope="module")
def lora_file(images, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    cfg = Config.defaults("LoRA").with_overrides({**SMALL, "lora_data_directory": str(images),
                                                  "lora_trigger_word": "ttdemo", "save_lora_name": "rings"})
    result, _ = run_job(cfg, root)
    return result.files[-1]


def test_cli_sample_draws_a_strength_grid_of_a_lora_file(lora_file, tmp_path):
    r = cli("sample", "--lora", lora_file, "--prompt", "ttdemo", "--prompt", "ttdemo, orange ring",
            "--multipliers", "0, 0.5, 1", "--seeds", 2, "--seed", 7, "--steps", 2, "--size", "64,128", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    path = (tmp_path / r.stdout.strip().splitlines()[-1]).resolve()
    assert path.parent == tmp_path / "samples" / "rings" and path.suffix == ".png"
    info = read_grid_info(path)
    assert info["rows"] == [["ttdemo", 7], ["ttdemo", 8], ["ttdemo, orange ring", 7], ["ttdemo, orange ring", 8]]
    assert info["multipliers"] == [0, 0.5, 1] and info["size"] == [64, 128]
    assert tile_layout(path) == (4, 3)
    # without --prompt: the LoRA's trigger word; --out names the file
    r = cli("sample", "--lora", lora_file, "--steps", 1, "--out", tmp_path / "g.png", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == str(tmp_path / "g.png")
    assert [p for p, _ in read_grid_info(tmp_path / "g.png")["rows"]] == ["ttdemo"]


def test_cli_sample_rejects_bad_arguments_by_name(lora_file, tmp_path):
    r = cli("sample", "--lora", lora_file, "--multipliers", "0, x", cwd=tmp_path)
    assert r.returncode == 2 and '--multipliers: "0, x" contains "x"' in r.stderr and "Traceback" not in r.stderr
    r = cli("sample", "--lora", tmp_path / "missing.safetensors", cwd=tmp_path)
    assert r.returncode == 2 and "missing.safetensors" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "samples").exists()


def test_the_demo_ends_with_a_before_after_image(tmp_path, capsys):
    from trainer.demo import run_demo

    assert run_demo(tmp_path, steps=2) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("Before/after:"))
    path = Path(line.split(":", 1)[1].strip())
    assert path.is_file() and path.suffix == ".png"
    info = read_grid_info(path)
    assert info["multipliers"] == [0, 1] and tile_layout(path) == (len(info["rows"]), 2)


def test_on_the_world_model_the_trained_strength_differs_from_the_model(world_model, tmp_path):
    """On a model that has learned its world (tests/world.py), a LoRA's grid shows what it learned: before
    training every strength draws the model's own image; after 20 iLECO steps (red -> blue) the strength-1
    images differ from the strength-0 ones (measured: mean 0.11 and 0.05 of the pixel range per seed; 0 before)."""
    cfg = Config.load_preset(Path(__file__).resolve().parent.parent / "presets" / "iLECO.json").replace(
        original_prompt="red", target_prompt="blue").with_overrides({
            "image_size": "64", "train_iterations": 20, "train_learning_rate": 2e-3, "train_seed": 0,
            "train_model_precision": "fp32", "save_lora_name": "world", "sample_every_n_steps": 20, "sample_steps": 10,
            "sample_prompts": "red circle", "sample_seed": "0, 1", "sample_multipliers": "0, 1",
            "sample_cfg_scale": 5})
    run_job(cfg, tmp_path, components=world_model)
    before, after = grids(tmp_path, "world")
    for row in range(2):
        assert np.abs(tile(before, row, 1) - tile(before, row, 0)).max() == 0
        assert np.abs(tile(after, row, 1) - tile(after, row, 0)).mean() > 0.02


def test_the_tab_shows_the_latest_grid_while_training_and_all_grids_after(images, tmp_path):
    import threading

    from trainer.jobs import DONE, StandaloneHost
    from trainer.ui import TrainTrainUI

    ui = TrainTrainUI(StandaloneHost(tmp_path))
    reached, release = threading.Event(), threading.Event()

    def hold(p):  # the job waits at its last step (grids of steps 0 and 2 drawn) until the test has looked
        if p.phase == "train" and p.step == 3:
            reached.set()
            release.wait(60)

    ui.host.on_progress = hold
    cfg = Config.defaults("LoRA").with_overrides({**SMALL, **FAST, "lora_data_directory": str(images),
                                                  "save_lora_name": "tab", "train_iterations": 3,
                                                  "sample_every_n_steps": 2})
    ui.queue.add(cfg)
    ui.queue.start()
    assert reached.wait(600)
    gallery, state = ui.sample_grids({})
    status = ui.status_line()
    release.set()
    assert status.startswith("Training tab (job 1) · step 3/3") and " · sampling 0:00:" in status
    assert ui.queue.wait(600) and ui.queue.jobs()[0].status == DONE
    folder = tmp_path / "samples" / "tab"
    # pictures with the file's stem as caption (paths under the workdir are blocked from gradio's file route)
    assert [c.split("-", 1)[1] for _, c in gallery["value"]] == ["step00002", "step00000"]
    gallery, state = ui.sample_grids(state)
    files = sorted(folder.glob("*.png"), reverse=True)
    assert [c for _, c in gallery["value"]] == [f.stem for f in files]
    with Image.open(files[0]) as newest:
        assert gallery["value"][0][0].size == newest.size
    assert len(gallery["value"]) == 3
    assert ui.sample_grids(state)[0] == {"__type__": "update"}  # nothing new: the gallery is left alone


def test_stop_ends_sampling_too(images, tmp_path):
    cfg = Config.defaults("LoRA").with_overrides({**SMALL, **FAST, "lora_data_directory": str(images),
                                                  "train_iterations": 6, "sample_every_n_steps": 2,
                                                  "save_lora_name": "s"})
    holder = {}

    def on_progress(p):  # Stop is pressed when the step-2 grid appears
        if p.phase == "sample" and p.step == 2:
            holder["run"].stop()

    run = TrainingRun(cfg, tiny_components(), OutputPaths.under(tmp_path), log=lambda m: None,
                      device=torch.device("cpu"), on_progress=on_progress)
    holder["run"] = run
    result = run.run(mode_for("LoRA"))
    assert result.ok and result.stopped and result.steps == 2
    assert [f.stem.split("-", 1)[1] for f in grids(tmp_path)] == ["step00000", "step00002"]  # no grid after Stop


def test_a_grid_that_cannot_be_saved_costs_the_preview_not_the_training(images, tmp_path):
    (tmp_path / "samples").write_text("a file where the samples folder would go")
    cfg = Config.defaults("LoRA").with_overrides({**SMALL, **FAST, "lora_data_directory": str(images),
                                                  "sample_every_n_steps": 1, "save_lora_name": "s"})
    said = []
    run = TrainingRun(cfg, tiny_components(), OutputPaths.under(tmp_path), log=said.append, device=torch.device("cpu"))
    result = run.run(mode_for("LoRA"))
    assert result.ok and (tmp_path / "output" / "s.safetensors").is_file()
    assert any(m.startswith("Could not save the sample grid of step 0 in ") and "training goes on" in m for m in said)
