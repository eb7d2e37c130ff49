"""The Train tab's "Check data": what training will read from the LoRA image folder with the current settings
(counts, buckets, captions found / missing, files skipped and why), with no model; checked against build_samples."""
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from trainer.config import Config
from trainer.data.dataset import build_samples
from trainer.data.preview import preview_dataset

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = dict(image_size=(64, 64), buckets_step=32, min_length=32, max_ratio=2.0)


@pytest.fixture()
def data(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(folder / "square.png")
    (folder / "square.txt").write_text("red square", encoding="utf-8")
    Image.new("RGB", (128, 64), (10, 200, 10)).save(folder / "wide.jpg")
    Image.new("RGB", (40, 80), (10, 10, 200)).save(folder / "tall.png")
    (folder / "tall.caption").write_text("blue", encoding="utf-8")
    (folder / "broken.png").write_bytes(b"not a png at all")
    Image.new("RGB", (4, 4)).save(folder / "tiny.png")
    return folder


def test_preview_counts_buckets_as_training_makes_them(data):
    for kw in ({}, {"mirroring": True, "num_multiply": 3}, {"sub_image_num": 2}):
        report = preview_dataset(data, **SETTINGS, **kw)
        samples = build_samples(data, **SETTINGS, **kw, warn=lambda m: None)
        assert report.buckets == Counter(s.bucket for s in samples), kw
        assert report.samples == len(samples)
    report = preview_dataset(data, **SETTINGS)
    assert (report.found, report.usable) == (5, 3)


def test_preview_names_skipped_files_and_missing_captions(data):
    report = preview_dataset(data, **SETTINGS)
    skipped = {p.name: why for p, why in report.skipped}
    assert set(skipped) == {"broken.png", "tiny.png"}
    assert "not a readable image" in skipped["broken.png"]
    assert "too small" in skipped["tiny.png"]
    assert sorted(p.name for p in report.captioned) == ["square.png", "tall.png"]
    assert [p.name for p in report.uncaptioned] == ["wide.jpg"]
    text = report.text()
    assert "5 images found, 3 usable" in text
    assert "Captions: 2 found, 1 missing" in text and "wide.jpg" in text
    assert "broken.png" in text and "tiny.png" in text


def test_preview_shows_images_refused_by_disable_upscale(data):
    report = preview_dataset(data, **{**SETTINGS, "image_size": (128, 128), "min_length": 64},
                             disable_upscale=True)
    skipped = {p.name: why for p, why in report.skipped}
    assert "image_disable_upscale" in skipped["square.png"]
    assert "tall.png" in skipped
    assert report.usable == 1  # wide.jpg 128x64 fits 128x64 without upscaling


def test_preview_of_filename_tags_says_caption_files_are_ignored(data):
    text = preview_dataset(data, **SETTINGS, use_filename_as_tag=True).text()
    assert "from the file names" in text


def _values(ui, **overrides):
    from test_ui import values_for

    cfg = Config.load_preset(ROOT / "presets" / "LoRA.json").with_overrides(overrides)
    return values_for(ui, cfg)


@pytest.fixture()
def tab_workdir(tmp_path):  # the tab (conftest's ui) works apart from this test's data folders
    return tmp_path / "work"


def test_check_data_button_reports_with_the_tabs_settings(ui, data):
    text = ui.check_data(*_values(ui, lora_data_directory=str(data), image_size="128", image_buckets_step=64,
                                  image_min_length=64, image_max_ratio=2))
    assert "5 images found, 3 usable" in text
    assert "128x128" in text and "broken.png" in text
    # the same folder with mirroring: twice the samples, as training would make
    mirrored = ui.check_data(*_values(ui, lora_data_directory=str(data), image_size="128", image_buckets_step=64,
                                      image_min_length=64, image_max_ratio=2, image_mirroring=True))
    assert "6 training samples" in mirrored


def test_check_data_errors_name_the_setting(ui, tmp_path):
    assert "lora_data_directory" in ui.check_data(*_values(ui, lora_data_directory=""))
    missing = ui.check_data(*_values(ui, lora_data_directory=str(tmp_path / "nope")))
    assert missing.startswith("Error:") and "nope" in missing and "does not exist" in missing
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "contains no images" in ui.check_data(*_values(ui, lora_data_directory=str(empty)))


def test_check_data_shows_only_in_lora_mode(ui):
    import gradio as gr

    assert isinstance(ui.widgets["data_check"], gr.Button)
    assert ui.widgets["data_check_group"].visible is True
    msg = ui.check_data(*_values(ui, mode="iLECO"))
    assert "LoRA" in msg and "iLECO" in msg
