"""Samples from a folder (sub images, mirroring, masks, skipping) and the bucket batcher."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.data.dataset import BucketBatcher, build_samples
from trainer.data.errors import DataError

SMALL = {"image_size": (64, 64), "buckets_step": 16, "min_length": 32, "max_ratio": 2.0}


def _gradient(width: int, height: int) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.float64)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float64)[:, None, None]
    array = np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1)),
                            np.full((height, width, 1), 128.0)], axis=2)  # fmt: skip
    return Image.fromarray(array.astype(np.uint8))


def test_one_image_sub3_mirror_gives_8_samples(tmp_path: Path) -> None:
    _gradient(80, 80).save(tmp_path / "a.png")
    warnings: list[str] = []
    samples = build_samples(tmp_path, **SMALL, sub_image_num=3, mirroring=True, warn=warnings.append)
    assert len(samples) == 8 and warnings == []
    assert [s.mirrored for s in samples] == [False, True] * 4
    assert samples[0].bucket == (64, 64)
    assert len({s.bucket for s in samples}) == 4
    for sample in samples:
        w, h = sample.bucket
        assert sample.pixels.shape == (3, h, w) and sample.pixels.dtype == torch.float32
        assert -1.0 <= float(sample.pixels.min()) and float(sample.pixels.max()) <= 1.0
        assert sample.mask is None and sample.source == tmp_path / "a.png"
    assert torch.equal(samples[1].pixels, torch.flip(samples[0].pixels, dims=[2]))


def test_counts_without_mirror_and_multiply(tmp_path: Path) -> None:
    _gradient(80, 80).save(tmp_path / "a.png")
    _gradient(120, 60).save(tmp_path / "b.png")
    samples = build_samples(tmp_path, **SMALL, sub_image_num=1, num_multiply=3)
    assert len(samples) == 2 * 2 * 3
    assert Counter(s.bucket for s in samples)[(64, 64)] == 3
    wide = [s for s in samples if s.source.name == "b.png" and s.bucket[0] > s.bucket[1]]
    assert wide and all(s.bucket[0] / s.bucket[1] == 2 for s in wide[:1])


def test_captions_and_trigger(tmp_path: Path) -> None:
    _gradient(64, 64).save(tmp_path / "red_dog.png")
    (tmp_path / "red_dog.txt").write_text("a red dog\n", encoding="utf-8")
    _gradient(64, 64).save(tmp_path / "blue_cat.png")
    samples = build_samples(tmp_path, **SMALL, trigger="sks")
    assert {s.source.name: s.caption for s in samples} == {"red_dog.png": "sks, a red dog", "blue_cat.png": "sks"}
    samples = build_samples(tmp_path, **SMALL, use_filename_as_tag=True)
    assert sorted(s.caption for s in samples) == ["blue,cat", "red,dog"]


def test_alpha_mask_follows_crop_and_mirror(tmp_path: Path) -> None:
    image = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    image.paste((200, 0, 0, 255), (0, 0, 32, 64))  # left half opaque red, right half transparent
    image.save(tmp_path / "cut.png")
    plain, mirrored = build_samples(tmp_path, **SMALL, mirroring=True)
    assert plain.mask is not None and plain.mask.shape == (1, 64, 64)
    assert set(plain.mask.unique().tolist()) <= {0.0, 1.0}
    assert plain.mask[0, :, :30].min() == 1 and plain.mask[0, :, 34:].max() == 0
    assert torch.equal(mirrored.mask, torch.flip(plain.mask, dims=[2]))
    assert plain.pixels[:, 10, 50].tolist() == [1.0, 1.0, 1.0]  # transparent area composited on white


def test_disable_upscale_skips_small_images(tmp_path: Path) -> None:
    _gradient(40, 40).save(tmp_path / "small.png")
    _gradient(100, 100).save(tmp_path / "big.png")
    warnings: list[str] = []
    samples = build_samples(tmp_path, **SMALL, disable_upscale=True, warn=warnings.append)
    assert [s.source.name for s in samples] == ["big.png"]
    assert any("small.png" in w for w in warnings)
    samples = build_samples(tmp_path, **SMALL, disable_upscale=True, sub_image_num=2, warn=warnings.append)
    # sub picks for a square image: 48x48 (too big for small.png, skipped), then 32x32 (fits)
    assert Counter(s.source.name for s in samples) == {"big.png": 3, "small.png": 1}
    assert [s.bucket for s in samples if s.source.name == "small.png"] == [(32, 32)]


def test_corrupt_files_skipped_with_warning(tmp_path: Path) -> None:
    _gradient(64, 64).save(tmp_path / "good.png")
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello")
    warnings: list[str] = []
    samples = build_samples(tmp_path, **SMALL, warn=warnings.append)
    assert [s.source.name for s in samples] == ["good.png"]
    assert len(warnings) == 2 and any("zero.png" in w for w in warnings) and any("text.png" in w for w in warnings)


def test_nothing_usable_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.raises(DataError, match="No usable image"):
        build_samples(tmp_path, **SMALL, warn=lambda message: None)


def test_no_sub_buckets_warns(tmp_path: Path) -> None:
    _gradient(64, 64).save(tmp_path / "a.png")
    warnings: list[str] = []
    samples = build_samples(tmp_path, image_size=(64, 64), buckets_step=64, min_length=64, max_ratio=2,
                            sub_image_num=2, warn=warnings.append)  # fmt: skip
    assert len(samples) == 1 and "sub_image_num" in warnings[0]


def test_bad_counts_name_the_setting(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="image_num_multiply"):
        build_samples(tmp_path, **SMALL, num_multiply=0)
    with pytest.raises(DataError, match="sub_image_num"):
        build_samples(tmp_path, **SMALL, sub_image_num=-1)


# --- BucketBatcher --------------------------------------------------------------------

KEYS = ["a"] * 5 + ["b"] * 3 + ["c"] * 1 + ["a"] * 2


def test_batches_never_mix_buckets_and_cover_each_epoch() -> None:
    batcher = BucketBatcher(KEYS, batch_size=2, seed=7)
    per_epoch = batcher.batches_per_epoch
    assert per_epoch == 4 + 2 + 1  # a: 7 -> 4 batches, b: 3 -> 2, c: 1 item repeated -> 1
    for epoch in range(3):
        assert batcher.epoch == epoch
        batches = [next(batcher) for _ in range(per_epoch)]
        assert all(len({KEYS[i] for i in batch}) == 1 for batch in batches)
        seen = Counter(i for batch in batches for i in batch)
        assert all(seen[i] == 1 for i, key in enumerate(KEYS) if key != "c")
        assert [batch for batch in batches if KEYS[batch[0]] == "c"] == [[8, 8]]
    assert batcher.epoch == 3


def test_batcher_is_deterministic_given_the_seed() -> None:
    def first(seed: int) -> list[list[int]]:
        return list(itertools.islice(BucketBatcher(KEYS, 3, seed=seed), 20))

    assert first(1) == first(1)
    assert first(1) != first(2)


def test_batch_larger_than_every_bucket() -> None:
    batcher = BucketBatcher(["x", "x", "y"], batch_size=3, seed=0)
    batches = list(itertools.islice(batcher, batcher.batches_per_epoch))
    assert [len(b) for b in batches] == [3, 3, 3]  # x: 2 items x 3 = 6 -> 2 batches; y: 1 x 3 -> 1
    assert sorted(i for b in batches for i in b) == [0] * 3 + [1] * 3 + [2] * 3
    assert all(len({["x", "x", "y"][i] for i in b}) == 1 for b in batches)


def test_batch_larger_than_the_data_is_cut_to_it_and_said() -> None:
    said = []
    batcher = BucketBatcher(["x", "x", "y", "y"], batch_size=100000, seed=0, warn=said.append)
    assert batcher.batch_size == 4 and batcher.batches_per_epoch == 4
    assert [len(next(batcher)) for _ in range(8)] == [4] * 8  # two epochs, at once
    assert len(said) == 1 and "train_batch_size=100000" in said[0] and "4 training samples" in said[0]


def test_batcher_rejects_bad_input() -> None:
    with pytest.raises(DataError, match="train_batch_size"):
        BucketBatcher(["a"], batch_size=0)
    with pytest.raises(DataError):
        BucketBatcher([], batch_size=1)
