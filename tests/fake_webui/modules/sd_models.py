"""modules/sd_models.py: checkpoints and the loaded model (A1111 1.10 behaviour, CPU only).

The loaded model is a torch module tree with the keys of A1111's LatentDiffusion after its hijack:
the text encoder sits under ``cond_stage_model.wrapped.`` and the token embedding under
``token_embedding.wrapped.``; the DDPM schedule buffers are there too."""
import os

import torch

from modules import shared

checkpoints_list = {}
checkpoint_aliases = {}
checkpoint_dir = None  # fake: the folder list_models() scans (A1111: models/Stable-diffusion)
events = []  # fake: ("to_cpu" | "to_device" | "load" | "reload", title)


class CheckpointInfo:
    def __init__(self, filename):
        self.filename = os.path.abspath(filename)
        self.name = os.path.basename(filename)
        self.name_for_extra = os.path.splitext(self.name)[0]
        self.model_name = self.name_for_extra
        self.hash = None
        self.sha256 = None
        self.shorthash = None
        self.title = self.name
        self.short_title = self.name_for_extra
        self.ids = [self.model_name, self.name, self.title]

    def register(self):
        checkpoints_list[self.title] = self
        for i in self.ids:
            checkpoint_aliases[i] = self


def list_models():
    checkpoints_list.clear()
    checkpoint_aliases.clear()
    if checkpoint_dir and os.path.isdir(checkpoint_dir):
        for f in sorted(os.listdir(checkpoint_dir)):
            if f.endswith((".safetensors", ".ckpt")):
                CheckpointInfo(os.path.join(checkpoint_dir, f)).register()


def checkpoint_tiles(use_short=False):
    return [x.short_title if use_short else x.title for x in checkpoints_list.values()]


def get_closet_checkpoint_match(search_string):
    if not search_string:
        return None
    info = checkpoint_aliases.get(search_string)
    if info is not None:
        return info
    found = sorted([i for i in checkpoints_list.values() if search_string in i.title], key=lambda x: len(x.title))
    return found[0] if found else None


def select_checkpoint():
    info = checkpoint_aliases.get(shared.opts.sd_model_checkpoint)
    if info is not None:
        return info
    return next(iter(checkpoints_list.values()), None)


class ModelData:
    def __init__(self):
        self.sd_model = None
        self.loaded_sd_models = []
        self.was_loaded_at_least_once = False

    def get_sd_model(self):
        if self.sd_model is None and not self.was_loaded_at_least_once:
            load_model()
        return self.sd_model

    def set_sd_model(self, v, already_loaded=False):
        self.sd_model = v
        shared.sd_model = v
        if v is not None and v not in self.loaded_sd_models:
            self.loaded_sd_models.insert(0, v)


model_data = ModelData()


def _hijacked_key(k):
    if k.startswith("cond_stage_model."):
        k = "cond_stage_model.wrapped." + k[len("cond_stage_model."):]
        k = k.replace("embeddings.token_embedding.weight", "embeddings.token_embedding.wrapped.weight")
    return k


class FakeSdModel(torch.nn.Module):
    """The parts of LatentDiffusion an extension touches: a state dict in the hijacked layout,
    sd_checkpoint_info, parameterization, the is_sd* flags, lowvram."""

    def __init__(self, info, state_dict):
        super().__init__()
        for k, v in state_dict.items():
            k = _hijacked_key(k)
            parent = self
            *path, leaf = k.split(".")
            for name in path:
                if name not in parent._modules:
                    parent.add_module(name, torch.nn.Module())
                parent = parent._modules[name]
            if v.is_floating_point():
                parent.register_parameter(leaf, torch.nn.Parameter(v.clone(), requires_grad=True))
            else:
                parent.register_buffer(leaf, v.clone())
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        self.register_buffer("betas", betas.float())
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0).float())
        self.sd_checkpoint_info = info
        self.sd_model_checkpoint = info.filename
        self.sd_model_hash = None
        self.parameterization = "eps"
        self.is_sd1, self.is_sd2, self.is_sdxl, self.is_ssd, self.is_sd3 = True, False, False, False, False
        self.lowvram = False
        self.placement = "device"  # fake: where send_model_to_cpu/device put it


def load_model(checkpoint_info=None, already_loaded_state_dict=None):
    from safetensors.torch import load_file

    info = checkpoint_info or select_checkpoint()
    if info is None:
        raise FileNotFoundError("No checkpoints found")
    model = FakeSdModel(info, already_loaded_state_dict or load_file(info.filename))
    model_data.set_sd_model(model)
    model_data.was_loaded_at_least_once = True
    shared.opts.sd_model_checkpoint = info.title
    events.append(("load", info.title))
    return model


def send_model_to_cpu(m):
    if m is not None:
        m.to("cpu")
        m.placement = "cpu"
        events.append(("to_cpu", m.sd_checkpoint_info.title))


def send_model_to_device(m):
    m.to("cpu")  # the fake's device
    m.placement = "device"
    events.append(("to_device", m.sd_checkpoint_info.title))


def unload_model_weights(sd_model=None, info=None):
    send_model_to_cpu(sd_model or shared.sd_model)
    return sd_model


def reload_model_weights(sd_model=None, info=None, forced_reload=False):
    """As in A1111 1.10: the same checkpoint is returned as it is (even when it sits on the CPU)."""
    checkpoint_info = info or select_checkpoint()
    sd_model = sd_model or model_data.sd_model
    events.append(("reload", checkpoint_info.title if checkpoint_info else None))
    if sd_model is not None and sd_model.sd_model_checkpoint == checkpoint_info.filename and not forced_reload:
        return sd_model
    return load_model(checkpoint_info)
