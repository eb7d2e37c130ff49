"""Prompts encoded once, for the modes whose text encoders stay frozen (iLECO, Difference, ADDifT,
Multi-ADDifT): each distinct text goes through the text encoder(s) once, then they leave the device.

A batch's U-Net conditioning pads longer prompts (75-token chunks) with the empty chunk, and on SDXL
adds the pooled vector and the size ids (in pixels: original size, crop (0, 0), target size).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

from ..engine import place
from ..models.prompts import encode_prompts
from .base import UNetCond, pad_chunks


class PromptEmbeddings:
    """{text: (hidden [1, 77k, D], pooled [1, P] | None)}, computed once with the frozen encoders."""

    def __init__(self, run, texts: Iterable[str], clip_skip: int):
        self.run = run
        self._hidden: dict[str, torch.Tensor] = {}
        self._pooled: dict[str, torch.Tensor | None] = {}
        encoders = run.components.text_encoders
        for te in encoders:
            place(te, run.device, run.dtype)
        try:
            with torch.no_grad(), run.autocast():
                for text in sorted(set(texts) | {""}):
                    run.check_stop()
                    cond = encode_prompts(run.components, [text], clip_skip=clip_skip)
                    self._hidden[text] = cond.hidden.float()
                    self._pooled[text] = cond.pooled.float() if cond.pooled is not None else None
        finally:
            for te in encoders:
                place(te, "cpu")

    def __contains__(self, text: str) -> bool:
        return text in self._hidden

    def hidden(self, texts: Sequence[str]) -> torch.Tensor:
        return pad_chunks([self._hidden[t] for t in texts], self._hidden[""]).to(self.run.device)

    def cond(self, texts: Sequence[str], size_hw: tuple[int, int]) -> UNetCond:
        """The U-Net conditioning of a batch of texts for images of `size_hw` pixels (height, width)."""
        hidden = self.hidden(texts)
        added = None
        if self._pooled[texts[0]] is not None:  # SDXL
            pooled = torch.cat([self._pooled[t] for t in texts]).to(self.run.device)
            h, w = size_hw
            ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32, device=self.run.device)
            added = {"text_embeds": pooled, "time_ids": ids.repeat(len(texts), 1)}
        return UNetCond(hidden, added)


def join_prompt(*parts: str) -> str:
    """Non-empty parts joined with ", " (the trigger word goes first)."""
    return ", ".join(p.strip() for p in parts if p and p.strip())


def cat_cond(conds: Sequence[UNetCond]) -> UNetCond:
    """Several conditionings as one batch (to run several frozen predictions in one U-Net call)."""
    longest = max(c.hidden.shape[1] for c in conds)
    if any(c.hidden.shape[1] != longest for c in conds):
        raise ValueError("cat_cond: pad the conditionings to the same number of chunks first")
    hidden = torch.cat([c.hidden for c in conds])
    added = None
    if conds[0].added:
        added = {k: torch.cat([c.added[k] for c in conds]) for k in conds[0].added}
    return UNetCond(hidden, added)
