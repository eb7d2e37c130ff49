"""Finding image files and decoding them into plain RGB (+ optional alpha).

Every supported Pillow mode ends up as an ``RGB`` image plus, when the file has
real transparency, an ``L`` alpha image. Anything unreadable raises
:class:`DataError` naming the file.

Large images: Pillow's process-wide decompression-bomb limit
(``Image.MAX_IMAGE_PIXELS``, ~89 Mpx warning / ~179 Mpx error by default) is *not*
changed here, because it is shared with the host (the Web-UI); nor are the warning
filters (process-wide too, and not thread-safe to swap). Images between the warning
and the error threshold load, with Pillow's one-line DecompressionBombWarning; images
above the error threshold raise a clear :class:`DataError` that tells the user to
downscale them. To keep memory bounded, ``load_image``
takes ``max_side``: JPEGs are then decoded at a reduced scale (``draft``) and other
formats are box-reduced (``reduce``) right after decoding, never below ``max_side``
on the shorter side, so the later LANCZOS resize and the ``disable_upscale`` check
see the same situation as with the full-size image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import DataError

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {"jpg", "jpeg", "png", "gif", "tif", "tiff", "bmp", "webp", "pcx", "ico"}
)
"""Accepted file-name extensions, compared case-insensitively (``.JPG`` is an image)."""

MIN_SIDE = 8
"""Smaller images are refused: the VAE turns 8x8 pixels into one latent pixel, so a 1x1 image is only
an upscaled colour."""

# Modes that carry an alpha channel (premultiplied ones included).
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


@dataclass(frozen=True)
class LoadedImage:
    """A decoded image: ``rgb`` is mode ``RGB``; ``alpha`` is mode ``L`` or None when opaque."""

    rgb: Image.Image
    alpha: Image.Image | None
    path: Path
    original_size: tuple[int, int] | None = None
    """(width, height) of the file's image (after EXIF orientation) before any early reduction;
    None means ``size`` (SDXL's size conditioning reads it)."""

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return self.rgb.size


def is_image_file(path: Path) -> bool:
    """True when the file name ends with one of IMAGE_EXTENSIONS (any case)."""
    return path.suffix[1:].lower() in IMAGE_EXTENSIONS


def find_images(root: Path | str) -> list[Path]:
    """All image files under ``root`` (recursive), sorted; hidden files and folders skipped."""
    folder = Path(root)
    if str(root).strip() == "":
        raise DataError("The image folder setting is empty: choose a folder of training images.")
    if not folder.exists():
        raise DataError(f"Image folder {str(folder)!r} does not exist.")
    if not folder.is_dir():
        raise DataError(f"Image folder {str(folder)!r} is not a folder.")
    found: list[Path] = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if is_image_file(path) and path.is_file():
            found.append(path)
    if not found:
        extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise DataError(f"Image folder {str(folder)!r} contains no images (looked for: {extensions}).")
    return sorted(found)


def load_image(path: Path | str, *, max_side: int | None = None, min_side: int = MIN_SIDE) -> LoadedImage:
    """Decode one image file into RGB (+ alpha), with EXIF orientation applied.

    An image with a side under ``min_side`` pixels, or with no visible pixel (alpha 0 everywhere),
    is a DataError naming the file: either would train on nothing but an upscaled colour.

    ``max_side``: if given, an image whose shorter side is much larger than it is
    reduced early (see the module docstring); its shorter side stays >= ``max_side``.
    """
    path = Path(path)
    try:
        size_on_disk = path.stat().st_size
    except OSError as exc:
        raise DataError(f"Cannot read image {str(path)!r}: {exc}") from exc
    if size_on_disk == 0:
        raise DataError(f"Image {str(path)!r} is empty (0 bytes).")
    try:
        with Image.open(path) as opened:
            full_size = opened.size
            if max_side is not None:
                _draft(opened, max_side)
            opened.load()
            decoded_size = opened.size
            image = _apply_exif_orientation(opened)
            if image.size != decoded_size and image.size == decoded_size[::-1]:
                full_size = full_size[::-1]  # EXIF rotated the picture by 90 degrees
            if max_side is not None:
                image = _reduce(image, max_side)
            rgb, alpha = _to_rgb_and_alpha(image)
    except DataError:
        raise
    except Image.DecompressionBombError as exc:
        raise DataError(
            f"Image {str(path)!r} is too large for Pillow's safety limit ({exc}). "
            "Downscale it (for example below 10000 x 10000 pixels)."
        ) from exc
    except UnidentifiedImageError as exc:
        raise DataError(f"Image {str(path)!r} is not a readable image file (unknown or damaged format).") from exc
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as exc:
        raise DataError(f"Image {str(path)!r} cannot be decoded (corrupt or truncated?): {exc}") from exc
    if min(full_size) < min_side:
        raise DataError(f"Image {str(path)!r} is {full_size[0]}x{full_size[1]} pixels: too small to train on "
                        f"(a side under {min_side} px is less than one latent pixel).")
    if alpha is not None and alpha.getextrema()[1] == 0:
        raise DataError(f"Image {str(path)!r} is fully transparent (alpha 0 everywhere): there is nothing to "
                        f"train on.")
    return LoadedImage(rgb=rgb, alpha=alpha, path=path, original_size=(int(full_size[0]), int(full_size[1])))


def _draft(image: Image.Image, max_side: int) -> None:
    """Ask the JPEG decoder for a power-of-two reduced decode; no-op for other formats."""
    width, height = image.size
    shorter = min(width, height)
    if image.format != "JPEG" or shorter <= 2 * max_side:
        return
    requested = (-(-width * max_side // shorter), -(-height * max_side // shorter))
    image.draft(image.mode, requested)


def _reduce(image: Image.Image, max_side: int) -> Image.Image:
    """Box-reduce by an integer factor that keeps the shorter side >= 2 * max_side."""
    factor = min(image.size) // (2 * max_side) if max_side > 0 else 0
    if factor < 2 or image.mode not in ("RGB", "RGBA", "L", "LA", "CMYK"):
        return image
    return image.reduce(factor)


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    """Rotate/flip according to the EXIF Orientation tag; a broken EXIF block is ignored."""
    try:
        transposed = ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - malformed EXIF must not drop an otherwise fine image
        return image
    return transposed if transposed is not None else image


def _to_rgb_and_alpha(image: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """Normalise any Pillow mode to (RGB, alpha-or-None)."""
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        image = _high_bit_depth_to_l(image)
        mode = image.mode
    if mode == "1":
        image = image.convert("L")
        mode = "L"
    has_transparency_key = "transparency" in image.info and mode in ("P", "L", "RGB")
    if mode in _ALPHA_MODES or has_transparency_key:
        rgba = image.convert("RGBA")
        alpha = rgba.getchannel("A")
        low, _high = alpha.getextrema()
        if low == 255:
            return rgba.convert("RGB"), None
        # Composite onto white: the colour stored under transparent pixels is arbitrary
        # (usually black), and feeding it to the VAE gives dark fringes around the subject.
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), alpha
    if mode == "RGB":
        return image, None
    return image.convert("RGB"), None


def _high_bit_depth_to_l(image: Image.Image) -> Image.Image:
    """16/32-bit integer or float grayscale -> 8-bit ``L``, scaling 0..65535 to 0..255."""
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if values.size and float(np.nanmax(values)) <= 1.0:
            values = values * 255.0
        return Image.fromarray(np.clip(np.nan_to_num(values), 0, 255).round().astype(np.uint8))
    values = np.asarray(image).astype(np.int64)
    # 16-bit sources (PNG, TIFF) open as "I;16*" or as "I" holding 0..65535.
    scaled = np.clip(values, 0, 65535) / 257.0
    return Image.fromarray(scaled.round().astype(np.uint8))
