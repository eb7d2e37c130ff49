"""SDXL end to end on the tiny SDXL model: topology, size conditioning in pixels, every mode,
kohya SGM keys and SDXL metadata, single-file and diffusers-folder checkpoints, the CLI."""
import pytest
import torch
from safetensors import safe_open

from _family_helpers import MODES, cli, mode_inputs, train_mode
from trainer.data.dataset import build_samples
from trainer.models.families import Family
from trainer.models.loading import load_components, save_ldm_checkpoint
from trainer.models.tiny import tiny_components
from trainer.modes.base import SizeCond, size_ids, unet_cond
from trainer.networks import Network, load_network_file
from trainer.networks.targets import unet_targets


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("sdxl")


@pytest.fixture(scope="module")
def inputs(root):
    return mode_inputs(root)


def test_tiny_sdxl_has_the_sdxl_topology():
    c = tiny_components(family="sdxl")
    cfg = c.unet.config
    assert c.info.family is Family.SDXL and not c.info.v_pred and c.name == "tiny-sdxl"
    assert list(cfg.down_block_types) == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert list(cfg.transformer_layers_per_block) == [1, 2, 3] and cfg.layers_per_block == 2
    assert cfg.addition_embed_type == "text_time" and cfg.use_linear_projection
    te1, te2 = c.text_encoders
    assert type(te1).__name__ == "CLIPTextModel" and type(te2).__name__ == "CLIPTextModelWithProjection"
    assert te1.config.hidden_act == "quick_gelu" and te2.config.hidden_act == "gelu"
    assert [t.pad_token for t in c.tokenizers] == ["<|endoftext|>", "!"]
    assert cfg.cross_attention_dim == te1.config.hidden_size + te2.config.hidden_size
    assert cfg.projection_class_embeddings_input_dim == 6 * cfg.addition_time_embed_dim + te2.config.projection_dim
    # the lierla blocks of the real SDXL (IN04 IN05 IN07 IN08 M00 OUT00-OUT05), SGM names as kohya writes
    from trainer.models.convert import unet_ldm_module_map
    targets = unet_targets(c.unet, key_style="sgm", ldm_map=unet_ldm_module_map(cfg))
    assert {t.block for t in targets} == {"IN04", "IN05", "IN07", "IN08", "M00"} | {f"OUT{i:02d}" for i in range(6)}
    names = {t.name for t in targets}
    assert "lora_unet_input_blocks_7_1_transformer_blocks_2_attn2_to_k" in names
    assert "lora_unet_output_blocks_0_1_proj_out" in names and "lora_unet_middle_block_1_proj_in" in names


def test_size_conditioning_is_in_pixels_with_the_crop(tmp_path):
    """A 128x64 image in a 64x64 bucket: original (64, 128), crop left 32 px, target (64, 64)."""
    inputs = mode_inputs(tmp_path)
    samples = build_samples(inputs["LoRA"][1]["lora_data_directory"], image_size=(64, 64), buckets_step=64,
                            min_length=64, max_ratio=2.0, mirroring=True)
    plain, mirrored = samples
    assert plain.size_cond_hw() == ((64, 128), (0, 32), (64, 64))
    assert mirrored.mirrored and mirrored.size_cond_hw() == ((64, 128), (0, 32), (64, 64))
    ids = size_ids([SizeCond(*plain.size_cond_hw())], 1)
    assert ids.tolist() == [[64.0, 128.0, 0.0, 32.0, 64.0, 64.0]]
    assert size_ids((1024, 768), 2).tolist() == [[1024.0, 768.0, 0.0, 0.0, 1024.0, 768.0]] * 2
    cond = unet_cond(torch.zeros(2, 77, 8), torch.ones(1, 4), (64, 96))
    assert cond.added["text_embeds"].shape == (2, 4) and cond.added["time_ids"][0].tolist()[:2] == [64.0, 96.0]
    assert unet_cond(torch.zeros(1, 77, 8)).added is None  # SD1/SD2
    with pytest.raises(ValueError, match="sizes"):
        unet_cond(torch.zeros(1, 77, 8), torch.ones(1, 4))


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_trains_on_tiny_sdxl(mode, root, inputs):
    comps = tiny_components(family="sdxl")
    result, run, calls = train_mode(mode, comps, root, inputs)
    assert result.ok, result.message
    assert calls and all(c is not None for c in calls)  # every U-Net call gets pooled + size ids
    for added in calls:
        assert added["text_embeds"].shape[-1] == comps.text_encoders[1].config.projection_dim
        ids = added["time_ids"]
        assert ids.shape[-1] == 6 and float(ids[:, 4:].min()) >= 64  # target size in pixels, not latents (8)
    if mode == "LoRA":
        assert calls[0]["time_ids"][0].tolist() == [64.0, 128.0, 0.0, 32.0, 64.0, 64.0]
    tensors, meta = load_network_file(result.files[-1])
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    unet_keys = [k for k in tensors if k.startswith("lora_unet_")]
    assert unet_keys and all(k.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_",
                                           "lora_unet_output_blocks_")) for k in unet_keys)
    if mode == "LoRA":  # BASE is selected by default: both text encoders, kohya's prefixes
        assert any(k.startswith("lora_te1_text_model_encoder_layers_") for k in tensors)
        assert any(k.startswith("lora_te2_text_model_encoder_layers_") for k in tensors)


def test_sdxl_single_file_and_diffusers_folder_load_and_train(tmp_path, root, inputs):
    tiny = tiny_components(family="sdxl")
    ckpt = save_ldm_checkpoint(tiny, tmp_path / "tiny-sdxl.safetensors")
    with safe_open(str(ckpt), "pt") as f:
        keys = set(f.keys())
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys  # SGM layout
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    folder = tmp_path / "tiny-sdxl-diffusers"
    tiny.unet.save_pretrained(folder / "unet")
    tiny.vae.save_pretrained(folder / "vae")
    tiny.text_encoders[0].save_pretrained(folder / "text_encoder")
    tiny.text_encoders[1].save_pretrained(folder / "text_encoder_2")
    for i, source in enumerate((ckpt, folder)):
        comps = load_components(source)
        assert comps.info.family is Family.SDXL and len(comps.text_encoders) == 2
        result, _, _ = train_mode("iLECO", comps, tmp_path / f"run{i}", inputs)
        assert result.ok, result.message


def test_cli_trains_lora_on_an_sdxl_checkpoint(tmp_path, inputs):
    ckpt = save_ldm_checkpoint(tiny_components(family="sdxl"), tmp_path / "xl.safetensors")
    r = cli("train", "--model", ckpt, "--data", inputs["LoRA"][1]["lora_data_directory"], "--name", "xl_cli",
            "--iterations", 2, "--set", "image_size=64", "--set", "image_min_length=64", "--set",
            "image_buckets_step=64", "--set", "train_model_precision=fp32", "--set", "network_rank=2",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "output" / "xl_cli.safetensors"
    tensors, meta = load_network_file(out)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    # the file loads back into a network on the same model (SGM key style detected)
    comps = load_components(ckpt)
    net = Network.from_file(out, comps.unet, comps.text_encoders)
    assert net.unet_key_style == "sgm" and sum(net.counts()) * 3 == len(tensors)
