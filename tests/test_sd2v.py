"""SD2.x 768-v: v-prediction read from the checkpoint where it can be (metadata, a companion .yaml,
marker keys), else the model_v_pred setting; zero-terminal-SNR; every mode on the tiny SD2-v model."""
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from _family_helpers import MODES, cli, mode_inputs, train_mode
from trainer.models.families import Family
from trainer.models.loading import META_V_PRED, load_components, prediction_hints, save_ldm_checkpoint
from trainer.models.tiny import tiny_components
from trainer.networks import load_network_file


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("sd2v")


@pytest.fixture(scope="module")
def inputs(root):
    return mode_inputs(root)


@pytest.fixture(scope="module")
def bare_sd2(root):
    """A tiny SD2 single file whose metadata says nothing about the prediction type (like a real
    SD2 768-v or 512-base file: their keys are the same)."""
    path = save_ldm_checkpoint(tiny_components(family="sd2"), root / "with-meta.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != META_V_PRED}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    bare = root / "sd2-768-v.safetensors"
    save_file(tensors, str(bare), metadata=meta)
    return bare


def test_prediction_hints(tmp_path):
    p = tmp_path / "m.safetensors"
    assert prediction_hints(p, {}, {}) == (None, False)
    assert prediction_hints(p, {"modelspec.prediction_type": "v"}, {}) == (True, False)
    assert prediction_hints(p, {"modelspec.prediction_type": "epsilon"}, {"v_pred": 1}) == (False, False)
    assert prediction_hints(p, {"ss_v_parameterization": "True"}, {}) == (True, False)
    assert prediction_hints(p, {}, {"v_pred": 1, "ztsnr": 1}) == (True, True)
    assert prediction_hints(p, {"ss_zero_terminal_snr": "true"}, {}) == (None, True)
    (tmp_path / "m.yaml").write_text("model:\n  params:\n    parameterization: \"v\"\n    linear_start: 0.00085\n")
    assert prediction_hints(p, {}, {}) == (True, False)
    (tmp_path / "m.yaml").write_text("model:\n  params:\n    linear_start: 0.00085\n")
    assert prediction_hints(p, {}, {}) == (None, False)


def test_sd2_v_pred_from_a_companion_yaml_else_the_setting(bare_sd2):
    assert load_components(bare_sd2).info.v_pred is False  # nothing says v: epsilon, like the Web-UI
    yaml = bare_sd2.with_suffix(".yaml")
    yaml.write_text('model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params:\n'
                    '    parameterization: "v"\n')
    try:
        c = load_components(bare_sd2)
        assert c.info.family is Family.SD2 and c.info.v_pred is True
        assert load_components(bare_sd2, v_pred=False).info.v_pred is False  # an explicit setting wins
    finally:
        yaml.unlink()
    assert load_components(bare_sd2, v_pred=True).info.v_pred is True  # model_v_pred


def test_zero_terminal_snr_from_the_setting_or_the_checkpoint(root, inputs):
    result, run, _ = train_mode("iLECO", tiny_components(family="sd2"), root / "zt1", inputs,
                                model_zero_terminal_snr=True)
    assert result.ok and float(run.schedule.alphas_cumprod[-1]) < 1e-6 and run.schedule.v_prediction
    assert load_network_file(result.files[0])[1]["ss_zero_terminal_snr"] == "True"
    comps = tiny_components(family="sd2")
    comps.info = type(comps.info)(Family.SD2, True, True)  # as read from a checkpoint's `ztsnr` key
    result, run, _ = train_mode("iLECO", comps, root / "zt2", inputs)
    assert result.ok and float(run.schedule.alphas_cumprod[-1]) < 1e-6
    result, run, _ = train_mode("iLECO", tiny_components(family="sd2"), root / "zt3", inputs)
    assert float(run.schedule.alphas_cumprod[-1]) > 1e-3 and "ss_zero_terminal_snr" not in \
        load_network_file(result.files[0])[1]


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_trains_on_tiny_sd2_v(mode, root, inputs):
    comps = tiny_components(family="sd2")
    assert comps.info.v_pred
    result, run, calls = train_mode(mode, comps, root, inputs)
    assert result.ok, result.message
    assert run.schedule.v_prediction and calls and all(c is None for c in calls)
    tensors, meta = load_network_file(result.files[-1])
    assert meta["ss_base_model_version"] == "sd_v2_v" and meta["ss_v2"] == "True"
    assert meta["ss_v_parameterization"] == "True" and meta["modelspec.prediction_type"] == "v"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert any(k.startswith("lora_unet_down_blocks_") for k in tensors)
    te = [k for k in tensors if k.startswith("lora_te_")]
    if mode == "LoRA":  # OpenCLIP's last layer is never read: no adapter there (kohya: 23 of 24 layers)
        last = comps.text_encoders[0].config.num_hidden_layers - 1
        assert te and not any(f"_layers_{last}_" in k for k in te)


def test_lora_mode_learns_velocity_on_v_models(root, inputs):
    """The LoRA target is v = sqrt(ab) eps - sqrt(1 - ab) x0 on a v model, eps otherwise."""
    seen = {}
    for v in (True, False):
        result, run, _ = train_mode("LoRA", tiny_components(family="sd2", v_pred=v), root / f"t{v}", inputs)
        x0, eps, t = torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2), torch.tensor([999])
        seen[v] = float(run.schedule.target(x0, eps, t).mean())
    assert seen[False] == 0.0 and seen[True] < -0.9


def test_cli_reads_v_prediction_from_the_yaml(bare_sd2, tmp_path):
    yaml = bare_sd2.with_suffix(".yaml")
    yaml.write_text('model:\n  params:\n    parameterization: "v"\n')
    try:
        r = cli("train", "--mode", "iLECO", "--model", bare_sd2, "--original-prompt", "a cat", "--target-prompt",
                "a dog", "--name", "v_cli", "--iterations", 2, "--set", "image_size=64", "--set",
                "train_model_precision=fp32", "--set", "network_rank=2", cwd=tmp_path)
    finally:
        yaml.unlink()
    assert r.returncode == 0, r.stderr
    meta = load_network_file(tmp_path / "output" / "v_cli.safetensors")[1]
    assert meta["modelspec.prediction_type"] == "v" and meta["ss_base_model_version"] == "sd_v2_v"
