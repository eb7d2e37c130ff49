"""Dataset preparation (the Image tab, the original's augmentation helper, spec §8.6): from a folder or one
image file, ``copies`` new images each, randomly rotated (within ±``max_angle`` degrees, the canvas grown to
hold the whole picture) and/or downscaled by U(``min_scale``, 1) onto a transparent canvas of the size
before downscaling, at a random place or against one side (``fix_side``).

Choices where the original fell short:

* Any format training reads is accepted (the original: PNG/JPEG, and transparency was inconsistent);
  every output is a PNG with alpha, because rotation and downscaling make transparent areas, which
  training then masks out of the loss. Names are ``<stem>_id_<n>.png`` (``image_use_filename_as_tag``
  cuts the tag at ``_id_``), without the original's double dot.
* Nothing is overwritten: ``n`` skips names that exist; writes are atomic. The output folder may not be the
  input folder (new images would mix with the originals and be augmented again on the next run); an
  output folder inside the input folder is left out when the input folder is read.
* A caption file (``.txt`` / ``.caption``) next to an image is copied next to each of its copies.
* An image training would refuse (unreadable, too small, fully transparent) is skipped with the reason,
  and the run goes on.
"""
from __future__ import annotations

import random
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..atomic import atomic_write
from .captions import caption_file_for
from .errors import DataError
from .images import _apply_exif_orientation, find_images, is_image_file, load_image

FIX_SIDES = ("none", "right", "left", "top", "bottom")
"""Where a downscaled picture sits on its canvas: anywhere (none) or against one edge."""
MAX_COPIES = 1000
_RESAMPLING = getattr(Image, "Resampling", Image)  # Pillow >= 9.1 has the enum


@dataclass(frozen=True)
class PrepareOptions:
    """The original's Image-tab options (defaults as there)."""

    copies: int = 5
    rotate: bool = True
    max_angle: float = 180.0
    downscale: bool = True
    min_scale: float = 0.4
    fix_side: str = "none"
    seed: int | None = None
    """None: a different result each run."""

    def checked(self) -> "PrepareOptions":
        """Self, or a DataError naming the option and its value."""
        if isinstance(self.copies, bool) or int(self.copies) != self.copies or not 1 <= self.copies <= MAX_COPIES:
            raise DataError(f"Number of images per input: {self.copies!r} (allowed: a whole number from 1 to "
                            f"{MAX_COPIES}).")
        if not 0 <= float(self.max_angle) <= 180:
            raise DataError(f"Max tilting angle: {self.max_angle!r} (allowed: 0 to 180 degrees).")
        if not 0 < float(self.min_scale) <= 1:
            raise DataError(f"Min scale: {self.min_scale!r} (allowed: more than 0, at most 1).")
        if self.fix_side not in FIX_SIDES:
            raise DataError(f"Fix side: {self.fix_side!r} (allowed: {', '.join(FIX_SIDES)}).")
        if not ((self.rotate and float(self.max_angle) > 0) or self.downscale):
            raise DataError("Nothing to do: tick random rotation (with a max tilting angle above 0), downscale "
                            "or both.")
        return self


@dataclass
class PrepareResult:
    output_dir: Path
    inputs: int = 0
    written: list[Path] = field(default_factory=list)
    captions: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def summary(self, limit: int = 20) -> str:
        processed = self.inputs - len(self.skipped)
        lines = [f"Images saved in {self.output_dir}: {len(self.written)} new images from {processed} of "
                 f"{self.inputs} inputs, {len(self.captions)} caption files copied, {len(self.skipped)} skipped."]
        lines += [f"  skipped {p}: {why}" for p, why in self.skipped[:limit]]
        if len(self.skipped) > limit:
            lines.append(f"  ... and {len(self.skipped) - limit} more")
        return "\n".join(lines)


Progress = Callable[[int, int, Path], None]


def prepare_images(source: Path | str, output_dir: Path | str, options: PrepareOptions = PrepareOptions(), *,
                   progress: Progress | None = None) -> PrepareResult:
    """Augment ``source`` (a folder, read recursively, or one image file) into ``output_dir``."""
    result = None
    for done, total, path, result in iter_prepare(source, output_dir, options):
        if progress is not None:
            progress(done, total, path)
    assert result is not None
    return result


def iter_prepare(source: Path | str, output_dir: Path | str, options: PrepareOptions = PrepareOptions()
                 ) -> Iterator[tuple[int, int, Path, PrepareResult]]:
    """As :func:`prepare_images`, yielding (inputs done, inputs, last input, result so far) after each input
    (the tab shows progress with it and can stop between inputs)."""
    options = options.checked()
    src, out = _checked_paths(source, output_dir)
    if src.is_dir():
        inside = out.resolve()
        paths = [p for p in find_images(src) if inside not in p.resolve().parents]
        if not paths:
            raise DataError(f"Input folder {str(src)!r} has no images outside the output folder.")
        relative = [p.parent.relative_to(src) for p in paths]
    else:
        paths, relative = [src], [Path()]
    rng = random.Random(options.seed)
    result = PrepareResult(output_dir=out, inputs=len(paths))
    for done, (path, rel) in enumerate(zip(paths, relative), 1):
        try:
            picture = _rgba(path)
        except DataError as exc:
            result.skipped.append((path, str(exc)))
        else:
            caption = caption_file_for(path)
            for _ in range(options.copies):
                image = _augment(picture, options, rng)
                written, copied = _save_new(image, out / rel, path.stem, caption)
                result.written.append(written)
                if copied is not None:
                    result.captions.append(copied)
        yield done, len(paths), path, result


def _checked_paths(source: Path | str, output_dir: Path | str) -> tuple[Path, Path]:
    if not str(source or "").strip():
        raise DataError("Input: empty (choose a folder of images or one image file).")
    if not str(output_dir or "").strip():
        raise DataError("Output folder: empty (choose a folder for the new images; the inputs are never changed).")
    src, out = Path(str(source).strip()).expanduser(), Path(str(output_dir).strip()).expanduser()
    if not src.exists():
        raise DataError(f"Input {str(src)!r} does not exist.")
    if src.is_file() and not is_image_file(src):
        raise DataError(f"Input {str(src)!r} is not an image file (or choose a folder).")
    if out.exists() and not out.is_dir():
        raise DataError(f"Output folder {str(out)!r} is a file, not a folder.")
    if src.is_dir() and out.resolve() == src.resolve():
        raise DataError(f"Output folder {str(out)!r} is the input folder: choose another one (for example "
                        f"{str(src / 'modified')!r}), so the new images do not mix with the originals.")
    return src, out


def _rgba(path: Path) -> Image.Image:
    """The image as training would read it (same refusals), with its transparency, as RGBA."""
    loaded = load_image(path)
    if loaded.alpha is None:
        return loaded.rgb.convert("RGBA")
    # load_image put the colours on white for training; a copy keeps the file's own colours under its alpha
    # (training puts them on white again, once). Alpha-carrying modes are all 8-bit, so a plain convert does.
    try:
        with Image.open(path) as opened:
            image = _apply_exif_orientation(opened).convert("RGBA")
    except (OSError, ValueError) as exc:
        raise DataError(f"Image {str(path)!r} cannot be decoded: {exc}") from exc
    return image if image.size == loaded.size else loaded.rgb.convert("RGBA")


def _augment(image: Image.Image, options: PrepareOptions, rng: random.Random) -> Image.Image:
    if options.rotate and options.max_angle > 0:
        angle = rng.uniform(-float(options.max_angle), float(options.max_angle))
        image = image.rotate(angle, resample=_RESAMPLING.BICUBIC, expand=True, fillcolor=(0, 0, 0, 0))
    if options.downscale:
        width, height = image.size
        scale = rng.uniform(float(options.min_scale), 1.0)
        small = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), _RESAMPLING.LANCZOS)
        free_x, free_y = width - small.width, height - small.height
        x = {"right": free_x, "left": 0}.get(options.fix_side, rng.randint(0, free_x))
        y = {"bottom": free_y, "top": 0}.get(options.fix_side, rng.randint(0, free_y))
        canvas = Image.new("RGBA", (width, height), (0, 0, 0, 0))
        canvas.paste(small, (x, y))
        image = canvas
    return image


def _save_new(image: Image.Image, folder: Path, stem: str, caption: Path | None) -> tuple[Path, Path | None]:
    """Write ``<stem>_id_<n>.png`` (and its caption) under the first ``n`` where neither exists."""
    n = 0
    while True:
        target = folder / f"{stem}_id_{n}.png"
        text = target.with_suffix(caption.suffix) if caption is not None else None
        n += 1
        if target.exists() or (text is not None and text.exists()):
            continue
        try:
            atomic_write(target, lambda tmp: image.save(tmp, format="PNG"), overwrite=False)
        except FileExistsError:  # appeared meanwhile: the next name
            continue
        if text is not None:
            try:
                atomic_write(text, lambda tmp: shutil.copyfile(caption, tmp), overwrite=False)
            except FileExistsError:
                text = None  # a caption of that name appeared meanwhile: kept, ours not written
        return target, text
