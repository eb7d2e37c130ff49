"""Captions: precedence, trigger joining, encodings, tag frequency."""

from __future__ import annotations

import codecs
from pathlib import Path

from trainer.data.captions import caption_for, filename_tag, fold_lines, tag_frequency


def _image(tmp_path: Path, name: str = "cat_sitting_id_3.png") -> Path:
    path = tmp_path / name
    path.write_bytes(b"not read here")
    return path


def test_filename_tag() -> None:
    assert filename_tag("dir/cat_sitting_id_3.png") == "cat,sitting"
    assert filename_tag("plain.jpg") == "plain"


def test_precedence_filename_over_txt_over_caption(tmp_path: Path) -> None:
    image = _image(tmp_path)
    assert caption_for(image, "sks", False) == "sks"
    image.with_suffix(".caption").write_text("from caption", encoding="utf-8")
    assert caption_for(image, "sks", False) == "sks, from caption"
    image.with_suffix(".txt").write_text("from txt", encoding="utf-8")
    assert caption_for(image, "sks", False) == "sks, from txt"
    assert caption_for(image, "sks", True) == "sks,cat,sitting"


def test_empty_trigger_has_no_leading_comma(tmp_path: Path) -> None:
    image = _image(tmp_path)
    assert caption_for(image, "", True) == "cat,sitting"
    assert caption_for(image, "", False) == ""
    image.with_suffix(".txt").write_text("a dog\n", encoding="utf-8")
    assert caption_for(image, "", False) == "a dog"
    assert caption_for(image, "  ", False) == "a dog"


def test_newlines_folded_to_commas() -> None:
    assert fold_lines("a, b,\r\n\n c\n") == "a, b, c"
    assert fold_lines("one line") == "one line"


def test_utf8_bom(tmp_path: Path) -> None:
    image = _image(tmp_path)
    image.with_suffix(".txt").write_bytes(codecs.BOM_UTF8 + "café, 猫".encode("utf-8"))
    warnings: list[str] = []
    assert caption_for(image, "t", False, warn=warnings.append) == "t, café, 猫"
    assert warnings == []


def test_utf16_with_bom(tmp_path: Path) -> None:
    image = _image(tmp_path)
    image.with_suffix(".txt").write_bytes("猫, girl\r\n".encode("utf-16"))
    warnings: list[str] = []
    assert caption_for(image, "", False, warn=warnings.append) == "猫, girl"
    assert warnings == []


def test_utf16_without_bom_is_guessed_with_warning(tmp_path: Path) -> None:
    image = _image(tmp_path)
    sidecar = image.with_suffix(".txt")
    sidecar.write_bytes("red hair, smile".encode("utf-16-le"))
    warnings: list[str] = []
    assert caption_for(image, "", False, warn=warnings.append) == "red hair, smile"
    assert len(warnings) == 1 and str(sidecar) in warnings[0]


def test_cp1252_falls_back_with_warning_naming_the_file(tmp_path: Path) -> None:
    image = _image(tmp_path)
    sidecar = image.with_suffix(".caption")
    sidecar.write_bytes("naïve café – “quoted”".encode("cp1252"))
    warnings: list[str] = []
    assert caption_for(image, "x", False, warn=warnings.append) == "x, naïve café – “quoted”"
    assert len(warnings) == 1 and str(sidecar) in warnings[0] and "cp1252" in warnings[0]


def test_latin1_last_resort(tmp_path: Path) -> None:
    image = _image(tmp_path)
    image.with_suffix(".txt").write_bytes(b"caf\xe9 \x81")  # 0x81 is undefined in cp1252
    warnings: list[str] = []
    assert caption_for(image, "", False, warn=warnings.append) == "caf\xe9 \x81"
    assert "latin-1" in warnings[0]


def test_tag_frequency() -> None:
    counts = tag_frequency(["sks, cat, red", "sks,cat", " ", "sks, , dog"])
    assert counts == {"sks": 3, "cat": 2, "red": 1, "dog": 1}
