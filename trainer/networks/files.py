"""Saving and loading network files: safetensors + kohya ``ss_*`` / ``modelspec.*`` metadata.

Writes are atomic (temp file in the same folder, fsync, rename); an existing file is
never replaced unless ``overwrite=True``; a failed write leaves the previous file
intact and no temp file behind.
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import json
import os
import random
import tempfile  # noqa: F401  (tests reach mkstemp as files.tempfile.mkstemp; temp_file uses it)
import time
from typing import Mapping, Optional, Tuple, Union

import torch

from ..atomic import temp_file

__all__ = [
    "save_network", "load_network_file", "build_metadata", "addnet_hashes",
    "FAMILIES", "NetworkFileExists",
]


class NetworkFileExists(FileExistsError):
    pass


# family -> (ss_base_model_version, ss_v2, modelspec architecture, implementation, prediction type)
_SAI_IMPL = "https://github.com/Stability-AI/generative-models"
FAMILIES = {
    "sd1": ("sd_v1", False, "stable-diffusion-v1", "diffusers", "epsilon"),
    "sd2": ("sd_v2", True, "stable-diffusion-v2-512", "diffusers", "epsilon"),
    "sd2-v": ("sd_v2_v", True, "stable-diffusion-v2-768-v", "diffusers", "v"),
    "sdxl": ("sdxl_base_v1-0", False, "stable-diffusion-xl-v1-base", _SAI_IMPL, "epsilon"),
}
_FAMILY_ALIASES = {
    "sd1": "sd1", "sd15": "sd1", "sd_v1": "sd1", "sd1.5": "sd1", "v1": "sd1",
    "sd2": "sd2", "sd_v2": "sd2", "sd21": "sd2", "sd2-512": "sd2",
    "sd2-v": "sd2-v", "sd2v": "sd2-v", "sd_v2_v": "sd2-v", "sd2-768-v": "sd2-v",
    "sdxl": "sdxl", "sdxl_base_v1-0": "sdxl", "xl": "sdxl",
}

NETWORK_MODULE = {"lierla": "networks.lora", "c3lier": "networks.lora", "loha": "lycoris.kohya"}


def _family(family: str) -> str:
    f = _FAMILY_ALIASES.get(str(family).strip().lower().replace(" ", ""))
    if f is None:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
    return f


def _num(v) -> str:
    return str(v)


def build_metadata(
    *,
    family: str,
    algo: str,
    rank: int,
    alpha: Optional[float],
    conv_rank: int = 0,
    conv_alpha: Optional[float] = 0,
    output_name: str,
    training_started_at: float,
    training_finished_at: Optional[float] = None,
    session_id: Optional[int] = None,
    learning_rate: float,
    unet_lr: Optional[float] = None,
    text_encoder_lr: Optional[float] = None,
    max_train_steps: int,
    steps: Optional[int] = None,
    lr_warmup_steps: int = 0,
    lr_scheduler: str = "constant",
    mixed_precision: str = "fp16",
    seed: Optional[int] = None,
    optimizer: str = "",
    min_snr_gamma: Optional[float] = None,
    clip_skip: Optional[int] = None,
    num_train_images: int = 0,
    tag_frequency: Optional[Mapping[str, Mapping[str, int]]] = None,
    resolution: Union[int, Tuple[int, int]] = 512,
    mode: str = "LoRA",
    prompts: Optional[Mapping[str, str]] = None,
    comment: Optional[str] = None,
    sd_model_name: Optional[str] = None,
    title: Optional[str] = None,
    trigger_phrase: Optional[str] = None,
    extra: Optional[Mapping[str, object]] = None,
) -> dict:
    """kohya ``ss_*`` and SAI ``modelspec.*`` metadata, every value a string.

    ``family``: sd1 | sd2 | sd2-v | sdxl.  ``algo``: lierla | c3lier | loha.
    ``training_started_at`` is the real start time (epoch seconds);
    ``training_finished_at`` defaults to now.  ``unet_lr``/``text_encoder_lr`` default
    to ``learning_rate``.  Keys whose value would be None are left out.
    ``sshs_*`` hashes are added by :func:`save_network`, which sees the tensors.
    """
    fam = _family(family)
    base_version, v2, arch, impl, pred = FAMILIES[fam]
    algo = str(algo).lower()
    if algo not in NETWORK_MODULE:
        raise ValueError(f"unknown network algorithm {algo!r}")
    finished = time.time() if training_finished_at is None else float(training_finished_at)
    if isinstance(resolution, (int, float)):
        w = h = int(resolution)
    else:
        w, h = (int(resolution[0]), int(resolution[1]))

    alpha_f = float(alpha) if alpha else float(rank)
    conv_rank = int(conv_rank or 0) or int(rank)
    conv_alpha_f = float(conv_alpha) if conv_alpha else alpha_f
    if algo == "c3lier":
        net_args = {"conv_dim": str(conv_rank), "conv_alpha": _num(conv_alpha_f)}
    elif algo == "loha":
        net_args = {"algo": "loha", "conv_dim": str(conv_rank), "conv_alpha": _num(conv_alpha_f),
                    "use_tucker": "False"}
    else:
        net_args = None

    parts = [f"TrainTrain mode: {mode}"]
    for k, v in (prompts or {}).items():
        if v is not None and str(v) != "":
            parts.append(f"{k}: {v}")
    if comment:
        parts.append(str(comment))
    training_comment = "; ".join(parts)

    md = {
        "ss_session_id": session_id if session_id is not None else random.randint(0, 2**32 - 1),
        "ss_training_started_at": float(training_started_at),
        "ss_training_finished_at": finished,
        "ss_output_name": output_name,
        "ss_learning_rate": learning_rate,
        "ss_unet_lr": unet_lr if unet_lr is not None else learning_rate,
        "ss_text_encoder_lr": text_encoder_lr if text_encoder_lr is not None else learning_rate,
        "ss_max_train_steps": int(max_train_steps),
        "ss_steps": int(steps) if steps is not None else int(max_train_steps),
        "ss_lr_warmup_steps": int(lr_warmup_steps),
        "ss_lr_scheduler": lr_scheduler,
        "ss_network_module": NETWORK_MODULE[algo],
        "ss_network_dim": int(rank),
        "ss_network_alpha": alpha_f,
        "ss_network_args": json.dumps(net_args) if net_args is not None else None,
        "ss_mixed_precision": mixed_precision,
        "ss_v2": bool(v2),
        "ss_base_model_version": base_version,
        "ss_seed": seed,
        "ss_optimizer": optimizer or None,
        "ss_min_snr_gamma": min_snr_gamma,
        "ss_clip_skip": clip_skip,
        "ss_num_train_images": int(num_train_images),
        "ss_tag_frequency": json.dumps(_tag_frequency(tag_frequency), ensure_ascii=False)
        if tag_frequency is not None else None,
        "ss_resolution": f"({w}, {h})",
        "ss_training_comment": training_comment,
        "ss_sd_model_name": sd_model_name,
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{arch}/lora",
        "modelspec.implementation": impl,
        "modelspec.title": title or output_name,
        "modelspec.date": datetime.datetime.fromtimestamp(int(finished)).isoformat(),
        "modelspec.resolution": f"{w}x{h}",
        "modelspec.prediction_type": pred,
        "modelspec.trigger_phrase": trigger_phrase or None,
    }
    if extra:
        md.update(extra)
    return stringify_metadata(md)


def _tag_frequency(tf: Mapping) -> dict:
    return {str(d): {str(t): int(n) for t, n in tags.items()} for d, tags in tf.items()}


def stringify_metadata(md: Mapping[str, object]) -> dict:
    """safetensors metadata is str → str: drop None, JSON-encode dicts/lists, str() the rest."""
    out = {}
    for k, v in md.items():
        if v is None:
            continue
        if isinstance(v, str):
            out[str(k)] = v
        elif isinstance(v, (dict, list, tuple)):
            out[str(k)] = json.dumps(v, ensure_ascii=False)
        else:
            out[str(k)] = str(v)
    return out


# -- hashes ---------------------------------------------------------------------------------

def addnet_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> Tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as kohya computes them: the file re-serialised
    with only the ``ss_*`` metadata; model hash = sha256 of everything after the header,
    legacy hash = first 8 hex of sha256 of the 64 KiB at offset 1 MiB."""
    from safetensors.torch import save as st_save

    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = st_save(dict(tensors), ss_only)
    n = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + n:]).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000:0x100000 + 0x10000]).hexdigest()[:8]
    return model_hash, legacy_hash


# -- save / load ------------------------------------------------------------------------------

def _write_all(fh, data: bytes) -> None:
    """Write and flush to disk (tests replace this to simulate a full disk)."""
    fh.write(data)
    fh.flush()
    os.fsync(fh.fileno())


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_network(
    path: Union[str, os.PathLike],
    tensors: Mapping[str, torch.Tensor],
    metadata: Optional[Mapping[str, object]] = None,
    *,
    overwrite: bool = False,
    hashes: bool = True,
) -> str:
    """Write a safetensors network file atomically; returns the path written.

    Refuses to replace an existing file unless ``overwrite``.  With ``hashes`` (default)
    ``sshs_model_hash``/``sshs_legacy_hash`` are added like kohya does.  On any failure the
    previous file (if any) is untouched and the temp file is removed."""
    from safetensors.torch import save as st_save

    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise ValueError(f"network files are saved as .safetensors, got {path!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.exists(path) and not overwrite:
        raise NetworkFileExists(
            errno.EEXIST, f"{path} already exists; turn on save_overwrite or choose another name", path
        )
    md = stringify_metadata(metadata or {})
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    if hashes:
        md["sshs_model_hash"], md["sshs_legacy_hash"] = addnet_hashes(tensors, md)
    data = st_save(tensors, md)

    os.makedirs(folder, exist_ok=True)
    fd, tmp = temp_file(path)  # the permissions a plain open() gives (umask), not mkstemp's 0600
    try:
        with os.fdopen(fd, "wb") as fh:
            _write_all(fh, data)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)      # atomic and never clobbers a file that appeared meanwhile
            except FileExistsError:
                raise NetworkFileExists(
                    errno.EEXIST, f"{path} already exists; turn on save_overwrite or choose another name", path
                )
            except OSError:             # filesystems without hard links
                if os.path.exists(path):
                    raise NetworkFileExists(errno.EEXIST, f"{path} already exists", path)
                os.replace(tmp, path)
            else:
                os.unlink(tmp)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(folder)
    return path


def load_network_file(path: Union[str, os.PathLike]) -> Tuple[dict, dict]:
    """(tensors, metadata) of a network file; ``.safetensors`` normally, ``.pt``/``.ckpt``
    read with ``torch.load(weights_only=True)`` (no metadata)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"network file not found: {path}")
    if path.lower().endswith(".safetensors"):
        from safetensors import safe_open

        tensors = {}
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
        return tensors, metadata
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: not a flat tensor dictionary")
    return dict(sd), {}
