"""Textual-inversion embeddings: reading them (standalone) and their vectors per text encoder.

An embedding is ``name -> vectors``: a tensor ``[N, dim]`` (SD1 / SD2) or, for SDXL, a dict with
``clip_l`` [N, 768] and ``clip_g`` [N, 1280] (the Web-UI's ``Embedding.vec`` and kohya's SDXL files
look the same). Prompt encoding (trainer.models.prompts) puts the N vectors in place of the name.

Files are read from ``.safetensors`` only: A1111's format (``emb_params``) and kohya's SDXL format
(``clip_l`` / ``clip_g``). Pickled files (.pt, .bin, .ckpt) are never loaded (unpickling can run code):
they are listed as refused, and a prompt that names one gets that message.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import torch

PICKLE_EXTENSIONS = (".pt", ".bin", ".ckpt", ".pth")
SDXL_KEYS = ("clip_l", "clip_g")


@dataclass
class Embeddings:
    """``vectors``: name -> tensor or {clip_l, clip_g}; ``refused``: name -> why it was not loaded."""

    vectors: dict = field(default_factory=dict)
    refused: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)  # name -> where it came from, for messages

    def __bool__(self) -> bool:
        return bool(self.vectors or self.refused)


def load_embeddings_dir(folder: Union[str, Path, None]) -> Embeddings:
    """Every embedding file under ``folder`` (recursively), named by its file stem."""
    out = Embeddings()
    if not folder:
        return out
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"embeddings_dir: {str(folder)!r} is not a folder")
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        ext = path.suffix.lower()
        if ext in PICKLE_EXTENSIONS:
            out.refused[path.stem] = (f"embedding {path.stem!r}: {path} is a pickle ({ext}); only .safetensors "
                                      "embeddings are read (unpickling can run code): convert it to .safetensors")
        elif ext == ".safetensors":
            out.vectors[path.stem] = read_embedding_file(path)
            out.source[path.stem] = str(path)
    return out


def read_embedding_file(path: Union[str, Path]):
    from safetensors.torch import load_file

    sd = load_file(str(path), device="cpu")
    if "emb_params" in sd:
        return sd["emb_params"].float()
    if all(k in sd for k in SDXL_KEYS):
        return {k: sd[k].float() for k in SDXL_KEYS}
    raise ValueError(f"embedding file {path}: neither 'emb_params' (A1111) nor 'clip_l' + 'clip_g' (SDXL) "
                     f"in its keys {sorted(sd)[:6]}")


def vectors_for(vec, encoder: int, n_encoders: int, dim: int, name: str) -> torch.Tensor:
    """The [N, dim] vectors of one embedding for text encoder ``encoder`` (0-based) of ``n_encoders``."""
    if isinstance(vec, dict):
        key = SDXL_KEYS[encoder] if n_encoders == 2 else None
        t = vec.get(key) if key else None
    else:
        t = vec if n_encoders == 1 else None
    if t is not None and t.dim() == 1:
        t = t.unsqueeze(0)
    if t is None or t.dim() != 2 or t.shape[-1] != dim:
        shape = {k: tuple(v.shape) for k, v in vec.items()} if isinstance(vec, dict) else tuple(vec.shape)
        raise ValueError(f"embedding {name!r} has vectors {shape}; this model's text encoder {encoder + 1} needs "
                         f"width {dim} (the embedding was made for another model family)")
    return t.detach()


def attach(components, embeddings: Embeddings | None = None, host_clip_skip: int | None = None):
    """Give ``components`` the host's embeddings and CLIP skip (read by encode_prompts)."""
    if embeddings is not None:
        components.embeddings = embeddings
    if host_clip_skip is not None:
        components.host_clip_skip = int(host_clip_skip)
    return components


def attach_dir(components, folder, log=None):
    """Standalone: the embeddings of ``folder`` (none when it is empty), pickles named in one ``log`` line."""
    if not folder:
        return components
    embeddings = load_embeddings_dir(folder)
    if embeddings.refused and log is not None:
        log(f"embeddings_dir: not read (pickles; only .safetensors are): {', '.join(sorted(embeddings.refused))}")
    return attach(components, embeddings)
