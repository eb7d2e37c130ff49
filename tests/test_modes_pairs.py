"""Image pairs (trainer.data.pairs): Difference/ADDifT pairs and Multi-ADDifT pair folders."""
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from trainer.data.errors import DataError
from trainer.data.pairs import build_pair_samples, difference_mask, find_pairs, load_image_pair, pair_pixels


def circle(path: Path, colour, size=(64, 64), box=(16, 16, 48, 48), background=(240, 240, 240)) -> Path:
    img = Image.new("RGB", size, background)
    ImageDraw.Draw(img).ellipse(box, fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


SMALL = dict(image_size=(64, 64), buckets_step=64, min_length=64, max_ratio=2.0)


def test_pair_of_different_sizes_names_both_files_and_sizes(tmp_path):
    a = circle(tmp_path / "a.png", (220, 30, 30))
    b = circle(tmp_path / "b.png", (30, 30, 220), size=(72, 64))
    with pytest.raises(DataError) as e:
        load_image_pair(a, b)
    msg = str(e.value)
    assert "a.png" in msg and "b.png" in msg and "64x64" in msg and "72x64" in msg


def test_missing_or_empty_pair_image_names_the_setting(tmp_path):
    a = circle(tmp_path / "a.png", (220, 30, 30))
    with pytest.raises(DataError, match=r"target_image: .*nope\.png.* does not exist"):
        load_image_pair(a, tmp_path / "nope.png")
    with pytest.raises(DataError, match="original_image is empty"):
        load_image_pair("", a)


def test_pair_sides_are_cropped_to_multiples_of_8_with_a_warning(tmp_path):
    a = circle(tmp_path / "a.png", (220, 30, 30), size=(70, 67))
    b = circle(tmp_path / "b.png", (30, 30, 220), size=(70, 67))
    warnings = []
    pair = pair_pixels(*load_image_pair(a, b), warn=warnings.append)
    assert pair.size == (64, 64) and pair.original.shape == (3, 64, 64) and pair.target.shape == (3, 64, 64)
    assert warnings and "70x67" in warnings[0] and "64x64" in warnings[0]


def test_difference_mask_marks_the_changed_region_at_latent_resolution(tmp_path):
    a = circle(tmp_path / "a.png", (220, 30, 30), box=(24, 24, 40, 40))
    b = circle(tmp_path / "b.png", (30, 30, 220), box=(24, 24, 40, 40))
    pair = pair_pixels(*load_image_pair(a, b))
    noisy = pair.target.clone()
    noisy[:, 2, 2] += 1.0  # one stray pixel in a corner cell does not mark it
    mask = difference_mask(pair.original, noisy)
    assert mask.shape == (1, 8, 8)
    assert mask[0, 3:5, 3:5].all()  # the circle (pixels 24..40 -> cells 3..4)
    assert mask[0, 2, 2] == 1 and mask[0, 5, 5] == 1  # dilated by one cell
    assert mask[0, 0, 0] == 0 and mask[0, 7, 7] == 0 and mask[0, 0, 7] == 0


def test_pairs_are_found_by_suffix_and_unpaired_images_are_named(tmp_path):
    circle(tmp_path / "x.png", (220, 30, 30))
    circle(tmp_path / "x_b.png", (30, 30, 220))
    circle(tmp_path / "sub" / "y.jpg", (220, 30, 30))
    circle(tmp_path / "sub" / "y_b.jpg", (30, 30, 220))
    circle(tmp_path / "alone.png", (0, 0, 0))
    circle(tmp_path / "orphan_b.png", (0, 0, 0))
    warnings = []
    pairs = find_pairs(tmp_path, "_b", warn=warnings.append)
    assert sorted((p.original.name, p.target.name) for p in pairs) == [("x.png", "x_b.png"), ("y.jpg", "y_b.jpg")]
    assert len(warnings) == 2
    assert any("alone.png" in w and "no target" in w for w in warnings)
    assert any("orphan_b.png" in w and "no original" in w for w in warnings)


def test_no_pairs_or_no_suffix_is_a_clear_error(tmp_path):
    circle(tmp_path / "x.png", (220, 30, 30))
    with pytest.raises(DataError, match=r"No image pairs .*_b"):
        find_pairs(tmp_path, "_b", warn=lambda m: None)
    with pytest.raises(DataError, match="diff_target_name is empty"):
        find_pairs(tmp_path, "", warn=lambda m: None)


def test_pair_samples_resize_to_the_common_size_mirror_together_and_use_captions(tmp_path):
    # x: 96x64 original, 80x72 target -> both resized to 80x64 then bucketed (64x64 max bucket here).
    circle(tmp_path / "x.png", (220, 30, 30), size=(96, 64), box=(10, 10, 40, 40))
    circle(tmp_path / "x_b.png", (30, 30, 220), size=(80, 72), box=(10, 10, 40, 40))
    (tmp_path / "x.txt").write_text("red circle", encoding="utf-8")
    circle(tmp_path / "y.png", (220, 30, 30), box=(5, 5, 30, 30))
    circle(tmp_path / "y_b.png", (30, 30, 220), box=(5, 5, 30, 30))
    (tmp_path / "y_b.txt").write_text("from the target", encoding="utf-8")  # only the target has one
    warnings = []
    samples = build_pair_samples(tmp_path, "_b", **SMALL, mirroring=True, trigger="tt", warn=warnings.append)
    assert len(samples) == 4
    assert any("96x64" in w and "80x72" in w and "80x64" in w for w in warnings)
    by = {(s.original.source.name, s.original.mirrored): s for s in samples}
    assert by[("x.png", False)].caption == "tt, red circle" and by[("x.png", False)].target.caption == "tt, red circle"
    assert by[("y.png", False)].caption == "tt, from the target"
    for name in ("x.png", "y.png"):
        plain, mirrored = by[(name, False)], by[(name, True)]
        assert plain.bucket == plain.target.bucket == (64, 64)
        assert plain.original.pixels.shape == plain.target.pixels.shape == (3, 64, 64)
        assert torch.equal(mirrored.original.pixels, torch.flip(plain.original.pixels, dims=[2]))
        assert torch.equal(mirrored.target.pixels, torch.flip(plain.target.pixels, dims=[2]))
        assert mirrored.target.source.name == name.replace(".png", "_b.png")


def test_pair_samples_sub_images_and_multiply(tmp_path):
    circle(tmp_path / "x.png", (220, 30, 30), size=(128, 128))
    circle(tmp_path / "x_b.png", (30, 30, 220), size=(128, 128))
    samples = build_pair_samples(tmp_path, "_b", image_size=(128, 128), buckets_step=64, min_length=64,
                                 max_ratio=2.0, sub_image_num=1, num_multiply=2, warn=lambda m: None)
    assert len(samples) == 4
    assert {s.bucket for s in samples} == {(128, 128), (64, 64)}
    assert all(s.original.pixels.shape == s.target.pixels.shape for s in samples)
