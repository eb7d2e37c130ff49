"""Outside the Web-UI: models are files or diffusers folders, outputs go under a work folder."""
from __future__ import annotations

from pathlib import Path

MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft")


class HostError(ValueError):
    pass


def resolve_model_path(name: str | None, model_dir: Path | None, setting: str = "model") -> Path | None:
    """An absolute or relative path, or a name under model_dir. Empty means the tiny default."""
    if not name:
        return None
    for candidate in [Path(name).expanduser()] + ([Path(model_dir) / name] if model_dir else []):
        if candidate.exists():
            return candidate
    where = f" or in {model_dir}" if model_dir else ""
    raise HostError(f"{setting}: {name!r} was not found (looked at {Path(name).resolve()}{where})")


def list_models(model_dir: Path | None) -> list[str]:
    """Checkpoint files and diffusers folders under model_dir, as names relative to it."""
    if not model_dir or not Path(model_dir).is_dir():
        return []
    root = Path(model_dir)
    found = [p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in MODEL_EXTENSIONS
             and p.parent.name not in ("unet", "vae", "text_encoder", "text_encoder_2")]
    found += [p.parent for p in root.rglob("model_index.json")]
    return sorted(str(p.relative_to(root)) for p in found)


def load_components(model: str | None, vae: str | None = None, *, model_dir: Path | None = None,
                    vae_dir: Path | None = None, v_pred: bool | None = None):
    from ..models.loading import load_components as load

    path = resolve_model_path(model, model_dir, "model")
    vae_path = resolve_model_path(vae if vae not in (None, "", "None") else None, vae_dir or model_dir, "vae")
    return load(path, vae_path=vae_path, v_pred=v_pred)
