"""What the modes share: the U-Net conditioning of a batch and how cached prompts are batched."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class UNetCond:
    hidden: torch.Tensor  # [B, 77*k, dim]
    added: dict | None = None  # SDXL: {"text_embeds": pooled, "time_ids": ...}


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
