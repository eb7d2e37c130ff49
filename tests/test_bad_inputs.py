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
