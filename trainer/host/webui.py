"""Inside the Stable Diffusion Web-UI (AUTOMATIC1111 1.10, Forge): the only module that imports ``modules.*``.

:class:`WebUIHost` gives the queue what it needs from the Web-UI:

- the model and VAE lists (``sd_models.checkpoint_tiles()``, ``sd_vae.vae_dict``);
- the model weights: when the job uses the checkpoint that is loaded (the default), its weights are
  taken from ``shared.sd_model.state_dict()`` (no second read of the file) and converted with
  ``trainer.models.convert.ldm_to_diffusers``; another checkpoint is read from its file;
- memory: the Web-UI's model is moved off the GPU for the training (``sd_models.send_model_to_cpu``)
  and put back afterwards (``sd_models.send_model_to_device``), also after an error or a stop;
  training holds ``call_queue.queue_lock`` so no generation runs meanwhile;
- progress in ``shared.state`` (job, job_count, sampling_step/steps, textinfo) and its Interrupt
  (``shared.state.interrupted``) stopping the training at the next step;
- LoRAs saved to ``shared.cmd_opts.lora_dir`` (the Web-UI's Lora folder);
- prompts encoded as the Web-UI encodes them: its CLIP skip option (``opts.CLIP_stop_at_last_layers``,
  SD1 models, followed while our ``clip_skip`` is 1) and its loaded textual-inversion embeddings
  (``sd_hijack.model_hijack.embedding_db.word_embeddings``), both read when a job starts.

Forge keeps no LDM-layout model (``forge_objects``; a ``FakeInitialModel`` before the first generation):
there the checkpoint chosen in the header (``sd_models.select_checkpoint``) is read from its file, Forge's
models are unloaded (``unload_model_weights``) and Forge reloads them by itself on the next generation.
"""
from __future__ import annotations

import contextlib
import gc
import os
from pathlib import Path
from typing import Any, Iterator

from ..engine import OutputPaths

ROOT = Path(__file__).resolve().parent.parent.parent
LOADED_LABEL = "(the loaded model)"


def _modules():
    from modules import call_queue, sd_models, sd_vae, shared  # noqa: F401  (the Web-UI)

    return shared, sd_models, sd_vae, call_queue


def normalize_webui_state_dict(sd: dict) -> dict:
    """The Web-UI's live model state dict -> the checkpoint-file layout.

    A1111 wraps the text encoder (``cond_stage_model.wrapped.…``, SDXL ``conditioner.embedders.N.wrapped.…``)
    and its token embedding (``…token_embedding.wrapped.weight``) in hijack modules; their keys gain
    ``wrapped.`` segments, which a checkpoint file does not have."""
    out = {}
    for k, v in sd.items():
        while ".wrapped." in k:
            k = k.replace(".wrapped.", ".", 1)
        out[k] = v
    return out


def _file_configs(path: str):
    """Architecture configs stored in a checkpoint's safetensors metadata (non-standard sizes, e.g. the
    tiny model); None for ordinary checkpoints."""
    if not str(path).lower().endswith(".safetensors"):
        return None
    from ..models import loading

    try:
        return loading._configs_from_metadata(loading.read_safetensors_metadata(path), Path(path))
    except (OSError, ValueError):
        return None


def webui_embeddings():
    """The Web-UI's loaded textual-inversion embeddings as trainer.models.embeddings.Embeddings (their
    ``vec``: [N, dim], or SDXL {clip_l, clip_g}); empty where the Web-UI keeps none (Forge builds may not)."""
    from ..models.embeddings import Embeddings

    out = Embeddings()
    try:
        from modules import sd_hijack
    except ImportError:
        return out
    db = getattr(getattr(sd_hijack, "model_hijack", None), "embedding_db", None)
    for name, emb in dict(getattr(db, "word_embeddings", None) or {}).items():
        vec = getattr(emb, "vec", None)
        if vec is None:
            continue
        out.vectors[name] = ({k: v.detach().to("cpu", copy=True).float() for k, v in vec.items()}
                             if isinstance(vec, dict) else vec.detach().to("cpu", copy=True).float())
        out.source[name] = str(getattr(emb, "filename", name))
    return out


def webui_conditioning(components, control=None):
    """Give our prompt encoding the Web-UI's CLIP skip and embeddings (as its own generation uses them)."""
    from ..models.embeddings import attach

    shared, _, _, _ = _modules()
    try:
        skip = int(getattr(shared.opts, "CLIP_stop_at_last_layers", 1) or 1)
    except (TypeError, ValueError):
        skip = 1
    from ..models.families import Family

    if components.info.family is not Family.SD1:
        skip = 1  # A1111's SD2 / SDXL text stacks use a fixed layer whatever the option says
    embeddings = webui_embeddings()
    if control is not None and (skip > 1 or embeddings.vectors):
        control.log(f"Web-UI conditioning: CLIP skip {skip} (our clip_skip above 1 overrides it), "
                    f"{len(embeddings.vectors)} textual-inversion embedding(s)")
    return attach(components, embeddings, skip)


def _has_networks_applied(model) -> bool:
    """A1111's Lora extension merges a prompt's LoRA into the weights (keeping a backup) until the next
    generation without it: then the live weights are not the checkpoint's."""
    return any(getattr(m, "network_current_names", ()) for m in model.modules())


class WebUIHost:
    name = "webui"

    def __init__(self, ext_root: Path | str = ROOT, *, device=None):
        shared, _, _, _ = _modules()
        self.workdir = Path(ext_root).resolve()
        lora_dir = getattr(shared.cmd_opts, "lora_dir", None)
        if not lora_dir:
            from modules import paths

            lora_dir = os.path.join(paths.models_path, "Lora")
        self._paths = OutputPaths(Path(lora_dir), self.workdir / "logs", self.workdir / "jsons", self.workdir / "cache")
        self.device = device
        # the settings' help in Japanese when the Web-UI's localization is Japanese
        self.lang = "ja" if str(getattr(shared.opts, "localization", "")).lower().startswith("ja") else "en"

    # --- lists ------------------------------------------------------------------------------
    def paths(self) -> OutputPaths:
        return self._paths

    def refresh(self) -> None:
        _, sd_models, sd_vae, _ = _modules()
        sd_models.list_models()
        sd_vae.refresh_vae_list()

    def model_choices(self) -> list[str]:
        _, sd_models, _, _ = _modules()
        return [LOADED_LABEL] + list(sd_models.checkpoint_tiles())

    def vae_choices(self) -> list[str]:
        _, _, sd_vae, _ = _modules()
        return ["None"] + list(sd_vae.vae_dict)

    def default_model(self) -> str:
        return LOADED_LABEL

    def model_value(self, label: str | None) -> str:
        return "" if not label or label == LOADED_LABEL else label

    def model_label(self, value: str | None) -> str:
        return LOADED_LABEL if not value else value

    def model_family(self, label: str | None):
        """The family of a Model-list entry for the tab's block list, without loading anything: the file's
        header (as standalone), else, for the loaded model, the Web-UI's own is_sdxl / is_sd2 flags; None when
        neither tells (the block list then stays SD1.5's, which the engine maps onto the model's blocks)."""
        from ..models.families import Family
        from ..models.loading import peek_family

        model = self._loaded_model() if self.model_value(label) == "" else None
        if model is not None:
            info = getattr(model, "sd_checkpoint_info", None)
        else:
            _, sd_models, _, _ = _modules()
            info = sd_models.get_closet_checkpoint_match(label) if label and label != LOADED_LABEL else None
        family = peek_family(info.filename) if getattr(info, "filename", None) else None
        if family is None and model is not None:
            for flag, fam in (("is_sdxl", Family.SDXL), ("is_sd2", Family.SD2), ("is_sd1", Family.SD1)):
                if getattr(model, flag, False) is True:
                    return fam
        return family

    # --- the model ----------------------------------------------------------------------------
    @staticmethod
    def _loaded_model():
        """shared.sd_model without triggering a load (A1111 loads on first access when none is loaded)."""
        shared, sd_models, _, _ = _modules()
        data = getattr(sd_models, "model_data", None)
        if data is not None and hasattr(data, "sd_model"):
            return data.sd_model
        return getattr(shared, "sd_model", None)

    def _checkpoint(self, name: str):
        _, sd_models, _, _ = _modules()
        info = sd_models.get_closet_checkpoint_match(name)
        if info is None:
            from ..host.standalone import HostError

            raise HostError(f"model: {name!r} is not in the Web-UI's checkpoint list (press Refresh next to it to reread the folder)")
        return info

    def _vae_path(self, name: str) -> str | None:
        if not name or name == "None":
            return None
        _, _, sd_vae, _ = _modules()
        path = sd_vae.vae_dict.get(name)
        if path is None:
            from ..host.standalone import HostError

            raise HostError(f"vae: {name!r} is not in the Web-UI's VAE list")
        return path

    @contextlib.contextmanager
    def session(self, cfg, control) -> Iterator[Any]:
        """Hold the Web-UI for one job: lock, progress, free its model, yield our components, restore."""
        shared, sd_models, _, call_queue = _modules()
        with call_queue.queue_lock:
            shared.state.begin(job="TrainTrain")
            shared.state.job_count = 1
            # begin() keeps the last generation's sampling_steps: show this job's steps from the start
            shared.state.sampling_step = 0
            try:
                shared.state.sampling_steps = int(cfg.train_iterations)
            except (AttributeError, TypeError, ValueError):
                shared.state.sampling_steps = 0
            shared.state.textinfo = f"TrainTrain: preparing {cfg.save_lora_name}"
            model = self._loaded_model()
            moved: list = []  # set as soon as the model is moved, so an error after that still restores it
            try:
                components = self._components(cfg, model, control, moved)
                webui_conditioning(components, control)
                yield components
            finally:
                components = None
                gc.collect()
                try:
                    import torch

                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                finally:
                    try:
                        if moved:
                            self._restore(model)
                    finally:
                        shared.state.textinfo = ""
                        shared.state.end()

    def _components(self, cfg, model, control, moved: list):
        """-> Components; appends to ``moved`` when the Web-UI's model was moved off the device."""
        import torch

        from ..models.convert import ldm_to_diffusers
        from ..models.families import ModelInfo, detect
        from ..models.loading import components_from_state_dicts, load_components, load_vae_file
        from ..models.configs import configs_for

        _, sd_models, _, _ = _modules()
        vae_path = self._vae_path(cfg.vae)
        v_pred = cfg.model_v_pred or None
        is_forge = hasattr(sd_models, "forge_model_reload") or hasattr(model, "forge_objects")
        # A1111's LatentDiffusion; Forge keeps its own model classes (and a FakeInitialModel before the first load)
        live = model if isinstance(model, torch.nn.Module) and not is_forge else None
        loaded_info = getattr(model, "sd_checkpoint_info", None) if model is not None else None
        if cfg.model:
            wanted = self._checkpoint(cfg.model)
        else:
            wanted = loaded_info
            if wanted is None and hasattr(sd_models, "select_checkpoint"):
                try:
                    wanted = sd_models.select_checkpoint()  # the checkpoint chosen in the Web-UI's header
                except FileNotFoundError:
                    wanted = None
        if wanted is None:
            from ..host.standalone import HostError

            raise HostError("model: no checkpoint is loaded in the Web-UI; choose one in the Model list")
        same = (live is not None and loaded_info is not None
                and os.path.abspath(wanted.filename) == os.path.abspath(loaded_info.filename))
        if is_forge:
            sd_models.unload_model_weights()  # Forge frees its models; it reloads by itself on the next generation
        elif live is not None:
            moved.append(live)
            sd_models.send_model_to_cpu(live)  # A1111: frees the GPU; the weights stay in RAM
        if same and _has_networks_applied(live):
            control.log("A LoRA from a prompt is merged into the Web-UI's model: reading the checkpoint file "
                        "for clean weights")
            same = False
        if same:
            sd = normalize_webui_state_dict(live.state_dict())
            sd = {k: v.detach().to("cpu") for k, v in sd.items()}
            if v_pred is None:
                v_pred = getattr(live, "parameterization", "eps") == "v"
            configs = _file_configs(wanted.filename)
            if configs is not None:  # non-standard sizes (the tiny model): the file says what it is
                info = ModelInfo(configs.family, bool(v_pred))
            else:
                info = detect(sd, v_pred, where=wanted.filename)
                configs = configs_for(info.family)
            converted = ldm_to_diffusers(sd, info, configs, where=wanted.filename)
            del sd
            name = Path(wanted.filename).stem
            comps = components_from_state_dicts(converted, info, configs, torch.float32, name, wanted.filename)
            del converted
            if vae_path:
                load_vae_file(vae_path, comps.vae, comps.configs.vae, torch.float32)
            return comps
        return load_components(wanted.filename, vae_path, v_pred=v_pred)

    @staticmethod
    def _restore(model) -> None:
        """Put the Web-UI's model back where it was used (A1111: send_model_to_device)."""
        _, sd_models, _, _ = _modules()
        if hasattr(sd_models, "send_model_to_device"):
            sd_models.send_model_to_device(model)
        else:
            sd_models.reload_model_weights()

    # --- console --------------------------------------------------------------------------------
    @staticmethod
    def console(message: str) -> None:
        """The queue's console lines (job started / finished, a failed job's traceback) go to the Web-UI's
        console. A1111 sets up no logging unless ``--loglevel`` is given, so ``logging.info`` is dropped there
        (a real A1111 1.10.1 showed "look up to see its traceback" in the tab and no traceback anywhere)."""
        print(message, flush=True)

    # --- progress and interrupt -----------------------------------------------------------------
    def on_progress(self, p) -> None:
        shared, _, _, _ = _modules()
        state = shared.state
        if p.phase == "train":
            state.sampling_steps = p.total
            state.sampling_step = p.step
            loss = f" loss {p.loss:.4f}" if p.loss is not None else ""
            sampling = f" (sampling {getattr(p, 'sample_s', 0):.0f} s)" if getattr(p, "sample_s", 0) else ""
            state.textinfo = f"TrainTrain: step {p.step}/{p.total}{loss}{sampling}"
        elif p.phase == "sample":
            state.textinfo = f"TrainTrain: sample grid {p.message}"
        elif p.message:
            state.textinfo = f"TrainTrain: {p.message}"

    def interrupted(self) -> bool:
        shared, _, _, _ = _modules()
        return bool(getattr(shared.state, "interrupted", False))
