"""A RE-STATEMENT, written here, of how two loaders find the model module for each key of a
kohya-format LoRA file. It is not their code: CI cannot fetch the real programs, so the tests in
test_loaders.py check our files against these rules, which were written from the documented facts
(shared/reference/peers-and-formats.md §3.3 for the Web-UI's built-in Lora extension, v1.10
``extensions-builtin/Lora/networks.py``; §3.4 for ComfyUI ``comfy/lora.py``). The real programs
were run on our files in a development session (recipe and results in docs/loader-checks.md).

Both loaders work on the Web-UI's / ComfyUI's own model, which uses the LDM/SGM ("CompVis")
module names of the single-file checkpoint. The module names are therefore taken from the
checkpoint's keys (a module owns the parameters ``<module path>.<param>``).
"""
from __future__ import annotations

import re

# ------------------------------------------------------------------ the checkpoint's modules


def ldm_modules(ldm_keys, family: str) -> dict:
    """{Web-UI network_layer_mapping name: LDM key prefix} of a single-file checkpoint.

    The Web-UI names a module by its path with "." -> "_": U-Net modules under ``model.`` (so
    ``diffusion_model_input_blocks_1_1_proj_in``), text encoders relative to the wrapped embedder:
    SD1 ``transformer_text_model_…`` (HF CLIP in ``cond_stage_model``), SD2 ``model_transformer_
    resblocks_…`` (OpenCLIP), SDXL ``0_transformer_text_model_…`` and ``1_model_transformer_
    resblocks_…`` (``conditioner.embedders[i]``, prefixed with ``i_``)."""
    roots = {"sd1": {"cond_stage_model.": ""}, "sd2": {"cond_stage_model.": ""},
             "sdxl": {"conditioner.embedders.0.": "0_", "conditioner.embedders.1.": "1_"}}[family]
    out = {}
    for key in ldm_keys:
        path = key.rsplit(".", 1)[0]
        if key.startswith("model.diffusion_model."):
            out[path[len("model."):].replace(".", "_")] = path
            continue
        for root, prefix in roots.items():
            if key.startswith(root):
                out[prefix + path[len(root):].replace(".", "_")] = path
    return out


# ------------------------------------------------------------------ the Web-UI (A1111 1.10)

_RESNET_SUFFIX = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
                  "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}


def a1111_convert(key: str, is_sd2: bool) -> str:
    """The documented diffusers -> CompVis renames (§3.3 step 3); other keys come back unchanged."""
    def suffix(kind, rest):
        return _RESNET_SUFFIX.get(rest, rest) if kind == "resnets" else rest

    m = re.match(r"lora_unet_conv_in(.*)", key)
    if m:
        return f"diffusion_model_input_blocks_0_0{m[1]}"
    m = re.match(r"lora_unet_conv_out(.*)", key)
    if m:
        return f"diffusion_model_out_2{m[1]}"
    m = re.match(r"lora_unet_time_embedding_linear_(\d+)(.*)", key)
    if m:
        return f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}{m[2]}"
    m = re.match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"diffusion_model_input_blocks_{1 + 3 * i + j}_{1 if kind == 'attentions' else 0}_{suffix(kind, rest)}"
    m = re.match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", key)
    if m:
        kind, j, rest = m[1], int(m[2]), m[3]
        return f"diffusion_model_middle_block_{1 if kind == 'attentions' else 2 * j}_{suffix(kind, rest)}"
    m = re.match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"diffusion_model_output_blocks_{3 * i + j}_{1 if kind == 'attentions' else 0}_{suffix(kind, rest)}"
    m = re.match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", key)
    if m:
        return f"diffusion_model_input_blocks_{3 + 3 * int(m[1])}_0_op"
    m = re.match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", key)
    if m:
        i = int(m[1])
        return f"diffusion_model_output_blocks_{2 + 3 * i}_{2 if i > 0 else 1}_conv"

    def openclip(n, rest, prefix):
        rest = rest.replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")
        return f"{prefix}model_transformer_resblocks_{n}_{rest}"

    m = re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key)
    if m:
        return openclip(m[1], m[2], "") if is_sd2 else f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
    m = re.match(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", key)
    if m:
        return openclip(m[1], m[2], "1_")
    return key


def a1111_module(name: str, modules) -> str | None:
    """The Web-UI module a file's module name lands on (§3.3 steps 3-4), or None (unmatched)."""
    is_sd2 = any(k.startswith("model_transformer_resblocks") for k in modules)
    key = a1111_convert(name, is_sd2)
    if key in modules:
        return key
    m = re.match(r"(.*)_([qkv]_proj)$", key)  # q/k/v of OpenCLIP's fused in_proj
    if m and m[1] in modules:
        return m[1]
    if "lora_unet" in name:  # "SDXL loras seem to already have correct compvis keys"
        key = name.replace("lora_unet", "diffusion_model")
        return key if key in modules else None
    if "lora_te1_text_model" in name:
        for repl in ("0_transformer_text_model", "transformer_text_model"):
            key = name.replace("lora_te1_text_model", repl)
            if key in modules:
                return key
    return None


A1111_TENSOR_SETS = ({"lora_up.weight", "lora_down.weight"}, {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"})


# ------------------------------------------------------------------ ComfyUI


def _unet_to_diffusers_blocks(num_res_blocks, attn_levels, num_levels) -> dict:
    """ComfyUI's diffusers -> SGM module correspondence (``comfy.utils.unet_to_diffusers``), at
    module level: ResNet, attention and sampler modules of every level."""
    m = {}
    for x in range(num_levels):
        n = 1 + (num_res_blocks + 1) * x
        for i in range(num_res_blocks):
            m[f"down_blocks.{x}.resnets.{i}"] = f"input_blocks.{n}.0"
            if x in attn_levels:
                m[f"down_blocks.{x}.attentions.{i}"] = f"input_blocks.{n}.1"
            n += 1
        m[f"down_blocks.{x}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"
    m["mid_block.attentions.0"] = "middle_block.1"
    m["mid_block.resnets.0"] = "middle_block.0"
    m["mid_block.resnets.1"] = "middle_block.2"
    for x in range(num_levels):
        n = (num_res_blocks + 1) * x
        level = num_levels - 1 - x
        for i in range(num_res_blocks + 1):
            m[f"up_blocks.{x}.resnets.{i}"] = f"output_blocks.{n}.0"
            c = 1
            if level in attn_levels:
                m[f"up_blocks.{x}.attentions.{i}"] = f"output_blocks.{n}.1"
                c = 2
            if i == num_res_blocks:
                m[f"up_blocks.{x}.upsamplers.0.conv"] = f"output_blocks.{n}.{c}.conv"
            n += 1
    return m


_COMFY_RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                 "conv_shortcut": "skip_connection"}
_COMFY_CLIP = ("mlp_fc1", "mlp_fc2", "self_attn_k_proj", "self_attn_q_proj", "self_attn_v_proj", "self_attn_out_proj")


def comfy_key_map(ldm_keys, family: str, num_res_blocks: int, attn_levels, num_levels: int) -> dict:
    """{file module name: model weight key} as ComfyUI builds it (§3.4): ``lora_unet_<SGM path>`` for
    every U-Net weight, ``lora_unet_<diffusers path>`` through its diffusers table, and text-encoder
    layers ``lora_te_`` (SD1 clip_l / SD2 clip_h), ``lora_te1_`` (clip_l) and ``lora_te2_`` (clip_g)."""
    weights = [k for k in ldm_keys if k.endswith(".weight")]
    km = {}
    unet = {k[len("model.diffusion_model."):-len(".weight")] for k in weights if k.startswith("model.diffusion_model.")}
    for path in unet:
        km["lora_unet_" + path.replace(".", "_")] = "diffusion_model." + path
    for d_path, sgm in _unet_to_diffusers_blocks(num_res_blocks, set(attn_levels), num_levels).items():
        for path in unet:
            if path == sgm or path.startswith(sgm + "."):
                rest = path[len(sgm):]
                if ".resnets." in d_path:
                    for d_leaf, s_leaf in _COMFY_RESNET.items():
                        if rest == "." + s_leaf:
                            rest = "." + d_leaf
                km["lora_unet_" + (d_path + rest).replace(".", "_")] = "diffusion_model." + path
    # text encoders: ComfyUI converts OpenCLIP to HF names; its layers are those of the checkpoint
    te_layers = {"sd1": [("cond_stage_model.transformer.text_model.encoder.layers.", ["lora_te", "lora_te1"])],
                 "sd2": [("cond_stage_model.model.transformer.resblocks.", ["lora_te", "lora_te1"])],
                 "sdxl": [("conditioner.embedders.0.transformer.text_model.encoder.layers.", ["lora_te1"]),
                          ("conditioner.embedders.1.model.transformer.resblocks.", ["lora_te2"])]}[family]
    for prefix, names in te_layers:
        layers = {int(k[len(prefix):].split(".")[0]) for k in ldm_keys if k.startswith(prefix)}
        for b in layers:
            for c in _COMFY_CLIP:
                for n in names:
                    km[f"{n}_text_model_encoder_layers_{b}_{c}"] = f"te:{prefix}{b}:{c}"
    return km


COMFY_TENSOR_SETS = ({"lora_up.weight", "lora_down.weight"}, {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"})
