"""ADDifT and Multi-ADDifT mechanics on the random tiny model."""
import pytest
import torch

from trainer.models.tiny import tiny_components
from trainer.modes.addift import ADDifTMode, MultiADDifTMode, cycle_timestep
from trainer.networks.files import load_network_file

from _modes_helpers import PRESETS, SMALL_ARGS, cli, config, draw, train


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("pair")
    return draw(d / "red.png", (220, 30, 30)), draw(d / "blue.png", (30, 30, 220))


@pytest.fixture(scope="module")
def components():
    return tiny_components()


@pytest.fixture(scope="module")
def pair_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    for i, shape in enumerate(("circle", "square")):
        draw(d / f"p{i}.png", (220, 30, 30), shape)
        draw(d / f"p{i}_blue.png", (30, 30, 220), shape)
        (d / f"p{i}.txt").write_text(f"red {shape}", encoding="utf-8")
    draw(d / "lonely.png", (0, 0, 0))
    return d


class Recorder(ADDifTMode):
    """Records the inputs of both branches at every step."""

    def setup(self, run, cfg):
        super().setup(run, cfg)
        self.inputs = []
        predict = run.predict

        def spy(noisy, t, cond):
            self.inputs.append((run.network.current_multiplier[0], noisy.clone(), t.clone()))
            return predict(noisy, t, cond)
        run.predict = spy


def test_multipliers_alternate_and_timesteps_span_the_range(images, tmp_path, components):
    red, blue = images
    cfg = config("ADDifT_Action_SD1.5.json", original_image=red, target_image=blue, diff_alt_ratio=0.5,
                 train_iterations=12, train_batch_size=4, train_min_timesteps=200, train_max_timesteps=400,
                 diff_timestep_schedule="uniform")
    mode = Recorder()
    _, result, _ = train(cfg, tmp_path, mode, components)
    assert result.ok, result.message
    assert [m for _, m, _ in mode.trace] == [0.25, -0.125] * 6
    ts = [t for _, _, step_ts in mode.trace for t in step_ts.tolist()]
    # uniform: 48 draws over the whole range (the original's cycle never used the minimum)
    assert all(200 <= t < 400 for t in ts) and min(ts) < 240 and max(ts) > 360 and len(set(ts)) > 30
    # each step: the frozen branch (multiplier 0) then the LoRA branch, same t, same noise
    frozen, lora = mode.inputs[0::2], mode.inputs[1::2]
    assert all(f[0] == 0.0 for f in frozen) and [x[0] for x in lora] == [0.25, -0.125] * 6
    assert all(torch.equal(f[2], x[2]) for f, x in zip(frozen, lora))
    # +: frozen sees the original, the LoRA the target; -: the other way round
    x_o, x_g = mode.x_o, mode.x_g
    schedule = mode.run.schedule
    for k in (0, 1):
        (_, a, t), (_, b, _) = frozen[k], lora[k]
        noise = (a - schedule._coefs(t, a)[0] * (x_o if k == 0 else x_g)) / schedule._coefs(t, a)[1]
        expected_b = schedule.add_noise(x_g if k == 0 else x_o, noise, t)
        torch.testing.assert_close(b, expected_b, rtol=1e-4, atol=1e-4)


def test_negative_ratio_is_the_null_regulariser_and_revert_swaps(images, tmp_path, components):
    red, blue = images
    cfg = config("ADDifT_Action_SD1.5.json", original_image=red, target_image=blue, diff_alt_ratio=-2,
                 train_iterations=2, diff_revert_original_target=True)
    mode = Recorder()
    _, result, _ = train(cfg, tmp_path, mode, components)
    assert result.ok, result.message
    assert [m for _, m, _ in mode.trace] == [0.25, -0.5]
    # the even step runs both branches on the same pure-noise-derived input
    assert torch.equal(mode.inputs[2][1], mode.inputs[3][1])
    plain = Recorder()
    train(config("ADDifT_Action_SD1.5.json", original_image=red, target_image=blue, train_iterations=1,
                 save_lora_name="plain"), tmp_path, plain, components)
    assert torch.equal(mode.x_o, plain.x_g) and torch.equal(mode.x_g, plain.x_o)


def test_difference_mask_is_the_changed_region(images, tmp_path, components):
    red, blue = images
    cfg = config("ADDifT_Action_SD1.5.json", original_image=red, target_image=blue, diff_use_diff_mask=True,
                 train_iterations=1)
    mode = ADDifTMode()
    _, result, _ = train(cfg, tmp_path, mode, components)
    assert result.ok, result.message
    m = mode.mask[0, 0]
    assert m.shape == (8, 8) and m[2:6, 2:6].all() and m[0, 0] == 0 and m[7, 7] == 0  # circle 16..48 px


def test_addift_from_the_cli_with_the_preset(images, tmp_path):
    red, blue = images
    r = cli("train", "--preset", PRESETS / "ADDifT_Action_SD1.5.json", "--original-image", red, "--target-image",
            blue, "--name", "a", *SMALL_ARGS, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert [x for x in r.stdout.splitlines() if x.endswith(".safetensors")] == ["output/a.safetensors"]
    tensors, meta = load_network_file(tmp_path / "output" / "a.safetensors")
    assert all(k.startswith("lora_unet_") for k in tensors)
    assert meta["ss_training_comment"] == "TrainTrain mode: ADDifT; original image: red.png; target image: blue.png"
    assert meta["ss_network_dim"] == "4" and meta["ss_optimizer"].endswith("CAME")


def test_multi_addift_from_the_cli_names_unpaired_images(pair_folder, tmp_path):
    r = cli("train", "--mode", "Multi-ADDifT", "--data", pair_folder, "--set", "diff_target_name=_blue",
            "--name", "m", *SMALL_ARGS, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert [x for x in r.stdout.splitlines() if x.endswith(".safetensors")] == ["output/m.safetensors"]
    assert "lonely.png" in r.stderr and "no target image" in r.stderr
    _, meta = load_network_file(tmp_path / "output" / "m.safetensors")
    assert meta["ss_training_comment"] == "TrainTrain mode: Multi-ADDifT; diff target name: _blue"
    assert "red circle" in meta["ss_tag_frequency"]
    r = cli("train", "--mode", "Multi-ADDifT", "--data", pair_folder, "--set", "diff_target_name=_green",
            *SMALL_ARGS, cwd=tmp_path)
    assert r.returncode == 2 and "No image pairs" in r.stderr and "_green" in r.stderr and "Traceback" not in r.stderr


def test_multi_addift_conditions_both_branches_on_each_pairs_caption(pair_folder, tmp_path, components):
    cfg = config(None, "Multi-ADDifT", lora_data_directory=str(pair_folder), diff_target_name="_blue",
                 lora_trigger_word="tt", train_iterations=2)
    mode = MultiADDifTMode()
    seen = []
    orig_pair_loss = mode.pair_loss

    def spy(step, x_o, x_g, cond_o, cond_g, mask):
        seen.append((cond_o.hidden, cond_g.hidden))
        return orig_pair_loss(step, x_o, x_g, cond_o, cond_g, mask)
    mode.pair_loss = spy
    _, result, _ = train(cfg, tmp_path, mode, components)
    assert result.ok, result.message
    assert sorted(mode.captions) == ["tt, red circle", "tt, red square"]
    captions = {c: mode.prompts.hidden([c]) for c in mode.captions}
    assert not torch.equal(*captions.values())
    for cond_o, cond_g in seen:
        assert cond_o is cond_g and any(torch.equal(cond_o, h) for h in captions.values())


@pytest.mark.parametrize("lo, hi, expected", [
    (500, 1000, [550, 650, 750, 850, 950]),   # the Action presets (spec §3.4)
    (200, 400, [220, 260, 300, 340, 380]),    # the Style presets
    (0, 1000, [100, 300, 500, 700, 900]),
    (500, 999, [549, 649, 749, 849, 949]),    # (hi - lo)*k/10 rounded down, as the original's int()
    (998, 1000, [998, 998, 999, 999, 999]),   # never 1000: the cycle stays below the maximum
])
def test_cycle_schedule_is_the_originals_sequence_one_value_per_pair(lo, hi, expected):
    ts = [cycle_timestep(step, lo, hi) for step in range(1, 23)]
    assert ts == [t for t in expected for _ in (0, 1)] * 2 + [expected[0]] * 2


def test_presets_train_on_the_cycle_each_pm_pair_sharing_its_t(images, tmp_path, components):
    """A preset without the row (every ADDifT file the original wrote) gets the original's cycle: steps
    1..12 at 550, 550, 650, 650, ..., 950, 950, 550, 550; both branches of a step and every image of
    the batch use it."""
    red, blue = images
    cfg = config("ADDifT_Action_SD1.5.json", original_image=red, target_image=blue, train_iterations=12,
                 train_batch_size=2)
    assert cfg.diff_timestep_schedule == "cycle"
    mode = Recorder()
    _, result, _ = train(cfg, tmp_path, mode, components)
    assert result.ok, result.message
    assert [(m, t.tolist()) for _, m, t in mode.trace] == [
        (s, [t, t]) for t in (550, 650, 750, 850, 950, 550) for s in (0.25, -0.25)]
    frozen, lora = mode.inputs[0::2], mode.inputs[1::2]
    assert [f[2].tolist() for f in frozen] == [x[2].tolist() for x in lora] == [t.tolist() for _, _, t in mode.trace]


def test_multi_addift_uses_the_same_cycle(pair_folder, tmp_path, components):
    cfg = config(None, "Multi-ADDifT", lora_data_directory=str(pair_folder), diff_target_name="_blue",
                 train_iterations=4, train_min_timesteps=200, train_max_timesteps=400)
    mode = MultiADDifTMode()
    _, result, _ = train(cfg, tmp_path, mode, components)
    assert result.ok, result.message
    assert [int(t[0]) for _, _, t in mode.trace] == [220, 220, 260, 260]
