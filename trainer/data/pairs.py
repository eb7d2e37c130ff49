"""Image pairs: the original/target images of Difference and ADDifT, and the pair folders of Multi-ADDifT.

Single pair (Difference, ADDifT): both files must exist, decode, and have the same size, or a
DataError names both files and their sizes before any work is done. A side that is not a multiple
of 8 pixels is centre-cropped to one (the same crop for both images, so they stay aligned), with a
warning; a side below 64 pixels is refused.

Folder of pairs (Multi-ADDifT): ``X.ext`` pairs with ``X<diff_target_name>.ext`` in the same folder
(the same extension is preferred; any image extension is accepted). Both images are resized (LANCZOS)
to the elementwise minimum of their sizes, then treated like LoRA mode's images (spec §7.3): the
nearest max bucket, ``sub_image_num`` sub buckets, mirroring, ``num_multiply``; original and target
always get the same bucket, crop and flip. The caption (trigger word + caption file, as in LoRA mode)
is the original's; when only the target has a caption file, that one is used. Every image that is
in no pair is named in a warning; a folder without any pair raises a DataError.

``difference_mask`` is the real difference mask the original computed and threw away (spec §7.6).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from .captions import caption_file_for, caption_for
from .dataset import BucketPlan, Sample, _crop, mask_from_alpha, pixels_from_image
from .errors import DataError
from .images import LoadedImage, find_images, load_image

Warn = Callable[[str], None]
_log = logging.getLogger(__name__)
_RESAMPLING = getattr(Image, "Resampling", Image)

MIN_SIDE = 64
"""Smallest side (pixels) of a Difference / ADDifT image."""
SIDE_MULTIPLE = 8
"""Image sides are cropped to a multiple of this (one latent pixel is 8x8 image pixels)."""

DIFF_THRESHOLD = 10 / 127.5
"""A pixel differs when |original - target| summed over R, G, B exceeds 10 (of 255), as the original."""
DIFF_CELL_FRACTION = 1 / 16
"""A latent cell (8x8 pixels) differs when at least this fraction of its pixels differ
(isolated compression noise does not mark a cell)."""
DIFF_DILATE = 1
"""The cell mask is grown by this many latent pixels (8 image pixels) in every direction."""


def _log_warning(message: str) -> None:
    _log.warning(message)


# --- one pair ---------------------------------------------------------------------------------------

def _load_setting_image(path: str | Path, setting: str) -> LoadedImage:
    if str(path).strip() == "":
        raise DataError(f"{setting} is empty: choose the {setting.replace('_', ' ')} file.")
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{setting}: {str(p)!r} does not exist." if not p.exists()
                        else f"{setting}: {str(p)!r} is not a file.")
    return load_image(p)


def load_image_pair(original: str | Path, target: str | Path) -> tuple[LoadedImage, LoadedImage]:
    """Both images of a pair, decoded; DataError (naming the setting, file and sizes) otherwise."""
    orig = _load_setting_image(original, "original_image")
    targ = _load_setting_image(target, "target_image")
    if orig.size != targ.size:
        raise DataError(
            f"original_image and target_image must have the same size: {str(orig.path)!r} is "
            f"{orig.size[0]}x{orig.size[1]}, {str(targ.path)!r} is {targ.size[0]}x{targ.size[1]}. "
            "Resize or crop one of them.")
    w, h = orig.size
    if w < MIN_SIDE or h < MIN_SIDE:
        raise DataError(f"original_image {str(orig.path)!r} is {w}x{h}; both sides must be at least "
                        f"{MIN_SIDE} pixels.")
    return orig, targ


@dataclass(frozen=True)
class PixelPair:
    original: torch.Tensor  # [3,H,W] in [-1,1]
    target: torch.Tensor
    mask: torch.Tensor | None  # [1,H,W] from the original's alpha, None when opaque
    size: tuple[int, int]  # (height, width)


def pair_pixels(orig: LoadedImage, targ: LoadedImage, warn: Warn = _log_warning) -> PixelPair:
    """Pixels of a same-size pair, centre-cropped to multiples of 8 when needed."""
    w, h = orig.size
    cw, ch = w - w % SIDE_MULTIPLE, h - h % SIDE_MULTIPLE
    box = ((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch)
    if (cw, ch) != (w, h):
        warn(f"The image pair is {w}x{h}; both images are centre-cropped to {cw}x{ch} (sides must be "
             f"multiples of {SIDE_MULTIPLE}).")

    def crop(img: Image.Image | None) -> Image.Image | None:
        return img if img is None or (cw, ch) == (w, h) else img.crop(box)

    alpha = crop(orig.alpha)
    return PixelPair(pixels_from_image(crop(orig.rgb)), pixels_from_image(crop(targ.rgb)),
                     mask_from_alpha(alpha) if alpha is not None else None, (ch, cw))


def difference_mask(original: torch.Tensor, target: torch.Tensor, *, factor: int = 8,
                    threshold: float = DIFF_THRESHOLD, cell_fraction: float = DIFF_CELL_FRACTION,
                    dilate: int = DIFF_DILATE) -> torch.Tensor:
    """Where two pixel tensors ([3,H,W] or [B,3,H,W], in [-1,1]) differ, at latent resolution.

    Returns a float {0,1} mask [1,H/f,W/f] (or [B,1,H/f,W/f]).
    """
    batched = original.dim() == 4
    o = original if batched else original[None]
    t = target if batched else target[None]
    differs = ((o.float() - t.float()).abs().sum(dim=1, keepdim=True) > threshold).float()
    cells = F.avg_pool2d(differs, factor) >= cell_fraction
    mask = cells.float()
    if dilate > 0:
        mask = F.max_pool2d(mask, 2 * dilate + 1, stride=1, padding=dilate)
    return mask if batched else mask[0]


# --- a folder of pairs ----------------------------------------------------------------------------

@dataclass(frozen=True)
class ImagePair:
    original: Path
    target: Path


@dataclass(frozen=True)
class PairSample:
    """One bucketed crop of a pair; both samples share bucket, crop, flip and caption."""

    original: Sample  # .mask: the original's alpha mask (None when opaque)
    target: Sample

    @property
    def bucket(self) -> tuple[int, int]:
        return self.original.bucket

    @property
    def caption(self) -> str:
        return self.original.caption


def find_pairs(directory: Path | str, target_suffix: str, warn: Warn = _log_warning) -> list[ImagePair]:
    """``X.ext`` + ``X<target_suffix>.ext`` pairs under ``directory``; unpaired images are warned about by name."""
    if not target_suffix:
        raise DataError("diff_target_name is empty: set the suffix that marks a pair's target image, e.g. "
                        "diff_target_name=_closed for a.png + a_closed.png.")
    paths = find_images(directory)
    by_stem: dict[tuple[Path, str], list[Path]] = {}
    for p in paths:
        by_stem.setdefault((p.parent, p.stem), []).append(p)
    pairs: dict[Path, Path] = {}  # original -> target
    extra_targets: list[tuple[Path, Path]] = []
    for p in paths:
        stem = p.stem
        if not stem.endswith(target_suffix) or len(stem) == len(target_suffix):
            continue
        candidates = by_stem.get((p.parent, stem[: -len(target_suffix)]), [])
        if not candidates:
            continue
        same_ext = [c for c in candidates if c.suffix.lower() == p.suffix.lower()]
        original = (same_ext or candidates)[0]
        if original in pairs:
            previous = pairs[original]
            if previous.suffix.lower() != original.suffix.lower() and p.suffix.lower() == original.suffix.lower():
                pairs[original] = p
                extra_targets.append((previous, original))
            else:
                extra_targets.append((p, original))
            continue
        pairs[original] = p
    used = set(pairs) | set(pairs.values())
    for extra, original in extra_targets:
        if extra not in used:
            warn(f"Multi-ADDifT: {str(extra)!r} is ignored: {str(original)!r} already pairs with "
                 f"{str(pairs[original])!r}.")
            used.add(extra)
    for p in paths:
        if p in used:
            continue
        if p.stem.endswith(target_suffix) and len(p.stem) > len(target_suffix):
            warn(f"Multi-ADDifT: {str(p)!r} has no original image "
                 f"(expected {p.stem[: -len(target_suffix)]}{p.suffix} next to it); it is not used.")
        else:
            warn(f"Multi-ADDifT: {str(p)!r} has no target image "
                 f"(expected {p.stem}{target_suffix}{p.suffix} next to it); it is not used.")
    if not pairs:
        raise DataError(
            f"No image pairs in {str(directory)!r}: {len(paths)} image(s) found, but none has a target "
            f"named <name>{target_suffix}.<ext> next to <name>.<ext> (diff_target_name={target_suffix!r}).")
    return [ImagePair(o, t) for o, t in sorted(pairs.items())]


def _pair_caption(pair: ImagePair, trigger: str, use_filename_as_tag: bool, warn: Warn) -> str:
    source = pair.original
    if not use_filename_as_tag and caption_file_for(pair.original) is None and caption_file_for(pair.target):
        source = pair.target
    return caption_for(source, trigger, use_filename_as_tag, warn=warn)


def _to_size(image: LoadedImage, size: tuple[int, int]) -> LoadedImage:
    if image.size == size:
        return image
    alpha = image.alpha.resize(size, _RESAMPLING.LANCZOS) if image.alpha is not None else None
    return LoadedImage(rgb=image.rgb.resize(size, _RESAMPLING.LANCZOS), alpha=alpha, path=image.path,
                       original_size=size)


def build_pair_samples(
    directory: Path | str,
    target_suffix: str,
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
) -> list[PairSample]:
    """Bucketed crops of every pair in ``directory`` (see module docstring). ``check_stop`` is called
    before each pair: it raises to end the reading when Stop was pressed."""
    plan = BucketPlan.make(image_size, buckets_step, min_length, max_ratio, num_multiply, sub_image_num)
    pairs = find_pairs(directory, target_suffix, warn)
    samples: list[PairSample] = []
    skipped = 0
    for pair in pairs:
        if check_stop is not None:
            check_stop()
        try:
            orig = load_image(pair.original, max_side=plan.largest_side)
            targ = load_image(pair.target, max_side=plan.largest_side)
            caption = _pair_caption(pair, trigger, use_filename_as_tag, warn)
        except DataError as exc:
            warn(f"Skipped the pair {str(pair.original)!r} + {str(pair.target)!r}: {exc}")
            skipped += 1
            continue
        size = (min(orig.size[0], targ.size[0]), min(orig.size[1], targ.size[1]))
        if orig.size != targ.size:
            warn(f"Multi-ADDifT: {str(pair.original)!r} is {orig.size[0]}x{orig.size[1]} and "
                 f"{str(pair.target)!r} is {targ.size[0]}x{targ.size[1]}; both are resized to {size[0]}x{size[1]}.")
        orig, targ = _to_size(orig, size), _to_size(targ, size)
        made = 0
        for bucket, error in plan.placements(size):
            crops_o = _crop(orig, bucket, error, disable_upscale, caption)
            crops_t = _crop(targ, bucket, error, disable_upscale, caption)
            if not crops_o or not crops_t:
                continue
            for o, t in list(zip(crops_o, crops_t))[: 2 if mirroring else 1]:
                # the loss mask is the original's alpha, for both (as the original)
                samples.append(PairSample(o, replace(t, mask=o.mask)))
                made += 1
        if made == 0:
            skipped += 1
            warn(f"Skipped: the pair {str(pair.original)!r} ({size[0]}x{size[1]}) is smaller than its bucket and "
                 "image_disable_upscale is on.")
    if not samples:
        raise DataError(f"No usable image pair in {str(directory)!r}: {len(pairs)} pair(s) found, {skipped} skipped.")
    return samples * int(num_multiply)
