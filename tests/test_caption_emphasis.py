"""Captions are read literally by default, as the original TrainTrain and kohya read them: a caption
``name (cosplay)`` trains with its brackets, not as ``name cosplay`` weighted 1.1.  ``caption_emphasis``
turns the Web-UI emphasis syntax on.  Prompts typed in iLECO keep the emphasis syntax (the original
encoded them with the Web-UI's own parser)."""
import pytest
import torch

from trainer.config import Config
from trainer.engine import OutputPaths, TrainingRun
from trainer.models.prompts import encode_prompts
from trainer.models.tiny import tiny_components
from trainer.modes.ileco import ILECOMode
from trainer.modes.lora import LoRAMode
from _family_helpers import SMALL, shape_image

torch.set_num_threads(1)

CAPTION = "name (cosplay)"


def _train_lora(tmp_path, components, **settings):
    shape_image(tmp_path / "images" / "a.png", (200, 40, 40))
    (tmp_path / "images" / "a.txt").write_text(CAPTION)
    cfg = Config.defaults("LoRA").with_overrides({
        **SMALL, "lora_data_directory": str(tmp_path / "images"), "lora_trigger_word": "", "train_iterations": 1,
        "save_lora_name": "cap", **settings})
    seen = {}

    class Peek(LoRAMode):
        def loss(self, step):
            seen["captions"] = list(self.captions)
            seen["hidden"] = self._cond([self.captions[0]], [self.sizes[0]]).hidden.detach().clone()
            return super().loss(step)

    run = TrainingRun(cfg, components, OutputPaths.under(tmp_path / "out"), log=lambda m: None,
                      device=torch.device("cpu"))
    result = run.run(Peek())
    assert result.ok, result.message
    return seen


@pytest.mark.parametrize("blocks", ["IN01,OUT11", "BASE,IN01,OUT11"], ids=["frozen-te", "trained-te"])
def test_captions_are_literal_by_default_and_emphasis_is_opt_in(tmp_path, blocks):
    c = tiny_components()
    with torch.no_grad():
        literal = encode_prompts(c, [CAPTION], emphasis=False).hidden
        weighted = encode_prompts(c, [CAPTION], emphasis=True).hidden
    assert not torch.allclose(literal, weighted)  # the two readings differ on this caption

    default = _train_lora(tmp_path / "a", c, network_blocks=blocks)
    assert default["captions"] == [CAPTION]
    torch.testing.assert_close(default["hidden"], literal, atol=1e-5, rtol=1e-5)

    opted = _train_lora(tmp_path / "b", tiny_components(), network_blocks=blocks, caption_emphasis=True)
    torch.testing.assert_close(opted["hidden"], weighted, atol=1e-5, rtol=1e-5)


def test_a_preset_without_the_setting_reads_captions_literally():
    cfg = Config.defaults("LoRA").with_overrides({"network_rank": 8})
    assert cfg.caption_emphasis is False
    assert Config.defaults("LoRA").with_overrides({"caption_emphasis": "true"}).caption_emphasis is True


def test_ileco_prompts_keep_the_emphasis_syntax(tmp_path):
    """(cat:1.5) in an iLECO prompt is the Web-UI's weight, as the original encoded it."""
    c = tiny_components()
    with torch.no_grad():
        weighted = encode_prompts(c, ["a (cat:1.5)"]).hidden
        literal = encode_prompts(c, ["a (cat:1.5)"], emphasis=False).hidden
    assert not torch.allclose(weighted, literal)
    cfg = Config.defaults("iLECO").replace(original_prompt="a (cat:1.5)", target_prompt="a dog").with_overrides(
        {**SMALL, "lora_trigger_word": "", "train_iterations": 1, "save_lora_name": "ileco"})
    seen = {}

    class Peek(ILECOMode):
        def loss(self, step):
            seen.update(self.prompts._hidden)
            return super().loss(step)

    run = TrainingRun(cfg, c, OutputPaths.under(tmp_path), log=lambda m: None, device=torch.device("cpu"))
    assert run.run(Peek()).ok
    (key,) = [k for k in seen if "cat" in k]
    torch.testing.assert_close(seen[key], weighted, atol=1e-5, rtol=1e-5)
