"""Encode each image once: latents in memory and, optionally, on disk; text embeddings in memory.

Disk cache: one ``<key>.safetensors`` file per latent in ``cache_dir``, where ``key`` is
a BLAKE2b hash of the sample's pixel tensor (shape, dtype and bytes) plus ``key_extra``
(the caller passes the VAE identity and precision, so a different VAE never reuses a
latent). Files are written atomically (temp file in the same folder + ``os.replace``);
an unreadable cache file is re-encoded, and a cache folder that cannot be written (read-only,
full disk) only costs speed (one warning), never the run.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Generic, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..atomic import temp_file
from .dataset import Sample
from .errors import DataError

Warn = Callable[[str], None]
EncodeFn = Callable[[torch.Tensor], torch.Tensor]
"""[B,3,H,W] float32 pixels in [-1,1] (CPU) -> [B,C,H/8,W/8] latents (any device)."""

_KEY_VERSION = b"traintrain-latent-v1"
_TENSOR_NAME = "latent"
_log = logging.getLogger(__name__)


def _log_warning(message: str) -> None:
    _log.warning(message)


def latent_key(pixels: torch.Tensor, key_extra: str) -> str:
    """Content hash of one pixel tensor plus the encoder identity (hex, 40 characters)."""
    digest = hashlib.blake2b(digest_size=20)
    digest.update(_KEY_VERSION + b"\0" + key_extra.encode("utf-8") + b"\0")
    digest.update(f"{tuple(pixels.shape)}|{pixels.dtype}".encode("ascii") + b"\0")
    raw = pixels.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    digest.update(raw.data)
    return digest.hexdigest()


class LatentCache:
    """Latents of samples, computed once per run (memory) and once per data set (disk)."""

    def __init__(self, *, warn: Warn = _log_warning) -> None:
        self._memory: dict[str, torch.Tensor] = {}
        self._warn = warn
        self._disk_failed = False
        self.encoded_count = 0
        """How many images went through the encoder (for logs and tests)."""
        self.loaded_count = 0
        """How many latents came from the disk cache."""

    def encode_all(
        self,
        samples: Sequence[Sample],
        encode_fn: EncodeFn,
        batch_size: int,
        cache_dir: Path | str | None = None,
        key_extra: str = "",
        check_stop: Callable[[], None] | None = None,
    ) -> list[torch.Tensor]:
        """One CPU latent [C,h,w] per sample, in order; equal pixels share one latent.

        Missing latents are encoded in batches of at most ``batch_size`` that never
        mix bucket sizes. ``check_stop`` is called before each cached file is read (a large
        cache takes a while too): it raises to end the loading when Stop was pressed.
        """
        if int(batch_size) != batch_size or batch_size < 1:
            raise DataError(f"The VAE encoding batch size must be a whole number >= 1, got {batch_size!r}.")
        folder = Path(cache_dir) if cache_dir is not None else None
        keys = self._keys(samples, key_extra)

        missing: dict[str, torch.Tensor] = {}
        for key, sample in zip(keys, samples):
            if key in self._memory or key in missing:
                continue
            if check_stop is not None and folder is not None:
                check_stop()
            loaded = self._load(folder, key) if folder is not None else None
            if loaded is not None:
                self._memory[key] = loaded
                self.loaded_count += 1
            else:
                missing[key] = sample.pixels

        for chunk in _chunks_by_shape(missing, int(batch_size)):
            batch = torch.stack([missing[key] for key in chunk])
            with torch.no_grad():
                latents = encode_fn(batch)
            _check_output(latents, batch)
            self.encoded_count += len(chunk)
            for key, latent in zip(chunk, latents):
                stored = latent.detach().to("cpu").clone().contiguous()
                self._memory[key] = stored
                if folder is not None:
                    self._save(folder, key, stored, key_extra)
        return [self._memory[key] for key in keys]

    def _keys(self, samples: Sequence[Sample], key_extra: str) -> list[str]:
        by_tensor: dict[int, str] = {}  # repeated samples share tensors: hash each once
        keys = []
        for sample in samples:
            tensor_id = id(sample.pixels)
            if tensor_id not in by_tensor:
                by_tensor[tensor_id] = latent_key(sample.pixels, key_extra)
            keys.append(by_tensor[tensor_id])
        return keys

    def _load(self, folder: Path, key: str) -> torch.Tensor | None:
        path = folder / f"{key}.safetensors"
        if not path.is_file():
            return None
        try:
            tensor = load_file(str(path)).get(_TENSOR_NAME)
        except (OSError, SafetensorError, ValueError, RuntimeError) as exc:
            self._warn(f"Latent cache file {str(path)!r} is unreadable ({exc}); encoding the image again.")
            return None
        if tensor is None or tensor.ndim != 3:
            self._warn(f"Latent cache file {str(path)!r} holds no latent; encoding the image again.")
            return None
        return tensor

    def _save(self, folder: Path, key: str, latent: torch.Tensor, key_extra: str) -> None:
        if self._disk_failed:
            return
        temp_name = None
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, temp_name = temp_file(folder / f".{key}")  # the umask's permissions, not 0600
            os.close(fd)
            save_file({_TENSOR_NAME: latent}, temp_name, metadata={"key_extra": key_extra})
            os.replace(temp_name, folder / f"{key}.safetensors")
            temp_name = None
        except (OSError, SafetensorError) as exc:  # safetensors reports a full disk as SafetensorError
            self._disk_failed = True
            self._warn(f"Cannot write the latent cache in {str(folder)!r} ({exc}); continuing without it.")
        finally:
            if temp_name is not None:
                Path(temp_name).unlink(missing_ok=True)


def _chunks_by_shape(pixels: dict[str, torch.Tensor], batch_size: int) -> list[list[str]]:
    """Keys grouped by tensor shape (= bucket), in first-seen order, cut into batches."""
    groups: dict[tuple[int, ...], list[str]] = {}
    for key, tensor in pixels.items():
        groups.setdefault(tuple(tensor.shape), []).append(key)
    return [keys[i : i + batch_size] for keys in groups.values() for i in range(0, len(keys), batch_size)]


def _check_output(latents: object, batch: torch.Tensor) -> None:
    if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or latents.shape[0] != batch.shape[0]:
        shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise DataError(
            f"The image encoder returned {shape} for a batch of shape {tuple(batch.shape)}; "
            f"expected [{batch.shape[0]}, C, H/8, W/8]."
        )


T = TypeVar("T")


class TextEmbeddingCache(Generic[T]):
    """Calls ``encode_fn`` once per distinct caption and remembers the result (memory only)."""

    def __init__(self, encode_fn: Callable[[str], T]) -> None:
        self._encode = encode_fn
        self._cache: dict[str, T] = {}

    def get(self, caption: str) -> T:
        if caption not in self._cache:
            with torch.no_grad():
                self._cache[caption] = self._encode(caption)
        return self._cache[caption]

    def __contains__(self, caption: object) -> bool:
        return caption in self._cache

    def __len__(self) -> int:
        return len(self._cache)
