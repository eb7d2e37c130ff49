"""Captions: which text goes with an image, and the tag statistics for the metadata.

Precedence (as the original): filename-as-tag > ``<stem>.txt`` > ``<stem>.caption`` > none.
The trigger word is prepended (``trigger + ","`` for filename tags, ``trigger + ", "``
for caption files), but an empty trigger adds nothing (the original left a stray ", ").

Caption files: UTF-8 (a BOM is dropped); UTF-16 with a BOM; UTF-16 without a BOM is
guessed from NUL bytes; otherwise cp1252, then latin-1 (both with a warning naming
the file). Line breaks are folded into ", " (tags are comma separated; a multi-line
tag list becomes one list), empty lines dropped, surrounding spaces and trailing commas
of each line trimmed.
"""

from __future__ import annotations

import codecs
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import DataError

Warn = Callable[[str], None]

CAPTION_SUFFIXES: tuple[str, ...] = (".txt", ".caption")
"""Sidecar caption files, in order of precedence."""

_log = logging.getLogger(__name__)


def _log_warning(message: str) -> None:
    _log.warning(message)


def filename_tag(image_path: Path | str) -> str:
    """The file name as a tag list: stem cut at ``_id_`` (augmentation suffix), ``_`` -> ``,``."""
    stem = Path(image_path).stem
    return stem.split("_id_")[0].replace("_", ",")


def caption_file_for(image_path: Path | str) -> Path | None:
    """The sidecar caption file of an image (``.txt`` before ``.caption``), or None."""
    path = Path(image_path)
    for suffix in CAPTION_SUFFIXES:
        candidate = path.with_suffix(suffix)
        if candidate.is_file():
            return candidate
    return None


def caption_for(
    image_path: Path | str,
    trigger: str,
    use_filename_as_tag: bool,
    *,
    warn: Warn = _log_warning,
) -> str:
    """The full caption (trigger included) for one image."""
    trigger = trigger.strip()
    if use_filename_as_tag:
        return _join(trigger, ",", filename_tag(image_path))
    sidecar = caption_file_for(image_path)
    if sidecar is None:
        return trigger
    return _join(trigger, ", ", read_caption_file(sidecar, warn=warn))


def without_trigger(caption: str, trigger: str) -> str:
    """The caption with every comma-separated tag that is the trigger word taken out."""
    trigger = trigger.strip()
    if not trigger:
        return caption
    return ", ".join(t.strip() for t in caption.split(",") if t.strip() and t.strip() != trigger)


def _join(trigger: str, separator: str, body: str) -> str:
    if trigger and body:
        return trigger + separator + body
    return trigger or body


def read_caption_file(path: Path | str, *, warn: Warn = _log_warning) -> str:
    """Decode a caption file (see module docstring) and fold it onto one line."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"Cannot read caption file {str(path)!r}: {exc}") from exc
    return fold_lines(decode_text(data, path, warn=warn))


def decode_text(data: bytes, path: Path, *, warn: Warn = _log_warning) -> str:
    """Bytes of a caption file -> text, trying UTF-8, UTF-16, cp1252, latin-1 in turn."""
    if data.startswith(codecs.BOM_UTF8):
        try:
            return data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise DataError(f"Caption file {str(path)!r} starts with a UTF-8 BOM but is not valid UTF-8: {exc}") from exc
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as exc:
            raise DataError(f"Caption file {str(path)!r} starts with a UTF-16 BOM but is not valid UTF-16: {exc}") from exc
    if b"\x00" in data and len(data) % 2 == 0:
        # No BOM but NUL bytes: almost certainly UTF-16 (ASCII text has a zero in every other byte).
        encoding = "utf-16-le" if data[1::2].count(0) >= data[0::2].count(0) else "utf-16-be"
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError:
            pass
        else:
            warn(f"Caption file {str(path)!r} has no byte-order mark; read it as {encoding.upper()}.")
            return text
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    for encoding in ("cp1252", "latin-1"):
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError:
            continue
        warn(f"Caption file {str(path)!r} is not UTF-8; read it as {encoding}. Save it as UTF-8 to be sure.")
        return text
    raise AssertionError("latin-1 decodes any bytes")  # pragma: no cover


def fold_lines(text: str) -> str:
    """Join the non-empty lines with ", " (each trimmed of spaces and trailing commas)."""
    text = text.replace("\x00", "")
    lines = (line.strip().rstrip(",").strip() for line in text.splitlines())
    return ", ".join(line for line in lines if line)


def split_tags(caption: str) -> list[str]:
    """Comma-separated tags of a caption, stripped, empties dropped."""
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def tag_frequency(captions: Iterable[str]) -> dict[str, int]:
    """How often each tag occurs over all captions (for ``ss_tag_frequency``)."""
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update(split_tags(caption))
    return dict(counts)
