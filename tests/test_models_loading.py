"""Reading checkpoints safely, detection, strict VAE loading, the tiny model."""
import os
import pickle

import pytest
import torch

from trainer.models import ModelError, load_components, read_state_dict, save_ldm_checkpoint, tiny_components
from trainer.models.configs import configs_for
from trainer.models.convert import canonical_te_keys, vae_to_ldm
from trainer.models.families import LDM_PROBE_KEY, Family, ModelInfo, detect
from trainer.models.loading import Components, checkpoint_state_dict


@pytest.fixture(scope="module")
def tiny():
    return tiny_components()


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory, tiny):
    return save_ldm_checkpoint(tiny, tmp_path_factory.mktemp("tiny") / "tiny.safetensors")


@torch.no_grad()
def _outputs(c: Components):
    g = torch.Generator().manual_seed(3)
    lat = torch.randn(2, 4, 8, 8, generator=g)
    img = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70])
    ctx = c.text_encoders[0](input_ids=ids).last_hidden_state
    return [
        ctx,
        c.unet(lat, torch.tensor([10, 900]), ctx.expand(2, -1, -1)).sample,
        c.vae.encode(img).latent_dist.mean,
        c.vae.decode(lat[:1]).sample,
    ]


# Two separately built models with identical weights compute the same sums in whatever order the CPU's
# kernels choose (memory layout, alignment, AVX-512 or not), so their fp32 outputs may differ in the last
# bits: 1e-6 on an AMD EPYC, up to 5.5e-6 here when one model runs channels-last (same weights, other
# kernels). 1e-4 is 20x that, and 100x below what one tensor 1 % off does (>= 1.2e-2 on every output).
OUTPUT_TOL = {"rtol": 1e-4, "atol": 1e-4}


def _same(a, b):
    """Identical weights (compared exactly) and the same outputs (within OUTPUT_TOL)."""
    for ma, mb in zip(a.modules(), b.modules()):
        sa, sb = ma.state_dict(), mb.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    for x, y in zip(_outputs(a), _outputs(b)):
        torch.testing.assert_close(x, y, **OUTPUT_TOL)
    return True


# ---------------------------------------------------------------- detection


@pytest.mark.parametrize("width,family", [(768, Family.SD1), (1024, Family.SD2), (2048, Family.SDXL)])
def test_detect_families(width, family):
    sd = {LDM_PROBE_KEY: torch.empty(640, width, device="meta")}
    assert detect(sd) == ModelInfo(family, False)
    assert detect(sd, v_pred_hint=True) == ModelInfo(family, True)
    assert detect(dict(sd, v_pred=torch.empty(0))).v_pred is True
    assert detect(dict(sd, v_pred=torch.empty(0)), v_pred_hint=False).v_pred is False
    dsd = {"down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight": torch.empty(640, width, device="meta")}
    assert detect(dsd).family is family


def test_detect_unknown_raises():
    with pytest.raises(ModelError, match="1280"):
        detect({LDM_PROBE_KEY: torch.empty(640, 1280, device="meta")}, where="refiner.safetensors")
    with pytest.raises(ModelError, match="lora.safetensors.*not a Stable Diffusion") as e:
        detect({"lora_unet_x.lora_down.weight": torch.zeros(1)}, where="lora.safetensors")
    assert "lora_unet_x" in str(e.value)


# ---------------------------------------------------------------- reading files


def test_ckpt_torch_save_dict(tmp_path, tiny):
    sd = {k: v.clone() for k, v in checkpoint_state_dict(tiny).items()}
    p = tmp_path / "m.ckpt"
    torch.save({"state_dict": sd, "global_step": 5, "epoch": 1}, p)
    back = read_state_dict(p)
    assert set(back) == set(sd)
    p2 = tmp_path / "m.pt"
    torch.save(sd, p2)
    assert set(read_state_dict(p2)) == set(sd)
    with pytest.raises(ModelError, match="configs|cross-attention|not"):
        load_components(p)  # tiny widths are not a known family without the metadata


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.ckpt"
    with open(p, "wb") as f:
        pickle.dump({"state_dict": {"a": _Evil(marker)}}, f)
    with pytest.raises(ModelError, match="evil.ckpt.*refused"):
        read_state_dict(p)
    with pytest.raises(ModelError):
        load_components(p)
    assert not marker.exists()


def test_unreadable_files(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        read_state_dict(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    with pytest.raises(ModelError, match="bad.safetensors"):
        read_state_dict(bad)
    odd = tmp_path / "m.onnx"
    odd.write_bytes(b"x")
    with pytest.raises(ModelError, match="unsupported"):
        read_state_dict(odd)


# ---------------------------------------------------------------- tiny model


def test_tiny_model_properties(tiny):
    assert tiny.name == "tiny-sd1"
    assert tiny.info == ModelInfo(Family.SD1, False)
    n = sum(p.numel() for m in tiny.modules() for p in m.parameters())
    assert n < 5_000_000
    cfg = tiny.unet.config
    assert list(cfg.down_block_types) == configs_for(Family.SD1).unet["down_block_types"]
    assert list(cfg.up_block_types) == configs_for(Family.SD1).unet["up_block_types"]
    assert cfg.layers_per_block == 2 and cfg.cross_attention_dim == tiny.text_encoders[0].config.hidden_size
    assert tiny.vae.config.latent_channels == 4 and len(tiny.vae.config.block_out_channels) == 4
    assert tiny.text_encoders[0].config.vocab_size == 49408
    assert tiny.scaling_factor == pytest.approx(0.18215)
    # same names as SD1.5
    assert "down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k" in dict(tiny.unet.named_modules())
    lat = tiny.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert lat.shape == (1, 4, 8, 8)
    assert not any(p.requires_grad for m in tiny.modules() for p in m.parameters())


def test_tiny_is_deterministic(tiny):
    again = tiny_components()
    for a, b in zip(tiny.modules(), again.modules()):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    other = tiny_components(seed=1)
    assert not torch.equal(other.unet.conv_in.weight, tiny.unet.conv_in.weight)


def test_tiny_saves_and_loads_back(tiny, tiny_file):
    loaded = load_components(tiny_file)
    assert loaded.name == "tiny-sd1" and loaded.info == tiny.info
    assert load_components(tiny_file, v_pred=True).info.v_pred is True
    assert _same(tiny, loaded)
    # weights live on CPU, not meta, and loading stays frozen
    assert all(not p.is_meta and not p.requires_grad for m in loaded.modules() for p in m.parameters())
    default = load_components(None)
    assert _same(tiny, default)
    assert load_components(None, v_pred=True).info.v_pred is True


def test_load_components_half_precision(tiny_file):
    c = load_components(tiny_file, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for m in c.modules() for p in m.parameters())


def test_diffusers_folder(tmp_path, tiny):
    folder = tmp_path / "tinyd"
    tiny.unet.save_pretrained(folder / "unet")
    tiny.vae.save_pretrained(folder / "vae")
    tiny.text_encoders[0].save_pretrained(folder / "text_encoder")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text('{"prediction_type": "v_prediction"}')
    c = load_components(folder)
    assert c.family is Family.SD1 and c.info.v_pred is True
    assert _same(tiny, c)
    with pytest.raises(ModelError, match="not a diffusers model"):
        load_components(tmp_path)


# ---------------------------------------------------------------- separate VAE files


def _vae_variants(tiny):
    diff = {k: v.clone() for k, v in tiny.vae.state_dict().items()}
    ldm_prefixed = vae_to_ldm(diff, tiny.configs.vae)
    ldm_plain = {k[len("first_stage_model."):]: v for k, v in ldm_prefixed.items()}
    return {"diffusers": diff, "ldm_prefixed": ldm_prefixed, "ldm": ldm_plain}


@pytest.mark.parametrize("variant", ["diffusers", "ldm_prefixed", "ldm"])
def test_vae_file_variants(tmp_path, tiny, tiny_file, variant):
    from safetensors.torch import save_file

    other = tiny_components(seed=5)
    sd = _vae_variants(other)[variant]
    p = tmp_path / f"vae_{variant}.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(p))
    c = load_components(tiny_file, vae_path=p)
    for k, v in other.vae.state_dict().items():
        assert torch.equal(c.vae.state_dict()[k], v), k
    assert torch.equal(c.unet.conv_in.weight, tiny.unet.conv_in.weight)


def test_truncated_vae_file_names_missing_keys(tmp_path, tiny_file, tiny):
    from safetensors.torch import save_file

    sd = _vae_variants(tiny)["ldm"]
    dropped = ["decoder.conv_out.weight", "encoder.mid.attn_1.q.weight"]
    for k in dropped:
        sd.pop(k)
    p = tmp_path / "cut.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(p))
    with pytest.raises(ModelError) as e:
        load_components(tiny_file, vae_path=p)
    msg = str(e.value)
    assert "cut.safetensors" in msg and "missing" in msg
    assert "decoder.conv_out.weight" in msg and "encoder.mid_block.attentions.0.to_q.weight" in msg

    # a VAE of another size: shape mismatch, named
    big = {k: v.contiguous() for k, v in _vae_variants(tiny)["diffusers"].items()}
    big["encoder.conv_in.weight"] = torch.zeros(8, 3, 3, 3)
    p2 = tmp_path / "wrong.safetensors"
    save_file(big, str(p2))
    with pytest.raises(ModelError, match="shape mismatch.*encoder.conv_in.weight"):
        load_components(tiny_file, vae_path=p2)

    # a U-Net file given as VAE
    p3 = tmp_path / "unet_as_vae.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.unet.state_dict().items()}, str(p3))
    with pytest.raises(ModelError, match="unet_as_vae"):
        load_components(tiny_file, vae_path=p3)


def test_te_keys_canonical_whatever_transformers(tiny):
    keys = canonical_te_keys(tiny.text_encoders[0].state_dict())
    assert "text_model.encoder.layers.0.self_attn.q_proj.weight" in keys
    assert "text_model.final_layer_norm.weight" in keys
