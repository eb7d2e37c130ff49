"""Bad inputs end to end: what a user gets from a whole run (engine or `python -m trainer train`), where
the unit tests of each layer check the parts. Every case ends in a message that names the file or the
setting, with no traceback and no output file. (The full matrix and where each item is tested:
bench/RESULTS.md, "Nothing lost, nothing broken".)"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.__main__ import main
from trainer.config import Config
from trainer.data.errors import DataError
from trainer.engine import OutputPaths, TrainingRun
from trainer.models.tiny import tiny_components
from trainer.modes import mode_for
from trainer.networks.files import load_network_file

SMALL = {"image_size": "64", "image_min_length": 64, "image_buckets_step": 64, "network_rank": 4,
         "network_alpha": 4, "network_blocks": "IN01,OUT11", "train_batch_size": 2, "train_iterations": 2,
         "train_model_precision": "fp32", "save_precision": "fp32", "latent_cache_on_disk": False, "train_seed": 0}


def _gradient(w, h, mode="RGB"):
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None].repeat(w, 1)
    rgb = np.stack([x, y, 255 - x], -1).astype(np.uint8)
    return Image.fromarray(rgb).convert(mode) if mode != "RGB" else Image.fromarray(rgb)


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory):
    """One of each awkward kind of file a real folder holds."""
    d = tmp_path_factory.mktemp("odd")
    _gradient(96, 80).save(d / "rgb.png")
    _gradient(80, 80, "L").save(d / "gray.png")
    pal = _gradient(80, 96).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    pal.save(d / "palette.png", transparency=0)
    _gradient(90, 90).convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray((np.arange(80 * 80, dtype=np.uint16).reshape(80, 80) * 10).astype(np.uint16)).save(d / "deep16.png")
    rgba = _gradient(80, 80).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((80, 80)))
    rgba.save(d / "alpha.png")
    _gradient(80, 80).convert("LA").save(d / "gray_alpha.png")
    _gradient(20000, 64).save(d / "strip_20000px.png")  # huge side, extreme ratio (1.3 M pixels)
    Image.new("1", (20000, 20000)).save(d / "bomb_20000x20000.png")  # 400 M pixels: over Pillow's limit
    (d / "zero.png").write_bytes(b"")
    (d / "text.png").write_text("not an image")
    good = (d / "rgb.png").read_bytes()
    (d / "truncated.png").write_bytes(good[: len(good) // 2])
    # captions in other encodings
    (d / "rgb.txt").write_bytes("café au lait".encode("cp1252"))
    (d / "gray.txt").write_bytes("日本語のタグ".encode("utf-16"))
    (d / "alpha.txt").write_bytes(b"\xef\xbb\xbfbom tag")
    return d


def test_a_folder_of_every_awkward_image_kind_trains_and_names_what_it_skipped(odd_folder, tmp_path):
    said = []
    cfg = Config.defaults("LoRA").with_overrides({**SMALL, "lora_data_directory": str(odd_folder),
                                                  "save_lora_name": "odd"})
    run = TrainingRun(cfg, tiny_components(), OutputPaths.under(tmp_path), log=said.append,
                      device=torch.device("cpu"))
    result = run.run(mode_for("LoRA"))
    assert result.ok, result.message
    skipped = [m for m in said if m.startswith("Skipped")]
    for name in ("bomb_20000x20000.png", "zero.png", "text.png", "truncated.png"):
        assert sum(name in m for m in skipped) == 1, (name, skipped)
    assert any("too large" in m for m in skipped if "bomb" in m)
    assert any("cp1252" in m and "rgb.txt" in m for m in said)  # a guessed encoding is named
    assert run.summary["num_train_images"] == 8  # rgb gray palette cmyk deep16 alpha gray_alpha strip
    _, meta = load_network_file(result.files[0])
    tags = json.loads(meta["ss_tag_frequency"])
    assert {"café au lait", "日本語のタグ", "bom tag"} <= set(next(iter(tags.values())))


def _train(argv, tmp_path, capsys):
    code = main(["train", "--workdir", str(tmp_path), *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _no_output(tmp_path):
    out = tmp_path / "output"
    return not out.exists() or not any(out.iterdir())


@pytest.fixture
def small_set():
    return [x for k, v in SMALL.items() for x in ("--set", f"{k}={v}")]


def test_empty_folder_from_the_cli(tmp_path, capsys, small_set):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    code, _, err = _train(["--data", str(tmp_path / "empty"), *small_set], tmp_path, capsys)
    assert code == 2 and str(tmp_path / "empty") in err and "no images" in err and "Traceback" not in err
    assert _no_output(tmp_path)


def test_no_image_left_after_filtering_names_the_folder_and_the_setting(tmp_path, capsys, small_set):
    d = tmp_path / "small"
    d.mkdir()
    for i in range(3):
        _gradient(40, 40).save(d / f"s{i}.png")  # smaller than the 64 px bucket
    code, _, err = _train(["--data", str(d), *small_set, "--set", "image_disable_upscale=true"], tmp_path, capsys)
    assert code == 2 and "No usable image" in err and str(d) in err and "image_disable_upscale" in err
    assert all(f"s{i}.png" in err for i in range(3)) and "Traceback" not in err
    assert _no_output(tmp_path)


def test_only_broken_images_name_each_file(tmp_path, capsys, small_set):
    d = tmp_path / "broken"
    d.mkdir()
    (d / "zero.png").write_bytes(b"")
    (d / "text.jpg").write_text("hello")
    code, _, err = _train(["--data", str(d), *small_set], tmp_path, capsys)
    assert code == 2 and "No usable image" in err and "zero.png" in err and "text.jpg" in err
    assert _no_output(tmp_path)


PRESETS = {
    "not JSON": ("{'network_rank': 4,", "not valid JSON"),
    "not an object": ("[1, 2, 3]", "expected a JSON object"),
    "unknown key": ('{"network_rnak": 4}', "network_rnak"),
    "wrong type": ('{"train_iterations": "many"}', "train_iterations"),
    "out of range": ('{"network_rank": 0}', "network_rank"),
    "bad choice": ('{"train_optimizer": "SuperAdam"}', "train_optimizer"),
}


@pytest.mark.parametrize("case", sorted(PRESETS))
def test_bad_preset_names_the_file_and_the_setting_and_writes_nothing(tmp_path, capsys, case):
    text, needle = PRESETS[case]
    preset = tmp_path / "preset.json"
    preset.write_text(text, encoding="utf-8")
    code, _, err = _train(["--preset", str(preset), "--data", str(tmp_path)], tmp_path, capsys)
    assert code == 2 and str(preset) in err and needle in err and "Traceback" not in err
    assert not (tmp_path / "output").exists() and not (tmp_path / "jsons").exists()


@pytest.mark.parametrize("preset", sorted((Path(__file__).resolve().parent.parent / "presets").glob("*.json")),
                         ids=lambda p: p.stem)
def test_every_shipped_preset_is_accepted_by_the_cli(tmp_path, capsys, preset):
    # --json-only: parsed, validated and written back, without training (training each is in the modes' tests)
    code, out, err = _train(["--preset", str(preset), "--json-only", "--name", "p"], tmp_path, capsys)
    assert code == 0, err
    written = next((tmp_path / "jsons").glob("p-*.json"))
    assert Config.load_preset(written) == Config.load_preset(preset).replace(save_lora_name="p")


@pytest.mark.parametrize("name", ["../escape", "a/b", "a\\b", "CON", "nul", "..", "x..y"])
def test_unsafe_save_names_are_refused_before_anything_is_written(tmp_path, capsys, name):
    code, _, err = _train(["--name", name, "--data", str(tmp_path)], tmp_path, capsys)
    assert code == 2 and "save_lora_name" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == [] and not (tmp_path.parent / "escape.safetensors").exists()


def test_an_empty_save_name_becomes_untitled():
    assert Config.defaults().replace(save_lora_name="  ").save_lora_name == "untitled"


def test_data_errors_are_value_errors_so_every_front_end_catches_them():
    # the CLI, the queue and the UI catch ValueError around a run: a DataError must be one
    assert issubclass(DataError, ValueError)


# --- any image size lands in a bucket exactly (property) ------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from trainer.data.buckets import crop_box, make_buckets, nearest_bucket, resize_and_crop  # noqa: E402


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 30000), st.integers(1, 30000), st.sampled_from([(512, 512), (768, 512), (1024, 1024)]),
       st.sampled_from([64, 128, 256]), st.sampled_from([1.5, 2.0, 4.0]))
def test_any_image_size_gets_a_crop_inside_it_with_the_buckets_shape(w, h, size, step, ratio):
    buckets, _ = make_buckets(size, step, min(size), ratio)
    bucket, error = nearest_bucket((w, h), buckets)
    box = crop_box((w, h), bucket, error)
    left, top, right, bottom = box
    assert 0 <= left < right <= w and 0 <= top < bottom <= h
    cw, ch = right - left, bottom - top
    assert (cw == w) or (ch == h)  # one side is kept whole, the other centre-cropped
    # the crop has the bucket's shape up to one source pixel of rounding
    assert abs(cw * bucket[1] - ch * bucket[0]) <= max(bucket) + 1 or min(cw, ch) == 1


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300), st.integers(1, 300), st.booleans())
def test_resize_and_crop_gives_exactly_the_bucket(w, h, disable_upscale):
    image = Image.new("RGB", (w, h), (10, 20, 30))
    buckets, _ = make_buckets((64, 64), 32, 32, 2.0)
    bucket, error = nearest_bucket((w, h), buckets)
    out = resize_and_crop(image, bucket, error, disable_upscale)
    if out is None:
        assert disable_upscale and (w < bucket[0] or h < bucket[1])
    else:
        assert out.size == bucket


# === issue 10, round 2: clear errors instead of tracebacks ==========================================
# Each case goes through the whole front end: `python -m trainer …` (main() in this process) or the
# tab's Add to Queue / Plot tab. Refusals come before any model is loaded (a missing tiny model would
# not be noticed: the check runs first), name the setting and the value, and write nothing.

import os  # noqa: E402
import pickle  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from safetensors.torch import save_file  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


class _Payload:
    """Unpickling this creates a folder: proof that a pickle ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _resume_files(d: Path) -> dict[str, tuple[str, str]]:
    """network_resume values -> (value, what the message must say)."""
    (d / "evil.pt").write_bytes(pickle.dumps({"w": _Payload(d / "PWNED")}))
    (d / "evil.safetensors").write_bytes(pickle.dumps({"w": _Payload(d / "PWNED")}))
    (d / "junk.safetensors").write_bytes(b"\x00\x01not safetensors at all")
    save_file({"model.diffusion_model.conv.weight": torch.zeros(2, 2)}, str(d / "model.safetensors"))
    (d / "folder.safetensors").mkdir()
    return {
        "missing": (str(d / "nope.safetensors"), "does not exist"),
        "pickle .pt": (str(d / "evil.pt"), "not a .safetensors file"),
        "pickle named .safetensors": (str(d / "evil.safetensors"), "not a readable .safetensors file"),
        "garbage": (str(d / "junk.safetensors"), "not a readable .safetensors file"),
        "not a LoRA": (str(d / "model.safetensors"), "holds no LoRA weights"),
        "a folder": (str(d / "folder.safetensors"), "is not a file"),
    }


# (--set values, text the error must contain); each is refused with exit 2 before the model loads
REFUSED = {
    # the help text's own example, with the default cosine scheduler
    "scheduler: eta_min with cosine": (["train_lr_scheduler_settings=eta_min=1e-5"],
                                       ["train_lr_scheduler_settings", "'eta_min'", "cosine", "cosine_annealing"]),
    "scheduler: unknown argument": (["train_lr_scheduler=step", "train_lr_scheduler_settings=gama=0.5"],
                                    ["train_lr_scheduler_settings", "'gama'", "did you mean gamma"]),
    "scheduler: wrong type": (["train_lr_scheduler=cosine_annealing", "train_lr_scheduler_settings=eta_min='low'"],
                              ["train_lr_scheduler_settings", "eta_min='low'", "a number"]),
    "scheduler: argument owned by another setting": (["train_lr_scheduler_settings=num_warmup_steps=5"],
                                                     ["train_lr_scheduler_settings", "train_lr_warmup_steps"]),
    "scheduler: value the scheduler rejects": (["train_lr_scheduler=one_cycle",
                                                "train_lr_scheduler_settings=total_steps=1"],
                                               ["train_lr_scheduler_settings", "total_steps=1", "one_cycle"]),
    "scheduler: not k=v": (["train_lr_scheduler_settings=eta_min"], ["train_lr_scheduler_settings", "k=v"]),
    "optimizer: unknown argument": (["train_optimizer_settings=weight_decy=0.1"],
                                    ["train_optimizer_settings", "'weight_decy'", "did you mean weight_decay"]),
    "optimizer: lr given twice": (["train_optimizer_settings=lr=0.1"],
                                  ["train_optimizer_settings", "lr=0.1", "train_learning_rate"]),
    "optimizer: betas of the wrong length": (["train_optimizer_settings=betas=(0.9,)"],
                                             ["train_optimizer_settings", "betas=(0.9,)", "tuple of 2"]),
    "optimizer: value the optimizer rejects": (["train_optimizer_settings=betas=(2.0,0.99)"],
                                               ["train_optimizer_settings", "Invalid beta parameter"]),
    "optimizer: bool expected": (["train_optimizer=AdaFactor", "train_optimizer_settings=relative_step=1"],
                                 ["train_optimizer_settings", "relative_step=1", "True or False"]),
    "optimizer: bare word": (["train_optimizer_settings=foreach=yes"],
                             ["train_optimizer_settings", "foreach='yes'"]),
    "2nd pass in LoRA mode": (["2nd.network_rank=4"], ["2nd.network_rank", "LoRA mode has no 2nd pass"]),
    "2nd pass in iLECO mode": (["mode=iLECO", "2nd.train_learning_rate=1e-3"],
                               ["2nd.train_learning_rate", "iLECO mode has no 2nd pass"]),
    "2nd pass of a pass-1 setting": (["mode=Difference", "2nd.lora_data_directory=x"],
                                     ["lora_data_directory", "cannot differ in the 2nd pass"]),
    "iterations 0": (["train_iterations=0"], ["train_iterations", "0"]),
    "rank not a number": (["network_rank=abc"], ["network_rank", "abc"]),
    "negative learning rate": (["train_learning_rate=-1"], ["train_learning_rate", "-1"]),
    "batch size 0": (["train_batch_size=0"], ["train_batch_size", "0"]),
    "seed out of range": ([f"train_seed={2 ** 33}"], ["train_seed", str(2 ** 33)]),
    "timesteps min above max": (["train_min_timesteps=900", "train_max_timesteps=100"],
                                ["train_min_timesteps", "900", "train_max_timesteps"]),
    "unknown block": (["network_blocks=IN99"], ["network_blocks", "IN99"]),
    "unknown optimizer": (["train_optimizer=SuperAdam"], ["train_optimizer", "SuperAdam"]),
    "unknown scheduler": (["train_lr_scheduler=zigzag"], ["train_lr_scheduler", "zigzag"]),
    "unknown mode": (["mode=Nope"], ["mode", "Nope"]),
    "unknown setting": (["netwrk_rank=4"], ["netwrk_rank", "did you mean \"network_rank\""]),
    "--set without =": (["train_iterations"], ["--set", "KEY=VALUE"]),
    "bad step rules": (["train_lr_step_rules=a:b:c"], ["train_lr_step_rules", "a:b:c"]),
    "image size not a size": (["image_size=big"], ["image_size", "big"]),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_bad_settings_are_refused_by_the_cli_before_the_model_loads(tmp_path, capsys, monkeypatch, case):
    pairs, needles = REFUSED[case]
    loads = []
    monkeypatch.setattr("trainer.host.standalone.load_components", lambda *a, **k: loads.append(1))
    argv = ["--data", str(tmp_path)] + [x for p in pairs for x in ("--set", p)]
    code, _, err = _train(argv, tmp_path, capsys)
    assert code == 2, err
    assert all(n in err for n in needles), (needles, err)
    assert "Traceback" not in err and err.startswith("error: ") and not loads
    assert _no_output(tmp_path)


@pytest.fixture(scope="module")
def resume_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    return d, _resume_files(d)


@pytest.mark.parametrize("case", ["missing", "pickle .pt", "pickle named .safetensors", "garbage", "not a LoRA",
                                  "a folder"])
def test_bad_network_resume_is_refused_before_the_model_loads_and_no_pickle_runs(
        tmp_path, capsys, monkeypatch, resume_files, case):
    d, files = resume_files
    value, needle = files[case]
    loads = []
    monkeypatch.setattr("trainer.host.standalone.load_components", lambda *a, **k: loads.append(1))
    code, _, err = _train(["--data", str(tmp_path), "--set", f"network_resume={value}"], tmp_path, capsys)
    assert code == 2 and "network_resume" in err and value in err and needle in err, err
    assert "Traceback" not in err and not loads and _no_output(tmp_path)
    assert not (d / "PWNED").exists()


def test_valid_scheduler_and_optimizer_arguments_train(tmp_path, capsys):
    # the same arguments the refusals point to, on the scheduler they belong to: they reach the run
    argv = ["--mode", "iLECO", "--original-prompt", "red", "--target-prompt", "blue", "--iterations", "2",
            "--set", "image_size=64", "--set", "network_rank=4", "--set", "train_model_precision=fp32",
            "--set", "train_lr_scheduler=cosine_annealing", "--set", "train_lr_scheduler_settings=eta_min=1e-5",
            "--set", "train_optimizer_settings=weight_decay=0.01; betas=(0.9,0.99)", "--set", "logging_save_csv=true"]
    code, out, err = _train(argv, tmp_path, capsys)
    assert code == 0, err
    rows = [r.split(",") for r in Path(out.split()[-1]).read_text().splitlines()]
    lrs = [float(r[3]) for r in rows[rows.index(next(r for r in rows if r[0] == "Step")) + 1:]]
    assert lrs[-1] == pytest.approx(1e-5)  # cosine_annealing ends at eta_min


@pytest.mark.parametrize("value", ["abc", "0", "-3", "1.5", "99999"])
def test_tt_threads_that_is_not_a_thread_count_is_refused(tmp_path, capsys, monkeypatch, value):
    monkeypatch.setenv("TT_THREADS", value)
    code, _, err = _train(["--json-only"], tmp_path, capsys)
    assert code == 2 and f"TT_THREADS={value!r}" in err and "whole number from 1 to 1024" in err
    assert "Traceback" not in err and not (tmp_path / "jsons").exists()


def test_a_setting_the_mode_does_not_use_gets_one_warning_line(tmp_path, capsys):
    code, _, err = _train(["--json-only", "--set", "diff_target_name=_b", "--set", "diff_alt_ratio=2",
                           "--set", "network_rank=8"], tmp_path, capsys)
    assert code == 0
    lines = [line for line in err.splitlines() if "not used in LoRA mode" in line]
    assert len(lines) == 1 and "diff_target_name, diff_alt_ratio" in lines[0] and "network_rank" not in lines[0]


# --- python -m trainer plot -----------------------------------------------------------------------

def _log_text(rows: list[str]) -> str:
    return "save_lora_name,x\nStep,Loss,Loss (avg),LR unet\n" + "".join(r + "\n" for r in rows)


PLOTS = {
    "missing": (None, "no such file"),
    "binary": (bytes(range(256)) * 4, "not a text file"),
    "not a log": ("a,b,c\n1,2,3\n", "no 'Step' row"),
    "empty": ("", "no 'Step' row"),
    "a word in a row": (_log_text(["1,0.5,0.5,1e-4", "2,abc,0.5,1e-4"]), "line 4: 'abc' is not a number"),
    "a short row": (_log_text(["1,0.5,0.5,1e-4", "2,0.5"]), "line 4 has 2 values"),
    "NUL bytes": (_log_text(["1,0.5\x00,0.5,1e-4"]), "line 3: '0.5\\x00' is not a number"),
    "two columns": ("Step,Loss\n1,0.5\n", "the Step row has 2 columns"),
    "a folder": ("DIR", "is a folder"),
}


@pytest.mark.parametrize("case", sorted(PLOTS))
def test_plot_of_a_bad_file_is_one_error_line(tmp_path, capsys, case):
    content, needle = PLOTS[case]
    path = tmp_path / "log.csv"
    if content == "DIR":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    code = main(["plot", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and str(path) in err and needle in err and "Traceback" not in err, err
    assert not (tmp_path / "log.png").exists() and not list(tmp_path.glob("*.tmp"))


def test_plot_with_inf_and_nan_draws_the_finite_points_and_says_so(tmp_path, capsys):
    path = tmp_path / "log.csv"
    path.write_text(_log_text(["1,0.5,0.5,1e-4", "2,inf,0.6,1e-4", "3,nan,-inf,1e-4", "4,0.4,0.5,1e-4"]))
    code = main(["plot", str(path)])
    out = capsys.readouterr()
    assert code == 0 and (tmp_path / "log.png").stat().st_size > 1000, out.err
    assert "3 values are inf or NaN" in out.err


# --- the tab: Add to Queue and the Plot tab -------------------------------------------------------

@pytest.fixture(scope="module")
def tab(tmp_path_factory):
    from trainer.jobs import StandaloneHost
    from trainer.ui import TrainTrainUI

    root = tmp_path_factory.mktemp("tab")
    (root / "imgs").mkdir()
    _gradient(64, 64).save(root / "imgs" / "a.png")
    return TrainTrainUI(StandaloneHost(root)), root


def _tab_values(ui, cfg):
    from test_ui import values_for

    return values_for(ui, cfg)


TAB_REFUSED = {
    "scheduler: eta_min with cosine": ({"train_lr_scheduler_settings": "eta_min=1e-5"},
                                       "train_lr_scheduler_settings: 'eta_min'"),
    "optimizer: unknown argument": ({"train_optimizer_settings": "weight_decy=0.1"},
                                    "train_optimizer_settings: 'weight_decy'"),
    "optimizer: value rejected": ({"train_optimizer_settings": "eps=-1.0"}, "train_optimizer_settings"),
    "network_resume missing": ({"network_resume": "/no/such/lora.safetensors"},
                               "network_resume: '/no/such/lora.safetensors' does not exist"),
    "network_resume pickle": ({"network_resume": "PICKLE"}, "not a .safetensors file"),
}


@pytest.mark.parametrize("case", sorted(TAB_REFUSED))
def test_the_tab_refuses_bad_arguments_at_add_to_queue(tab, resume_files, case):
    ui, root = tab
    overrides, needle = TAB_REFUSED[case]
    if overrides.get("network_resume") == "PICKLE":
        overrides = {"network_resume": resume_files[1]["pickle .pt"][0]}
    cfg = Config.defaults("LoRA").with_overrides({"lora_data_directory": str(root / "imgs"), **overrides,
                                                  "save_lora_name": "tab"})
    msg = ui.add_to_queue(*_tab_values(ui, cfg))[0]
    assert msg.startswith("Error: ") and needle in msg and "Traceback" not in msg, msg
    assert ui.queue.jobs() == [] and not (resume_files[0] / "PWNED").exists()


@pytest.mark.parametrize("case", ["binary", "not a log", "a word in a row"])
def test_the_plot_tab_shows_a_bad_log_as_one_message(tab, case):
    ui, root = tab
    logs = Path(ui.paths.log_dir)
    logs.mkdir(parents=True, exist_ok=True)
    content, needle = PLOTS[case]
    name = case.replace(" ", "_") + ".csv"
    (logs / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    fig, msg = ui.draw_log(name)
    assert fig is None and msg.startswith("Error: ") and needle in msg and "Traceback" not in msg


def test_the_plot_tab_draws_a_log_with_inf(tab):
    ui, _ = tab
    logs = Path(ui.paths.log_dir)
    logs.mkdir(parents=True, exist_ok=True)
    (logs / "inf.csv").write_text(_log_text(["1,0.5,0.5,1e-4", "2,inf,0.6,1e-4", "3,0.4,0.5,1e-4"]))
    fig, msg = ui.draw_log("inf.csv")
    assert fig is not None and msg.endswith("inf.csv")
    fig.canvas.draw()  # what gradio does with it: no "Axis limits cannot be NaN or Inf"


# --- images with nothing to train on, through a whole CLI run on the tiny model --------------------

def test_tiny_and_fully_transparent_images_are_skipped_naming_each_file(tmp_path, capsys, small_set):
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(2):
        _gradient(64, 64).save(d / f"good{i}.png")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(d / "one_pixel.png")
    Image.new("RGB", (4, 300), (200, 10, 10)).save(d / "sliver_4x300.png")
    Image.new("RGBA", (64, 64), (255, 0, 0, 0)).save(d / "invisible.png")
    code, out, err = _train(["--data", str(d), *small_set, "--set", "train_iterations=1"], tmp_path, capsys)
    assert code == 0, err
    skipped = [line for line in err.splitlines() if line.startswith("Skipped")]
    assert len(skipped) == 3, skipped
    assert any("one_pixel.png" in s and "1x1 pixels: too small" in s for s in skipped)
    assert any("sliver_4x300.png" in s and "4x300 pixels: too small" in s for s in skipped)
    assert any("invisible.png" in s and "fully transparent" in s for s in skipped)


def test_a_folder_of_only_one_pixel_images_is_an_error_naming_them(tmp_path, capsys, small_set):
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(2):
        Image.new("RGB", (1, 1)).save(d / f"dot{i}.png")
    code, _, err = _train(["--data", str(d), *small_set], tmp_path, capsys)
    assert code == 2 and "No usable image" in err and "dot0.png" in err and "dot1.png" in err
    assert "Traceback" not in err and _no_output(tmp_path)


# --- a full disk under the latent cache: the run goes on without it, with one warning ---------------

@pytest.fixture(params=["tmpfs", "patched writer"])
def full_cache_dir(request, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    if request.param == "patched writer":
        from safetensors import SafetensorError

        def full(*a, **k):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

        monkeypatch.setattr("trainer.data.cache.save_file", full)
        yield cache
        return
    # a real full file system: a 64 KiB tmpfs filled to the last byte (needs root and mount)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(cache)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root; the patched writer covers this case")
    try:
        fd = os.open(cache / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:  # ENOSPC: full
            pass
        finally:
            os.close(fd)
        yield cache
    finally:
        subprocess.run(["umount", "-l", str(cache)], capture_output=True)


def test_a_full_disk_while_writing_the_latent_cache_only_costs_the_cache(tmp_path, capsys, small_set,
                                                                         full_cache_dir):
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(3):
        _gradient(64 + 8 * i, 64).save(d / f"g{i}.png")
    code, out, err = _train(["--data", str(d), *small_set, "--set", "latent_cache_on_disk=true",
                             "--set", "train_iterations=1"], tmp_path, capsys)
    assert code == 0 and "Traceback" not in err, err
    warnings = [line for line in err.splitlines() if "Cannot write the latent cache" in line]
    assert len(warnings) == 1 and "No space left on device" in warnings[0] and "continuing without it" in warnings[0]
    assert (tmp_path / "output" / "untitled.safetensors").is_file()
    assert not [p for p in full_cache_dir.iterdir() if p.name != "filler"]  # no temp or partial file


# --- logging_verbose ------------------------------------------------------------------------------

def test_logging_verbose_prints_a_line_per_step_and_the_trained_modules(tmp_path, capsys):
    argv = ["--mode", "iLECO", "--original-prompt", "red", "--target-prompt", "blue", "--iterations", "3",
            "--set", "image_size=64", "--set", "network_rank=4", "--set", "network_blocks=IN01,OUT11",
            "--set", "train_model_precision=fp32"]
    code, _, quiet = _train(argv + ["--name", "quiet"], tmp_path, capsys)
    assert code == 0 and "step 1/3" not in quiet and "Trained modules" not in quiet
    code, _, loud = _train(argv + ["--name", "loud", "--set", "logging_verbose=true"], tmp_path, capsys)
    assert code == 0, loud
    steps = [line for line in loud.splitlines() if line.startswith("step ")]
    assert [s.split(":")[0] for s in steps] == ["step 1/3", "step 2/3", "step 3/3"]
    assert all(" loss " in s and "(avg " in s and " lr " in s for s in steps)
    modules = next(line for line in loud.splitlines() if "Trained modules by block" in line)
    assert "unet_down_blocks_0" in modules or "unet_input_blocks_1" in modules, modules


# --- bitsandbytes is loaded only for an 8-bit optimizer ------------------------------------------

def _importtime_run(tmp_path, *extra):
    """`python -X importtime -m trainer train …` (iLECO, tiny model, 1 step): (rc, imported module names, stderr)."""
    argv = [sys.executable, "-X", "importtime", "-m", "trainer", "train", "--workdir", str(tmp_path), "--mode",
            "iLECO", "--original-prompt", "red", "--target-prompt", "blue", "--iterations", "1", "--set",
            "image_size=64", "--set", "network_rank=4", "--set", "network_blocks=IN01", "--set",
            "train_model_precision=fp32", *extra]
    env = {**os.environ, "TT_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    modules = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    return r.returncode, modules, r.stderr


def test_a_plain_cli_run_does_not_import_bitsandbytes(tmp_path):
    import importlib.metadata

    try:
        importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("bitsandbytes is not installed: nothing to keep out")
    rc, modules, err = _importtime_run(tmp_path, "--name", "plain")
    assert rc == 0 and "diffusers" in modules, err[-2000:]
    # (importtime also lists a refused attempt, at a few µs: a loaded package brings its submodules)
    assert not [m for m in modules if m.startswith("bitsandbytes.")] and "gemm_4bit_forward" not in err
    # (that an 8-bit optimizer then loads it: the next test, without a second CLI run)


def test_with_bitsandbytes_held_back_every_optimizer_still_builds_and_8bit_ones_load_it(tmp_path):
    # packages that import bitsandbytes themselves (pytorch_optimizer: CAME, Tiger, AdamMini) still load
    code = (
        "import torch\n"
        "from trainer.optim import OPTIMIZER_NAMES, keep_bitsandbytes_unloaded, make_optimizer\n"
        "keep_bitsandbytes_unloaded()\n"
        "net = torch.nn.Linear(2, 2)\n"
        "for name in OPTIMIZER_NAMES:\n"
        "    make_optimizer(name, [{'params': list(net.parameters())}], 1e-3, {}, network=net, warn=lambda m: None)\n"
        "import sys\n"
        "print('built', len(OPTIMIZER_NAMES), 'bitsandbytes.optim' in sys.modules)\n")
    env = {**os.environ, "TT_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and "built 25 True" in r.stdout, r.stderr[-3000:]  # AdamW8bit loaded it
