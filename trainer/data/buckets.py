"""Aspect-ratio buckets: the sizes images are cropped to, and how an image is fitted.

Bucket sizes are tuples ``(width, height)``. ``make_buckets`` reproduces the original
arithmetic exactly (spec §7.2):

* ``[a, b] = sorted(image_size)``, max area ``P = a * b``.
* Max buckets: ``(a, a)``, plus for ``w = m, m+s, ... <= b`` the tallest
  ``h = min(b, P//w - (P//w) % s)`` when ``1/ρ <= w/h <= ρ``, with its transpose.
* Sub buckets: every ``(w, h)`` on the grid ``{m, m+s, ... <= b}²`` with ``w*h <= P``
  and ratio within bounds that is not a max bucket, with its transpose.
* Both lists sorted by ``w/h``.

Choices where the original is undefined or broken:

* Equal ratios (e.g. ``(384,384)`` and ``(256,256)``) are ordered larger area first.
  The original used a set plus an unstable ``argsort``, whose tie order depends on
  hashing and on the numpy build; larger-first matches every worked example in §7.2.
  Order matters only for ties in ``nearest_bucket``, which takes the first.
* ``step == 0`` means "no aspect-ratio buckets": the single size ``image_size``, offered
  in both orientations (one bucket when square), and no sub buckets. (The original
  raised ZeroDivisionError.) A negative step, a side < 1, ``min_length < 1`` or
  ``max_ratio < 1`` raise DataError.
* A computed height of 0 (step larger than the short side) is skipped instead of
  dividing by zero.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from .errors import DataError

Bucket = tuple[int, int]
"""(width, height) in pixels."""

_RESAMPLING = getattr(Image, "Resampling", Image)  # Pillow >= 9.1 has the enum; older has constants


def make_buckets(
    image_size: tuple[int, int] | Sequence[int],
    step: int,
    min_length: int,
    max_ratio: float,
) -> tuple[list[Bucket], list[Bucket]]:
    """(max_buckets, sub_buckets), each sorted by aspect ratio w/h (see module docstring)."""
    a, b = _validated(image_size, step, min_length, max_ratio)
    if step == 0:
        return _sorted_by_ratio({(a, b), (b, a)}), []
    max_pixels = a * b

    max_buckets: set[Bucket] = {(a, a)}
    width = min_length
    while width <= b:
        largest = max_pixels // width
        height = min(b, largest - largest % step)
        if height > 0 and 1 / max_ratio <= width / height <= max_ratio:
            max_buckets.add((width, height))
            max_buckets.add((height, width))
        width += step

    sub_buckets: set[Bucket] = set()
    sides = range(min_length, b + 1, step)
    for width in sides:
        for height in sides:
            if width * height <= max_pixels and 1 / max_ratio <= width / height <= max_ratio:
                if (width, height) not in max_buckets:
                    sub_buckets.add((width, height))
                if (height, width) not in max_buckets:
                    sub_buckets.add((height, width))

    return _sorted_by_ratio(max_buckets), _sorted_by_ratio(sub_buckets)


def _validated(
    image_size: tuple[int, int] | Sequence[int], step: int, min_length: int, max_ratio: float
) -> tuple[int, int]:
    sides = list(image_size)
    if len(sides) == 1:
        sides = sides * 2
    if len(sides) != 2 or any(int(side) != side or side < 1 for side in sides):
        raise DataError(f"image_size must be one or two positive whole numbers, got {tuple(image_size)!r}.")
    if int(step) != step or step < 0:
        raise DataError(f"image_buckets_step must be a whole number >= 0, got {step!r}.")
    if int(min_length) != min_length or min_length < 1:
        raise DataError(f"image_min_length must be a whole number >= 1, got {min_length!r}.")
    if not max_ratio >= 1:  # also rejects NaN
        raise DataError(f"image_max_ratio must be >= 1 (it bounds both w/h and h/w), got {max_ratio!r}.")
    a, b = sorted(int(side) for side in sides)
    return a, b


def _sorted_by_ratio(buckets: set[Bucket]) -> list[Bucket]:
    return sorted(buckets, key=lambda size: (size[0] / size[1], -size[0] * size[1]))


def bucket_errors(size: tuple[int, int], buckets: Sequence[Bucket]) -> list[float]:
    """Signed aspect errors ``bucket_w/bucket_h - W/H`` of an image of ``size`` = (W, H)."""
    ratio = size[0] / size[1]
    return [w / h - ratio for w, h in buckets]


def nearest_bucket(size: tuple[int, int], buckets: Sequence[Bucket]) -> tuple[Bucket, float]:
    """The bucket whose ratio is closest to the image's (first on ties) and its signed error."""
    if not buckets:
        raise DataError("There are no buckets to place images in; check image_size and image_min_length.")
    errors = bucket_errors(size, buckets)
    index = min(range(len(errors)), key=lambda i: abs(errors[i]))
    return buckets[index], errors[index]


def pick_sub_buckets(size: tuple[int, int], buckets: Sequence[Bucket], count: int) -> list[tuple[Bucket, float]]:
    """``count`` sub buckets for an image, as the original: take the smallest |error|,
    then add +1 to that bucket's error so the next pick prefers another one.

    The returned error is the bucket's true error (the original cropped with the
    penalised one, which can pad instead of crop when a bucket is picked twice).
    """
    if not buckets or count <= 0:
        return []
    true_errors = bucket_errors(size, buckets)
    ranked = list(true_errors)
    picks: list[tuple[Bucket, float]] = []
    for _ in range(count):
        index = min(range(len(ranked)), key=lambda i: abs(ranked[i]))
        picks.append((buckets[index], true_errors[index]))
        ranked[index] += 1
    return picks


def crop_box(
    size: tuple[int, int], bucket: Bucket, error: float, disable_upscale: bool = False
) -> tuple[int, int, int, int] | None:
    """The (left, top, right, bottom) box of an image of ``size`` that :func:`resize_and_crop`
    scales to ``bucket``; None when ``disable_upscale`` refuses it."""
    bucket_w, bucket_h = bucket
    width, height = size
    if error <= 0:
        if disable_upscale and height < bucket_h:
            return None
        crop_w = min(width, max(1, round(height * bucket_w / bucket_h)))
        left = (width - crop_w) // 2
        return (left, 0, left + crop_w, height)
    if disable_upscale and width < bucket_w:
        return None
    crop_h = min(height, max(1, round(width * bucket_h / bucket_w)))
    top = (height - crop_h) // 2
    return (0, top, width, top + crop_h)


def crop_offset(size: tuple[int, int], bucket: Bucket, box: tuple[int, int, int, int]) -> tuple[int, int]:
    """(left, top) of the crop in the resized image, in bucket pixels: where SDXL's
    ``crop_coords_top_left`` conditioning says the training crop starts."""
    left, top, right, bottom = box
    scale_x = bucket[0] / max(1, right - left)
    scale_y = bucket[1] / max(1, bottom - top)
    return int(round(left * scale_x)), int(round(top * scale_y))


def resize_and_crop(
    image: Image.Image, bucket: Bucket, error: float, disable_upscale: bool
) -> Image.Image | None:
    """Scale ``image`` (LANCZOS) so it covers ``bucket`` and centre-crop it to exactly that size.

    ``error <= 0`` (image relatively wider than the bucket): the height is matched and
    the width centre-cropped; otherwise the width is matched and the height cropped.
    Returns None when ``disable_upscale`` is set and the matched side is smaller than
    the bucket's. The crop box is computed in source pixels (integers) and resized in
    one step, so an extreme aspect ratio never builds a huge intermediate image.
    """
    bucket_w, bucket_h = bucket
    width, height = image.size
    box = crop_box(image.size, bucket, error, disable_upscale)
    if box is None:
        return None
    if box == (0, 0, width, height) and image.size == (bucket_w, bucket_h):
        return image.copy()
    return image.resize((bucket_w, bucket_h), _RESAMPLING.LANCZOS, box=box)
