"""Behaviours of the training core that mutation testing (tests/mutation.py, docs/TESTING.md) found
untested: each test here kills mutants that left the rest of the fast suite green."""
import pytest
import torch

from _modes_helpers import config, train
from trainer.data.dataset import build_samples
from trainer.demo import draw_demo_images
from trainer.models.prompts import encode_prompts
from trainer.models.tiny import tiny_components
from trainer.modes.lora import LoRAMode

torch.set_num_threads(1)

LONG = ", ".join(["a very long caption about an orange ring on teal"] * 12)  # more than 75 tokens


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = draw_demo_images(tmp_path_factory.mktemp("imgs"), count=3, size=128)
    (folder / sorted(p.stem for p in folder.glob("*.png"))[0]).with_suffix(".txt").write_text(LONG)
    return folder


IMAGE_SETTINGS = {"image_size": "128", "image_buckets_step": 64, "image_min_length": 64, "image_max_ratio": 2.0,
                  "image_num_multiply": 2, "sub_image_num": 1, "image_mirroring": True,
                  "image_disable_upscale": True, "lora_trigger_word": "zqx", "image_use_filename_as_tag": True}


def test_lora_mode_trains_on_the_samples_its_image_settings_describe(images, tmp_path):
    cfg = config(None, mode="LoRA", lora_data_directory=str(images), train_iterations=1,
                 network_blocks=["IN01", "OUT11"], **IMAGE_SETTINGS)
    mode = LoRAMode()
    run, result, _ = train(cfg, tmp_path, mode)
    assert result.ok, result.message
    want = build_samples(images, image_size=(128, 128), buckets_step=64, min_length=64, max_ratio=2.0, num_multiply=2,
                         sub_image_num=1, mirroring=True, disable_upscale=True, trigger="zqx",
                         use_filename_as_tag=True, warn=lambda m: None)
    assert len(want) > 6  # the settings multiply the 3 images: repeats, sub images, mirrors
    assert mode.captions == [s.caption for s in want] and mode.buckets == [s.bucket for s in want]
    assert run.summary["num_samples"] == len(want) and run.summary["num_train_images"] == 3
    assert len(mode.latents) == len(want) and all(x.shape[1:] == (s.bucket[1] // 8, s.bucket[0] // 8)
                                                  for x, s in zip(mode.latents, want))


def test_cached_captions_condition_the_unet_like_encoding_them_in_the_step(images, tmp_path):
    """Without BASE the captions are encoded once before training; a batch mixing a long caption (two
    75-token chunks) with a short one is padded with the empty chunk, as encoding them together does."""
    components = tiny_components()
    cfg = config(None, mode="LoRA", lora_data_directory=str(images), train_iterations=1, clip_skip=2,
                 network_blocks=["IN01", "OUT11"])
    mode = LoRAMode()
    _, result, _ = train(cfg, tmp_path, mode, components=components)
    assert result.ok, result.message
    assert not mode.train_te
    short = next(c for c in mode.captions if c != LONG)
    cond = mode._cond([LONG, short], mode.sizes[:2])
    with torch.no_grad():
        want = encode_prompts(components, [LONG, short], clip_skip=2).hidden
    assert cond.hidden.shape == want.shape == (2, 154, want.shape[2])
    torch.testing.assert_close(cond.hidden, want, rtol=1e-4, atol=1e-5)  # same encoder, run twice
    with torch.no_grad():
        other_skip = encode_prompts(components, [LONG, short], clip_skip=1).hidden
    assert not torch.allclose(cond.hidden, other_skip, atol=1e-3)  # clip_skip reaches the cache


# --- networks: apply / remove / multipliers, as a trainer and a loader use them -------------------------

def small_network(algo="lierla", **kw):
    from trainer.networks.network import Network

    c = tiny_components()
    net = Network.create(c.unet, c.text_encoders, algo=algo, rank=2, alpha=2, train_text_encoder=True, **kw)
    with torch.no_grad():
        for q in net.parameters():  # a non-zero effect, so multipliers show
            q.copy_(torch.randn(q.shape, generator=torch.Generator().manual_seed(q.numel())) * 0.2)
    return c, net


def test_network_context_managers_let_errors_through_and_undo():
    c, net = small_network()
    with pytest.raises(ZeroDivisionError):
        with net.apply():
            1 / 0
    assert not net.applied and all(not m.applied for m in net.adapters())
    net.apply()
    with pytest.raises(RuntimeError, match=r"^network is already applied$"):
        net.apply()
    with pytest.raises(ZeroDivisionError):
        with net.multiplier(0.25, 0.5):
            1 / 0
    assert net.current_multiplier == (1.0, 1.0) and {m.multiplier for m in net.adapters()} == {1.0}
    net.remove()


def test_a_failed_apply_restores_the_adapters_already_applied(monkeypatch):
    c, net = small_network()
    x = torch.randn(1, 4, 8, 8)
    hidden = torch.randn(1, 77, c.unet.config.cross_attention_dim)
    with torch.no_grad():
        before = c.unet(x, torch.tensor([10]), encoder_hidden_states=hidden).sample
    mods = list(net.adapters())
    monkeypatch.setattr(mods[len(mods) // 2], "apply_to", lambda: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError, match="boom"):
        net.apply()
    assert not net.applied and all(not m.applied for m in mods)
    with torch.no_grad():
        assert torch.equal(c.unet(x, torch.tensor([10]), encoder_hidden_states=hidden).sample, before)


def test_unet_and_text_encoder_multipliers_are_separate():
    c, net = small_network()
    unet_mods, te_mods = net.unet_modules, net.te_modules
    assert unet_mods and te_mods
    net.set_multiplier(0.75, 0.0)
    assert net.current_multiplier == (0.75, 0.0)
    assert {m.multiplier for m in unet_mods} == {0.75} and {m.multiplier for m in te_mods} == {0.0}
    with net.multiplier(0.5, 0.25):
        assert {m.multiplier for m in unet_mods} == {0.5} and {m.multiplier for m in te_mods} == {0.25}
        assert net.current_multiplier == (0.5, 0.25)
    assert net.current_multiplier == (0.75, 0.0) and {m.multiplier for m in te_mods} == {0.0}
    with net.multiplier(0.3):  # one value: both parts
        assert {m.multiplier for m in net.adapters()} == {0.3}


@pytest.mark.parametrize("algo", ["lierla", "c3lier", "loha"])
def test_fresh_networks_start_at_multiplier_one_and_a_file_knows_its_algorithm(tmp_path, algo):
    from trainer.networks.files import save_network
    from trainer.networks.network import Network

    c, net = small_network(algo)
    assert net.current_multiplier == (1.0, 1.0) and {m.multiplier for m in net.adapters()} == {1.0}
    path = tmp_path / f"{algo}.safetensors"
    save_network(path, net.state_dict_kohya(torch.float32), {"ss_network_module": "x"})
    loaded = Network.from_file(path, c.unet, c.text_encoders)
    assert loaded.algo == algo and loaded.current_multiplier == (1.0, 1.0)
    assert {m.multiplier for m in loaded.adapters()} == {1.0}
    half = Network.from_file(path, c.unet, c.text_encoders, multiplier=0.5, dtype=torch.bfloat16)
    assert {m.multiplier for m in half.adapters()} == {0.5} and {q.dtype for q in half.parameters()} == {torch.bfloat16}


def test_loha_adapters_live_on_the_device_of_their_module():
    from trainer.networks.modules import LoHaModule

    conv = torch.nn.Conv2d(4, 4, 3, padding=1, device="meta")
    assert all(q.device.type == "meta" for q in LoHaModule("x", conv, 2).parameters())
    assert LoHaModule("x", torch.nn.Linear(4, 4), 2).multiplier == 1.0


@pytest.mark.parametrize("algo", ["lierla", "c3lier", "loha"])
def test_adapters_take_the_networks_dtype_and_their_modules_device(algo):
    from trainer.networks.network import Network

    c = tiny_components()
    net = Network.create(c.unet, algo=algo, rank=2, alpha=1, dtype=torch.bfloat16)
    assert {q.dtype for q in net.parameters()} == {torch.bfloat16}
    meta = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.Linear(4, 4)).to("meta")
    from trainer.networks.modules import LoHaModule, LoRAModule

    cls = LoHaModule if algo == "loha" else LoRAModule
    for m in meta:
        adapter = cls("x", m, 2, 1.0, dtype=torch.bfloat16)
        assert {(q.device.type, q.dtype) for q in adapter.parameters()} == {("meta", torch.bfloat16)}
        assert all(b.device.type == "meta" for b in adapter.buffers())


def test_misuse_of_adapters_and_networks_is_named():
    from trainer.networks.network import Network

    c = tiny_components()
    a = Network.create(c.unet, rank=2, alpha=1)
    b = Network.create(c.unet, rank=2, alpha=1)
    adapter = next(iter(a.adapters()))
    with pytest.raises(RuntimeError, match=r": adapter is not applied$"):
        adapter(torch.zeros(1, *adapter.org_module.weight.shape[1:2]))
    a.apply()
    with pytest.raises(RuntimeError, match=r": adapter is already applied$"):
        adapter.apply_to()
    b.apply()
    with pytest.raises(RuntimeError, match=r"; remove networks in reverse order of application$"):
        a.remove()
    with pytest.raises(RuntimeError, match=r"; remove adapters in reverse order of application$"):
        adapter.restore()
    b.remove()
    a.remove()
    assert not a.applied and not b.applied


def test_network_settings_reach_the_adapters_and_bad_ones_are_named():
    from trainer.networks.network import Network

    c = tiny_components()
    net = Network.create(c.unet, algo="c3lier", rank=4, alpha=2)  # conv rank/alpha 0: inherit rank/alpha
    convs = [m for m in net.adapters() if m.org_module.__class__.__name__ == "Conv2d"
             and m.org_module.kernel_size != (1, 1)]
    assert net.algo == "c3lier" and convs
    assert {(m.rank, float(m.alpha)) for m in convs} == {(4, 2.0)}
    own = Network.create(c.unet, algo="c3lier", rank=4, alpha=2, conv_rank=2, conv_alpha=1)
    assert {(m.rank, float(m.alpha)) for m in own.adapters() if m.org_module.__class__.__name__ == "Conv2d"
            and m.org_module.kernel_size != (1, 1)} == {(2, 1.0)}
    with pytest.raises(ValueError, match=r"^network_rank must be >= 1, got 0$"):
        Network.create(c.unet, rank=0)
    with pytest.raises(ValueError, match=r"^unet_key_style must be one of .*, got 'ldm'$"):
        Network(c.unet, unet_key_style="ldm")
