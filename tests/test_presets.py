"""Every shipped preset (presets/*.json) trains from the command line: 2 steps on the tiny model of its
family (the XL presets on a tiny SDXL checkpoint, the others on the built-in tiny SD1 model), with the
mode's inputs, and writes a LoRA file that loads back with the preset's network.

The preset's recipe is kept (mode, network type, rank, alpha, blocks, optimizer, scheduler, timestep range,
precisions, strength, batch size, ...); only what the tiny model needs is overridden: 64 px images, 2
steps, a fixed seed. tests/test_bad_inputs.py checks that each preset parses and writes back unchanged;
this one checks that each one trains.
"""
from pathlib import Path

import pytest

from _family_helpers import mode_inputs
from trainer.__main__ import main
from trainer.config import SETTINGS, Config
from trainer.models.loading import save_ldm_checkpoint
from trainer.models.tiny import tiny_components
from trainer.networks.files import load_network_file

PRESETS = sorted((Path(__file__).resolve().parent.parent / "presets").glob("*.json"))
TINY = ["image_size=64", "image_min_length=64", "image_buckets_step=64", "train_iterations=2", "train_seed=0"]


def test_the_shipped_presets_are_the_ones_listed_here():
    # a new preset is picked up by the parametrisation below; this pins the count so a lost one shows
    assert [p.stem for p in PRESETS] == ["ADDifT_Action_SD1.5", "ADDifT_Action_XL", "ADDifT_Style_SD1.5",
                                        "ADDifT_Style_XL", "Difference", "Difference_Use2ndPass", "LoRA", "iLECO"]


@pytest.fixture(scope="module")
def sdxl_file(tmp_path_factory):
    return save_ldm_checkpoint(tiny_components(family="sdxl"), tmp_path_factory.mktemp("xl") / "tiny-xl.safetensors")


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_every_shipped_preset_trains_two_steps_from_the_cli(tmp_path, capsys, sdxl_file, preset):
    cfg = Config.load_preset(preset)
    xl = preset.stem.endswith("_XL")
    meta, settings = mode_inputs(tmp_path / "in")[cfg.mode]
    args = ["train", "--preset", str(preset), "--workdir", str(tmp_path / "work"), "--name", "p"]
    if xl:
        args += ["--model", str(sdxl_file)]
    args += [x for k, v in {**meta, **settings}.items() for x in ("--set", f"{k}={v}")]
    tiny = TINY
    if cfg.second_pass is not None:  # Difference_Use2ndPass: its 2nd pass has its own size and steps
        second = {st.name for st in SETTINGS if "Difference2" in st.modes}
        tiny = TINY + [f"2nd.{kv}" for kv in TINY if kv.partition("=")[0] in second]
    args += [x for kv in tiny for x in ("--set", kv)]
    code = main(args)
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    files = sorted((tmp_path / "work" / "output").glob("*.safetensors"))
    printed = [Path(line.strip()) for line in out.splitlines() if line.strip().endswith(".safetensors")]
    assert printed and set(printed) <= set(files), (out[-2000:], files)
    tensors, metadata = load_network_file(printed[-1])
    rank = (cfg.second_pass or cfg).network_rank  # Difference saves the 2nd pass's network
    downs = [v for k, v in tensors.items() if k.endswith("lora_down.weight")]
    assert downs and all(v.shape[0] == rank for v in downs), {v.shape[0] for v in downs}
    assert metadata["ss_network_dim"] == str(rank)
    want = "sdxl_base_v1-0" if xl else "sd_v1"
    assert metadata["ss_base_model_version"] == want, metadata["ss_base_model_version"]
    assert any(k.startswith("lora_unet_") for k in tensors)
