"""trainer.networks: adapter maths, target selection, apply/remove/stacking, kohya I/O."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.networks import LoHaModule, LoRAModule, Network
from trainer.networks.targets import _te_path, filter_targets, ldm_block_id, te_targets, to_ldm_path, unet_targets

SEED = 1234


def tiny_sd1():
    """Tiny SD1-topology U-Net + 2-layer CLIP text encoder, fixed seed."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(
        sample_size=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        norm_num_groups=8,
        cross_attention_dim=32,
        attention_head_dim=2,
    ).eval()
    te = CLIPTextModel(
        CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       vocab_size=49408, projection_dim=32)
    ).eval()
    unet.requires_grad_(False)
    te.requires_grad_(False)
    return unet, te


@pytest.fixture(scope="module")
def models():
    return tiny_sd1()


@pytest.fixture(scope="module")
def ldm_map(models):
    from trainer.models.convert import unet_ldm_module_map

    return unet_ldm_module_map(models[0].config)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(7)
    return (
        torch.randn(1, 4, 8, 8, generator=g),
        torch.tensor([500]),
        torch.randn(1, 5, 32, generator=g),
        torch.randint(0, 49407, (1, 7), generator=g),
    )


def randomise(net, std=0.3, seed=0):
    """Make a freshly created network look trained (non-zero ΔW)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.adapters():
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * std)


def unet_out(unet, inputs):
    x, t, ehs, _ = inputs
    with torch.no_grad():
        return unet(x, t, ehs).sample


def te_out(te, inputs):
    with torch.no_grad():
        return te(inputs[3])[0]


# -- modules -------------------------------------------------------------------------------

def _linear():
    torch.manual_seed(0)
    return nn.Linear(6, 5)


def _conv3():
    torch.manual_seed(0)
    return nn.Conv2d(4, 6, 3, stride=2, padding=1)


@pytest.mark.parametrize("make", [_linear, _conv3])
@pytest.mark.parametrize("cls", [LoRAModule, LoHaModule])
def test_initial_delta_is_zero_and_scale(make, cls):
    org = make()
    m = cls("x", org, rank=4, alpha=2)
    assert m.scale == 0.5
    assert torch.count_nonzero(m.delta_weight()) == 0
    assert m.delta_weight().shape == org.weight.shape
    assert cls("y", org, rank=4, alpha=0).scale == 1.0
    assert cls("z", org, rank=4, alpha=None).scale == 1.0


def test_lora_init():
    org = nn.Linear(64, 32)
    m = LoRAModule("x", org, rank=8, alpha=4)
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=√5) on fan_in 64
    assert m.lora_down.weight.abs().max() <= bound + 1e-7
    assert torch.count_nonzero(m.lora_up.weight) == 0
    assert tuple(m.lora_down.weight.shape) == (8, 64) and tuple(m.lora_up.weight.shape) == (32, 8)
    c = LoRAModule("c", nn.Conv2d(4, 6, 3, padding=1), rank=2)
    assert tuple(c.lora_down.weight.shape) == (2, 4, 3, 3) and tuple(c.lora_up.weight.shape) == (6, 2, 1, 1)


def test_loha_delta_formula_and_init():
    org = _conv3()
    m = LoHaModule("x", org, rank=3, alpha=1.5)
    assert tuple(m.hada_w1_a.shape) == (6, 3) and tuple(m.hada_w1_b.shape) == (3, 4 * 9)
    assert tuple(m.hada_w2_a.shape) == (6, 3) and tuple(m.hada_w2_b.shape) == (3, 4 * 9)
    assert torch.count_nonzero(m.hada_w2_a) == 0 and torch.count_nonzero(m.hada_w1_a) > 0
    assert 0.05 < m.hada_w1_a.std().item() < 0.2 and 0.6 < m.hada_w1_b.std().item() < 1.4
    randomise_module(m)
    expected = ((m.hada_w1_a @ m.hada_w1_b) * (m.hada_w2_a @ m.hada_w2_b) * 0.5).reshape(6, 4, 3, 3)
    torch.testing.assert_close(m.delta_weight(), expected)


def randomise_module(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("make", [_linear, _conv3])
@pytest.mark.parametrize("cls", [LoRAModule, LoHaModule])
def test_forward_equals_merged_weight(make, cls):
    org = make()
    x = torch.randn(2, 6) if isinstance(org, nn.Linear) else torch.randn(2, 4, 9, 9)
    ref0 = org(x)
    m = cls("x", org, rank=3, alpha=2, multiplier=0.7)
    randomise_module(m)
    m.apply_to()
    w = org.weight + 0.7 * m.delta_weight()
    if isinstance(org, nn.Linear):
        ref = F.linear(x, w, org.bias)
    else:
        ref = F.conv2d(x, w, org.bias, org.stride, org.padding)
    torch.testing.assert_close(org(x), ref, atol=1e-5, rtol=1e-5)
    # gradients reach the adapter
    org(x).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    m.restore()
    assert "forward" not in org.__dict__
    assert torch.equal(org(x), ref0)


def test_low_precision_model_fp32_adapter():
    org = _linear().to(torch.bfloat16)
    m = LoRAModule("x", org, rank=2, alpha=2, dtype=torch.float32)
    randomise_module(m)
    m.apply_to()
    x = torch.randn(3, 6, dtype=torch.bfloat16)
    y = org(x)
    assert y.dtype == torch.bfloat16 and m.lora_down.weight.dtype == torch.float32
    ref = m._prev_forward(x).float() + F.linear(x.float(), m.delta_weight())
    torch.testing.assert_close(y.float(), ref, atol=2e-2, rtol=2e-2)
    m.restore()


def test_stacking_two_adapters_on_one_module():
    org = _linear()
    x = torch.randn(4, 6)
    ref0 = org(x)
    a = LoRAModule("a", org, rank=2, multiplier=1.0)
    b = LoHaModule("b", org, rank=2, multiplier=0.5)
    randomise_module(a, 1)
    randomise_module(b, 2)
    a.apply_to()
    b.apply_to()
    w = org.weight + a.delta_weight() + 0.5 * b.delta_weight()
    torch.testing.assert_close(org(x), F.linear(x, w, org.bias), atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="reverse order"):
        a.restore()
    b.restore()
    a.restore()
    assert torch.equal(org(x), ref0)


# -- targets ---------------------------------------------------------------------------------

def test_tiny_sd1_counts(models):
    unet, te = models
    assert Network.create(unet, [te], rank=4, train_text_encoder=True).counts() == (16 * 10 + 16 * 2, 2 * 6)
    # bug #15: no text-encoder tensors unless the text encoder is trained
    assert Network.create(unet, [te], rank=4, train_text_encoder=False).counts() == (192, 0)


def test_names_are_kohya(models):
    unet, te = models
    net = Network.create(unet, [te], rank=4, train_text_encoder=True)
    names = {m.lora_name for m in net.adapters()}
    for n in [
        "lora_unet_down_blocks_0_attentions_0_proj_in",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k",
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj",
        "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn1_to_out_0",
        "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_2",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te_text_model_encoder_layers_1_mlp_fc2",
    ]:
        assert n in names, n
    keys = set(net.state_dict_kohya())
    assert len(keys) == 3 * len(names)
    assert "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_1_mlp_fc2.alpha" in keys


def test_te_path_normalised_across_transformers_versions():
    assert _te_path("encoder.layers.3.self_attn.q_proj") == "text_model.encoder.layers.3.self_attn.q_proj"
    assert _te_path("text_model.encoder.layers.3.mlp.fc1") == "text_model.encoder.layers.3.mlp.fc1"

    class Attn(nn.Module):  # any class name: targets are found by structure
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(4, 4) for _ in range(4))

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 4)

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn, self.mlp = Attn(), Mlp()

    old = nn.Module()
    old.text_model = nn.Module()
    old.text_model.encoder = nn.Module()
    old.text_model.encoder.layers = nn.ModuleList([Layer()])
    new = nn.Module()
    new.encoder = nn.Module()
    new.encoder.layers = nn.ModuleList([Layer()])
    assert [t.name for t in te_targets([old])] == [t.name for t in te_targets([new])]
    assert sorted(t.name for t in te_targets([new])) == sorted(
        f"lora_te_text_model_encoder_layers_0_{s}"
        for s in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")
    )
    two = te_targets([old, new])
    assert {t.name.split("_text_model")[0] for t in two} == {"lora_te1", "lora_te2"}


def test_ldm_block_ids():
    mp = {"down_blocks.1.attentions.0": "input_blocks.4.1", "mid_block.attentions.0": "middle_block.1",
          "up_blocks.3.resnets.2.conv1": "output_blocks.11.0.in_layers.2", "conv_in": "input_blocks.0.0"}
    assert to_ldm_path("down_blocks.1.attentions.0.proj_in", mp) == "input_blocks.4.1.proj_in"
    assert to_ldm_path("down_blocks.1.attentions.01", mp) is None
    assert ldm_block_id(to_ldm_path("down_blocks.1.attentions.0.proj_in", mp)) == "IN04"
    assert ldm_block_id("middle_block.1.proj_out") == "M00"
    assert ldm_block_id(to_ldm_path("up_blocks.3.resnets.2.conv1", mp)) == "OUT11"
    assert ldm_block_id("input_blocks.0.0") == "IN00"
    assert ldm_block_id("time_embed.0") is None and ldm_block_id("out.2") is None


def test_block_filter(models, ldm_map):
    unet, te = models
    net = Network.create(unet, [te], rank=4, blocks=["IN04"], train_text_encoder=True, ldm_map=ldm_map)
    n_unet, n_te = net.counts()
    assert n_te == 0 and n_unet == 12
    assert all(m.lora_name.startswith("lora_unet_down_blocks_1_attentions_0_") for m in net.unet_modules)
    base = Network.create(unet, [te], rank=4, blocks=["BASE"], train_text_encoder=True, ldm_map=ldm_map)
    assert base.counts() == (0, 12)
    # the default map comes from trainer.models.convert
    assert Network.create(unet, [te], rank=4, blocks=["M00", "OUT11"]).counts() == (24, 0)
    with pytest.raises(ValueError, match="network_blocks"):
        Network.create(unet, [te], rank=4, blocks=["IN99"])


def test_element_filter(models):
    unet, te = models
    for element, word in (("CrossAttention", "attn2"), ("SelfAttention", "attn1")):
        for algo in ("lierla", "c3lier", "loha"):
            net = Network.create(unet, [te], algo=algo, rank=2, element=element, train_text_encoder=True)
            assert net.counts() == (16 * 4, 0), (element, algo)
            assert all(word in m.lora_name for m in net.adapters())


def test_c3lier_and_loha_targets(models):
    unet, te = models
    lierla = {m.lora_name for m in Network.create(unet, [te], rank=4).adapters()}
    net = Network.create(unet, [te], algo="c3lier", rank=4, alpha=2, conv_rank=2, conv_alpha=1)
    mods = {m.lora_name: m for m in net.adapters()}
    assert lierla < set(mods)
    for n in ("lora_unet_down_blocks_0_downsamplers_0_conv", "lora_unet_up_blocks_1_resnets_2_conv1",
              "lora_unet_up_blocks_2_upsamplers_0_conv", "lora_unet_mid_block_resnets_0_time_emb_proj"):
        assert n in mods, n
    conv = mods["lora_unet_up_blocks_1_resnets_2_conv1"]
    assert conv.rank == 2 and conv.scale == 0.5 and conv.kernel_size == (3, 3)
    shortcut = mods["lora_unet_up_blocks_1_resnets_2_conv_shortcut"]  # 1×1: linear rank/alpha
    assert shortcut.rank == 4 and shortcut.scale == 0.5
    assert mods["lora_unet_mid_block_resnets_0_time_emb_proj"].rank == 4
    loha = Network.create(unet, [te], algo="loha", rank=4, conv_rank=2)
    assert {m.lora_name for m in loha.adapters()} == set(mods)
    assert all(isinstance(m, LoHaModule) for m in loha.adapters())


def test_sgm_key_style(models, ldm_map):
    unet, te = models
    net = Network.create(unet, [te], algo="c3lier", rank=2, unet_key_style="sgm", ldm_map=ldm_map)
    names = {m.lora_name for m in net.adapters()}
    for n in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "lora_unet_middle_block_1_proj_out",
              "lora_unet_input_blocks_3_0_op", "lora_unet_output_blocks_11_0_in_layers_2",
              "lora_unet_output_blocks_5_0_skip_connection", "lora_unet_input_blocks_1_0_emb_layers_1"):
        assert n in names, n
    assert not any("down_blocks" in n for n in names)


def test_real_sd15_on_meta_device():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
            norm_num_groups=32, use_linear_projection=False,
        )
        te = CLIPTextModel(CLIPTextConfig(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", projection_dim=768,
        ))
    net = Network.create(unet, [te], rank=4, alpha=1, train_text_encoder=True)
    assert net.counts() == (192, 72)
    sd = net.state_dict()
    assert len(sd) == 3 * 264
    shapes = {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320, 1, 1),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": (4, 320),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": (4, 768),
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj.lora_up.weight": (10240, 4),
        "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn1_to_out_0.alpha": (),
        "lora_te_text_model_encoder_layers_11_mlp_fc2.lora_down.weight": (4, 3072),
    }
    for k, s in shapes.items():
        assert tuple(sd[k].shape) == s, k
    from trainer.models.convert import unet_ldm_module_map

    mp = unet_ldm_module_map(unet.config)
    blocks = {t.block for t in unet_targets(unet, algo="lierla", ldm_map=mp)}
    assert blocks == {"IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00"} | {f"OUT{i:02d}" for i in range(3, 12)}
    c3 = {t.block for t in unet_targets(unet, algo="c3lier", ldm_map=mp)}
    assert c3 == blocks | {"IN03", "IN06", "IN09", "IN10", "IN11", "OUT00", "OUT01", "OUT02"}


def test_real_sdxl_on_meta_device():
    from trainer.models import configs
    from trainer.models.families import Family

    unet, _, tes = configs.build_models(Family.SDXL, device="meta")
    net = Network.create(unet, tes, rank=4, train_text_encoder=True, unet_key_style="sgm")
    assert net.counts() == (722, 72 + 192)
    sd = net.state_dict()
    for k, s in {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": (4, 640),
        "lora_unet_input_blocks_7_1_transformer_blocks_9_attn2_to_k.lora_down.weight": (4, 2048),
        "lora_unet_middle_block_1_transformer_blocks_0_ff_net_2.lora_up.weight": (1280, 4),
        "lora_unet_output_blocks_0_1_proj_out.lora_down.weight": (4, 1280),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (4, 768),
        "lora_te2_text_model_encoder_layers_31_mlp_fc1.lora_up.weight": (5120, 4),
    }.items():
        assert tuple(sd[k].shape) == s, k


# -- network: apply / remove / multiplier / stacking -------------------------------------------

def test_network_forward_remove_bit_exact(models, inputs):
    unet, te = models
    u0, t0 = unet_out(unet, inputs), te_out(te, inputs)
    net = Network.create(unet, [te], algo="c3lier", rank=4, alpha=2, train_text_encoder=True)
    with net.apply():
        # fresh network: ΔW = 0
        torch.testing.assert_close(unet_out(unet, inputs), u0, atol=1e-6, rtol=0)
        randomise(net, 0.05)
        u1 = unet_out(unet, inputs)
        assert (u1 - u0).abs().max() > 1e-3
        assert (te_out(te, inputs) - t0).abs().max() > 1e-3
        with net.multiplier(0.0):
            assert torch.equal(unet_out(unet, inputs), u0)
        assert torch.equal(unet_out(unet, inputs), u1)
        net.set_multiplier(1.0, te=0.0)
        assert torch.equal(te_out(te, inputs), t0)
        net.set_multiplier(1.0)
    assert not net.applied
    assert torch.equal(unet_out(unet, inputs), u0)
    assert torch.equal(te_out(te, inputs), t0)
    assert not any("forward" in m.__dict__ for m in unet.modules())
    assert not any("forward" in m.__dict__ for m in te.modules())


def merged_reference(unet, nets, inputs):
    """Output of a deep copy of the U-Net with every network's ΔW·m merged into the weights."""
    import copy

    ref = copy.deepcopy(unet)
    mods = dict(unet.named_modules())
    ids = {id(m): n for n, m in mods.items()}
    ref_mods = dict(ref.named_modules())
    with torch.no_grad():
        for net in nets:
            for a in net.unet_modules:
                ref_mods[ids[id(a.org_module)]].weight += a.delta_weight() * a.multiplier
    return unet_out(ref, inputs)


@pytest.mark.parametrize("algo", ["lierla", "c3lier", "loha"])
def test_network_equals_merged_weights(models, inputs, algo):
    unet, te = models
    net = Network.create(unet, [te], algo=algo, rank=3, alpha=1.5, conv_rank=2, multiplier=0.6)
    randomise(net, 0.08 if algo != "loha" else 0.25)
    ref = merged_reference(unet, [net], inputs)
    with net.apply():
        torch.testing.assert_close(unet_out(unet, inputs), ref, atol=1e-5, rtol=1e-4)


def test_stacking_networks(models, inputs):
    unet, te = models
    u0 = unet_out(unet, inputs)
    copier = Network.create(unet, [te], algo="lierla", rank=4, alpha=4)
    second = Network.create(unet, [te], algo="c3lier", rank=2, alpha=1)
    randomise(copier, 0.05, seed=1)
    randomise(second, 0.05, seed=2)
    copier.requires_grad_(False)
    ref = merged_reference(unet, [copier, second], inputs)
    copier.apply()
    second.apply()
    torch.testing.assert_close(unet_out(unet, inputs), ref, atol=1e-5, rtol=1e-4)
    with pytest.raises(RuntimeError, match="reverse order"):
        copier.remove()
    assert copier.applied  # nothing changed
    torch.testing.assert_close(unet_out(unet, inputs), ref, atol=1e-5, rtol=1e-4)
    second.remove()
    copier.remove()
    assert torch.equal(unet_out(unet, inputs), u0)


def test_param_groups(models):
    unet, te = models
    net = Network.create(unet, [te], rank=2, train_text_encoder=True)
    groups = net.param_groups(1e-4, 5e-5)
    assert [g["name"] for g in groups] == ["text_encoder", "unet"]
    assert [g["lr"] for g in groups] == [5e-5, 1e-4]
    assert len(groups[0]["params"]) == 12 * 2 and len(groups[1]["params"]) == 192 * 2
    assert Network.create(unet, [te], rank=2).param_groups(1e-4, 5e-5)[0]["name"] == "unet"
    assert len(Network.create(unet, [te], rank=2).param_groups(1e-4)) == 1
    assert net.param_groups(1e-4)[0]["lr"] == 1e-4
    torch.optim.AdamW(groups)  # accepted by a real optimizer


# -- kohya state dicts -------------------------------------------------------------------------

def test_state_dict_kohya_dtype_and_strength(models):
    unet, te = models
    net = Network.create(unet, [te], algo="c3lier", rank=4, alpha=2, train_text_encoder=True)
    randomise(net)
    sd = net.state_dict_kohya(torch.float16)
    assert all(v.dtype == torch.float16 and v.device.type == "cpu" for v in sd.values())
    assert all(k.split(".", 1)[1] in ("lora_down.weight", "lora_up.weight", "alpha") for k in sd)
    assert sd["lora_te_text_model_encoder_layers_0_mlp_fc1.alpha"].item() == 2
    for s in (0.25, -0.5):
        scaled = net.state_dict_kohya(torch.float32, strength=s)
        for m in list(net.adapters())[::40]:
            up, down = scaled[f"{m.lora_name}.lora_up.weight"], scaled[f"{m.lora_name}.lora_down.weight"]
            if m.is_conv:
                dw = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
            else:
                dw = up @ down
            torch.testing.assert_close(dw * m.scale, s * m.delta_weight().detach(), atol=1e-5, rtol=1e-4)


def test_state_dict_kohya_loha_strength(models):
    unet, te = models
    net = Network.create(unet, [te], algo="loha", rank=2, alpha=1)
    randomise(net)
    sd = net.state_dict_kohya(torch.float32, strength=0.3)
    m = next(net.adapters())
    keys = {k.split(".", 1)[1] for k in sd if k.startswith(m.lora_name + ".")}
    assert keys == {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}
    p = {k: sd[f"{m.lora_name}.{k}"] for k in keys}
    dw = (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"]) * p["alpha"] / 2
    torch.testing.assert_close(dw.reshape(m.weight_shape), 0.3 * m.delta_weight().detach(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("algo", ["c3lier", "loha"])
def test_load_kohya_round_trip(models, algo):
    unet, te = models
    net = Network.create(unet, [te], algo=algo, rank=4, alpha=2, conv_rank=2, conv_alpha=1, train_text_encoder=True)
    randomise(net)
    sd = net.state_dict_kohya(torch.float32)
    other = Network.create(unet, [te], algo=algo, rank=4, alpha=2, conv_rank=2, conv_alpha=1, train_text_encoder=True)
    res = other.load_kohya(sd)
    assert res.created == [] and res.missing == [] and len(res.loaded) == sum(net.counts())
    sd2 = other.state_dict_kohya(torch.float32)
    assert sd2.keys() == sd.keys()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    # rank (and algorithm) come from the file
    small = Network.create(unet, [te], algo="lierla", rank=1, alpha=1)
    res = small.load_kohya(sd)
    assert len(res.created) == sum(net.counts())
    sd3 = small.state_dict_kohya(torch.float32)
    assert all(torch.equal(sd[k], sd3[k]) for k in sd)
    assert small.counts() == net.counts()


def test_load_kohya_errors(models):
    unet, te = models
    net = Network.create(unet, [te], rank=4, alpha=2, train_text_encoder=True)
    sd = net.state_dict_kohya(torch.float32)
    bad = dict(sd)
    bad["lora_unet_not_a_module.lora_down.weight"] = torch.zeros(4, 4)
    bad["lora_unet_not_a_module.lora_up.weight"] = torch.zeros(4, 4)
    with pytest.raises(ValueError, match="lora_unet_not_a_module"):
        net.load_kohya(bad)
    bad = dict(sd)
    k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"
    bad[k] = torch.zeros(4, 99)
    with pytest.raises(ValueError) as e:
        net.load_kohya(bad)
    assert k in str(e.value) and "(4, 99)" in str(e.value) and "(4, 32)" in str(e.value)
    bad = dict(sd)
    bad["lora_te_text_model_encoder_layers_0_mlp_fc1.dora_scale"] = torch.zeros(1, 32)
    with pytest.raises(ValueError, match="dora_scale"):
        net.load_kohya(bad)


def test_loaded_without_alpha_means_scale_one(models):
    unet, te = models
    net = Network.create(unet, [te], rank=4, alpha=2)
    sd = {k: v for k, v in net.state_dict_kohya(torch.float32).items() if not k.endswith(".alpha")}
    other = Network(unet, [te])
    other.load_kohya(sd)
    assert all(m.scale == 1.0 for m in other.adapters())
