"""trainer.networks.files: atomic safetensors writes, overwrite refusal, metadata, kohya hashes,
and the key interop test: our files load in diffusers with the same effect."""

import errno
import hashlib
import json
import logging
import os
import time
import warnings

import pytest
import torch

from trainer.networks import Network, build_metadata, load_network_file, save_network
from trainer.networks import files as files_mod
from trainer.networks.files import NetworkFileExists, addnet_hashes

from test_networks import randomise, tiny_sd1


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "lora_unet_x.lora_down.weight": torch.randn(4, 8, generator=g),
        "lora_unet_x.lora_up.weight": torch.randn(8, 4, generator=g),
        "lora_unet_x.alpha": torch.tensor(2.0),
    }


def _meta(**kw):
    args = dict(family="sd1", algo="lierla", rank=4, alpha=2, output_name="test", training_started_at=1.7e9,
                learning_rate=1e-4, max_train_steps=100)
    args.update(kw)
    return build_metadata(**args)


def test_save_load_round_trip(tmp_path):
    p = tmp_path / "a.safetensors"
    t = _tensors()
    assert save_network(p, t, {"ss_output_name": "a", "ss_network_dim": 4}) == str(p)
    t2, md = load_network_file(p)
    assert t2.keys() == t.keys() and all(torch.equal(t[k], t2[k]) for k in t)
    assert md["ss_output_name"] == "a" and md["ss_network_dim"] == "4"
    assert os.listdir(tmp_path) == ["a.safetensors"]


def test_refuses_to_overwrite(tmp_path):
    p = tmp_path / "a.safetensors"
    save_network(p, _tensors(0), {})
    before = p.read_bytes()
    with pytest.raises(NetworkFileExists, match="already exists"):
        save_network(p, _tensors(1), {})
    assert p.read_bytes() == before
    save_network(p, _tensors(1), {}, overwrite=True)
    assert torch.equal(load_network_file(p)[0]["lora_unet_x.lora_up.weight"], _tensors(1)["lora_unet_x.lora_up.weight"])
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors"]


def test_disk_full_keeps_previous_file(tmp_path, monkeypatch):
    p = tmp_path / "a.safetensors"
    save_network(p, _tensors(0), {})
    before = p.read_bytes()

    def full(fh, data):
        fh.write(data[:10])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files_mod, "_write_all", full)
    with pytest.raises(OSError) as e:
        save_network(p, _tensors(1), {}, overwrite=True)
    assert e.value.errno == errno.ENOSPC
    assert p.read_bytes() == before
    assert os.listdir(tmp_path) == ["a.safetensors"]
    with pytest.raises(OSError):
        save_network(tmp_path / "b.safetensors", _tensors(1), {})
    assert os.listdir(tmp_path) == ["a.safetensors"]


def test_read_only_folder(tmp_path, monkeypatch):
    d = tmp_path / "ro"
    d.mkdir()
    save_network(d / "a.safetensors", _tensors(0), {})
    before = (d / "a.safetensors").read_bytes()
    d.chmod(0o500)
    if not hasattr(os, "geteuid") or os.geteuid() == 0:
        # root (CI containers) and Windows ignore the folder's mode: refuse new files in it the way the
        # kernel does for everyone else, so the test runs everywhere instead of being skipped
        real = files_mod.tempfile.mkstemp

        def mkstemp(*args, dir=None, **kwargs):
            if dir is not None and os.path.samefile(dir, d):
                raise PermissionError(errno.EACCES, "Permission denied", str(d))
            return real(*args, dir=dir, **kwargs)

        monkeypatch.setattr(files_mod.tempfile, "mkstemp", mkstemp)
    try:
        with pytest.raises(PermissionError):
            save_network(d / "a.safetensors", _tensors(1), {}, overwrite=True)
        assert (d / "a.safetensors").read_bytes() == before
        assert os.listdir(d) == ["a.safetensors"]
    finally:
        d.chmod(0o700)


def test_rejects_other_extensions(tmp_path):
    with pytest.raises(ValueError, match="safetensors"):
        save_network(tmp_path / "a.pt", _tensors(), {})


@pytest.mark.parametrize(
    "family,algo,version,v2,arch,impl,pred",
    [
        ("sd1", "lierla", "sd_v1", "False", "stable-diffusion-v1/lora", "diffusers", "epsilon"),
        ("sd2", "c3lier", "sd_v2", "True", "stable-diffusion-v2-512/lora", "diffusers", "epsilon"),
        ("sd2-v", "loha", "sd_v2_v", "True", "stable-diffusion-v2-768-v/lora", "diffusers", "v"),
        ("sdxl", "lierla", "sdxl_base_v1-0", "False", "stable-diffusion-xl-v1-base/lora",
         "https://github.com/Stability-AI/generative-models", "epsilon"),
    ],
)
def test_metadata(family, algo, version, v2, arch, impl, pred):
    started = time.time() - 100
    md = _meta(
        family=family, algo=algo, conv_rank=8, conv_alpha=4, training_started_at=started, seed=42,
        optimizer="adamw", lr_scheduler="cosine", mixed_precision="bf16", num_train_images=3,
        tag_frequency={"1_img": {"cat": 2, "日本": 1}}, resolution=(768, 512), mode="iLECO",
        prompts={"original prompt": "a cat", "target prompt": "a dog"}, sd_model_name="model.safetensors",
        clip_skip=2, min_snr_gamma=5, trigger_phrase="sks",
    )
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in md.items())
    for key in ("ss_session_id", "ss_training_started_at", "ss_training_finished_at", "ss_output_name",
                "ss_learning_rate", "ss_unet_lr", "ss_text_encoder_lr", "ss_max_train_steps", "ss_steps",
                "ss_lr_warmup_steps", "ss_lr_scheduler", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                "ss_mixed_precision", "ss_v2", "ss_base_model_version", "ss_seed", "ss_optimizer",
                "ss_min_snr_gamma", "ss_clip_skip", "ss_num_train_images", "ss_tag_frequency", "ss_resolution",
                "ss_training_comment", "ss_sd_model_name", "modelspec.sai_model_spec", "modelspec.architecture",
                "modelspec.implementation", "modelspec.title", "modelspec.date", "modelspec.resolution",
                "modelspec.prediction_type", "modelspec.trigger_phrase"):
        assert key in md, key
    assert md["ss_base_model_version"] == version and md["ss_v2"] == v2
    assert md["modelspec.architecture"] == arch and md["modelspec.implementation"] == impl
    assert md["modelspec.prediction_type"] == pred and md["modelspec.resolution"] == "768x512"
    assert md["modelspec.sai_model_spec"] == "1.0.1"
    assert float(md["ss_training_started_at"]) == pytest.approx(started)
    assert float(md["ss_training_finished_at"]) >= float(md["ss_training_started_at"])
    assert json.loads(md["ss_tag_frequency"]) == {"1_img": {"cat": 2, "日本": 1}}
    assert md["ss_network_module"] == ("lycoris.kohya" if algo == "loha" else "networks.lora")
    assert md["ss_network_dim"] == "4" and float(md["ss_network_alpha"]) == 2.0
    if algo == "lierla":
        assert "ss_network_args" not in md
    else:
        args = json.loads(md["ss_network_args"])
        assert args["conv_dim"] == "8" and float(args["conv_alpha"]) == 4
        assert (args.get("algo") == "loha") == (algo == "loha")
    assert "iLECO" in md["ss_training_comment"] and "a cat" in md["ss_training_comment"]
    assert "a dog" in md["ss_training_comment"]
    assert md["ss_resolution"] == "(768, 512)"


def test_metadata_defaults_drop_none():
    md = _meta()
    assert "ss_tag_frequency" not in md and "ss_clip_skip" not in md and "modelspec.trigger_phrase" not in md
    assert md["ss_unet_lr"] == md["ss_text_encoder_lr"] == md["ss_learning_rate"]
    with pytest.raises(ValueError, match="family"):
        _meta(family="sd3")


def test_addnet_hashes_match_kohya_definition(tmp_path):
    """sshs_model_hash = sha256 of the tensor bytes (what A1111 recomputes from the file);
    sshs_legacy_hash = sha256 of 64 KiB at 1 MiB of the file re-serialised with ss_* only."""
    from safetensors.torch import save as st_save

    g = torch.Generator().manual_seed(0)
    tensors = {"lora_unet_x.lora_down.weight": torch.randn(600, 600, generator=g)}  # > 1 MiB
    md = {"ss_output_name": "x", "modelspec.title": "not hashed"}
    p = tmp_path / "h.safetensors"
    save_network(p, tensors, md)
    _, saved = load_network_file(p)
    raw = p.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert saved["sshs_model_hash"] == hashlib.sha256(raw[8 + n:]).hexdigest()
    ss_only = st_save(tensors, {"ss_output_name": "x"})
    assert saved["sshs_legacy_hash"] == hashlib.sha256(ss_only[0x100000:0x110000]).hexdigest()[:8]
    assert addnet_hashes(tensors, md) == addnet_hashes(tensors, {"ss_output_name": "x", "modelspec.title": "other"})


def test_network_file_round_trip_and_from_file(tmp_path):
    unet, te = tiny_sd1()
    net = Network.create(unet, [te], algo="c3lier", rank=4, alpha=2, conv_rank=2, conv_alpha=1,
                         train_text_encoder=True)
    randomise(net)
    p = tmp_path / "n.safetensors"
    md = _meta(algo="c3lier", conv_rank=2, conv_alpha=1)
    save_network(p, net.state_dict_kohya(torch.float32), md)
    loaded = Network.from_file(p, unet, [te])
    assert loaded.counts() == net.counts() and loaded.algo == "c3lier"
    assert loaded.metadata["ss_network_module"] == "networks.lora"
    a, b = net.state_dict_kohya(torch.float32), loaded.state_dict_kohya(torch.float32)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # resume into a network created from settings
    resumed = Network.create(unet, [te], algo="c3lier", rank=4, alpha=2, conv_rank=2, conv_alpha=1,
                             train_text_encoder=True)
    res = resumed.load_kohya(load_network_file(p)[0])
    assert not res.created and not res.missing
    c = resumed.state_dict_kohya(torch.float32)
    assert all(torch.equal(a[k], c[k]) for k in a)


# -- interop: diffusers load_lora_weights ------------------------------------------------------

class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _tiny_pipeline(unet, te):
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline

    from trainer.models.tokenizer import clip_tokenizer

    tokenizer = clip_tokenizer()  # the bundled tokenizer: broken or missing is a failure, never a skip
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), norm_num_groups=8, latent_channels=4,
                        layers_per_block=1)
    sched = DDPMScheduler(steps_offset=1, clip_sample=False)
    return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tokenizer, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def test_diffusers_load_lora_weights_same_effect(tmp_path):
    """Our kohya file, loaded by diffusers' own loader, patches the U-Net and the text encoder
    exactly like our network does: every key consumed, same outputs at strength 1 and 0.5."""
    import peft  # noqa: F401  (requirements-dev.txt: diffusers needs it to load LoRAs; missing is a failure)
    unet, te = tiny_sd1()
    net = Network.create(unet, [te], algo="c3lier", rank=4, alpha=2, conv_rank=2, conv_alpha=1,
                         train_text_encoder=True)
    randomise(net, 0.2, seed=3)
    p = tmp_path / "interop.safetensors"
    save_network(p, net.state_dict_kohya(torch.float32), _meta(algo="c3lier", conv_rank=2, conv_alpha=1))

    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([321])
    ids = torch.randint(0, 49406, (1, 77), generator=g)
    with torch.no_grad():
        ehs = te(ids)[0]
        with net.apply():
            te1, u1 = te(ids)[0], unet(x, t, ehs).sample
            with net.multiplier(0.5):
                te5, u5 = te(ids)[0], unet(x, t, ehs).sample
        base_u = unet(x, t, ehs).sample
    assert (u1 - base_u).abs().max() > 1e-3 and (te1 - ehs).abs().max() > 1e-3

    pipe = _tiny_pipeline(unet, te)
    handler = _Collect()
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(p), adapter_name="ours")
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    texts = handler.messages + [str(w.message) for w in caught]
    assert not [m for m in texts if "unexpected" in m.lower() or "not been correctly renamed" in m.lower()], texts

    n_unet = sum(1 for n, _ in pipe.unet.named_modules() if n.endswith(".lora_A"))
    n_te = sum(1 for n, _ in pipe.text_encoder.named_modules() if n.endswith(".lora_A"))
    assert (n_unet, n_te) == net.counts() == (277, 12)

    with torch.no_grad():
        torch.testing.assert_close(pipe.text_encoder(ids)[0], te1, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pipe.unet(x, t, ehs).sample, u1, atol=1e-5, rtol=1e-5)
        pipe.set_adapters(["ours"], adapter_weights=[0.5])
        torch.testing.assert_close(pipe.text_encoder(ids)[0], te5, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pipe.unet(x, t, ehs).sample, u5, atol=1e-5, rtol=1e-5)


def test_from_file_detects_sgm_keys(tmp_path):
    unet, te = tiny_sd1()
    net = Network.create(unet, [te], algo="c3lier", rank=2, alpha=1, unet_key_style="sgm", train_text_encoder=True)
    randomise(net)
    p = tmp_path / "sgm.safetensors"
    save_network(p, net.state_dict_kohya(torch.float16), {})
    assert any(k.startswith("lora_unet_input_blocks_4_1_") for k in load_network_file(p)[0])
    loaded = Network.from_file(p, unet, [te])
    assert loaded.unet_key_style == "sgm" and loaded.counts() == net.counts()
    a, b = net.state_dict_kohya(torch.float16), loaded.state_dict_kohya(torch.float16)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # either key style is read whatever style the network names its own modules in (issue 13)
    as_diffusers = Network.from_file(p, unet, [te], unet_key_style="diffusers")
    assert as_diffusers.counts() == net.counts()
    assert any(k.startswith("lora_unet_down_blocks_1_attentions_0_") for k in as_diffusers.state_dict_kohya())


def test_failed_rename_leaves_no_temp_file(tmp_path, monkeypatch):
    p = tmp_path / "a.safetensors"
    save_network(p, _tensors(0), {})
    before = p.read_bytes()

    def refuse(src, dst):
        raise PermissionError(errno.EACCES, "read-only folder", str(dst))

    monkeypatch.setattr(files_mod.os, "replace", refuse)
    with pytest.raises(PermissionError):
        save_network(p, _tensors(1), {}, overwrite=True)
    assert p.read_bytes() == before
    assert os.listdir(tmp_path) == ["a.safetensors"]
