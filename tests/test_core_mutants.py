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
