"""The Image tab's dataset preparation (trainer/data/prepare.py): rotated / downscaled copies of a folder or one
file in another folder, captions copied along, inputs and existing files never overwritten, skips with reasons."""
import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer.data.errors import DataError
from trainer.data.prepare import PrepareOptions, prepare_images


def digest(folder: Path) -> dict:
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture()
def data(tmp_path):
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (64, 48), (200, 10, 10)).save(folder / "red.jpg")
    (folder / "red.txt").write_text("red box", encoding="utf-8")
    rgba = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    rgba.paste((10, 200, 10, 255), (10, 10, 30, 30))
    rgba.save(folder / "sub" / "green.webp", lossless=True)
    (folder / "broken.png").write_bytes(b"junk")
    return folder


def test_a_folder_gives_copies_with_captions_and_the_inputs_stay(data, tmp_path):
    before = digest(data)
    out = tmp_path / "out"
    seen = []
    result = prepare_images(data, out, PrepareOptions(copies=3, seed=1), progress=lambda d, t, p: seen.append((d, t)))
    assert digest(data) == before
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert names == ["red_id_0.png", "red_id_0.txt", "red_id_1.png", "red_id_1.txt", "red_id_2.png",
                     "red_id_2.txt", "sub", "sub/green_id_0.png", "sub/green_id_1.png", "sub/green_id_2.png"]
    assert (out / "red_id_1.txt").read_text(encoding="utf-8") == "red box"
    assert len(result.written) == 6 and len(result.captions) == 3
    assert [p.name for p, _ in result.skipped] == ["broken.png"]
    assert seen[-1] == (3, 3)
    summary = result.summary()
    assert "6 new images from 2 of 3 inputs" in summary and "broken.png" in summary
    # rotation grows the canvas and leaves transparent corners; PNG keeps them
    for p in result.written:
        with Image.open(p) as im:
            assert im.mode == "RGBA"
            assert np.asarray(im)[..., 3].min() == 0


def test_a_second_run_never_overwrites_and_takes_new_names(data, tmp_path):
    out = tmp_path / "out"
    prepare_images(data / "red.jpg", out, PrepareOptions(copies=2, seed=1))
    first = digest(out)
    result = prepare_images(data / "red.jpg", out, PrepareOptions(copies=2, seed=2))
    assert [p.name for p in result.written] == ["red_id_2.png", "red_id_3.png"]
    assert {k: v for k, v in digest(out).items() if k in first} == first


def test_downscale_pins_the_picture_to_the_chosen_side(tmp_path):
    src = tmp_path / "white.png"
    Image.new("RGB", (100, 80), (255, 255, 255)).save(src)
    for side, check in {"right": lambda a: a[:, -1].any() and not a[:, 0].any(),
                        "left": lambda a: a[:, 0].any() and not a[:, -1].any(),
                        "top": lambda a: a[0].any() and not a[-1].any(),
                        "bottom": lambda a: a[-1].any() and not a[0].any()}.items():
        out = tmp_path / side
        [path] = prepare_images(src, out, PrepareOptions(copies=1, rotate=False, min_scale=0.5, fix_side=side,
                                                         seed=3)).written
        with Image.open(path) as im:
            assert im.size == (100, 80)
            opaque = np.asarray(im)[..., 3] > 0
        assert check(opaque), side
        assert 0.25 * 0.9 <= opaque.mean() < 1.0


def test_rotation_only_keeps_the_whole_picture(tmp_path):
    src = tmp_path / "x.png"
    Image.new("RGB", (60, 30), (0, 0, 255)).save(src)
    [path] = prepare_images(src, tmp_path / "o", PrepareOptions(copies=1, downscale=False, max_angle=90,
                                                                seed=5)).written
    with Image.open(path) as im:
        assert im.width * im.height > 60 * 30  # grown to hold the tilted picture
        opaque = (np.asarray(im)[..., 3] > 127).sum()
    assert abs(opaque - 60 * 30) < 0.1 * 60 * 30


def test_bad_inputs_and_options_are_named(data, tmp_path):
    with pytest.raises(DataError, match="Output folder .* is the input folder"):
        prepare_images(data, data)
    with pytest.raises(DataError, match="Output folder: empty"):
        prepare_images(data, " ")
    with pytest.raises(DataError, match="does not exist"):
        prepare_images(tmp_path / "nope", tmp_path / "o")
    with pytest.raises(DataError, match="not an image file"):
        prepare_images(data / "red.txt", tmp_path / "o")
    with pytest.raises(DataError, match="Number of images per input: 0"):
        prepare_images(data, tmp_path / "o", PrepareOptions(copies=0))
    with pytest.raises(DataError, match="Min scale: 0"):
        prepare_images(data, tmp_path / "o", PrepareOptions(min_scale=0))
    with pytest.raises(DataError, match="Fix side: 'middle'"):
        prepare_images(data, tmp_path / "o", PrepareOptions(fix_side="middle"))
    with pytest.raises(DataError, match="Nothing to do"):
        prepare_images(data, tmp_path / "o", PrepareOptions(rotate=False, downscale=False))
    assert not (tmp_path / "o").exists()


def test_an_output_folder_inside_the_input_is_not_read_again(data):
    out = data / "modified"
    prepare_images(data, out, PrepareOptions(copies=1, seed=0))
    again = prepare_images(data, out, PrepareOptions(copies=1, seed=0))
    assert again.inputs == 3
    assert sorted(p.name for p in out.glob("*.png")) == ["red_id_0.png", "red_id_1.png"]


@pytest.fixture()
def tab_workdir(tmp_path):  # the tab (conftest's ui) works apart from this test's data folders
    return tmp_path / "work"


def run_tab(ui, **kw):
    from trainer.ui import IMAGE_TAB_INPUTS

    w = ui.widgets
    values = {k: w[k].value for k in IMAGE_TAB_INPUTS}  # the tab's defaults, as a user first sees them
    values.update({f"img_{k}": v for k, v in kw.items()})
    return list(ui.make_images(*[values[k] for k in IMAGE_TAB_INPUTS]))


def test_the_image_tab_processes_a_folder_with_its_defaults(ui, data, tmp_path):
    messages = run_tab(ui, source=str(data), output=str(tmp_path / "out"), seed="7")
    assert messages[-1].startswith(f"Images saved in {tmp_path / 'out'}: 10 new images from 2 of 3 inputs")
    assert "broken.png" in messages[-1]
    assert len(list((tmp_path / "out").rglob("*.png"))) == 10  # the original's default: 5 per image


def test_the_image_tab_takes_an_upload_and_names_bad_values(ui, tmp_path):
    src = tmp_path / "pic.png"
    Image.new("RGBA", (32, 32), (255, 0, 0, 255)).save(src)
    widget = ui.widgets["img_upload"]
    picture = widget.preprocess(widget.data_model(path=str(src), orig_name=src.name))  # as gradio hands it over
    assert isinstance(picture, Image.Image)
    out = tmp_path / "up"
    messages = run_tab(ui, upload=picture, output=str(out), copies=2, fix_side="left")
    assert "2 new images" in messages[-1]
    assert sorted(p.name for p in out.iterdir()) == ["upload_id_0.png", "upload_id_1.png"]
    assert run_tab(ui, source="", output=str(out))[-1].startswith("Error: Input: empty")
    assert "Seed" in run_tab(ui, upload=picture, output=str(out), seed="abc")[-1]
    assert "Min scale" in run_tab(ui, upload=picture, output=str(out), min_scale=0)[-1]
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    bad = widget.preprocess(widget.data_model(path=str(junk), orig_name=junk.name))
    message = run_tab(ui, upload=bad, output=str(out))[-1]
    assert message.startswith("Error: Or upload one image: the Image tab upload could not be read"), message
    assert sorted(p.name for p in out.iterdir()) == ["upload_id_0.png", "upload_id_1.png"]


def test_the_cli_prepare_command(data, tmp_path, capsys):
    from trainer.__main__ import main

    out = tmp_path / "cli"
    assert main(["prepare", str(data / "red.jpg"), str(out), "--copies", "2", "--no-rotate", "--fix-side", "top",
                 "--seed", "1"]) == 0
    assert "2 new images" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["red_id_0.png", "red_id_0.txt", "red_id_1.png", "red_id_1.txt"]
    assert main(["prepare", str(data), str(data)]) == 2
    assert "is the input folder" in capsys.readouterr().err


def test_half_transparent_pixels_keep_their_colour_and_alpha(tmp_path):
    src = tmp_path / "glass.png"
    Image.new("RGBA", (32, 32), (0, 0, 255, 128)).save(src)
    [path] = prepare_images(src, tmp_path / "o", PrepareOptions(copies=1, rotate=False, min_scale=1.0,
                                                                seed=0)).written
    with Image.open(path) as im:
        assert im.getpixel((16, 16)) == (0, 0, 255, 128)  # not whitened: training composites it once, on white
