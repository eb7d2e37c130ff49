"""Offline CLIP tokenizer.

The BPE merges come from the data file that open-clip-torch ships
(``open_clip/bpe_simple_vocab_16e6.txt.gz``); the package is located on disk and
never imported (importing it pulls torchvision). From that file we build
``vocab.json`` and ``merges.txt`` exactly as OpenAI's CLIP tokenizer does, write
them once into a cache folder, and load them with
``transformers.CLIPTokenizer.from_pretrained(folder)``.

Text is cleaned as CLIP cleans it (ftfy, html.unescape twice, whitespace folding,
lower case) by :func:`clean_text`; :func:`tokenize` does cleaning + tokenizing
without special tokens.
"""
from __future__ import annotations

import gzip
import hashlib
import html
import importlib.util
import json
import os
import re
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

from ..atomic import atomic_write_text
from .errors import ModelError

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
BOS_ID = 49406
EOS_ID = 49407
VOCAB_SIZE = 49408
MAX_LENGTH = 77
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


def find_bpe_file() -> Path:
    """Locate open_clip's BPE data file without importing open_clip."""
    candidates: list[Path] = []
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / BPE_FILE for p in spec.submodule_search_locations]
    for entry in sys.path:
        if entry:
            candidates.append(Path(entry) / "open_clip" / BPE_FILE)
    for c in candidates:
        if c.is_file():
            return c
    raise ModelError(
        f"CLIP tokenizer data {BPE_FILE!r} not found: install open-clip-torch "
        "(pip install --no-deps open-clip-torch); it is read as data only."
    )


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2 reversible byte -> printable unicode character table."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_vocab_and_merges(bpe_path: Path) -> tuple[dict[str, int], list[str]]:
    """Vocabulary and merge list exactly as OpenAI CLIP's SimpleTokenizer builds them."""
    lines = gzip.open(bpe_path, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    pairs = [tuple(m.split()) for m in merges]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(p) for p in pairs] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ModelError(f"{bpe_path}: expected {VOCAB_SIZE} tokens, built {len(vocab)}")
    return vocab, [" ".join(p) for p in pairs]


def _cache_root() -> Path:
    base = os.environ.get("TRAINTRAIN_CACHE") or os.environ.get("XDG_CACHE_HOME")
    root = Path(base) if base else Path.home() / ".cache"
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / ".traintrain_probe"
        probe.touch()
        probe.unlink()
    except OSError:
        root = Path(tempfile.gettempdir())
    return root / "traintrain" / "clip_tokenizer"


@lru_cache(maxsize=None)
def tokenizer_folder() -> Path:
    """Folder holding vocab.json + merges.txt built from the BPE file (created once)."""
    bpe = find_bpe_file()
    digest = hashlib.sha256(bpe.read_bytes()).hexdigest()[:16]
    folder = _cache_root() / digest
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    if vocab_file.is_file() and merges_file.is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab_and_merges(bpe)
    atomic_write_text(merges_file, "#version: 0.2\n" + "\n".join(merges) + "\n")
    atomic_write_text(vocab_file, json.dumps(vocab, ensure_ascii=False))
    return folder


@lru_cache(maxsize=None)
def _load(pad_token: str):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(
        str(tokenizer_folder()),
        pad_token=pad_token,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=EOS,
        model_max_length=MAX_LENGTH,
        local_files_only=True,
    )


def clip_tokenizer(pad_token: str = EOS):
    """A transformers CLIPTokenizer with OpenAI CLIP's vocabulary.

    pad_token: ``"<|endoftext|>"`` for SD1 and SDXL's first encoder, ``"!"`` (id 0)
    for SD2 and SDXL's second encoder (OpenCLIP pads with zeros).
    The returned object is shared between callers: do not modify it.
    """
    tok = _load(pad_token)
    ids = tok.convert_tokens_to_ids([BOS, EOS, pad_token])
    if ids[0] != BOS_ID or ids[1] != EOS_ID:
        raise ModelError(f"CLIP tokenizer built from {tokenizer_folder()} has wrong special ids {ids}")
    return tok


_WS = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """Clean a prompt exactly as OpenAI CLIP does before BPE."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:  # pragma: no cover - ftfy is a requirement
        pass
    text = html.unescape(html.unescape(text)).strip()
    return _WS.sub(" ", text).strip().lower()


def tokenize(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` (cleaned as CLIP does) without BOS/EOS, not truncated."""
    text = clean_text(text)
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"])


def pad_id(tokenizer) -> int:
    return int(tokenizer.pad_token_id)
