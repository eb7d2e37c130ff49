"""Core training behaviours whose breakage a loss curve would not show (issue 17): gradient
checkpointing really on, and the demo's verdict on the loss in both directions."""
import pytest
import torch

import trainer.__main__  # noqa: F401  its ProgressPrinter binds sys.stderr at import: import it outside capsys
import trainer.demo as demo
from _modes_helpers import config, train
from trainer.demo import draw_demo_images
from trainer.models.tiny import tiny_components
from trainer.modes.lora import LoRAMode
from trainer.networks.targets import BLOCK_IDS

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return draw_demo_images(tmp_path_factory.mktemp("imgs"), count=2)


def count_block_forwards(components):
    """Calls of a module inside a U-Net resnet and of one inside a text-encoder layer. A checkpointed
    segment calls its modules a second time during backward (recomputation instead of stored activations;
    the recomputation stops early, so count the start of each call, not its end)."""
    counts = {"unet": 0, "te": 0}
    unet_block = components.unet.up_blocks[-1].resnets[-1].conv1  # on the way back to every adapter
    te_layer = components.text_encoders[0].get_submodule("encoder.layers.0.mlp")
    unet_block.register_forward_pre_hook(lambda *a: counts.__setitem__("unet", counts["unet"] + 1))
    te_layer.register_forward_pre_hook(lambda *a: counts.__setitem__("te", counts["te"] + 1))
    return counts


@pytest.mark.parametrize("train_te", [True, False])
def test_gradient_checkpointing_recomputes_unet_and_trained_text_encoder_in_backward(images, tmp_path, train_te):
    blocks = [b for b in BLOCK_IDS if train_te or b != "BASE"]
    seen = {}
    for flag in (False, True):
        cfg = config(None, mode="LoRA", lora_data_directory=str(images), train_iterations=1,
                     use_gradient_checkpointing=flag, network_blocks=blocks, save_lora_name=f"gc{flag}{train_te}")
        components = tiny_components()
        counts = count_block_forwards(components)
        _, result, _ = train(cfg, tmp_path / f"{flag}", LoRAMode(), components=components)
        assert result.ok, result.message
        seen[flag] = dict(counts)
    # one training step: the U-Net block runs once without checkpointing, twice with it
    assert seen[False]["unet"] == 1 and seen[True]["unet"] == 2
    if train_te:  # the text encoder is in the step only when it is trained
        assert seen[False]["te"] == 1 and seen[True]["te"] == 2
    else:  # captions encoded once before training (no grad): nothing to recompute
        assert seen[False]["te"] == seen[True]["te"] >= 1


@pytest.mark.parametrize("before,after,verdict", [
    (1.47, 1.07, "(27% lower)"),
    (1.00, 1.25, "(25% higher)"),
    (1.00, 1.00, "(unchanged)"),
])
def test_demo_says_whether_the_lora_lowered_or_raised_the_loss(tmp_path, capsys, monkeypatch, before, after,
                                                               verdict):
    losses = {0.0: before, 1.0: after}
    monkeypatch.setattr(demo, "denoising_loss", lambda c, n, lat, prompt, multiplier: losses[multiplier])
    monkeypatch.setattr(demo, "demo_config", lambda data, steps, real=demo.demo_config: real(data, steps).with_overrides(
        {"network_rank": 2, "network_alpha": 2, "train_batch_size": 1}))
    assert demo.run_demo(tmp_path, steps=1) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("Denoising loss")][0]
    assert line.endswith(f"{before:.4f} without the LoRA, {after:.4f} with it {verdict}"), line
