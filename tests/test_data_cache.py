"""Latent cache (memory + disk) and text-embedding cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.data.cache import LatentCache, TextEmbeddingCache
from trainer.data.dataset import Sample, build_samples
from trainer.data.errors import DataError

SMALL = {"image_size": (64, 64), "buckets_step": 16, "min_length": 32, "max_ratio": 2.0}


class CountingEncoder:
    """Stands in for a VAE: [B,3,H,W] -> [B,4,H/8,W/8]; records batch sizes."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, ...]] = []

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        self.batches.append(tuple(pixels.shape))
        pooled = torch.nn.functional.avg_pool2d(pixels, 8)
        return torch.cat([pooled, pooled.mean(dim=1, keepdim=True)], dim=1)

    @property
    def images(self) -> int:
        return sum(shape[0] for shape in self.batches)


def _dataset(folder: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(exist_ok=True)
    for name, size in [("a.png", (64, 64)), ("b.png", (64, 64)), ("c.png", (128, 64)), ("d.png", (64, 64))]:
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / name)


def test_encodes_once_batched_per_bucket(tmp_path: Path) -> None:
    _dataset(tmp_path / "data")
    samples = build_samples(tmp_path / "data", **SMALL, num_multiply=2)
    assert len(samples) == 8
    encoder = CountingEncoder()
    cache = LatentCache()
    latents = cache.encode_all(samples, encoder, batch_size=2)
    assert encoder.images == 4 and cache.encoded_count == 4
    # three 64x64 images -> batches of 2 + 1; the 128x64 one sits alone in the (64, 32) bucket
    assert sorted(encoder.batches) == [(1, 3, 32, 64), (1, 3, 64, 64), (2, 3, 64, 64)]
    for sample, latent in zip(samples, latents):
        w, h = sample.bucket
        assert latent.shape == (4, h // 8, w // 8) and latent.device.type == "cpu"
    assert latents[0] is latents[4]  # repeated sample shares one latent
    cache.encode_all(samples, encoder, batch_size=2)
    assert encoder.images == 4  # in-memory: nothing new


def test_disk_cache_second_instance_skips_encoder(tmp_path: Path) -> None:
    _dataset(tmp_path / "data")
    samples = build_samples(tmp_path / "data", **SMALL)
    first_encoder = CountingEncoder()
    first = LatentCache().encode_all(samples, first_encoder, 4, tmp_path / "cache", "vae=x fp16")
    assert first_encoder.images == 4
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 4
    assert not list((tmp_path / "cache").glob("*.tmp"))

    second_encoder = CountingEncoder()
    second_cache = LatentCache()
    again = second_cache.encode_all(
        build_samples(tmp_path / "data", **SMALL), second_encoder, 4, tmp_path / "cache", "vae=x fp16"
    )
    assert second_encoder.images == 0 and second_cache.loaded_count == 4
    assert all(torch.equal(x, y) for x, y in zip(first, again))

    other_vae = CountingEncoder()
    LatentCache().encode_all(samples, other_vae, 4, tmp_path / "cache", "vae=y fp16")
    assert other_vae.images == 4  # key_extra is part of the key


def test_changed_image_is_re_encoded(tmp_path: Path) -> None:
    _dataset(tmp_path / "data")
    LatentCache().encode_all(build_samples(tmp_path / "data", **SMALL), CountingEncoder(), 4, tmp_path / "cache", "")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "data" / "b.png")
    encoder = CountingEncoder()
    LatentCache().encode_all(build_samples(tmp_path / "data", **SMALL), encoder, 4, tmp_path / "cache", "")
    assert encoder.images == 1


def test_corrupt_cache_file_is_re_encoded_with_warning(tmp_path: Path) -> None:
    _dataset(tmp_path / "data")
    samples = build_samples(tmp_path / "data", **SMALL)
    LatentCache().encode_all(samples, CountingEncoder(), 4, tmp_path / "cache", "")
    victim = sorted((tmp_path / "cache").glob("*.safetensors"))[0]
    victim.write_bytes(b"garbage")
    warnings: list[str] = []
    encoder = CountingEncoder()
    LatentCache(warn=warnings.append).encode_all(samples, encoder, 4, tmp_path / "cache", "")
    assert encoder.images == 1 and len(warnings) == 1 and victim.name in warnings[0]


def test_unwritable_cache_dir_only_warns(tmp_path: Path) -> None:
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    sample = Sample(torch.zeros(3, 16, 16), None, "", tmp_path / "x.png", (16, 16), False)
    warnings: list[str] = []
    latents = LatentCache(warn=warnings.append).encode_all([sample], CountingEncoder(), 1, blocker / "cache", "")
    assert latents[0].shape == (4, 2, 2) and len(warnings) == 1 and "latent cache" in warnings[0]


def test_encoder_with_wrong_output_is_a_clear_error(tmp_path: Path) -> None:
    sample = Sample(torch.zeros(3, 16, 16), None, "", tmp_path / "x.png", (16, 16), False)
    with pytest.raises(DataError, match="encoder returned"):
        LatentCache().encode_all([sample], lambda x: x[0], 1)
    with pytest.raises(DataError, match="batch size"):
        LatentCache().encode_all([sample], CountingEncoder(), 0)


def test_text_embedding_cache_encodes_each_caption_once() -> None:
    calls: list[str] = []

    def encode(caption: str) -> torch.Tensor:
        calls.append(caption)
        return torch.full((1, 2), float(len(caption)))

    cache = TextEmbeddingCache(encode)
    first = cache.get("sks, dog")
    assert cache.get("sks, dog") is first
    cache.get("sks")
    assert calls == ["sks, dog", "sks"] and len(cache) == 2 and "sks" in cache
