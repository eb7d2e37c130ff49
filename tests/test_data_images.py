"""Image discovery and decoding: every mode, EXIF, broken files, large images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer.data.errors import DataError
from trainer.data.images import find_images, load_image


def _save(image: Image.Image, path: Path, **params) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **params)
    return path


# --- find_images -------------------------------------------------------------------


def test_find_images_recursive_sorted_case_insensitive_skips_hidden(tmp_path: Path) -> None:
    img = Image.new("RGB", (8, 8))
    _save(img, tmp_path / "b.png")
    _save(img, tmp_path / "A.JPG")
    _save(img, tmp_path / "sub" / "c.Jpeg")
    _save(img, tmp_path / ".hidden.png")
    _save(img, tmp_path / ".git" / "d.png")
    (tmp_path / "notes.txt").write_text("x")
    found = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)]
    assert found == ["A.JPG", "b.png", "sub/c.Jpeg"]


def test_find_images_errors_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        find_images(tmp_path / "nope")
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(DataError, match="is not a folder"):
        find_images(tmp_path / "file.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="contains no images") as info:
        find_images(empty)
    assert str(empty) in str(info.value)
    with pytest.raises(DataError, match="empty"):
        find_images("")


# --- modes -------------------------------------------------------------------------


def test_rgb_jpeg_upper_case_extension(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (40, 30), (200, 10, 10)), tmp_path / "photo.JPG", quality=95)
    loaded = load_image(path)
    assert loaded.rgb.mode == "RGB" and loaded.rgb.size == (40, 30) and loaded.alpha is None
    r, g, b = loaded.rgb.getpixel((20, 15))
    assert r > 180 and g < 40 and b < 40
    assert loaded.path == path


def test_grayscale_l(tmp_path: Path) -> None:
    loaded = load_image(_save(Image.new("L", (10, 12), 77), tmp_path / "g.png"))
    assert loaded.rgb.mode == "RGB" and loaded.rgb.getpixel((0, 0)) == (77, 77, 77)
    assert loaded.alpha is None


def test_one_bit(tmp_path: Path) -> None:
    image = Image.new("1", (10, 10), 0)
    image.putpixel((3, 3), 1)
    loaded = load_image(_save(image, tmp_path / "bw.png"))
    assert loaded.rgb.getpixel((3, 3)) == (255, 255, 255)
    assert loaded.rgb.getpixel((0, 0)) == (0, 0, 0)


def test_la_composited_on_white_with_alpha(tmp_path: Path) -> None:
    image = Image.new("LA", (10, 10), (0, 0))  # fully transparent black
    for x in range(5):
        for y in range(10):
            image.putpixel((x, y), (50, 255))
    loaded = load_image(_save(image, tmp_path / "la.png"))
    assert loaded.alpha is not None and loaded.alpha.mode == "L"
    assert loaded.rgb.getpixel((1, 1)) == (50, 50, 50)
    assert loaded.rgb.getpixel((8, 8)) == (255, 255, 255)  # transparent -> white, not black
    assert loaded.alpha.getpixel((8, 8)) == 0 and loaded.alpha.getpixel((1, 1)) == 255


def test_rgba_half_transparent_composited(tmp_path: Path) -> None:
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    loaded = load_image(_save(image, tmp_path / "rgba.png"), min_side=1)
    value = loaded.rgb.getpixel((0, 0))
    assert all(126 <= channel <= 129 for channel in value)  # half black over white
    assert loaded.alpha is not None and loaded.alpha.getpixel((0, 0)) == 128


def test_opaque_rgba_has_no_alpha(tmp_path: Path) -> None:
    loaded = load_image(_save(Image.new("RGBA", (4, 4), (1, 2, 3, 255)), tmp_path / "o.png"), min_side=1)
    assert loaded.alpha is None and loaded.rgb.getpixel((0, 0)) == (1, 2, 3)


def test_palette_without_and_with_transparency(tmp_path: Path) -> None:
    plain = Image.new("RGB", (6, 6), (0, 0, 255)).convert("P")
    loaded = load_image(_save(plain, tmp_path / "p.png"), min_side=1)
    assert loaded.alpha is None and loaded.rgb.getpixel((0, 0)) == (0, 0, 255)

    palette = Image.new("P", (6, 6), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))
    for x in range(3):
        for y in range(6):
            palette.putpixel((x, y), 1)
    loaded = load_image(_save(palette, tmp_path / "pt.png", transparency=0), min_side=1)
    assert loaded.alpha is not None
    assert loaded.rgb.getpixel((0, 0)) == (255, 0, 0)
    assert loaded.rgb.getpixel((5, 5)) == (255, 255, 255)
    loaded_gif = load_image(_save(palette, tmp_path / "pt.gif", transparency=0), min_side=1)
    assert loaded_gif.alpha is not None and loaded_gif.rgb.getpixel((5, 5)) == (255, 255, 255)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    loaded = load_image(_save(cmyk, tmp_path / "cmyk.jpg", quality=95))
    assert loaded.rgb.mode == "RGB"
    r, g, b = loaded.rgb.getpixel((8, 8))
    assert r > 200 and g < 60 and b < 60


def test_sixteen_bit_grayscale_png_scaled(tmp_path: Path) -> None:
    values = np.array([[0, 257 * 100], [65535, 257 * 200]], dtype=np.uint16)
    image = Image.fromarray(values)  # mode I;16
    loaded = load_image(_save(image, tmp_path / "deep.png"), min_side=1)
    assert loaded.rgb.getpixel((0, 0)) == (0, 0, 0)
    assert loaded.rgb.getpixel((1, 0)) == (100, 100, 100)
    assert loaded.rgb.getpixel((0, 1)) == (255, 255, 255)
    assert loaded.rgb.getpixel((1, 1)) == (200, 200, 200)


def test_32_bit_integer_mode_i_scaled_as_16_bit(tmp_path: Path) -> None:
    image = Image.fromarray(np.array([[257 * 10, 65535]], dtype=np.int32))  # mode I
    assert image.mode == "I"
    loaded = load_image(_save(image, tmp_path / "i.tif"), min_side=1)
    assert loaded.rgb.getpixel((0, 0)) == (10, 10, 10)
    assert loaded.rgb.getpixel((1, 0)) == (255, 255, 255)


def test_exif_orientation_applied(tmp_path: Path) -> None:
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    for x in range(20):  # left half red
        for y in range(20):
            image.putpixel((x, y), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = _save(image, tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    loaded = load_image(path)
    assert loaded.rgb.size == (20, 40)
    top = loaded.rgb.getpixel((10, 5))
    bottom = loaded.rgb.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60  # the red (left) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


# --- broken files ------------------------------------------------------------------


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(DataError, match="empty") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_text_file_named_png(tmp_path: Path) -> None:
    path = tmp_path / "fake.png"
    path.write_text("this is not an image")
    with pytest.raises(DataError) as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_truncated_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    path = _save(image, tmp_path / "cut.png")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_truncated_jpeg(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    path = _save(image, tmp_path / "cut.jpg")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cut.jpg"):
        load_image(path)


# --- large images ------------------------------------------------------------------


def test_decompression_bomb_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(Image.new("RGB", (100, 100)), tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10000 px > 2 x limit
    with pytest.raises(DataError, match="too large") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_between_warning_and_error_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(Image.new("RGB", (100, 60)), tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)  # 6000 px: Pillow's warning range
    with pytest.warns(Image.DecompressionBombWarning):
        assert load_image(path).rgb.size == (100, 60)


def test_max_side_reduces_large_jpeg_and_png(tmp_path: Path) -> None:
    image = Image.new("RGB", (4000, 2400), (10, 200, 30))
    jpeg = load_image(_save(image, tmp_path / "large.jpg"), max_side=256)
    assert min(jpeg.rgb.size) >= 256 and jpeg.rgb.size[0] <= 2000
    assert abs(jpeg.rgb.size[0] / jpeg.rgb.size[1] - 4000 / 2400) < 0.02
    png = load_image(_save(image, tmp_path / "large.png"), max_side=256)
    assert min(png.rgb.size) >= 256 and png.rgb.size[0] <= 2000
    assert load_image(tmp_path / "large.png").rgb.size == (4000, 2400)
