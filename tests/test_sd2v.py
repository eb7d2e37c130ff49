"""SD2.x 768-v: v-prediction read from the checkpoint where it can be (metadata, a companion .yaml,
marker keys), else the model_v_pred setting; zero-terminal-SNR; every mode on the tiny SD2-v model."""
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from safetensors import safe_open
from safetensors.torch import save_file

from _family_helpers import MODES, SMALL, cli, mode_inputs, train_mode
from trainer.config import Config
from trainer.engine import OutputPaths, TrainingRun
from trainer.models.families import Family
from trainer.models.loading import META_V_PRED, load_components, prediction_hints, save_ldm_checkpoint
from trainer.models.tiny import tiny_components
from trainer.modes.lora import LoRAMode
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


class TargetProbe(LoRAMode):
    """Records, in the first step, the clean latents, the noise, the timesteps, the U-Net's prediction
    and the loss the mode returns."""

    seen = None

    def loss(self, step):
        run = self.run
        schedule, predict = run.schedule, run.predict
        seen = {}

        def add_noise(x0, noise, t):
            seen.update(x0=x0.clone(), noise=noise.clone(), t=t.clone())
            return type(schedule).add_noise(schedule, x0, noise, t)

        def recording(noisy, t, cond):
            seen["pred"] = predict(noisy, t, cond)
            return seen["pred"]

        schedule.add_noise, run.predict = add_noise, recording
        try:
            loss = super().loss(step)
        finally:
            del schedule.add_noise, run.predict
        if step == 1:
            self.seen = {**seen, "loss": float(loss)}
        return loss


@pytest.mark.parametrize("v_pred", [True, False])
def test_lora_mode_trains_against_velocity_on_v_models_and_noise_otherwise(root, inputs, v_pred):
    """The LoRA-mode loss of a step is the MSE against diffusers' own v = sqrt(ab) eps - sqrt(1 - ab) x0 on
    a v model (against the noise on an epsilon model), for that step's latents, noise and timesteps."""
    meta, extra = inputs["LoRA"]
    cfg = Config.defaults("LoRA").with_overrides({**SMALL, **extra, "train_batch_size": 2, "train_iterations": 1,
                                                  "train_snr_gamma": 0, "train_loss_function": "MSE",
                                                  "save_lora_name": f"target{v_pred}"})
    mode = TargetProbe()
    run = TrainingRun(cfg, tiny_components(family="sd2", v_pred=v_pred), OutputPaths.under(root / f"tg{v_pred}"),
                      log=lambda m: None, device=torch.device("cpu"))
    assert run.run(mode).ok
    s = mode.seen
    reference = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type="v_prediction" if v_pred else "epsilon")
    velocity = reference.get_velocity(s["x0"], s["noise"], s["t"])
    want = velocity if v_pred else s["noise"]
    other = s["noise"] if v_pred else velocity
    loss = F.mse_loss(s["pred"], want).item()
    assert s["loss"] == pytest.approx(loss, rel=1e-5)
    # the two targets give clearly different losses here, so the check above tells them apart
    assert abs(F.mse_loss(s["pred"], other).item() - loss) > 0.05 * loss


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
