"""Our LoRA files in the loaders people use, for SD1, SD2 and SDXL, lierla / c3lier / loha.

* target selection on the REAL architectures (meta device) gives kohya's module counts;
* diffusers ``load_lora_weights`` consumes every key and patches the U-Net and text encoders
  exactly like our network, at strength 1 and 0.5 (tiny models of each family; SDXL through
  diffusers' own SGM -> diffusers key conversion);
* the Web-UI's built-in Lora extension and ComfyUI map every key to a module of the right shape
  (a re-statement of their rules, tests/_loader_rules.py; the real programs were checked in a
  session, docs/loader-checks.md);
* round trip: a saved file loads back into our own network with identical weights and outputs.
"""
import copy
import logging
import warnings
from types import SimpleNamespace

import pytest
import torch

from _loader_rules import (A1111_TENSOR_SETS, COMFY_TENSOR_SETS, a1111_module, comfy_key_map, ldm_modules)
from trainer.engine import TrainingRun
from trainer.models.configs import build_models
from trainer.models.convert import canonical_te_keys, diffusers_to_ldm
from trainer.models.families import Family, ModelInfo
from trainer.models.tiny import tiny_components
from trainer.networks import Network, load_network_file, save_network

KOHYA_COUNTS = {  # (U-Net, text encoder 1, text encoder 2)
    ("sd1", "lierla"): (192, 72, 0), ("sd1", "c3lier"): (278, 72, 0),
    ("sd2", "lierla"): (192, 138, 0), ("sd2", "c3lier"): (278, 138, 0),
    ("sdxl", "lierla"): (722, 72, 192), ("sdxl", "c3lier"): (788, 72, 192),
    # README: "c3lier / loha": LoHa targets the same modules as c3lier (its 3x3 convs included)
    ("sd1", "loha"): (278, 72, 0), ("sd2", "loha"): (278, 138, 0), ("sdxl", "loha"): (788, 72, 192),
}


def key_style(family):
    return "sgm" if Family(family) is Family.SDXL else "diffusers"


def te_limits(family, tes):
    return TrainingRun.te_layer_limits(SimpleNamespace(family=Family(family)), tes)


def make_net(family, unet, tes, algo, rank=4, **kw):
    return Network.create(unet, tes, algo=algo, rank=rank, alpha=rank / 2, conv_rank=2, conv_alpha=1,
                          train_text_encoder=True, unet_key_style=key_style(family),
                          te_layer_limits=te_limits(family, tes), **kw)


def te_counts(net):
    names = [m.lora_name for m in net.te_modules]
    return (sum(n.startswith(("lora_te_", "lora_te1_")) for n in names), sum(n.startswith("lora_te2_") for n in names))


# ------------------------------------------------------------------ real architectures on meta


@pytest.fixture(scope="module")
def real():
    """{family: (unet, tes, ldm keys->shape)} of the real SD1.5, SD2.1 and SDXL, on meta."""
    out = {}
    for fam in (Family.SD1, Family.SD2, Family.SDXL):
        unet, vae, tes = build_models(fam, device="meta")
        ldm = diffusers_to_ldm(unet.state_dict(), vae.state_dict(), [canonical_te_keys(t.state_dict()) for t in tes],
                               ModelInfo(fam))
        out[fam.value] = (unet, tes, {k: tuple(v.shape) for k, v in ldm.items()})
    return out


@pytest.mark.parametrize("family,algo", sorted(KOHYA_COUNTS))
def test_module_counts_match_kohya_on_real_architectures(real, family, algo):
    unet, tes, _ = real[family]
    net = make_net(family, unet, tes, algo, rank=1)
    n_unet, _ = net.counts()
    assert (n_unet, *te_counts(net)) == KOHYA_COUNTS[(family, algo)]
    if algo == "c3lier":  # LoHa targets the same modules as LoCon
        loha = make_net(family, unet, tes, "loha", rank=1)
        assert {m.lora_name for m in loha.adapters()} == {m.lora_name for m in net.adapters()}


def _delta_shape(module):
    w = module.org_module.weight
    return tuple(w.shape)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_webui_and_comfyui_rules_map_every_key_real_architectures(real, family):
    """RE-STATED rules (tests/_loader_rules.py), real architectures: every module of our file lands
    on a module of the checkpoint whose weight has the shape of our ΔW; nothing is left over.
    c3lier covers lierla's modules; LoHa has c3lier's modules with hada_* tensors."""
    unet, tes, ldm = real[family]
    net = make_net(family, unet, tes, "c3lier", rank=1)
    for algo in ("c3lier", "loha"):
        some = next(iter(make_net(family, unet, tes, algo, rank=1).adapters())) if algo == "loha" else \
            next(iter(net.adapters()))
        subs = set(some.file_state()) - {"alpha"}
        assert subs in A1111_TENSOR_SETS and subs in COMFY_TENSOR_SETS

    modules = ldm_modules(ldm, family)
    levels = {"sd1": (2, (0, 1, 2), 4), "sd2": (2, (0, 1, 2), 4), "sdxl": (2, (1, 2), 3)}[family]
    comfy = comfy_key_map(ldm, family, *levels)
    unmatched_a1111, unmatched_comfy, wrong_shape = [], [], []
    for m in net.adapters():
        want = _delta_shape(m)
        hit = a1111_module(m.lora_name, modules)
        if hit is None:
            unmatched_a1111.append(m.lora_name)
        else:
            path = modules[hit]
            shape = ldm.get(path + ".weight") or ldm.get(path + ".in_proj_weight")
            if path.endswith(".attn") and path + ".in_proj_weight" in ldm:  # q/k/v: one third of in_proj
                shape = (shape[0] // 3, *shape[1:])
            if shape != want:
                wrong_shape.append((m.lora_name, hit, shape, want))
        target = comfy.get(m.lora_name)
        if target is None:
            unmatched_comfy.append(m.lora_name)
        elif target.startswith("diffusion_model."):
            shape = ldm["model." + target + ".weight"]
            if shape != want:
                wrong_shape.append((m.lora_name, target, shape, want))
    assert not unmatched_a1111 and not unmatched_comfy and not wrong_shape, \
        (unmatched_a1111[:5], unmatched_comfy[:5], wrong_shape[:5])
    if family == "sdxl":
        # the Web-UI's diffusers->CompVis rule would put SDXL upsamplers on the wrong module: our
        # SGM names never go through it
        assert all(not n.startswith("lora_unet_up_blocks") for n in (m.lora_name for m in net.adapters()))


# ------------------------------------------------------------------ diffusers load_lora_weights


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _randomise(net, seed=3, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.adapters():
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _pipeline(family, comps, unet, tes):
    import diffusers
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(clip_sample=False)
    if family == "sdxl":
        return diffusers.StableDiffusionXLPipeline(vae=comps.vae, text_encoder=tes[0], text_encoder_2=tes[1],
                                                   tokenizer=comps.tokenizers[0], tokenizer_2=comps.tokenizers[1],
                                                   unet=unet, scheduler=sched)
    return diffusers.StableDiffusionPipeline(vae=comps.vae, text_encoder=tes[0], tokenizer=comps.tokenizers[0],
                                             unet=unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)


def _diffusers_text_encoders(family, tes):
    """The text encoders as diffusers pipelines have them: SD2's without OpenCLIP's last layer."""
    tes = [copy.deepcopy(t) for t in tes]
    if family != "sd2":
        return tes
    from transformers import CLIPTextModel

    cfg = copy.deepcopy(tes[0].config)
    cfg.num_hidden_layers -= 1
    short = CLIPTextModel(cfg).eval()
    sd = {k: v for k, v in tes[0].state_dict().items() if f"layers.{cfg.num_hidden_layers}." not in k}
    short.load_state_dict(sd, strict=False)
    return [short]


@pytest.mark.parametrize("family,algo", [("sd1", "lierla"), ("sd2", "lierla"), ("sd2", "c3lier"),
                                         ("sdxl", "lierla"), ("sdxl", "c3lier")])
def test_diffusers_load_lora_weights_consumes_every_key_same_effect(tmp_path, family, algo):
    import peft  # noqa: F401  (requirements-dev.txt: diffusers needs it to load LoRAs; missing is a failure)
    comps = tiny_components(family=family)
    unet, tes = comps.unet, comps.text_encoders
    net = make_net(family, unet, tes, algo)
    _randomise(net)
    path = tmp_path / f"{family}_{algo}.safetensors"
    save_network(path, net.state_dict_kohya(torch.float32), {})

    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([321])
    ids = torch.randint(0, 49406, (1, 77), generator=g)
    ehs = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    kw = {}
    if family == "sdxl":
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(1, tes[1].config.projection_dim, generator=g),
                                   "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    used = te_limits(family, tes) or [te.config.num_hidden_layers for te in tes]

    def outputs(u, encoders):
        with torch.no_grad():
            return [u(x, t, ehs, **kw).sample] + [te(ids, output_hidden_states=True).hidden_states[n]
                                                  for te, n in zip(encoders, used)]

    base = outputs(unet, tes)
    with net.apply():
        ours1 = outputs(unet, tes)
        with net.multiplier(0.5):
            ours5 = outputs(unet, tes)
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(ours1, base))

    pipe = _pipeline(family, comps, copy.deepcopy(unet), _diffusers_text_encoders(family, tes))
    handler = _Collect()
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(path), adapter_name="ours")
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    texts = handler.messages + [str(w.message) for w in caught]
    assert not [m for m in texts if "unexpected" in m.lower() or "not been correctly renamed" in m.lower()
                or "not loaded" in m.lower()], texts

    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    patched = [sum(1 for n, _ in mod.named_modules() if n.endswith(".lora_A")) for mod in [pipe.unet, *encoders]]
    n_unet, _ = net.counts()
    assert patched == [n_unet, *[c for c in te_counts(net) if c]], "every module of the file is applied"

    got1 = outputs(pipe.unet, encoders)
    pipe.set_adapters(["ours"], adapter_weights=[0.5])
    got5 = outputs(pipe.unet, encoders)
    for a, b in zip(got1 + got5, ours1 + ours5):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_diffusers_refuses_loha_files(tmp_path):
    """A documented limit of diffusers (peers §3.4): LoHa keys are not converted. Our README says so."""
    import peft  # noqa: F401  (requirements-dev.txt: diffusers needs it to load LoRAs; missing is a failure)
    comps = tiny_components(family="sdxl")
    net = make_net("sdxl", comps.unet, comps.text_encoders, "loha")
    _randomise(net)
    path = tmp_path / "loha.safetensors"
    save_network(path, net.state_dict_kohya(torch.float32), {})
    pipe = _pipeline("sdxl", comps, comps.unet, comps.text_encoders)
    # diffusers names the keys it could not convert: the LoHa ones (not some unrelated failure)
    with pytest.raises(ValueError, match=r"hada_w1_a"):
        pipe.load_lora_weights(str(path))


# ------------------------------------------------------------------ round trip (resume)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("algo", ["lierla", "c3lier", "loha"])
def test_saved_file_loads_back_identically(tmp_path, family, algo):
    comps = tiny_components(family=family)
    unet, tes = comps.unet, comps.text_encoders
    net = make_net(family, unet, tes, algo)
    _randomise(net, seed=7)
    path = tmp_path / "rt.safetensors"
    save_network(path, net.state_dict_kohya(torch.float32), {})
    saved, _ = load_network_file(path)

    # resume: a fresh network of the same settings, filled from the file
    fresh = make_net(family, unet, tes, algo)
    result = fresh.load_kohya(saved)
    assert not result.missing and not result.created
    # and a network built from the file alone (key style detected)
    from_file = Network.from_file(path, unet, tes)
    assert from_file.unet_key_style == key_style(family) and from_file.algo == algo
    for other in (fresh, from_file):
        back = other.state_dict_kohya(torch.float32)
        assert set(back) == set(saved)
        assert all(torch.equal(back[k], saved[k]) for k in saved)

    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    ehs = torch.randn(1, 77, unet.config.cross_attention_dim)
    kw = {}
    if family == "sdxl":
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(1, tes[1].config.projection_dim),
                                   "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        with net.apply():
            a = unet(x, t, ehs, **kw).sample
        with from_file.apply():
            b = unet(x, t, ehs, **kw).sample
    # two separately built networks with identical weights (compared exactly above): their sums may be
    # ordered differently by the CPU's kernels; 1e-5 is 100x fp32 rounding (1e-7 of outputs near 2)
    # and far below what one adapter switched off changes (0.07 in SDXL, 0.17 in SD1)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_restated_rules_do_reject_bad_keys(real):
    """The re-stated rules are not vacuous: a misspelled module, an SD1 name on SDXL and a text
    encoder layer the model lacks find nothing."""
    _, _, ldm = real["sdxl"]
    modules, comfy = ldm_modules(ldm, "sdxl"), comfy_key_map(ldm, "sdxl", 2, (1, 2), 3)
    good = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    assert a1111_module(good, modules) and good in comfy
    for bad in ("lora_unet_input_block_4_1_transformer_blocks_0_attn1_to_q",
                "lora_unet_down_blocks_3_attentions_0_proj_in", "lora_te1_text_model_encoder_layers_12_mlp_fc1"):
        assert a1111_module(bad, modules) is None and bad not in comfy
