"""What the modes share: the U-Net conditioning of a batch and how cached prompts are batched.

SDXL conditions the U-Net on more than the text: ``added_cond_kwargs = {"text_embeds": pooled,
"time_ids": [orig_h, orig_w, crop_top, crop_left, target_h, target_w]}`` per sample, in PIXELS
(the original TrainTrain passed latent sizes, H/8 and W/8: spec 11.1 #6). :func:`size_ids` and
:func:`sdxl_added` build them; every mode goes through :func:`unet_cond` so SD1/SD2 (no pooled
output) and SDXL share one call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch


@dataclass
class UNetCond:
    hidden: torch.Tensor  # [B, 77*k, dim]
    added: dict | None = None  # SDXL: {"text_embeds": pooled, "time_ids": ...}


@dataclass(frozen=True)
class SizeCond:
    """SDXL's micro-conditioning of one sample, in pixels.

    ``original_hw``: the source image's size before it was resized; ``crop_tl``: the top-left corner
    of the crop in the resized image; ``target_hw``: the size the U-Net sees (the bucket)."""

    original_hw: tuple
    crop_tl: tuple = (0, 0)
    target_hw: tuple | None = None

    @classmethod
    def plain(cls, height: int, width: int) -> "SizeCond":
        """An uncropped image of this size (prompt-only modes, image pairs used as they are)."""
        return cls((int(height), int(width)), (0, 0), (int(height), int(width)))

    def ids(self) -> list:
        target = self.target_hw or self.original_hw
        return [int(self.original_hw[0]), int(self.original_hw[1]), int(self.crop_tl[0]), int(self.crop_tl[1]),
                int(target[0]), int(target[1])]


Sizes = Union[SizeCond, tuple, Sequence]


def _as_size_conds(sizes: Sizes, batch: int) -> list:
    """One SizeCond per batch item from a SizeCond, an (h, w) pair, or a list of either."""
    if isinstance(sizes, SizeCond):
        return [sizes] * batch
    if isinstance(sizes, tuple) and len(sizes) == 2 and all(isinstance(v, (int, float)) for v in sizes):
        return [SizeCond.plain(*sizes)] * batch
    out = [s if isinstance(s, SizeCond) else SizeCond.plain(*s) for s in sizes]
    if len(out) == 1 and batch > 1:
        out = out * batch
    if len(out) != batch:
        raise ValueError(f"SDXL size conditioning: {len(out)} sizes for a batch of {batch}")
    return out


def size_ids(sizes: Sizes, batch: int, device=None) -> torch.Tensor:
    """``time_ids`` [B, 6] float32: (orig_h, orig_w, crop_top, crop_left, target_h, target_w) in pixels."""
    rows = [s.ids() for s in _as_size_conds(sizes, batch)]
    return torch.tensor(rows, dtype=torch.float32, device=device)


def sdxl_added(pooled: torch.Tensor, sizes: Sizes) -> dict:
    """SDXL's ``added_cond_kwargs`` for a batch: pooled text embedding [B, P] and pixel size ids [B, 6]."""
    return {"text_embeds": pooled, "time_ids": size_ids(sizes, pooled.shape[0], pooled.device)}


def unet_cond(hidden: torch.Tensor, pooled: torch.Tensor | None = None, sizes: Sizes | None = None) -> UNetCond:
    """The U-Net conditioning of a batch: SD1/SD2 (``pooled`` None) just the hidden states; SDXL adds
    the pooled embedding and the size ids of ``sizes`` (a SizeCond, an (h, w) pair in pixels, or one
    per sample)."""
    if pooled is None:
        return UNetCond(hidden)
    if sizes is None:
        raise ValueError("SDXL conditioning needs the image sizes (pixels) for its time_ids")
    if pooled.shape[0] == 1 and hidden.shape[0] > 1:
        pooled = pooled.expand(hidden.shape[0], -1)
    return UNetCond(hidden, sdxl_added(pooled.to(hidden.device), sizes))


def pad_chunks(hidden: list[torch.Tensor], empty_chunk: torch.Tensor) -> torch.Tensor:
    """Stack [1, 77*k_i, D] prompt encodings of different lengths into [B, 77*max_k, D].

    A prompt longer than 75 tokens is encoded in chunks of 77; shorter prompts in the same batch
    are padded with the encoding of an empty chunk, as the Web-UI does.
    """
    longest = max(h.shape[1] for h in hidden)
    out = []
    for h in hidden:
        missing = (longest - h.shape[1]) // empty_chunk.shape[1]
        out.append(torch.cat([h] + [empty_chunk.to(h)] * missing, dim=1) if missing else h)
    return torch.cat(out, dim=0)
