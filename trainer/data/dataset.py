"""From a folder of images to bucketed training samples, and batches that never mix buckets.

``build_samples`` follows the original (spec §7.3): each image goes into its nearest
max bucket; ``sub_image_num`` extra crops go into sub buckets (smallest |error| first,
then that bucket is penalised by +1); ``mirroring`` adds a horizontally flipped copy of
every crop; ``num_multiply`` repeats the list. Unreadable files are skipped with a
warning naming them; the run stops only when no image at all is usable.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .buckets import Bucket, crop_box, crop_offset, make_buckets, nearest_bucket, pick_sub_buckets, resize_and_crop
from .captions import caption_for
from .errors import DataError
from .images import LoadedImage, find_images, load_image

Warn = Callable[[str], None]

ALPHA_THRESHOLD = 0.1
"""A pixel belongs to the subject (mask 1) when its alpha is above this fraction."""

_TRANSPOSE = getattr(Image, "Transpose", Image)  # Pillow >= 9.1 has the enum
_log = logging.getLogger(__name__)


def _log_warning(message: str) -> None:
    _log.warning(message)


@dataclass(frozen=True)
class Sample:
    """One training image, cropped to its bucket."""

    pixels: torch.Tensor  # [3,H,W] float32 in [-1,1]
    mask: torch.Tensor | None  # [1,H,W] float32 in {0,1} from alpha > 0.1; None for opaque images
    caption: str
    source: Path
    bucket: tuple[int, int]  # (w,h)
    mirrored: bool
    original_size: tuple[int, int] | None = None  # (w,h) of the source image; None = the bucket
    crop_xy: tuple[int, int] = (0, 0)  # (left, top) of the crop in the resized image, bucket pixels

    def size_cond_hw(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """SDXL micro-conditioning in pixels: ((orig_h, orig_w), (crop_top, crop_left), (target_h, target_w))."""
        w, h = self.original_size or self.bucket
        return (h, w), (self.crop_xy[1], self.crop_xy[0]), (self.bucket[1], self.bucket[0])


@dataclass(frozen=True)
class BucketPlan:
    """The buckets a dataset's images go to, with its validated counts: one place for what training, the
    pair modes and the tab's Check data all decide the same way."""

    max_buckets: list
    sub_buckets: list
    sub_image_num: int

    @classmethod
    def make(cls, image_size, buckets_step: int, min_length: int, max_ratio: float, num_multiply: int = 1,
             sub_image_num: int = 0) -> "BucketPlan":
        if int(num_multiply) != num_multiply or num_multiply < 1:
            raise DataError(f"image_num_multiply must be a whole number >= 1, got {num_multiply!r}.")
        if int(sub_image_num) != sub_image_num or sub_image_num < 0:
            raise DataError(f"sub_image_num must be a whole number >= 0, got {sub_image_num!r}.")
        max_buckets, sub_buckets = make_buckets(image_size, buckets_step, min_length, max_ratio)
        return cls(max_buckets, sub_buckets, int(sub_image_num))

    @property
    def largest_side(self) -> int:
        """Images are decoded no larger than this (a bigger one is shrunk on load)."""
        return max(max(bucket) for bucket in self.max_buckets)

    def placements(self, size: tuple[int, int]) -> list:
        """(bucket, error) for an image of ``size``: its nearest full bucket, then its sub buckets."""
        return [nearest_bucket(size, self.max_buckets)] + pick_sub_buckets(size, self.sub_buckets, self.sub_image_num)


def build_samples(
    directory: Path | str,
    *,
    image_size: tuple[int, int] | Sequence[int],
    buckets_step: int,
    min_length: int,
    max_ratio: float,
    num_multiply: int = 1,
    sub_image_num: int = 0,
    mirroring: bool = False,
    disable_upscale: bool = False,
    trigger: str = "",
    use_filename_as_tag: bool = False,
    warn: Warn = _log_warning,
    check_stop: Callable[[], None] | None = None,
) -> list[Sample]:
    """All training samples of ``directory`` (see module docstring). ``check_stop`` is called before
    each image (reading thousands takes minutes): it raises to end the reading when Stop was pressed."""
    plan = BucketPlan.make(image_size, buckets_step, min_length, max_ratio, num_multiply, sub_image_num)
    if sub_image_num > 0 and not plan.sub_buckets:
        warn(
            f"sub_image_num is {sub_image_num} but there are no sub buckets "
            f"(image_size={tuple(image_size)}, image_buckets_step={buckets_step}, "
            f"image_min_length={min_length}): no sub images are made. "
            "Lower image_min_length or image_buckets_step to get some."
        )
    paths = find_images(directory)
    samples: list[Sample] = []
    unreadable = too_small = 0
    for path in paths:
        if check_stop is not None:
            check_stop()
        try:
            image = load_image(path, max_side=plan.largest_side)
            caption = caption_for(path, trigger, use_filename_as_tag, warn=warn)
        except DataError as exc:
            warn(f"Skipped: {exc}")
            unreadable += 1
            continue
        made = 0
        for bucket, error in plan.placements(image.size):
            crops = _crop(image, bucket, error, disable_upscale, caption)
            chosen = crops if mirroring else crops[:1]
            samples.extend(chosen)
            made += len(chosen)
        if made == 0:
            too_small += 1
            warn(f"Skipped: image {str(path)!r} ({image.size[0]}x{image.size[1]}) is smaller than its bucket and image_disable_upscale is on.")

    if not samples:
        raise DataError(
            f"No usable image in {str(directory)!r}: {len(paths)} found, {unreadable} unreadable, "
            f"{too_small} smaller than their bucket with image_disable_upscale on."
        )
    return samples * int(num_multiply)


def _crop(image: LoadedImage, bucket: Bucket, error: float, disable_upscale: bool, caption: str) -> list[Sample]:
    """The sample for one bucket and its mirrored twin; [] when upscaling is refused."""
    rgb = resize_and_crop(image.rgb, bucket, error, disable_upscale)
    if rgb is None:
        return []
    alpha = resize_and_crop(image.alpha, bucket, error, False) if image.alpha is not None else None
    pixels = pixels_from_image(rgb)
    mask = mask_from_alpha(alpha) if alpha is not None else None
    # where the crop sits in the resized image (SDXL conditioning); the mirrored twin's crop
    # starts at the same distance from the other edge
    box = crop_box(image.size, bucket, error, disable_upscale) or (0, 0) + image.size
    left, top = crop_offset(image.size, bucket, box)
    resized_w = round(image.size[0] * bucket[0] / max(1, box[2] - box[0]))
    original = image.original_size or image.size
    plain = Sample(pixels=pixels, mask=mask, caption=caption, source=image.path, bucket=bucket, mirrored=False,
                   original_size=original, crop_xy=(left, top))
    mirrored = Sample(
        pixels=torch.flip(pixels, dims=[2]),
        mask=torch.flip(mask, dims=[2]) if mask is not None else None,
        caption=caption,
        source=image.path,
        bucket=bucket,
        mirrored=True,
        original_size=original,
        crop_xy=(max(0, resized_w - bucket[0] - left), top),
    )
    return [plain, mirrored]


def pixels_from_image(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> [3,H,W] float32 in [-1,1]."""
    array = np.array(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(127.5).sub_(1.0).contiguous()


def mask_from_alpha(alpha: Image.Image) -> torch.Tensor | None:
    """Alpha ``L`` image -> [1,H,W] float32 mask (1 where alpha > 0.1), None if all ones."""
    array = np.array(alpha, dtype=np.uint8)
    mask = torch.from_numpy(array > ALPHA_THRESHOLD * 255).float().unsqueeze(0)
    return None if bool(mask.all()) else mask


class BucketBatcher:
    """Endless, seeded batches of indices that never mix buckets.

    One epoch: each bucket's indices are shuffled (repeated first when the bucket
    has fewer items than ``batch_size``, as the original multiplied its list) and cut
    into batches (the last one may be smaller); then, like the original
    ContinualRandomDataLoader, each next batch comes from a randomly chosen bucket
    that still has batches. After the last batch of an epoch, ``epoch`` goes up by 1
    and a new epoch starts. The whole sequence is a function of ``seed``.

    A batch larger than the whole data set is cut to the number of samples (``warn`` says so): every
    batch of it would be the data repeated, and repeating 4 images to a batch of 100000 makes steps
    that never finish.
    """

    def __init__(self, keys: Sequence[Hashable], batch_size: int, seed: int = 0, warn: Warn = _log_warning) -> None:
        if int(batch_size) != batch_size or batch_size < 1:
            raise DataError(f"train_batch_size must be a whole number >= 1, got {batch_size!r}.")
        if len(keys) == 0:
            raise DataError("There are no training samples to batch.")
        if batch_size > len(keys):
            warn(f"train_batch_size={batch_size} is larger than the {len(keys)} training samples (images, "
                 f"with repeats and mirrored copies): training with batches of {len(keys)}.")
            batch_size = len(keys)
        self.batch_size = int(batch_size)
        self._groups: list[list[int]] = list(_group_by_key(keys).values())
        self._generator = torch.Generator().manual_seed(int(seed))
        self._pending: list[list[list[int]]] = []
        self.epoch = 0
        """Number of completed passes over the data."""

    @property
    def batches_per_epoch(self) -> int:
        return sum(-(-self._filled_len(group) // self.batch_size) for group in self._groups)

    def _filled_len(self, group: list[int]) -> int:
        return len(group) * self.batch_size if len(group) < self.batch_size else len(group)

    def __iter__(self) -> Iterator[list[int]]:
        return self

    def __next__(self) -> list[int]:
        if not self._pending:
            self._pending = [queue for queue in (self._epoch_batches(group) for group in self._groups) if queue]
        choice = int(torch.randint(len(self._pending), (1,), generator=self._generator))
        queue = self._pending[choice]
        batch = queue.pop(0)
        if not queue:
            self._pending.pop(choice)
            if not self._pending:
                self.epoch += 1
        return batch

    def _epoch_batches(self, group: list[int]) -> list[list[int]]:
        items = group * self.batch_size if len(group) < self.batch_size else group
        order = torch.randperm(len(items), generator=self._generator).tolist()
        shuffled = [items[i] for i in order]
        return [shuffled[i : i + self.batch_size] for i in range(0, len(shuffled), self.batch_size)]


def _group_by_key(keys: Sequence[Hashable]) -> dict[Hashable, list[int]]:
    groups: dict[Hashable, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    return groups
