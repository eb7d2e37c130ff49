"""LoRA mode's trigger preservation (lora_trigger_preservation): prompts without the trigger word keep
what the frozen model gives, so the LoRA ties what it learns to its trigger word."""
import copy

import pytest
import torch

from trainer.data.captions import without_trigger
from trainer.data.errors import DataError
from trainer.models.tiny import tiny_components
from trainer.modes.lora import LoRAMode

from _modes_helpers import config, draw, give_effect, train


@pytest.mark.parametrize("caption,trigger,plain", [
    ("sks, red circle", "sks", "red circle"),
    ("sks", "sks", ""),
    ("sks,circle,grey", "sks", "circle, grey"),  # filename tags
    ("circle, sks, grey", "sks", "circle, grey"),  # a shuffled caption
    ("sksx, circle", "sks", "sksx, circle"),  # only the whole tag
    ("red circle", "", "red circle"),
])
def test_the_trigger_word_is_taken_out_of_the_caption(caption, trigger, plain):
    assert without_trigger(caption, trigger) == plain


@pytest.fixture()
def data(tmp_path):
    folder = tmp_path / "data"
    for i, colour in enumerate([(200, 30, 30), (30, 30, 200)]):
        draw(folder / f"{i}.png", colour)
        (folder / f"{i}.txt").write_text(["circle", "square"][i])
    return folder


def lora_cfg(data, **kw):
    return config("LoRA.json", **{"lora_data_directory": str(data), "lora_trigger_word": "sks",
                                  "train_learning_rate": 1e-3, "train_batch_size": 2, **kw})


class Probe(LoRAMode):
    """At step 2, with a LoRA that has an effect, records the mode's loss and the parts computed by
    hand against a copy of the U-Net that never had a network."""

    def __init__(self, frozen_unet):
        self.frozen_unet = frozen_unet
        self.checked = None

    def loss(self, step):
        run = self.run
        if step != 2:
            return super().loss(step)
        give_effect(run.network, 0.05)
        state = run.generator.get_state()
        batcher = copy.deepcopy(self.batcher)
        got = super().loss(step)
        run.generator.set_state(state)
        self.batcher = batcher
        idx = next(self.batcher)
        x0 = torch.stack([self.latents[i] for i in idx])
        noise = run.randn(x0.shape)
        t = run.timesteps(x0.shape[0])
        noisy = run.schedule.add_noise(x0, noise, t)
        mse = lambda a, b: run.step_loss(a, b, t)  # noqa: E731
        sizes = [self.sizes[i] for i in idx]
        with torch.no_grad():
            main = mse(run.predict(noisy, t, self._cond([self.captions[i] for i in idx], sizes)), noise)
            plain = self._cond([without_trigger(self.captions[i], "sks") for i in idx], sizes)
            frozen = self.frozen_unet(noisy, t, encoder_hidden_states=plain.hidden).sample
            lora = run.predict(noisy, t, plain)
            self.checked = (float(got), float(main + 2.0 * mse(lora, frozen)), float((lora - frozen).abs().max()))
        return got


def test_preservation_loss_is_the_documented_formula(data, tmp_path):
    components = tiny_components()
    frozen_unet = copy.deepcopy(components.unet).requires_grad_(False)
    mode = Probe(frozen_unet)
    _, result, _ = train(lora_cfg(data, lora_trigger_preservation=2.0, train_iterations=2), tmp_path, mode,
                         components=components)
    assert result.ok, result.message
    got, want, lora_effect = mode.checked
    assert lora_effect > 1e-3  # the LoRA changes the plain captions' prediction: the term is not zero
    assert got == pytest.approx(want, rel=1e-4)


def test_preservation_keeps_prompts_without_the_trigger_closer_to_the_base_model(data, tmp_path):
    """Trained the same way with and without preservation: on a caption without the trigger word, the
    LoRA moves the prediction less with it."""
    def drift(weight):
        components = tiny_components()
        frozen = copy.deepcopy(components.unet).requires_grad_(False)
        run, result, _ = train(lora_cfg(data, lora_trigger_preservation=weight, train_iterations=12,
                                        train_learning_rate=3e-3), tmp_path / str(weight), LoRAMode(),
                               components=components)
        assert result.ok, result.message
        from trainer.networks.network import Network

        net = Network.from_file(result.files[-1], components.unet, components.text_encoders)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(4, 4, 8, 8, generator=g)
        t = torch.tensor([100, 300, 600, 900])
        from trainer.models.prompts import encode_prompts

        with torch.no_grad():
            cond = encode_prompts(components, ["circle"] * 4).hidden
            base = frozen(x, t, encoder_hidden_states=cond).sample
            net.apply()
            with_lora = components.unet(x, t, encoder_hidden_states=cond).sample
            net.remove()
        return float((with_lora - base).pow(2).mean())

    off, on = drift(0.0), drift(4.0)
    assert on < 0.5 * off, (on, off)


def test_preservation_needs_a_trigger_word(data):
    cfg = config("LoRA.json", lora_data_directory=str(data), lora_trigger_word="", lora_trigger_preservation=1.0)
    with pytest.raises(DataError, match="lora_trigger_preservation: 1 .* lora_trigger_word is empty"):
        LoRAMode().check(cfg)
