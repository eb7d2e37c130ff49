"""Converter tests: module maps, real-size SD1.5 / SD2.1 round trips with random
weights, SDXL key map on meta, strictness."""
import gc
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _models_helpers import materialise  # noqa: E402

from trainer.models.configs import build_models, configs_for  # noqa: E402
from trainer.models.convert import (  # noqa: E402
    canonical_te_keys,
    diffusers_to_ldm,
    ldm_to_diffusers,
    translate,
    unet_ldm_module_map,
)
from trainer.models.errors import ModelError  # noqa: E402
from trainer.models.families import Family, ModelInfo, detect  # noqa: E402
from trainer.models.loading import components_from_state_dicts  # noqa: E402
from trainer.models.tiny import tiny_configs  # noqa: E402

U = "model.diffusion_model."


def _module_paths(module):
    return {n for n, _ in module.named_modules() if n}


# ---------------------------------------------------------------- module maps


def test_unet_module_map_sd1_known_entries():
    m = unet_ldm_module_map(configs_for(Family.SD1).unet)
    expected = {
        "conv_in": "input_blocks.0.0",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "down_blocks.0.attentions.0": "input_blocks.1.1",
        "down_blocks.1.attentions.0": "input_blocks.4.1",
        "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
        "down_blocks.2.downsamplers.0.conv": "input_blocks.9.0.op",
        "down_blocks.3.resnets.1": "input_blocks.11.0",
        "mid_block.resnets.0": "middle_block.0",
        "mid_block.attentions.0": "middle_block.1",
        "mid_block.resnets.1": "middle_block.2",
        "up_blocks.0.resnets.2": "output_blocks.2.0",
        "up_blocks.0.upsamplers.0.conv": "output_blocks.2.1.conv",
        "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
        "up_blocks.3.attentions.2": "output_blocks.11.1",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
        "down_blocks.1.resnets.0.conv1": "input_blocks.4.0.in_layers.2",
        "down_blocks.1.resnets.0.norm1": "input_blocks.4.0.in_layers.0",
        "down_blocks.1.resnets.0.conv2": "input_blocks.4.0.out_layers.3",
        "down_blocks.1.resnets.0.norm2": "input_blocks.4.0.out_layers.0",
        "down_blocks.1.resnets.0.time_emb_proj": "input_blocks.4.0.emb_layers.1",
        "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
    }
    for k, v in expected.items():
        assert m[k] == v, k
    # shortcut only where channels change
    assert "down_blocks.1.resnets.1.conv_shortcut" not in m
    assert "down_blocks.0.resnets.0.conv_shortcut" not in m
    assert "up_blocks.3.resnets.2.conv_shortcut" in m
    assert len(set(m.values())) == len(m)  # one-to-one


def test_unet_module_map_sdxl_known_entries():
    m = unet_ldm_module_map(configs_for(Family.SDXL).unet)
    assert m["down_blocks.1.attentions.0"] == "input_blocks.4.1"
    assert m["down_blocks.2.attentions.1"] == "input_blocks.8.1"
    assert m["up_blocks.0.upsamplers.0.conv"] == "output_blocks.2.2.conv"
    assert m["up_blocks.1.upsamplers.0.conv"] == "output_blocks.5.2.conv"
    assert m["add_embedding.linear_1"] == "label_emb.0.0"
    assert m["add_embedding.linear_2"] == "label_emb.0.2"
    assert "down_blocks.0.attentions.0" not in m
    assert "up_blocks.2.upsamplers.0.conv" not in m
    assert "down_blocks.2.downsamplers.0.conv" not in m


@pytest.mark.parametrize("which", ["sd1", "sd2", "sdxl", "tiny"])
def test_unet_module_map_covers_every_module(which):
    """Every key of the real module is translated, and every map entry is a real module."""
    cfgs = tiny_configs() if which == "tiny" else configs_for(Family(which))
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfgs.unet)
    m = unet_ldm_module_map(cfgs.unet)
    paths = _module_paths(unet)
    assert set(m) <= paths, sorted(set(m) - paths)[:5]
    for k in unet.state_dict():
        assert translate(k, m) is not None, k
    # every ResNet child that has parameters is listed explicitly (LoCon naming uses it)
    for p in paths:
        if ".resnets." in p and p.rsplit(".", 1)[-1] in ("conv1", "conv2", "norm1", "norm2", "time_emb_proj",
                                                          "conv_shortcut"):
            assert p in m, p


def test_translate_longest_prefix():
    m = {"a": "x", "a.b": "y.z"}
    assert translate("a.b.weight", m) == "y.z.weight"
    assert translate("a.c.weight", m) == "x.c.weight"
    assert translate("q.weight", m) is None


# ---------------------------------------------------------------- SDXL on meta


def test_sdxl_keymap_on_meta():
    info = ModelInfo(Family.SDXL, False)
    unet, vae, tes = build_models(Family.SDXL, device="meta")
    te_sds = [canonical_te_keys(te.state_dict()) for te in tes]
    ldm = diffusers_to_ldm(unet.state_dict(), vae.state_dict(), te_sds, info)
    shapes = {k: tuple(v.shape) for k, v in ldm.items()}
    assert shapes[U + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"] == (640, 2048)
    assert shapes[U + "input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight"] == (1280, 2048)
    assert shapes[U + "label_emb.0.0.weight"] == (1280, 2816)
    assert shapes[U + "output_blocks.2.2.conv.weight"] == (1280, 1280, 3, 3)
    assert shapes[U + "output_blocks.0.1.proj_out.weight"] == (1280, 1280)
    assert shapes[U + "middle_block.1.transformer_blocks.9.ff.net.2.weight"] == (1280, 5120)
    assert shapes["first_stage_model.encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert shapes["conditioner.embedders.0.transformer.text_model.encoder.layers.11.self_attn.q_proj.weight"] == (768, 768)
    g = "conditioner.embedders.1.model."
    assert shapes[g + "transformer.resblocks.31.attn.in_proj_weight"] == (3840, 1280)
    assert shapes[g + "transformer.resblocks.0.mlp.c_fc.weight"] == (5120, 1280)
    assert shapes[g + "text_projection"] == (1280, 1280)
    assert shapes[g + "positional_embedding"] == (77, 1280)
    assert shapes[g + "ln_final.weight"] == (1280,)
    assert not any(".text_model." in k for k in shapes if k.startswith(g))
    assert detect(ldm) == info
    n_params = sum(1 for _ in unet.state_dict()) + sum(1 for _ in vae.state_dict())
    assert sum(1 for k in ldm if k.startswith((U, "first_stage_model."))) == n_params

    back = ldm_to_diffusers(ldm, info)
    assert set(back["unet"]) == set(unet.state_dict())
    assert set(back["vae"]) == set(vae.state_dict())
    for orig, new in zip(te_sds, back["text_encoders"]):
        want = {k for k in orig if not k.endswith("position_ids")}
        assert set(new) == want
        assert all(tuple(new[k].shape) == tuple(orig[k].shape) for k in want)
    assert set(back["extras"]) == set()


# ---------------------------------------------------------------- real-size round trips


def _oracle_unet_vae(ldm, cfgs, unet_sd, vae_sd):
    """diffusers' own LDM->diffusers converter (test oracle only) must agree with our export."""
    # in every diffusers the requirements allow (>= 0.31): an ImportError fails the test instead of
    # silently dropping the oracle
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    u = convert_ldm_unet_checkpoint(dict(ldm), dict(cfgs.unet))
    assert set(u) == set(unet_sd)
    for k in unet_sd:
        assert torch.equal(u[k], unet_sd[k]), k
    v = convert_ldm_vae_checkpoint(dict(ldm), dict(cfgs.vae))
    assert set(v) == set(vae_sd)
    for k in vae_sd:
        assert torch.equal(v[k].reshape(vae_sd[k].shape), vae_sd[k]), k


@torch.no_grad()
def _outputs(unet, vae, tes, family):
    g = torch.Generator().manual_seed(0)
    dt = next(unet.parameters()).dtype
    ctx_dim = {Family.SD1: 768, Family.SD2: 1024}[family]
    lat = torch.randn(1, 4, 8, 8, generator=g).to(dt)
    ctx = torch.randn(1, 77, ctx_dim, generator=g).to(dt)
    img = torch.rand(1, 3, 64, 64, generator=g).to(dt) * 2 - 1
    ids = torch.randint(0, 49406, (1, 77), generator=g)
    ids[0, 0], ids[0, 40] = 49406, 49407
    out = [unet(lat, 500, ctx).sample, vae.encode(img).latent_dist.mean]
    for te in tes:
        o = te(input_ids=ids, output_hidden_states=True)
        out += [o.last_hidden_state, o.hidden_states[-2]]
    for t in out:
        assert torch.isfinite(t.float()).all()
    return out


@pytest.mark.parametrize("family", [Family.SD1, Family.SD2])
def test_real_architecture_round_trip(family):
    info = ModelInfo(family, False)
    cfgs = configs_for(family)
    unet, vae, tes = build_models(family, device="meta")
    for i, m in enumerate((unet, vae, *tes)):
        materialise(m, torch.bfloat16, salt=i)
    unet_sd, vae_sd = unet.state_dict(), vae.state_dict()
    te_sds = [canonical_te_keys(te.state_dict()) for te in tes]
    ldm = diffusers_to_ldm(unet_sd, vae_sd, te_sds, info)

    # known LDM names and shapes hold the right tensors
    assert torch.equal(ldm[U + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"],
                       unet_sd["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"])
    assert torch.equal(ldm[U + "output_blocks.2.1.conv.weight"], unet_sd["up_blocks.0.upsamplers.0.conv.weight"])
    assert torch.equal(ldm[U + "input_blocks.3.0.op.weight"], unet_sd["down_blocks.0.downsamplers.0.conv.weight"])
    assert torch.equal(ldm[U + "middle_block.2.in_layers.2.weight"], unet_sd["mid_block.resnets.1.conv1.weight"])
    assert torch.equal(ldm[U + "time_embed.2.weight"], unet_sd["time_embedding.linear_2.weight"])
    assert torch.equal(ldm["first_stage_model.decoder.up.3.block.0.conv1.weight"],
                       vae_sd["decoder.up_blocks.0.resnets.0.conv1.weight"])
    q = ldm["first_stage_model.encoder.mid.attn_1.q.weight"]
    assert tuple(q.shape) == (512, 512, 1, 1)
    assert torch.equal(q[:, :, 0, 0], vae_sd["encoder.mid_block.attentions.0.to_q.weight"])
    k_width = ldm[U + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
    if family is Family.SD1:
        assert k_width == 768
        key = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
        assert tuple(ldm[key].shape) == (768, 768)
        assert not any(k.startswith("cond_stage_model.model.") for k in ldm)
    else:
        assert k_width == 1024
        assert tuple(ldm[U + "input_blocks.1.1.proj_in.weight"].shape) == (320, 320)  # linear projection
        key = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
        assert tuple(ldm[key].shape) == (3072, 1024)
        layer0 = "text_model.encoder.layers.0.self_attn."
        assert torch.equal(ldm[key][1024:2048], te_sds[0][layer0 + "k_proj.weight"])
        assert "cond_stage_model.model.transformer.resblocks.23.ln_1.weight" in ldm  # all 24 layers kept
        assert torch.equal(ldm["cond_stage_model.model.positional_embedding"],
                           te_sds[0]["text_model.embeddings.position_embedding.weight"])
        assert torch.equal(ldm["cond_stage_model.model.transformer.resblocks.5.mlp.c_fc.weight"],
                           te_sds[0]["text_model.encoder.layers.5.mlp.fc1.weight"])
    assert detect(ldm) == info
    _oracle_unet_vae(ldm, cfgs, unet_sd, vae_sd)

    # SD2 checkpoints carry OpenCLIP's text_projection / logit_scale: they must survive
    if family is Family.SD2:
        ldm["cond_stage_model.model.text_projection"] = torch.randn(1024, 1024).to(torch.bfloat16)
        ldm["cond_stage_model.model.logit_scale"] = torch.tensor(4.6)
    # keys dropped on purpose
    ldm["model_ema.decay"] = torch.tensor(0.999)
    ldm["alphas_cumprod"] = torch.ones(1000)

    back = ldm_to_diffusers(ldm, info)
    for k, v in unet_sd.items():
        assert torch.equal(back["unet"][k], v), k
    for k, v in vae_sd.items():
        assert torch.equal(back["vae"][k], v), k
    loaded = components_from_state_dicts(back, info, cfgs, torch.bfloat16, "rt")
    again = diffusers_to_ldm(loaded.unet.state_dict(), loaded.vae.state_dict(),
                             [canonical_te_keys(te.state_dict()) for te in loaded.text_encoders], info,
                             extras=loaded.extras)
    ldm.pop("model_ema.decay")
    ldm.pop("alphas_cumprod")
    assert set(again) == set(ldm)
    for k in ldm:
        assert torch.equal(again[k], ldm[k]), k

    before = _outputs(unet, vae, tes, family)
    del unet, vae, tes, unet_sd, vae_sd, te_sds, ldm, again, back
    gc.collect()
    after = _outputs(loaded.unet, loaded.vae, loaded.text_encoders, family)
    # The weights are compared exactly above; the outputs show the loaded modules are configured like
    # the built ones. They are separately built bf16 modules, whose sums the CPU's kernels may order
    # differently: the same model run channels-last (other kernels, same weights) differed by 4 bf16
    # ulps of the largest value (0.031 at 1.76). A wrong config (heads, eps, activation) changes
    # outputs by the order of the values themselves, so allow 16 ulps: 1/8 of the largest value.
    for a, b in zip(before, after):
        a, b = a.float(), b.float()
        assert (a - b).abs().max() <= a.abs().max() / 8, float((a - b).abs().max())
    del loaded
    gc.collect()


# ---------------------------------------------------------------- strictness


def _tiny_ldm():
    from trainer.models.loading import checkpoint_state_dict
    from trainer.models.tiny import tiny_components

    c = tiny_components()
    return checkpoint_state_dict(c), c


def test_unknown_keys_raise_and_documented_keys_are_dropped():
    ldm, c = _tiny_ldm()
    info, cfgs = c.info, c.configs
    extra = dict(ldm)
    extra["model_ema.model.foo"] = torch.zeros(1)
    extra["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    extra["betas"] = torch.zeros(10)
    out = ldm_to_diffusers(extra, info, cfgs)
    assert set(out["unet"]) == set(c.unet.state_dict())

    for bad_key in ("something.else.weight", U + "nonsense_block.0.weight",
                    "cond_stage_model.transformer.foo.weight", "first_stage_model.encoder.down.9.wrong.weight"):
        bad = dict(ldm)
        bad[bad_key] = torch.zeros(1)
        with pytest.raises(ModelError, match="cannot be converted") as e:
            ldm_to_diffusers(bad, info, cfgs, where="x.safetensors")
        assert "x.safetensors" in str(e.value)

    # diffusers side: an unknown module key is not dropped either
    with pytest.raises(ModelError, match="bogus"):
        diffusers_to_ldm({"bogus.weight": torch.zeros(1)}, {}, [{}], info, configs=cfgs)


def test_missing_text_encoder_raises():
    ldm, c = _tiny_ldm()
    no_te = {k: v for k, v in ldm.items() if not k.startswith("cond_stage_model.")}
    with pytest.raises(ModelError, match="text-encoder"):
        ldm_to_diffusers(no_te, c.info, c.configs)


def test_legacy_clip_keys_without_text_model_level():
    ldm, c = _tiny_ldm()
    pre = "cond_stage_model.transformer."
    old = {(pre + k[len(pre + "text_model."):] if k.startswith(pre) else k): v for k, v in ldm.items()}
    old[pre + "embeddings.position_ids"] = torch.arange(77)[None]
    assert any(k.startswith(pre + "encoder.layers.0.") for k in old)
    out = ldm_to_diffusers(old, c.info, c.configs)
    assert set(out["text_encoders"][0]) == set(ldm_to_diffusers(ldm, c.info, c.configs)["text_encoders"][0])
