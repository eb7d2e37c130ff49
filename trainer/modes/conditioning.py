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
from .base import UNetCond, pad_chunks, unet_cond


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

    def cond(self, texts: Sequence[str], sizes) -> UNetCond:
        """The U-Net conditioning of a batch of texts; ``sizes`` (SDXL only): an (h, w) pair in pixels,
        a SizeCond, or one per text (trainer.modes.base.unet_cond)."""
        pooled = None
        if self._pooled[texts[0]] is not None:  # SDXL
            pooled = torch.cat([self._pooled[t] for t in texts]).to(self.run.device)
        return unet_cond(self.hidden(texts), pooled, sizes)


def join_prompt(*parts: str) -> str:
    """Non-empty parts joined with ", " (the trigger word goes first)."""
    return ", ".join(p.strip() for p in parts if p and p.strip())
