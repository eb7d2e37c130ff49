"""trainer.config: the settings table, Config, presets, validation messages, CLI helpers."""
import argparse
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from trainer import config as C
from trainer.config import BLOCK_IDS, SETTINGS, Config, SettingError

ROOT = Path(__file__).resolve().parent.parent
PRESETS = ROOT / "presets"

# §4 of the spec: (JSON key, widget, default as typed value) in the original order.
ALL = ("LoRA", "iLECO", "Difference", "Difference2", "ADDifT", "Multi-ADDifT")
EXPECTED_ROWS = [
    ("network_type", "dropdown", "lierla", ALL),
    ("network_rank", "dropdown", 16, ALL),
    ("network_alpha", "dropdown", 8.0, ALL),
    ("lora_data_directory", "text", "", ("LoRA", "Difference", "Multi-ADDifT")),
    ("diff_target_name", "text", "", ("Multi-ADDifT",)),
    ("lora_trigger_word", "text", "", ("LoRA", "Difference", "ADDifT", "Multi-ADDifT")),
    ("image_size(height, width)", "text", (512, 512), ("LoRA", "iLECO", "Multi-ADDifT")),
    ("train_iterations", "text", 1000, ALL),
    ("train_batch_size", "text", 2, ALL),
    ("train_learning_rate", "text", 1e-4, ALL),
    ("train_optimizer", "dropdown", "AdamW", ALL),
    ("train_optimizer_settings", "text", {}, ALL),
    ("train_lr_scheduler", "dropdown", "cosine", ALL),
    ("train_lr_scheduler_settings", "text", {}, ALL),
    ("save_lora_name", "text", "untitled", ("LoRA", "iLECO", "Difference", "ADDifT", "Multi-ADDifT")),
    ("use_gradient_checkpointing", "checkbox", False, ALL),
    ("network_blocks(BASE = TextEncoder)", "checkgroup", BLOCK_IDS, ALL),
    ("network_resume", "text", "", ("LoRA", "Difference", "Multi-ADDifT")),
    ("network_strength", "text", 1.0, ALL),
    ("network_conv_rank", "dropdown", 0, ALL),
    ("network_conv_alpha", "dropdown", 0.0, ALL),
    ("network_element", "dropdown", "Full", ALL),
    ("network_train_text_encoder", "checkbox", False, ("iLECO",)),
    ("image_buckets_step", "dropdown", 256, ("LoRA", "Difference", "Multi-ADDifT")),
    ("image_num_multiply", "text", 1, ("LoRA", "Difference", "Multi-ADDifT")),
    ("image_min_length", "text", 512, ("LoRA", "Difference", "Multi-ADDifT")),
    ("image_max_ratio", "text", 2.0, ("LoRA", "Difference", "Multi-ADDifT")),
    ("sub_image_num", "text", 0, ("LoRA", "Difference", "Multi-ADDifT")),
    ("image_mirroring", "checkbox", False, ("LoRA", "Difference", "Multi-ADDifT")),
    ("image_use_filename_as_tag", "checkbox", False, ("LoRA", "Difference", "Multi-ADDifT")),
    ("image_disable_upscale", "checkbox", False, ("LoRA", "Difference", "Multi-ADDifT")),
    ("train_fixed_timsteps_in_batch", "checkbox", False, ALL),
    ("train_textencoder_learning_rate", "text", None, ("LoRA",)),
    ("train_seed", "text", -1, ALL),
    ("train_min_timesteps", "text", 0, ALL),
    ("train_max_timesteps", "text", 1000, ALL),
    ("train_loss_function", "dropdown", "MSE", ALL),
    ("train_lr_step_rules", "text", "", ALL),
    ("train_lr_warmup_steps", "text", 0, ALL),
    ("train_lr_scheduler_num_cycles", "text", 1, ALL),
    ("train_lr_scheduler_power", "text", 1.0, ALL),
    ("train_snr_gamma", "text", 5.0, ALL),
    ("save_per_steps", "text", 0, ALL),
    ("diff_alt_ratio", "text", 1.0, ("ADDifT", "Multi-ADDifT")),
    ("diff_revert_original_target", "checkbox", False, ("ADDifT", "Multi-ADDifT")),
    ("diff_use_diff_mask", "checkbox", False, ("ADDifT", "Multi-ADDifT")),
    ("train_model_precision", "dropdown", "fp16", ALL),
    ("train_lora_precision", "dropdown", "fp32", ALL),
    ("save_precision", "dropdown", "fp16", ALL),
    ("train_VAE_precision", "dropdown", "fp32", ALL),
    ("diff_load_1st_pass", "text", "", ("Difference",)),
    ("diff_save_1st_pass", "checkbox", False, ("Difference",)),
    ("diff_1st_pass_only", "checkbox", False, ("Difference",)),
    ("logging_save_csv", "checkbox", False, ("LoRA", "iLECO", "Difference", "ADDifT", "Multi-ADDifT")),
    ("logging_verbose", "checkbox", False, ("LoRA", "iLECO", "Difference", "ADDifT", "Multi-ADDifT")),
    ("save_overwrite", "checkbox", False, ALL),
    ("save_as_json", "checkbox", False, ("LoRA", "iLECO", "Difference", "ADDifT", "Multi-ADDifT")),
    ("model_v_pred", "checkbox", False, ALL),
    ("use_2nd_pass_settings", "checkbox", False, ("Difference2",)),
]


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------

def test_59_original_rows_in_order_with_defaults_and_visibility():
    assert len(C.ORIGINAL_SETTINGS) == 59 == len(EXPECTED_ROWS)
    assert SETTINGS[:59] == C.ORIGINAL_SETTINGS
    for s, (key, widget, default, modes) in zip(C.ORIGINAL_SETTINGS, EXPECTED_ROWS):
        assert s.key == key
        assert s.name == key.split("(")[0]
        assert s.widget == widget, key
        assert s.default == default, key
        assert s.modes == frozenset(modes), key
        assert not s.addition
        assert s.help_en and s.help_ja, key
        assert isinstance(default, s.type) or (default is None and s.allow_empty), key
        # every default is itself valid and parses to itself
        assert s.parse(s.default) == s.default, key
        assert s.parse(s.format(s.default)) == s.default, key


def test_additions_are_marked_and_at_the_end():
    added = {s.name: s for s in C.ADDED_SETTINGS}
    assert set(added) == {"caption_emphasis", "clip_skip", "leco_objective", "leco_guidance_scale", "leco_trajectory_steps", "lora_trigger_preservation", "model_zero_terminal_snr",
                          "train_max_grad_norm", "latent_cache_on_disk", "sample_every_n_steps", "sample_prompts",
                          "sample_negative_prompt", "sample_multipliers", "sample_seed", "sample_steps",
                          "sample_cfg_scale", "sample_sampler", "sample_size", "diff_timestep_schedule"}
    assert all(s.addition for s in added.values())
    assert SETTINGS[59:] == C.ADDED_SETTINGS
    assert added["clip_skip"].default == 1
    assert added["leco_objective"].default == "iLECO" and added["leco_objective"].choices == ("iLECO", "erase", "enhance")
    assert added["leco_guidance_scale"].default == 1.0
    assert added["model_zero_terminal_snr"].default is False
    assert added["train_max_grad_norm"].default == 0.0
    assert added["latent_cache_on_disk"].default is True
    # the original's ADDifT timestep cycle by default: files it wrote have no such row
    assert added["diff_timestep_schedule"].default == "cycle"
    assert added["diff_timestep_schedule"].choices == ("cycle", "uniform")


def test_names_unique_and_widgets_known():
    names = [s.name for s in SETTINGS]
    keys = [s.key for s in SETTINGS]
    assert len(set(names)) == len(names) and len(set(keys)) == len(keys)
    assert {s.widget for s in SETTINGS} <= C.WIDGETS
    assert C.MODES == ("LoRA", "iLECO", "Difference", "ADDifT", "Multi-ADDifT")


def test_choice_lists():
    assert BLOCK_IDS == ("BASE", *[f"IN{i:02d}" for i in range(12)], "M00", *[f"OUT{i:02d}" for i in range(12)])
    assert len(C.OPTIMIZERS) == 25 and not any(o.startswith("-") for o in C.OPTIMIZERS)
    assert C.OPTIMIZERS[:5] == ("AdamW", "AdamW8bit", "AdaFactor", "Lion", "Prodigy")
    assert {"CAME", "Tiger", "AdamMini", "RAdamScheduleFree", "SGDNesterov", "Adam"} <= set(C.OPTIMIZERS)
    assert len(C.LR_SCHEDULERS) == 15 and len(set(C.LR_SCHEDULERS)) == 15
    assert {"cosine_annealing", "one_cycle", "piecewise_constant", "reduce_on_plateau"} <= set(C.LR_SCHEDULERS)
    assert 0 not in C.IMAGE_BUCKET_STEPS and C.IMAGE_BUCKET_STEPS == tuple(range(64, 577, 64))
    assert C.NETWORK_RANKS[0] == 4 and C.NETWORK_RANKS[-1] == 1024
    assert C.NETWORK_ALPHAS[0] == 0.03125 and C.NETWORK_ALPHAS[-1] == 1024
    assert C.MODEL_PRECISIONS == ("model", "fp32", "bf16", "fp16")  # int8 is refused with a reason
    assert C.SAVE_PRECISIONS == ("model", "fp32", "bf16", "fp16")
    assert C.LORA_PRECISIONS == C.VAE_PRECISIONS == ("fp32", "bf16", "fp16")


def test_choice_lists_match_the_optimizer_layer():
    from trainer import optim

    assert set(optim.OPTIMIZER_NAMES) == set(C.OPTIMIZERS)
    assert set(optim.SCHEDULER_NAMES) == set(C.LR_SCHEDULERS)


def test_settings_for_mode():
    names = lambda m: [s.name for s in C.settings_for_mode(m)]  # noqa: E731
    assert "lora_data_directory" in names("LoRA") and "lora_data_directory" not in names("iLECO")
    assert "train_textencoder_learning_rate" in names("LoRA") and "train_textencoder_learning_rate" not in names("ADDifT")
    assert [n for n in names("Difference2") if not C.SETTINGS_BY_NAME[n].addition][-1] == "use_2nd_pass_settings"
    assert "use_2nd_pass_settings" not in names("Difference")
    assert "save_lora_name" not in names("Difference2")
    assert "leco_objective" in names("iLECO") and "leco_objective" not in names("LoRA")
    assert names("multi-addift") == names("Multi-ADDifT")
    with pytest.raises(SettingError, match="mode"):
        C.settings_for_mode("Lora2")


def test_config_imports_without_torch():
    code = "import sys; import trainer.config; assert 'torch' not in sys.modules; assert 'gradio' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# ---------------------------------------------------------------------------------------------
# Config basics
# ---------------------------------------------------------------------------------------------

def test_defaults_and_attribute_access():
    cfg = Config.defaults()
    assert cfg.mode == "LoRA" and cfg.model == "" and cfg.second_pass is None
    assert cfg.network_rank == 16 and isinstance(cfg.network_rank, int)
    assert cfg.network_alpha == 8.0 and isinstance(cfg.network_alpha, float)
    assert cfg.image_size == (512, 512)
    assert cfg.network_blocks == BLOCK_IDS
    assert cfg.train_optimizer_settings == {}
    assert cfg.train_textencoder_learning_rate is None
    assert cfg.train_fixed_timesteps_in_batch is cfg.train_fixed_timsteps_in_batch is False
    assert Config.defaults("ilEco").mode == "iLECO"
    assert Config("ADDifT", network_rank="32").network_rank == 32
    assert cfg.values["train_iterations"] == 1000 and len(cfg.values) == len(SETTINGS)


def test_config_is_immutable_equal_and_picklable():
    cfg = Config.defaults("Difference").replace(use_2nd_pass_settings=True)
    with pytest.raises(AttributeError):
        cfg.network_rank = 3
    with pytest.raises(AttributeError):
        del cfg.network_rank
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    with pytest.raises(AttributeError, match='did you mean "network_rank"'):
        cfg.network_rnak  # noqa: B018
    assert cfg != Config.defaults("Difference")
    assert "second_pass" in repr(cfg)


def test_typed_parsing():
    cfg = Config.defaults().replace(
        image_size="768,512", network_rank="32", network_alpha="0.5", train_learning_rate="1e-4",
        train_optimizer="adamw", network_blocks="base, in01 ,OUT11", train_textencoder_learning_rate="",
        train_iterations="2e3", train_optimizer_settings="weight_decay=0.01; betas=(0.9, 0.99)\neps=1e-8",
        train_lr_scheduler="COSINE_annealing", train_loss_function="smooth-l1", train_model_precision="BF16",
        logging_save_csv="", save_lora_name="  my lora.safetensors ", train_seed="-5",
    )
    assert cfg.image_size == (512, 768)
    assert cfg.network_rank == 32 and cfg.network_alpha == 0.5
    assert cfg.train_learning_rate == 1e-4
    assert cfg.train_optimizer == "AdamW"
    assert cfg.network_blocks == ("BASE", "IN01", "OUT11")
    assert cfg.train_textencoder_learning_rate is None
    assert cfg.train_iterations == 2000
    assert cfg.train_optimizer_settings == {"weight_decay": 0.01, "betas": (0.9, 0.99), "eps": 1e-8}
    assert cfg.train_lr_scheduler == "cosine_annealing"
    assert cfg.train_loss_function == "Smooth-L1"
    assert cfg.train_model_precision == "bf16"
    assert cfg.logging_save_csv is False
    assert cfg.save_lora_name == "my lora"
    assert cfg.train_seed == -1
    assert Config.defaults().replace(image_size="512").image_size == (512, 512)
    assert Config.defaults().replace(image_size=[640, 512]).image_size == (512, 640)
    assert Config.defaults().replace(train_optimizer="came").train_optimizer == "CAME"
    assert Config.defaults().replace(train_optimizer="dadaptadam").train_optimizer == "DadaptAdam"
    assert Config.defaults().replace(network_blocks="all").network_blocks == BLOCK_IDS
    assert Config.defaults().replace(train_textencoder_learning_rate="0").train_textencoder_learning_rate is None
    assert Config.defaults().replace(train_textencoder_learning_rate="5e-5").train_textencoder_learning_rate == 5e-5
    assert Config.defaults().replace(network_rank=3).network_rank == 3  # any positive rank
    assert Config.defaults().replace(network_element=None).network_element == "Full"
    assert Config.defaults().replace(network_element="crossattention").network_element == "CrossAttention"
    assert Config.defaults().replace(train_lr_step_rules="1:100, 0.5:200, 0.1").train_lr_step_rules == "1:100,0.5:200,0.1"
    assert Config.defaults().replace(vae="None").vae == ""


def test_optimizer_settings_strings():
    p = C.parse_kwargs_string
    assert p("") == {} and p("  \n ; ") == {}
    assert p("eta_min=0.00001") == {"eta_min": 1e-5}
    assert p("betas=(0.9,0.99)\nweight_decay=0") == {"betas": (0.9, 0.99), "weight_decay": 0}
    assert p("mode='min'; relative_step=False; d0=None") == {"mode": "min", "relative_step": False, "d0": None}
    assert p("sep='a;b\\nc'; x=[1, 2]") == {"sep": "a;b\nc", "x": [1, 2]}
    assert p("name='a b'") == {"name": "a b"}  # the original removed every space; we keep them
    assert C.format_kwargs_string({"eta_min": 1e-05, "betas": (0.9, 0.99), "t": (1,)}) == \
        "eta_min=1e-05; betas=(0.9, 0.99); t=(1,)"


# ---------------------------------------------------------------------------------------------
# Error messages
# ---------------------------------------------------------------------------------------------

def _err(fn, *a, **kw) -> str:
    with pytest.raises(SettingError) as ei:
        fn(*a, **kw)
    return str(ei.value)


def test_error_wrong_whole_number():
    msg = _err(Config.defaults().replace, train_batch_size="abc")
    assert msg == 'train_batch_size: "abc" is not a whole number (allowed: 1 or more)'


@pytest.mark.parametrize("name,value,needle", [
    ("train_batch_size", 0, "out of range (allowed: 1 or more)"),
    ("train_iterations", "0", "out of range"),
    ("train_iterations", 2.5, "not a whole number"),
    ("train_iterations", True, "not a whole number"),
    ("train_iterations", [1], "not a whole number"),
    ("train_learning_rate", "0", "out of range (allowed: more than 0)"),
    ("train_learning_rate", "-1e-4", "out of range"),
    ("train_learning_rate", "fast", "not a number"),
    ("train_learning_rate", "nan", "not a finite number"),
    ("train_textencoder_learning_rate", "-1", "out of range"),
    ("network_rank", "0", "out of range"),
    ("network_rank", "sixteen", "not a whole number"),
    ("network_alpha", "-1", "out of range"),
    ("image_buckets_step", "0", "not one of the choices"),
    ("image_buckets_step", 100, "not one of the choices"),
    ("image_max_ratio", "0.5", "out of range"),
    ("image_min_length", "500", "multiple of 8"),
    ("image_size", "500", "not a multiple of 8"),
    ("image_size", "32", "out of range"),
    ("image_size", "1,2,3", "not a size"),
    ("image_size", "big", "not a size"),
    ("train_min_timesteps", "1000", "out of range (allowed: 0 to 999)"),
    ("train_max_timesteps", "1001", "out of range (allowed: 1 to 1000)"),
    ("train_optimizer", "-----", "not a known choice"),
    ("train_optimizer", "adamx", 'did you mean "Adam'),
    ("network_type", "lora", "not a known choice"),
    ("network_blocks", ["BASE", "IN99"], '"IN99" is not a block'),
    ("network_blocks", [], "selects no block"),
    ("network_blocks", 5, "not a list of blocks"),
    ("use_gradient_checkpointing", "maybe", "not true/false"),
    ("lora_data_directory", 5, "not text"),
    ("train_lr_step_rules", "1:a,0.1", "not a step-rules string"),
    ("clip_skip", "0", "out of range"),
    ("leco_objective", "destroy", "not a known choice"),
])
def test_error_names_setting_and_value(name, value, needle):
    msg = _err(Config.defaults().replace, **{name: value})
    assert msg.startswith(f"{name}: ")
    assert needle in msg
    assert "allowed" in msg


@pytest.mark.parametrize("text,needle", [
    ("mode=min", "strings need quotes, e.g. mode='min'"),
    ("betas=(0.9,", "not a Python literal"),
    ("just words", "not a k=v entry"),
    ("1x=3", "not a k=v entry"),
    ("a=1; a=2", "given twice"),
    ("x=__import__('os')", "not a Python literal"),
])
def test_error_bad_settings_string(text, needle):
    msg = _err(Config.defaults().replace, train_optimizer_settings=text)
    assert msg.startswith("train_optimizer_settings: ") and needle in msg


@pytest.mark.parametrize("name", ["../x", "a/b", "a\\b", "CON", "nul.txt", "Com1", "lpt9.safetensors",
                                  "a:b", "what?", "tab\there", "x..y", ".hidden", "end.", "<x>", "a|b", "a*"])
def test_unsafe_lora_names_rejected(name):
    msg = _err(Config.defaults().replace, save_lora_name=name)
    assert msg.startswith("save_lora_name: ") and json.dumps(name) in msg


@pytest.mark.parametrize("name", ["", "   ", None, ".safetensors"])
def test_empty_lora_name_is_untitled(name):
    assert Config.defaults().replace(save_lora_name=name).save_lora_name == "untitled"


def test_ok_lora_names():
    for name in ["my_lora", "キャラ v2", "a.b", "CONSOLE", "com10", "x-1 (copy)"]:
        assert Config.defaults().replace(save_lora_name=name).save_lora_name == name


def test_min_timesteps_must_be_below_max():
    msg = _err(Config.defaults().replace, train_min_timesteps=500, train_max_timesteps=500)
    assert msg.startswith("train_min_timesteps: 500 is not below train_max_timesteps 500")
    msg = _err(Config.from_dict, {"train_min_timesteps": "900", "train_max_timesteps": "200"})
    assert "train_min_timesteps" in msg


def test_several_problems_are_reported_together():
    with pytest.raises(SettingError) as ei:
        Config.from_dict({"train_batch_size": "x", "network_rank": "-3", "bogus": 1})
    e = ei.value
    assert len(e.problems) == 3 and e.setting == "train_batch_size"
    assert "train_batch_size" in str(e) and "network_rank" in str(e) and "bogus" in str(e)


def test_unknown_key_with_suggestion_and_non_strict():
    msg = _err(Config.from_dict, {"network_rnak": "4"})
    assert 'unknown setting: "network_rnak" (did you mean "network_rank"?)' in msg
    cfg = Config.from_dict({"network_rnak": "4", "train_iterations": "5"}, strict=False)
    assert cfg.train_iterations == 5
    msg = _err(Config.from_dict, {"mode": "Difference", "2nd pass": {"network_rank": "4", "zzz": 1}})
    assert "2nd pass: zzz" in msg


def test_from_dict_rejects_non_objects():
    for bad in ([], "x", 3, None):
        msg = _err(Config.from_dict, bad)
        assert "must be a JSON object" in msg
    assert "mode" in _err(Config.from_dict, {"mode": "Training"})
    assert "2nd pass" in _err(Config.from_dict, {"mode": "Difference", "2nd pass": [1]})
    assert "model" in _err(Config.from_dict, {"model": 3})


def test_conflicting_duplicate_keys():
    msg = _err(Config.from_dict, {"image_size": "512", "image_size(height, width)": "768"})
    assert "given twice" in msg
    assert Config.from_dict({"image_size": "512", "image_size(height, width)": "512"}).image_size == (512, 512)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

def test_load_preset_errors_name_the_file(tmp_path):
    f = tmp_path / "p.json"
    f.write_text("{not json", encoding="utf-8")
    msg = _err(C.load_preset, f)
    assert msg.startswith(str(f)) and "not valid JSON (line 1" in msg
    f.write_text("[1, 2]", encoding="utf-8")
    assert _err(C.load_preset, f) == f"{f}: expected a JSON object {{\"key\": value, …}}, found a list"
    f.write_text('{"train_iterations": [1]}', encoding="utf-8")
    msg = _err(Config.load_preset, f)
    assert msg == f"{f}: train_iterations: [1] is not a whole number (allowed: 1 or more)"
    f.write_text('{"network_rnak": 4}', encoding="utf-8")
    assert _err(Config.load_preset, f).startswith(f"{f}: unknown setting")
    assert "no such file" in _err(C.load_preset, tmp_path / "missing.json")
    f.write_bytes(b"\xff\xfe\x00garbage")
    assert _err(C.load_preset, f).startswith(str(f))


def test_save_preset_atomic_and_no_overwrite(tmp_path):
    cfg = Config.defaults("iLECO").replace(original_prompt="Mona Lisa", network_rank=4)
    path = tmp_path / "sub" / "x.json"
    assert cfg.save_preset(path) == str(path)
    assert Config.load_preset(path) == cfg
    with pytest.raises(FileExistsError):
        cfg.replace(network_rank=8).save_preset(path)
    assert Config.load_preset(path).network_rank == 4
    cfg.replace(network_rank=8).save_preset(path, overwrite=True)
    assert Config.load_preset(path).network_rank == 8
    assert sorted(os.listdir(path.parent)) == ["x.json"]  # no temp files left behind
    assert path.read_text(encoding="utf-8").startswith("{\n    \"network_type\": \"lierla\"")


PRESET_VALUES = {
    "LoRA": dict(mode="LoRA", network_rank=16, network_alpha=8, train_iterations=1000, train_batch_size=2,
                 train_learning_rate=1e-4, train_optimizer="AdamW", train_lr_scheduler="cosine", train_snr_gamma=5),
    "iLECO": dict(mode="iLECO", network_rank=4, network_alpha=8, train_iterations=300, train_batch_size=2,
                  train_learning_rate=5e-4, train_optimizer="AdamW", train_lr_scheduler="cosine"),
    "Difference": dict(mode="Difference", network_rank=16, network_alpha=16, train_iterations=500,
                       train_batch_size=2, train_learning_rate=5e-4, train_optimizer="AdamW"),
    "Difference_Use2ndPass": dict(mode="Difference", network_rank=16, network_alpha=16, train_iterations=500,
                                  train_batch_size=2, train_learning_rate=5e-4, use_2nd_pass_settings=True),
    "ADDifT_Action_SD1.5": dict(mode="ADDifT", network_rank=4, network_alpha=1, train_iterations=30,
                                train_batch_size=1, train_learning_rate=1e-4, train_optimizer="CAME",
                                train_lr_scheduler="cosine_annealing", train_min_timesteps=500,
                                train_max_timesteps=1000, train_seed=1, network_strength=1, save_as_json=True),
    "ADDifT_Action_XL": dict(mode="ADDifT", network_rank=4, network_alpha=1, train_iterations=30, train_batch_size=1,
                             train_learning_rate=2e-4, train_optimizer="CAME", train_lr_scheduler="cosine_annealing",
                             train_min_timesteps=500, train_max_timesteps=1000, train_seed=1),
    "ADDifT_Style_SD1.5": dict(mode="ADDifT", network_rank=4, network_alpha=1, train_iterations=50,
                               train_batch_size=1, train_learning_rate=5e-5, train_optimizer="CAME",
                               train_min_timesteps=200, train_max_timesteps=400,
                               diff_revert_original_target=True, network_strength=5),
    "ADDifT_Style_XL": dict(mode="ADDifT", network_rank=4, network_alpha=1, train_iterations=30, train_batch_size=1,
                            train_learning_rate=2e-4, train_optimizer="CAME", train_min_timesteps=200,
                            train_max_timesteps=400, diff_revert_original_target=True, train_snr_gamma=1,
                            network_strength=2, train_seed=-1),
}


@pytest.mark.parametrize("name", sorted(PRESET_VALUES))
def test_shipped_preset(name):
    path = PRESETS / f"{name}.json"
    cfg = Config.load_preset(path)
    for k, v in PRESET_VALUES[name].items():
        assert getattr(cfg, k) == v, k
    # §8.3 common values
    assert cfg.network_type == "lierla" and cfg.image_size == (512, 512)
    assert (cfg.train_model_precision, cfg.train_lora_precision, cfg.save_precision) == ("fp16", "fp32", "fp16")
    assert (cfg.image_buckets_step, cfg.image_min_length, cfg.image_max_ratio) == (256, 512, 2)
    assert (cfg.train_lr_warmup_steps, cfg.train_lr_scheduler_num_cycles, cfg.train_lr_scheduler_power) == (0, 1, 1)
    if name.startswith("ADDifT"):
        assert cfg.train_lr_scheduler_settings == {"eta_min": 1e-5}
        assert ("BASE" in cfg.network_blocks) == name.endswith("SD1.5")
    # round trip, and the file is exactly what save_preset writes
    assert Config.from_dict(cfg.to_dict()) == cfg
    # the file is exactly what save_preset writes, less the rows it predates (absent = samples off,
    # captions literal, ADDifT's timestep cycle, which the ADDifT presets write out)
    if name.startswith("ADDifT"):
        assert cfg.diff_timestep_schedule == "cycle"  # the original's, which they were tuned on
    predates = {"caption_emphasis", "leco_trajectory_steps", "lora_trigger_preservation"} | (set() if name.startswith("ADDifT") else {"diff_timestep_schedule"})

    def predating(d):
        return {k: predating(v) if isinstance(v, dict) and k == "2nd pass" else v for k, v in d.items()
                if not k.startswith("sample_") and k not in predates}

    written = predating(cfg.to_dict())
    assert all(cfg.values[k] == C.SETTINGS_BY_NAME[k].default for k in cfg.values if k.startswith("sample_"))
    assert path.read_text(encoding="utf-8") == json.dumps(written, indent=4, ensure_ascii=False) + "\n"


def test_difference_2nd_pass_preset_really_enables_the_2nd_pass():
    cfg = Config.load_preset(PRESETS / "Difference_Use2ndPass.json")
    sp = cfg.second_pass
    assert sp is not None and sp.use_2nd_pass_settings
    assert (sp.network_rank, sp.network_alpha, sp.train_iterations, sp.train_learning_rate) == (4, 4.0, 500, 1e-4)
    assert (cfg.network_rank, cfg.train_learning_rate) == (16, 5e-4)
    data = json.loads((PRESETS / "Difference_Use2ndPass.json").read_text(encoding="utf-8"))
    assert data["use_2nd_pass_settings"] is True and data["2nd pass"]["use_2nd_pass_settings"] is True
    assert Config.load_preset(PRESETS / "Difference.json").second_pass is None


def _original_format(**over):
    """A settings file written exactly as the original extension writes it."""
    d = {
        "network_type": "lierla", "network_rank": "16", "network_alpha": "8", "lora_data_directory": "",
        "diff_target_name": "", "lora_trigger_word": "", "image_size(height, width)": "512",
        "train_iterations": "1000", "train_batch_size": "2", "train_learning_rate": "1e-4",
        "train_optimizer": "adamw", "train_optimizer_settings": "", "train_lr_scheduler": "cosine",
        "train_lr_scheduler_settings": "", "save_lora_name": "", "use_gradient_checkpointing": False,
        "network_blocks(BASE = TextEncoder)": list(BLOCK_IDS), "network_resume": "", "network_strength": "1",
        "network_conv_rank": "0", "network_conv_alpha": "0", "network_element": None,
        "network_train_text_encoder": False, "image_buckets_step": "256", "image_num_multiply": "1",
        "image_min_length": "512", "image_max_ratio": "2", "sub_image_num": "0", "image_mirroring": False,
        "image_use_filename_as_tag": False, "image_disable_upscale": False, "train_fixed_timsteps_in_batch": False,
        "train_textencoder_learning_rate": "", "train_seed": "-1", "train_min_timesteps": "0",
        "train_max_timesteps": "1000", "train_loss_function": "MSE", "train_lr_step_rules": "",
        "train_lr_warmup_steps": "0", "train_lr_scheduler_num_cycles": "1", "train_lr_scheduler_power": "1.0",
        "train_snr_gamma": "5", "save_per_steps": "0", "diff_alt_ratio": "1", "diff_revert_original_target": False,
        "diff_use_diff_mask": False, "train_model_precision": "fp16", "train_lora_precision": "fp32",
        "save_precision": "fp16", "train_VAE_precision": "fp32", "diff_load_1st_pass": "",
        "diff_save_1st_pass": False, "diff_1st_pass_only": False, "logging_save_csv": "",
        "logging_verbose": False, "save_overwrite": False, "save_as_json": False, "model_v_pred": False,
        "use_2nd_pass_settings": False,
        "mode": "LoRA", "model": "sd15.safetensors", "vae": "None", "te": "None",
        "original prompt": "", "target prompt": "", "2nd pass": None,
    }
    d.update(over)
    return d


def test_original_format_file_loads(tmp_path):
    f = tmp_path / "orig.json"
    f.write_text(json.dumps(_original_format(), indent=4), encoding="utf-8")
    cfg = Config.load_preset(f)
    assert cfg == Config.defaults().replace(model="sd15.safetensors")
    assert cfg.vae == "" and cfg.te == "" and cfg.logging_save_csv is False and cfg.network_element == "Full"
    # our output uses the same keys and value kinds, so the original can read it back
    ours = cfg.to_dict()
    orig = _original_format()
    for key, value in orig.items():
        assert key in ours, key
        assert type(ours[key]) is type(value) or value is None or value == "", key


def test_original_difference_2nd_pass_flag_on_either_level():
    pass2 = _original_format(network_rank="4", network_alpha="4", train_learning_rate="1e-4",
                             use_2nd_pass_settings=False, save_lora_name="ignored in pass 2")
    for d2 in (pass2, None):
        d = _original_format(mode="Difference", network_alpha="16", train_iterations="500",
                             use_2nd_pass_settings=True)
        d["2nd pass"] = d2
        cfg = Config.from_dict(d)
        assert cfg.second_pass is not None, d2
        assert cfg.second_pass.network_rank == (4 if d2 else 16)
        assert cfg.second_pass.save_lora_name == cfg.save_lora_name == "untitled"
    # flag only inside "2nd pass" (what the original writes when the 2nd-pass box is ticked)
    d = _original_format(mode="Difference")
    d["2nd pass"] = dict(pass2, use_2nd_pass_settings=True)
    assert Config.from_dict(d).second_pass.train_learning_rate == 1e-4
    # off on both levels: no 2nd pass
    d["2nd pass"] = pass2
    assert Config.from_dict(d).second_pass is None


def test_second_pass_inherits_rows_outside_the_2nd_pass_panel():
    cfg = Config.defaults("Difference").replace(second_pass={"network_rank": 4})
    assert cfg.use_2nd_pass_settings and cfg.second_pass.network_rank == 4
    cfg2 = cfg.replace(lora_data_directory="/data", network_rank=32)
    assert cfg2.second_pass.lora_data_directory == "/data"  # not in the panel: inherited
    assert cfg2.second_pass.network_rank == 4  # in the panel: kept
    assert cfg2.replace(second_pass=None).second_pass is None
    assert cfg2.replace(use_2nd_pass_settings=False).second_pass is None
    assert cfg2.replace(mode="LoRA").second_pass is None
    assert Config.defaults("Difference").replace(use_2nd_pass_settings=True).second_pass.network_rank == 16
    msg = _err(cfg.replace, second_pass={"train_min_timesteps": 999, "train_max_timesteps": 10})
    assert msg.startswith("2nd pass: train_min_timesteps")
    assert Config.from_dict(cfg2.to_dict()) == cfg2


def test_values_for_mode():
    cfg = Config.defaults("ADDifT")
    v = cfg.values_for_mode()
    assert "diff_alt_ratio" in v and "lora_data_directory" not in v
    assert set(cfg.values_for_mode("LoRA")) == {s.name for s in C.settings_for_mode("LoRA")}
    assert cfg.settings_for_mode() == C.settings_for_mode("ADDifT")


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def test_with_overrides():
    cfg = Config.defaults("Difference").with_overrides([
        "train_iterations=500", "image_size(height, width)=768,512", "network blocks(BASE = TextEncoder)=IN01",
        "train_optimizer_settings=betas=(0.9,0.99)", "mode=Difference", "original image=/a.png",
        "2nd.network_rank=4", "2nd pass.train_learning_rate=1e-5", "train fixed timesteps in batch=true",
    ])
    assert cfg.train_iterations == 500 and cfg.image_size == (512, 768) and cfg.network_blocks == ("IN01",)
    assert cfg.train_optimizer_settings == {"betas": (0.9, 0.99)}
    assert cfg.original_image == "/a.png"
    assert cfg.train_fixed_timsteps_in_batch is True
    assert cfg.second_pass.network_rank == 4 and cfg.second_pass.train_learning_rate == 1e-5
    assert Config.defaults().with_overrides({"network_rank": 8}).network_rank == 8
    assert "did you mean" in _err(Config.defaults().with_overrides, ["train_iteration=5"])
    assert "KEY=VALUE" in _err(Config.defaults().with_overrides, ["train_iterations"])
    assert "cannot differ in the 2nd pass" in _err(Config.defaults("Difference").with_overrides,
                                                    ["2nd.lora_data_directory=x"])


def test_argparse_helpers():
    parser = C.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--set", "train_iterations=7", "--set", "image_size=768", "--lr", "2e-4",
                              "--rank", "8", "--alpha", "4", "--batch-size", "3", "--name", "x", "--seed", "1",
                              "--iterations", "9"])
    assert C.shortcut_overrides(args)[0] == "train_iterations=9"
    cfg = C.apply_args(Config.defaults(), args)
    assert (cfg.train_iterations, cfg.image_size, cfg.train_learning_rate, cfg.network_rank, cfg.network_alpha,
            cfg.train_batch_size, cfg.save_lora_name, cfg.train_seed) == (9, (768, 768), 2e-4, 8, 4.0, 3, "x", 1)
    assert parser.parse_args(["--list-settings"]).list_settings is True
    assert parser.parse_args([]).set == []
    bad = parser.parse_args(["--batch-size", "abc"])
    assert _err(C.apply_args, Config.defaults(), bad).startswith('train_batch_size: "abc"')


def test_describe_settings():
    text = C.describe_settings()
    for s in SETTINGS:
        assert s.name in text
    assert "[addition]" in text and "JSON key: image_size(height, width)" in text
    ja = C.describe_settings("iLECO", lang="ja")
    assert "学習ステップ数" in ja and "lora_data_directory" not in ja and "leco_objective" in ja
    with pytest.raises(SettingError):
        C.describe_settings(lang="fr")


@pytest.mark.parametrize("mode", ["LoRA", "iLECO", "ADDifT", "Multi-ADDifT"])
def test_a_2nd_pass_value_outside_difference_is_refused_naming_it_and_the_mode(mode):
    with pytest.raises(SettingError) as e:
        Config.defaults(mode).with_overrides(["2nd.network_rank=4"])
    assert "2nd.network_rank" in str(e.value) and f"{mode} mode has no 2nd pass" in str(e.value)
    # the same line with the mode switched to Difference in the same overrides is accepted
    cfg = Config.defaults(mode).with_overrides(["mode=Difference", "2nd.network_rank=4"])
    assert cfg.second_pass.network_rank == 4 and cfg.network_rank == 16


def test_unused_in_mode_names_only_the_settings_that_mode_ignores():
    cfg = Config.defaults("iLECO")
    line = cfg.unused_in_mode(["lora_data_directory=x", "leco_objective=erase", "network_rank=4",
                               "image_mirroring=true", "2nd.network_rank=4", "original prompt=red"])
    assert line.count("\n") == 0 and "iLECO mode" in line
    assert "lora_data_directory, image_mirroring" in line and "leco_objective" not in line
    assert Config.defaults("Difference").unused_in_mode(["use_2nd_pass_settings=true"]) is None
    assert cfg.unused_in_mode([]) is None
