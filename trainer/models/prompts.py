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
* Textual-inversion embeddings (``components.embeddings``, set by the host): an embedding's name in a
  prompt becomes its N vectors, N positions of the chunk (never split across chunks), by replacing
  the token-embedding output at placeholder ids; the vectors are frozen.
* ``clip_skip`` 1 (the default) follows the host's CLIP skip (``components.host_clip_skip``: the
  Web-UI's option when hosted); a larger value overrides it.

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
# ids from here up stand for embedding vectors (row = id - PLACEHOLDER); far above any CLIP vocabulary
PLACEHOLDER = 1 << 24

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


class EmbeddingVocab:
    """Names of the embeddings a prompt may use -> (first placeholder row, vector count)."""

    def __init__(self, embeddings):
        self.embeddings = embeddings
        self.rows: dict = {}
        start = 0
        for name in sorted(embeddings.vectors):
            vec = embeddings.vectors[name]
            t = next(iter(vec.values())) if isinstance(vec, dict) else vec
            n = 1 if t.dim() == 1 else int(t.shape[0])
            self.rows[name.lower()] = (name, start, n)
            start += n
        names = sorted({*self.rows, *(r.lower() for r in embeddings.refused)}, key=len, reverse=True)
        # a name counts where it stands as a word: CLIP reads it case-insensitively, as the Web-UI matches it
        self._re = (re.compile("(?<![\\w])(" + "|".join(re.escape(n) for n in names) + ")(?![\\w])", re.IGNORECASE)
                    if names else None)
        self._refused = {k.lower(): v for k, v in embeddings.refused.items()}

    def split(self, text: str) -> list:
        """``[(text, None) | (name, (start, n)), ...]``"""
        if self._re is None:
            return [(text, None)]
        out, pos = [], 0
        for m in self._re.finditer(text):
            key = m.group(1).lower()
            if key in self._refused:
                raise ValueError(self._refused[key])
            if m.start() > pos:
                out.append((text[pos:m.start()], None))
            name, start, n = self.rows[key]
            out.append((name, (start, n)))
            pos = m.end()
        if pos < len(text) or not out:
            out.append((text[pos:], None))
        return out

    def table(self, encoder: int, n_encoders: int, dim: int, used: set) -> torch.Tensor:
        """[rows, dim] vectors of text encoder ``encoder``; only the ``used`` rows are checked and filled."""
        from .embeddings import vectors_for

        total = sum(n for _, _, n in self.rows.values())
        out = torch.zeros(total, dim)
        for name, start, n in self.rows.values():
            if any(start <= r < start + n for r in used):
                out[start:start + n] = vectors_for(self.embeddings.vectors[name], encoder, n_encoders, dim, name)
        return out


def _vocab(components) -> Optional[EmbeddingVocab]:
    emb = getattr(components, "embeddings", None)
    return EmbeddingVocab(emb) if emb else None


def chunk_prompt(tokenizer, text: str, emphasis: bool = True, vocab: Optional[EmbeddingVocab] = None) -> list:
    """Token ids and weights of one prompt in chunks of at most 75: ``[(ids, weights), ...]``.
    ``emphasis`` False reads the text literally (brackets are words, every weight 1, no BREAK), as
    kohya and the original TrainTrain read captions. ``vocab``: embedding names become placeholder ids."""
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
        for tid in _token_stream(tokenizer, text_part, vocab):
            if isinstance(tid, tuple):  # an embedding's (first row, count): its vectors stay in one chunk
                start, n = tid
                if ids and len(ids) + n > CHUNK:
                    close()
                for r in range(n):
                    if len(ids) == CHUNK:
                        close()
                    ids.append(PLACEHOLDER + start + r)
                    ws.append(weight)
                continue
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


def _token_stream(tokenizer, text: str, vocab: Optional[EmbeddingVocab]):
    """Token ids of ``text``, with ``(start, n)`` in place of an embedding's name."""
    if vocab is None:
        yield from tokenize(tokenizer, text)
        return
    for piece, emb in vocab.split(text):
        if emb is not None:
            yield emb
        elif piece:
            yield from tokenize(tokenizer, piece)


def _chunk_tensors(chunk: tuple, pad_id: int) -> tuple:
    ids, ws = chunk
    n = len(ids)
    full_ids = [BOS_ID, *ids, EOS_ID] + [pad_id] * (CHUNK - n)
    full_ws = [1.0, *ws, 1.0] + [1.0] * (CHUNK - n)
    return full_ids, full_ws


def tokenize_batch(tokenizer, prompts: Sequence[str], emphasis: bool = True,
                   vocab: Optional[EmbeddingVocab] = None) -> tuple:
    """``(ids [B, k, 77] long, weights [B, k, 77] float)`` with all prompts padded to k chunks."""
    pad_id = int(tokenizer.pad_token_id)
    per_prompt = [chunk_prompt(tokenizer, p, emphasis, vocab) for p in prompts]
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
                final_norm: bool, want_pooled: bool, vocab: Optional[EmbeddingVocab] = None,
                encoder: int = 0, n_encoders: int = 1) -> tuple:
    """ids/ws [B, k, 77] -> (hidden [B, 77k, dim], pooled [B, proj] | None)."""
    param = next(te.parameters())
    B, k, L = ids.shape
    layer = _layer_index(family, te, clip_skip)
    core = _text_core(te)
    flat = ids.reshape(B * k, L).to(param.device)
    slots = flat >= PLACEHOLDER
    if vocab is None or not bool(slots.any()):
        out = te(input_ids=flat, output_hidden_states=True)
    else:
        # Textual inversion: the token embedding's output at the placeholder positions becomes the
        # embedding's vectors (detached: frozen); the vocabulary itself is left as it is.
        token_embedding = core.embeddings.token_embedding
        rows = flat[slots] - PLACEHOLDER
        table = vocab.table(encoder, n_encoders, token_embedding.embedding_dim, set(rows.tolist()))
        vectors = table.to(param.device)[rows]

        def inject(_module, _inputs, output):
            output = output.clone()
            output[slots] = vectors.to(output.dtype)
            return output

        handle = token_embedding.register_forward_hook(inject)
        try:
            out = te(input_ids=torch.where(slots, torch.zeros_like(flat), flat), output_hidden_states=True)
        finally:
            handle.remove()
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


def effective_clip_skip(components, clip_skip: int) -> int:
    """The CLIP skip prompts are encoded with: ``clip_skip`` 1 (the default) follows the host (the Web-UI's
    CLIP skip option), more overrides it."""
    return int(getattr(components, "host_clip_skip", None) or 1) if clip_skip == 1 else clip_skip


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
    clip_skip = effective_clip_skip(components, clip_skip)
    vocab = _vocab(components)
    family = components.info.family
    if family is Family.SDXL:
        tensors = [tokenize_batch(tok, prompts, emphasis, vocab) for tok in components.tokenizers]
        k = max(t[0].shape[1] for t in tensors)
        if any(t[0].shape[1] != k for t in tensors):  # pad ids differ, chunking does not; guard anyway
            raise RuntimeError("SDXL tokenizers produced different chunk counts")
        h1, _ = _encode_one(components.text_encoders[0], family, *tensors[0], clip_skip, False, False, vocab, 0, 2)
        h2, pooled = _encode_one(components.text_encoders[1], family, *tensors[1], clip_skip, False, True, vocab, 1, 2)
        return Conditioning(torch.cat([h1, h2.to(h1.dtype)], dim=-1), pooled)
    ids, ws = tokenize_batch(components.tokenizers[0], prompts, emphasis, vocab)
    hidden, _ = _encode_one(components.text_encoders[0], family, ids, ws, clip_skip, True, False, vocab)
    return Conditioning(hidden, None)
