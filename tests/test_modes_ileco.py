"""iLECO mechanics on the random tiny model: the CLI run, the saved file, the objectives' formulas."""
import pytest
import torch

from trainer.data.errors import DataError
from trainer.modes.ileco import ILECOMode
from trainer.networks.files import load_network_file

from _modes_helpers import PRESETS, SMALL_ARGS, cli, config, give_effect, train


def test_ileco_from_the_cli_saves_unet_only_with_the_prompts_in_the_metadata(tmp_path):
    r = cli("train", "--preset", PRESETS / "iLECO.json", "--original-prompt", "red", "--target-prompt", "blue",
            "--name", "redblue", *SMALL_ARGS, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    path = tmp_path / "output" / "redblue.safetensors"
    assert [line for line in r.stdout.splitlines() if line.endswith(".safetensors")] == [str(path.relative_to(tmp_path))]
    tensors, meta = load_network_file(path)
    assert tensors and not any(k.startswith("lora_te") for k in tensors)  # bug #15: no dead TE tensors
    assert all(k.startswith("lora_unet_") for k in tensors)
    assert meta["ss_training_comment"] == "TrainTrain mode: iLECO; original prompt: red; target prompt: blue"
    assert meta["ss_num_train_images"] == "0"
    assert "0 text-encoder modules" in r.stderr


def test_empty_original_prompt_is_refused_before_the_model_loads(tmp_path):
    r = cli("train", "--preset", PRESETS / "iLECO.json", "--target-prompt", "blue", *SMALL_ARGS, cwd=tmp_path)
    assert r.returncode == 2 and "original_prompt is empty" in r.stderr and "Traceback" not in r.stderr
    assert "Start training" not in r.stderr and not (tmp_path / "output").exists()


class Probe(ILECOMode):
    """Compares, at step 1, the mode's target with predictions computed by hand, and records the
    noise of every step."""

    def __init__(self, expected):
        self.expected = expected
        self.noises = []
        self.checked = None

    def loss(self, step):
        run = self.run
        if step == 1:
            b = self.shape[0]
            z = torch.randn(self.shape, generator=torch.Generator().manual_seed(5))
            t = torch.tensor([100, 700][:b])
            with torch.no_grad(), run.network.multiplier(0):
                def eps(prompt):
                    return run.predict(z, t, self.prompts.cond([prompt] * b, self.size))
                want = self.expected(eps)
            self.checked = (self.target(z, t), want)
        real = run.randn
        run.randn = lambda shape: self.noises.append(real(shape)) or self.noises[-1]
        try:
            return super().loss(step)
        finally:
            run.randn = real


@pytest.mark.parametrize("objective,target,negative,g,expected", [
    ("iLECO", "blue", "", 1.0, lambda e: e("blue")),
    ("iLECO", "", "", 1.0, lambda e: e("")),  # erase: the original maps to the empty prompt
    # erase, empty target: ESD, neutral = unconditional = the negative prompt
    ("erase", "", "blurry", 2.0, lambda e: e("blurry") - 2.0 * (e("red") - e("blurry"))),
    ("erase", "blue", "", 1.5, lambda e: e("blue") - 1.5 * (e("red") - e(""))),
    # enhance, empty target: the neutral is the original itself (amplify it)
    ("enhance", "", "", 3.0, lambda e: e("red") + 3.0 * (e("red") - e(""))),
    ("enhance", "blue", "", 0.0, lambda e: e("blue")),  # g = 0 is the iLECO objective
])
def test_objective_targets_are_the_documented_formulas(tmp_path, objective, target, negative, g, expected):
    cfg = config("iLECO.json", original_prompt="red", target_prompt=target, negative_prompt=negative,
                 leco_objective=objective, leco_guidance_scale=g, train_batch_size=2, train_iterations=2)
    mode = Probe(expected)
    _, result, _ = train(cfg, tmp_path, mode)
    assert result.ok, result.message
    got, want = mode.checked
    assert got.shape == (2, 4, 8, 8)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # a fresh latent at every step (the original reused one fixed latent)
    assert len(mode.noises) == 2 and not torch.equal(mode.noises[0], mode.noises[1])


def test_leco_objective_is_named_in_the_metadata(tmp_path):
    cfg = config("iLECO.json", original_prompt="red", negative_prompt="ugly", leco_objective="erase",
                 leco_guidance_scale=2, train_iterations=1, save_lora_name="er")
    _, result, _ = train(cfg, tmp_path, ILECOMode())
    assert result.ok, result.message
    _, meta = load_network_file(result.files[0])
    assert meta["ss_training_comment"] == ("TrainTrain mode: iLECO; original prompt: red; negative prompt: ugly; "
                                           "objective: erase (guidance 2)")


class TrainedProbe(ILECOMode):
    """At step 2, gives the LoRA a clear effect, then compares the mode's target with a separate copy of
    the frozen U-Net that no network was ever applied to."""

    def __init__(self, frozen_unet):
        self.frozen_unet = frozen_unet
        self.checked = None

    def loss(self, step):
        run = self.run
        if step == 2:
            give_effect(run.network, 0.5)
            b = self.shape[0]
            z = torch.randn(self.shape, generator=torch.Generator().manual_seed(5))
            t = torch.tensor([100, 700][:b])
            with torch.no_grad():
                def frozen(prompt):
                    return self.frozen_unet(z, t, encoder_hidden_states=self.prompts.cond([prompt] * b, self.size)
                                            .hidden).sample
                want = {"iLECO": lambda: frozen("blue"),
                        "erase": lambda: frozen("blue") - 2.0 * (frozen("red") - frozen(""))}[self.objective]()
                with_lora = run.predict(z, t, self.prompts.cond(["blue"] * b, self.size))
            self.checked = (self.target(z, t), want, with_lora, frozen("blue"))
        return super().loss(step)


@pytest.mark.parametrize("objective", ["iLECO", "erase"])
def test_frozen_target_is_computed_without_the_lora_once_it_has_an_effect(tmp_path, objective):
    """The target comes from the frozen model even when the LoRA being trained changes the U-Net's output
    (at step 1 a fresh LoRA changes nothing, so only a later step can tell)."""
    import copy

    from trainer.models.tiny import tiny_components

    components = tiny_components()
    frozen_unet = copy.deepcopy(components.unet).requires_grad_(False)
    cfg = config("iLECO.json", original_prompt="red", target_prompt="blue", negative_prompt="",
                 leco_objective=objective, leco_guidance_scale=2.0, train_batch_size=2, train_iterations=2,
                 train_model_precision="fp32")
    mode = TrainedProbe(frozen_unet)
    _, result, _ = train(cfg, tmp_path, mode, components=components)
    assert result.ok, result.message
    got, want, with_lora, without = mode.checked
    # the LoRA really changes the prediction at that step (by far more than the tolerance below) ...
    assert (with_lora - without).abs().max() > 100 * 1e-4
    # ... and the target ignores it (separately built modules: equal within float rounding)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("blocks,te_flag,warned", [(("BASE", "IN01", "OUT11"), False, True),
                                                   (("IN01", "OUT11"), True, True), (("IN01", "OUT11"), False, False)])
def test_ileco_trains_the_unet_only_and_says_so_when_a_text_encoder_was_asked_for(tmp_path, blocks, te_flag, warned):
    """In-process (the CLI test runs in a subprocess): no text-encoder tensors, the iLECO comment, 0 images."""
    logs = []
    cfg = config("iLECO.json", original_prompt="red", target_prompt="blue", train_iterations=1, save_lora_name="u",
                 network_blocks=list(blocks), network_train_text_encoder=te_flag)
    _, result, _ = train(cfg, tmp_path, ILECOMode(), logs=logs)
    assert result.ok, result.message
    tensors, meta = load_network_file(result.files[0])
    assert tensors and all(k.startswith("lora_unet_") for k in tensors)
    assert meta["ss_training_comment"] == "TrainTrain mode: iLECO; original prompt: red; target prompt: blue"
    assert meta["ss_num_train_images"] == "0"
    assert any("iLECO trains the U-Net only" in m for m in logs) == warned


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_original_prompt_is_a_data_error_naming_the_setting(prompt):
    from trainer.data.errors import DataError

    cfg = config("iLECO.json", original_prompt=prompt, target_prompt="blue")
    with pytest.raises(DataError, match="original_prompt is empty"):
        ILECOMode().check(cfg)
    ILECOMode().check(config("iLECO.json", original_prompt="red", target_prompt=""))  # erase: fine


class TrajectoryProbe(ILECOMode):
    """At step 2 (a LoRA with a clear effect), records the mode's latents and recomputes them by hand:
    the same noise denoised with guided DDIM steps of the LoRA'd model until each sample's timestep."""

    def __init__(self):
        self.checked = None

    def loss(self, step):
        run = self.run
        if step == 2:
            from trainer.sampling import ddim_step, ddim_timesteps

            give_effect(run.network, 0.05)
            state = run.generator.get_state()
            z, t = self.latents()
            run.generator.set_state(state)
            b = self.shape[0]
            torch.randint(len(self.stops), (b,), generator=run.generator)  # the stops, as latents() draws them
            x = run.randn(self.shape)
            ts = ddim_timesteps(self.cfg.leco_trajectory_steps)
            ab = run.schedule.alphas_cumprod
            want = {ts[0]: x.clone()}
            with torch.no_grad():
                for j in range(len(ts) - 1):
                    tt = torch.full((b,), ts[j])

                    def eps(prompt):
                        return run.predict(x, tt, self.prompts.cond([prompt] * b, self.size))
                    e = eps("") + 3.0 * (eps("red") - eps(""))
                    x = ddim_step(e, x, float(ab[ts[j]]), float(ab[ts[j + 1]]))
                    want[ts[j + 1]] = x.clone()
                with run.network.multiplier(0):  # the frozen model's trajectory differs: the LoRA is used
                    frozen_eps = run.predict(want[ts[0]], torch.full((b,), ts[0]), self.prompts.cond(["red"] * b,
                                                                                                      self.size))
                lora_eps = run.predict(want[ts[0]], torch.full((b,), ts[0]), self.prompts.cond(["red"] * b, self.size))
            self.checked = (z, t, want, (lora_eps - frozen_eps).abs().max())
        return super().loss(step)


def test_trajectory_latents_are_the_loraed_models_own_guided_ddim_steps(tmp_path):
    cfg = config("iLECO.json", original_prompt="red", target_prompt="blue", negative_prompt="",
                 leco_trajectory_steps=4, train_min_timesteps=200, train_max_timesteps=1000, train_batch_size=4,
                 train_iterations=2, train_model_precision="fp32")
    mode = TrajectoryProbe()
    _, result, _ = train(cfg, tmp_path, mode)
    assert result.ok, result.message
    z, t, want, lora_effect = mode.checked
    assert lora_effect > 1e-2  # the LoRA changes the steps the latents come from
    # 4 trailing steps: 999, 749, 499, 249; all within 200..999, so every stop is allowed
    assert set(t.tolist()) <= {999, 749, 499, 249}
    # the mode batches both guidance branches, the hand computation one prompt at a time: equal within
    # float rounding, amplified by the guided steps of a random model (latents reach |x| ~ 35)
    for i, ti in enumerate(t.tolist()):
        torch.testing.assert_close(z[i], want[ti][i], rtol=1e-4, atol=2e-4)
    # the stops come from the timestep range: 0..1000 by 4 steps gives no timestep in 300..400
    cfg_bad = config("iLECO.json", original_prompt="red", leco_trajectory_steps=4, train_min_timesteps=300,
                     train_max_timesteps=400)
    with pytest.raises(DataError, match="leco_trajectory_steps: 4 DDIM steps"):
        ILECOMode().check(cfg_bad)


def test_trajectory_stops_keep_to_the_timestep_range():
    from trainer.modes.ileco import trajectory_stops

    assert trajectory_stops(0, 0, 1000) == []
    assert trajectory_stops(4, 0, 1000) == [0, 1, 2, 3]
    assert trajectory_stops(4, 250, 800) == [1, 2]  # 749, 499 (249 < 250)
