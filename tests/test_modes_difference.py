"""Difference (copy machine) mechanics on the random tiny model: files, options, errors, copier loading."""
import pytest
import torch

from trainer.models.prompts import encode_prompts
from trainer.models.tiny import tiny_components
from trainer.modes.base import UNetCond
from trainer.modes.difference import DifferenceMode
from trainer.networks.files import load_network_file
from trainer.networks.network import Network

from _modes_helpers import PRESETS, SMALL_ARGS, cli, config, draw, train


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("pair")
    return draw(d / "red.png", (220, 30, 30)), draw(d / "blue.png", (30, 30, 220)), \
        draw(d / "wide.png", (30, 30, 220), size=(72, 64))


@pytest.fixture(scope="module")
def components():
    return tiny_components()


def test_difference_from_the_cli_saves_the_difference_and_the_copier(images, tmp_path):
    red, blue, _ = images
    r = cli("train", "--preset", PRESETS / "Difference.json", "--original-image", red, "--target-image", blue,
            "--name", "d", "--set", "diff_save_1st_pass=true", *SMALL_ARGS, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    printed = [line for line in r.stdout.splitlines() if line.endswith(".safetensors")]
    assert printed == ["output/d_copy.safetensors", "output/d.safetensors"]
    for name, part in (("d_copy", "1st (copier of the original image)"), ("d", "2nd (difference)")):
        tensors, meta = load_network_file(tmp_path / "output" / f"{name}.safetensors")
        assert all(k.startswith("lora_unet_") for k in tensors)  # no text-encoder tensors (bug #15)
        assert meta["ss_training_comment"] == (f"TrainTrain mode: Difference; original image: red.png; "
                                               f"target image: blue.png; pass: {part}")


def test_pair_errors_are_reported_before_any_work(images, tmp_path):
    red, _, wide = images
    r = cli("train", "--preset", PRESETS / "Difference.json", "--original-image", red, "--target-image", wide,
            *SMALL_ARGS, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "Start training" not in r.stderr
    assert "red.png" in r.stderr and "64x64" in r.stderr and "wide.png" in r.stderr and "72x64" in r.stderr
    r = cli("train", "--preset", PRESETS / "ADDifT_Action_SD1.5.json", "--original-image", tmp_path / "gone.png",
            "--target-image", red, *SMALL_ARGS, cwd=tmp_path)
    assert r.returncode == 2 and "original_image" in r.stderr and "gone.png" in r.stderr
    assert not (tmp_path / "output").exists()


def test_first_pass_only_trains_and_saves_the_copier(images, tmp_path, components):
    red, blue, _ = images
    cfg = config("Difference.json", original_image=red, target_image=blue, diff_1st_pass_only=True,
                 save_lora_name="c")
    _, result, _ = train(cfg, tmp_path, DifferenceMode(), components)
    assert result.ok, result.message
    assert result.files == [tmp_path / "output" / "c_copy.safetensors"]  # bug #3: the original saved nothing


def test_second_pass_settings_are_used(images, tmp_path, components):
    red, blue, _ = images
    cfg = config("Difference_Use2ndPass.json", original_image=red, target_image=blue, diff_save_1st_pass=True,
                 save_lora_name="u", **{"2nd.train_iterations": 1})
    assert cfg.second_pass.network_rank == 4
    _, result, _ = train(cfg, tmp_path, DifferenceMode(), components)
    assert result.ok, result.message
    (_, copier), (_, diff) = (load_network_file(f) for f in result.files)
    assert (copier["ss_network_dim"], copier["ss_steps"]) == ("16", "2")
    assert (diff["ss_network_dim"], diff["ss_network_alpha"], diff["ss_steps"]) == ("4", "4.0", "1")


class Probe(DifferenceMode):
    """Records the prediction on a fixed input at the first step of pass 2, before any update."""

    probe = None

    def loss(self, step, x0, cfg):
        if step == 1 and x0 is self.x_targ:
            z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
            with torch.no_grad():
                self.probe = self.run.predict(z, torch.tensor([600]), self.prompts.cond([""], self.size))
        return super().loss(step, x0, cfg)


def test_a_loaded_copier_is_really_applied_in_pass_2(images, tmp_path, components):
    red, blue, _ = images
    cfg = config("Difference.json", original_image=red, target_image=blue, diff_1st_pass_only=True,
                 save_lora_name="k", train_learning_rate=1e-2, train_iterations=3)
    _, first, _ = train(cfg, tmp_path, DifferenceMode(), components)
    copier = first.files[0]
    # pass 2 only, the copier found by name in the LoRA folder
    cfg = config("Difference.json", original_image=red, target_image=blue, diff_load_1st_pass="k_copy",
                 save_lora_name="k2")
    logs = []
    mode = Probe()
    _, result, _ = train(cfg, tmp_path, mode, components, logs=logs)
    assert result.ok, result.message
    assert result.files == [tmp_path / "output" / "k2.safetensors"]
    assert any("Copier loaded from" in m and "pass 1 skipped" in m for m in logs)
    # the same input through the model with the copier file applied by hand, and without it
    z = torch.randn(mode.probe.shape, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([600])
    with torch.no_grad():
        cond = UNetCond(encode_prompts(components, [""]).hidden)
        base = components.unet(z, t, encoder_hidden_states=cond.hidden).sample
        net = Network.from_file(copier, components.unet)
        with net.apply():
            with_copier = components.unet(z, t, encoder_hidden_states=cond.hidden).sample
    torch.testing.assert_close(mode.probe, with_copier, rtol=1e-4, atol=1e-5)
    assert (mode.probe - base).abs().max() > 100 * (mode.probe - with_copier).abs().max() + 1e-3


def test_unknown_copier_file_is_a_clear_error(images, tmp_path, components):
    red, blue, _ = images
    cfg = config("Difference.json", original_image=red, target_image=blue, diff_load_1st_pass="nothing_here")
    with pytest.raises(ValueError, match="diff_load_1st_pass: 'nothing_here' is neither a file nor a LoRA"):
        train(cfg, tmp_path, DifferenceMode(), components)
