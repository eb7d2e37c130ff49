"""A dataset check before training (the Train tab's "Check data"): what ``build_samples`` will make of a
folder with the current settings, without a model, a VAE or pixel tensors.

It walks the same functions training uses (``find_images``, ``load_image``, ``caption_for``, the bucket
functions and ``crop_box``), so a bucket or a skip reason shown here is the one training will meet;
tests compare its bucket counts with ``build_samples``'. Images are decoded one at a time and dropped,
so memory stays that of one image.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .buckets import crop_box
from .captions import caption_file_for, caption_for
from .errors import DataError
from .dataset import BucketPlan
from .images import find_images, load_image


@dataclass
class DataPreview:
    folder: Path
    found: int = 0
    usable: int = 0
    samples: int = 0
    """Training samples per epoch (crops, mirrored copies and image_num_multiply included)."""
    buckets: Counter = field(default_factory=Counter)
    """(w, h) -> samples in that bucket, as training will batch them."""
    captioned: list[Path] = field(default_factory=list)
    uncaptioned: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    filename_tags: bool = False

    def text(self, limit: int = 20) -> str:
        """The report a user reads: counts first, then the files to look at."""
        lines = [f"{self.folder}: {self.found} images found, {self.usable} usable, {self.samples} training "
                 f"samples per epoch."]
        if self.buckets:
            lines.append("Buckets (w x h: samples): " + ", ".join(
                f"{w}x{h}: {n}" for (w, h), n in sorted(self.buckets.items(), key=lambda kv: (-kv[1], kv[0]))))
        if self.filename_tags:
            lines.append("Captions: from the file names (image_use_filename_as_tag is on; caption files ignored).")
        else:
            lines.append(f"Captions: {len(self.captioned)} found, {len(self.uncaptioned)} missing"
                         + (" (those train on the trigger word alone):" if self.uncaptioned else "."))
            lines += [f"  no caption: {p}" for p in self.uncaptioned[:limit]]
            if len(self.uncaptioned) > limit:
                lines.append(f"  ... and {len(self.uncaptioned) - limit} more")
        if self.skipped:
            lines.append(f"Skipped by training: {len(self.skipped)}")
            lines += [f"  {p}: {why}" for p, why in self.skipped[:limit]]
            if len(self.skipped) > limit:
                lines.append(f"  ... and {len(self.skipped) - limit} more")
        else:
            lines.append("Skipped by training: none.")
        lines += [f"Warning: {w}" for w in self.warnings[:limit]]
        return "\n".join(lines)


def preview_dataset(
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
) -> DataPreview:
    """What training would read from ``directory`` (arguments as :func:`build_samples`). A bad setting or a
    missing folder raises DataError naming it, as training would."""
    plan = BucketPlan.make(image_size, buckets_step, min_length, max_ratio, num_multiply, sub_image_num)
    paths = find_images(directory)
    report = DataPreview(folder=Path(directory), found=len(paths), filename_tags=use_filename_as_tag)
    for path in paths:
        try:
            image = load_image(path, max_side=plan.largest_side)
            caption_for(path, trigger, use_filename_as_tag, warn=report.warnings.append)
        except DataError as exc:
            report.skipped.append((path, str(exc)))
            continue
        size = image.size
        del image  # one decoded image at a time
        placements = plan.placements(size)
        made = Counter()
        for bucket, error in placements:
            if crop_box(size, bucket, error, disable_upscale) is not None:  # as resize_and_crop decides
                made[bucket] += 2 if mirroring else 1
        if not made:
            report.skipped.append((path, f"{size[0]}x{size[1]} is smaller than its bucket "
                                         f"{placements[0][0][0]}x{placements[0][0][1]} and image_disable_upscale "
                                         f"is on"))
            continue
        report.usable += 1
        for bucket, n in made.items():
            report.buckets[bucket] += n * int(num_multiply)
        if not use_filename_as_tag:
            (report.captioned if caption_file_for(path) is not None else report.uncaptioned).append(path)
    report.samples = sum(report.buckets.values())
    return report
