"""Prompt encoding as the Stable Diffusion Web-UI does it.

* Emphasis syntax (:func:`parse_emphasis`): ``(word)`` x1.1, ``[word]`` /1.1,
  ``(word:1.3)``, nesting multiplies, ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal,
  unclosed brackets apply to the end, ``BREAK`` starts a new chunk.
* 75-token chunks: each chunk is ``BOS + 75 tokens + EOS`` (77 ids); the text is
  followed by EOS then the encoder's pad id (EOS for CLIP-L, 0 for OpenCLIP). A chunk
  that would overflow breaks at the last comma when it is within 20 tokens. Prompts
  of a batch get empty chunks so that all have the same count.
* Weights multiply the hidden states; the mean of each prompt's chunk is then restored
  (the Web-UI "Original" emphasis; computed per prompt, so a prompt's encoding does
  not depend on the rest of its batch).
* Layers: SD1 ``final_layer_norm(hidden_states[-clip_skip])``; SD2 the layer
  ``clip_skip`` before the last of the full 24-layer tower, then ``final_layer_norm``
  (the LDM default is the penultimate layer: ``clip_skip=1``); SDXL the layer
  ``clip_skip`` before the last of both encoders, no final norm, concatenated
  (768 + 1280), and ``pooled`` = text projection of encoder 2's final-normed last layer
  at the first chunk's EOS token.

Everything is differentiable: the text-encoder LoRA trains through it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from .families import Family
from .tokenizer import BOS_ID, EOS_ID, tokenize

CHUNK = 75
COMMA_ID = 267  # ",</w>"
COMMA_BACKTRACK = 20
BREAK = "BREAK"

_TOKEN_RE = re.compile(
    r"\\[()\[\]\\]"  # escaped bracket or backslash
    r"|\\"  # lone backslash
    r"|\("
    r"|\["
    r"|:\s*([+-]?[.\d]+)\s*\)"  # explicit weight closing a round bracket
    r"|\)"
    r"|\]"
    r"|[^\\()\[\]:]+"
    r"|:"
)
_BREAK_RE = re.compile(r"\s*\bBREAK\b\s*")


def parse_emphasis(text: str) -> list:
    """Split a prompt into ``[(text, weight), ...]``; ``(BREAK, -1.0)`` marks a chunk break.

    >>> parse_emphasis("a (cat:1.5) [dog]")
    [('a ', 1.0), ('cat', 1.5), (' ', 1.0), ('dog', 0.9090909090909091)]
    """
    parts: list = []  # [text, weight] lists, mutated when brackets close
    round_open: list = []
    square_open: list = []

    def scale(start: int, factor: float) -> None:
        for p in parts[start:]:
            if p[1] != -1.0:
                p[1] *= factor

    for m in _TOKEN_RE.finditer(text):
        tok, weight = m.group(0), m.group(1)
        if len(tok) == 2 and tok[0] == "\\":
            parts.append([tok[1], 1.0])
        elif tok == "(":
            round_open.append(len(parts))
        elif tok == "[":
            square_open.append(len(parts))
        elif weight is not None and round_open:
            try:
                factor = float(weight)
            except ValueError:
                parts.append([tok, 1.0])
            else:
                scale(round_open.pop(), factor)
        elif tok == ")" and round_open:
            scale(round_open.pop(), 1.1)
        elif tok == "]" and square_open:
            scale(square_open.pop(), 1 / 1.1)
        else:
            for i, piece in enumerate(_BREAK_RE.split(tok)):
                if i > 0:
                    parts.append([BREAK, -1.0])
                parts.append([piece, 1.0])
    for start in round_open:
        scale(start, 1.1)
    for start in square_open:
        scale(start, 1 / 1.1)

    merged: list = []
    for t, w in parts:
        if t == "" and w != -1.0:
            continue
        if merged and w != -1.0 and merged[-1][1] == w:
            merged[-1] = (merged[-1][0] + t, w)
        else:
            merged.append((t, w))
    return merged or [("", 1.0)]


def chunk_prompt(tokenizer, text: str, emphasis: bool = True) -> list:
    """Token ids and weights of one prompt in chunks of at most 75: ``[(ids, weights), ...]``.
    ``emphasis`` False reads the text literally (brackets are words, every weight 1, no BREAK), as
    kohya and the original TrainTrain read captions."""
    chunks: list = []
    ids: list = []
    ws: list = []
    last_comma = -1

    def close() -> None:
        nonlocal ids, ws, last_comma
        chunks.append((ids, ws))
        ids, ws, last_comma = [], [], -1

    for text_part, weight in (parse_emphasis(text) if emphasis else [(text, 1.0)]):
        if text_part == BREAK and weight == -1.0:
            close()
            continue
        for tid in tokenize(tokenizer, text_part):
            if len(ids) == CHUNK:
                if last_comma >= 0 and CHUNK - (last_comma + 1) <= COMMA_BACKTRACK:
                    keep = last_comma + 1
                    rest_ids, rest_ws = ids[keep:], ws[keep:]
                    ids, ws = ids[:keep], ws[:keep]
                    close()
                    ids, ws = rest_ids, rest_ws
                else:
                    close()
            if tid == COMMA_ID:
                last_comma = len(ids)
            ids.append(tid)
            ws.append(weight)
    if ids or not chunks:
        close()
    return chunks


def _chunk_tensors(chunk: tuple, pad_id: int) -> tuple:
    ids, ws = chunk
    n = len(ids)
    full_ids = [BOS_ID, *ids, EOS_ID] + [pad_id] * (CHUNK - n)
    full_ws = [1.0, *ws, 1.0] + [1.0] * (CHUNK - n)
    return full_ids, full_ws


def tokenize_batch(tokenizer, prompts: Sequence[str], emphasis: bool = True) -> tuple:
    """``(ids [B, k, 77] long, weights [B, k, 77] float)`` with all prompts padded to k chunks."""
    pad_id = int(tokenizer.pad_token_id)
    per_prompt = [chunk_prompt(tokenizer, p, emphasis) for p in prompts]
    k = max(len(c) for c in per_prompt)
    all_ids, all_ws = [], []
    for chunks in per_prompt:
        chunks = list(chunks) + [([], [])] * (k - len(chunks))
        pairs = [_chunk_tensors(c, pad_id) for c in chunks]
        all_ids.append([p[0] for p in pairs])
        all_ws.append([p[1] for p in pairs])
    return torch.tensor(all_ids, dtype=torch.long), torch.tensor(all_ws, dtype=torch.float32)


@dataclass
class Conditioning:
    """``hidden`` [B, 77*k, dim] cross-attention context; ``pooled`` [B, 1280] for SDXL else None."""

    hidden: torch.Tensor
    pooled: Optional[torch.Tensor] = None


def _text_core(te):
    return getattr(te, "text_model", te)


def _layer_index(family: Family, te, clip_skip: int) -> int:
    n = int(te.config.num_hidden_layers)
    full = 24 if (family is Family.SD2 and n == 23) else n  # diffusers' SD2 encoders drop the last layer
    k = full - (clip_skip - 1) if family is Family.SD1 else full - clip_skip
    if not 1 <= k <= n:
        raise ValueError(f"clip_skip={clip_skip} is out of range for a {n}-layer text encoder")
    return k


def _encode_one(te, family: Family, ids: torch.Tensor, ws: torch.Tensor, clip_skip: int,
                final_norm: bool, want_pooled: bool) -> tuple:
    """ids/ws [B, k, 77] -> (hidden [B, 77k, dim], pooled [B, proj] | None)."""
    param = next(te.parameters())
    B, k, L = ids.shape
    layer = _layer_index(family, te, clip_skip)
    core = _text_core(te)
    out = te(input_ids=ids.reshape(B * k, L).to(param.device), output_hidden_states=True)
    z = out.hidden_states[layer]
    if final_norm:
        z = core.final_layer_norm(z)
    if bool((ws != 1).any()):
        # Emphasis: scale token vectors, then restore the chunk's mean as the Web-UI does. Only
        # when some weight differs from 1: a layer-normed chunk can have a mean of exactly 0.
        w = ws.reshape(B * k, L, 1).to(device=z.device, dtype=z.dtype)
        original_mean = z.mean(dim=(1, 2), keepdim=True)
        z = z * w
        new_mean = z.mean(dim=(1, 2), keepdim=True)
        safe = new_mean.abs() > 1e-6
        z = torch.where(safe, z * (original_mean / torch.where(safe, new_mean, torch.ones_like(new_mean))), z)
    hidden = z.reshape(B, k * L, z.shape[-1])
    pooled = None
    if want_pooled:
        last = core.final_layer_norm(out.hidden_states[-1]).reshape(B, k, L, -1)[:, 0]
        first_ids = ids[:, 0].to(last.device)
        eos_pos = (first_ids == EOS_ID).int().argmax(dim=-1)
        pooled = last[torch.arange(B, device=last.device), eos_pos]
        pooled = te.text_projection(pooled)
    return hidden, pooled


def encode_prompts(components, prompts: Union[str, Sequence[str]], clip_skip: int = 1,
                   emphasis: bool = True) -> Conditioning:
    """Encode prompts with the Web-UI's emphasis syntax and 75-token chunks (see module doc);
    ``emphasis`` False reads them literally (captions, unless ``caption_emphasis``)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise ValueError("encode_prompts: no prompts")
    if clip_skip < 1:
        raise ValueError(f"clip_skip must be >= 1, got {clip_skip}")
    family = components.info.family
    if family is Family.SDXL:
        tensors = [tokenize_batch(tok, prompts, emphasis) for tok in components.tokenizers]
        k = max(t[0].shape[1] for t in tensors)
        if any(t[0].shape[1] != k for t in tensors):  # pad ids differ, chunking does not; guard anyway
            raise RuntimeError("SDXL tokenizers produced different chunk counts")
        h1, _ = _encode_one(components.text_encoders[0], family, *tensors[0], clip_skip, False, False)
        h2, pooled = _encode_one(components.text_encoders[1], family, *tensors[1], clip_skip, False, True)
        return Conditioning(torch.cat([h1, h2.to(h1.dtype)], dim=-1), pooled)
    ids, ws = tokenize_batch(components.tokenizers[0], prompts, emphasis)
    hidden, _ = _encode_one(components.text_encoders[0], family, ids, ws, clip_skip, True, False)
    return Conditioning(hidden, None)
