"""Files the original TrainTrain wrote load here: resume (network_resume) and the Difference copier
(diff_load_1st_pass).

The fixtures are *made by the original's rules* (reference spec §5.2, §6: kohya names from the
diffusers module path for every family, SDXL included; ``lora_te`` / ``lora_te1`` + ``lora_te2``;
LoRA/LoCon ``lora_down``/``lora_up``/``alpha``; LoHa ``hada_*`` with the LyCORIS Tucker core for k×k
convs; every tensor saved in fp16), written here from those rules and never from our own naming code,
so a naming mistake on our side cannot hide in both.
"""
import math

import pytest
import torch
import torch.nn as nn

from test_engine import make_cfg
from trainer.config import Config
from trainer.demo import draw_demo_images
from trainer.engine import OutputPaths, TrainingRun
from trainer.models.tiny import tiny_components
from trainer.modes import mode_for
from trainer.networks import Network, save_network
from _family_helpers import SMALL, mode_inputs

torch.set_num_threads(1)

_LIERLA_PARENTS = ("Transformer2DModel",)
_C3_PARENTS = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")


def _cls_names(m):
    return {c.__name__ for c in type(m).__mro__}


def original_unet_modules(unet, algo):
    """{name: module}: the original's U-Net targets, named lora_unet_<diffusers path, . → _>."""
    parents = _LIERLA_PARENTS if algo == "lierla" else _C3_PARENTS
    out = {}
    for pname, parent in unet.named_modules():
        if not _cls_names(parent) & set(parents):
            continue
        for cname, child in parent.named_modules():
            if not isinstance(child, (nn.Linear, nn.Conv2d)):
                continue
            if algo == "lierla" and isinstance(child, nn.Conv2d) and child.kernel_size != (1, 1):
                continue
            out.setdefault("lora_unet_" + f"{pname}.{cname}".replace(".", "_"), child)
    return out


def original_te_modules(text_encoders):
    """{name: module}: lora_te_ (one encoder) or lora_te1_/lora_te2_, then text_model_encoder_layers_N_…"""
    out = {}
    prefixes = ["lora_te"] if len(text_encoders) == 1 else ["lora_te1", "lora_te2"]
    for prefix, te in zip(prefixes, text_encoders):
        layers = {n: m for n, m in te.named_modules() if n.endswith("encoder.layers") or n == "encoder.layers"}
        (layers,) = layers.values()
        for i, layer in enumerate(layers):
            for sub in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                        "mlp.fc1", "mlp.fc2"):
                out[f"{prefix}_text_model_encoder_layers_{i}_{sub.replace('.', '_')}"] = layer.get_submodule(sub)
    return out


def _dims(m):
    if isinstance(m, nn.Conv2d):
        return m.out_channels, m.in_channels, tuple(m.kernel_size)
    return m.out_features, m.in_features, None


def original_file(components, algo, with_te, rank=4, alpha=2.0, seed=0):
    """(tensors, {name: module}) of a LoRA the original would save with these settings."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: (torch.randn(*shape, generator=g) * 0.05).half()  # noqa: E731  (small: a trained LoRA)
    modules = original_unet_modules(components.unet, algo)
    if with_te:
        modules.update(original_te_modules(components.text_encoders))
    tensors = {}
    for name, m in modules.items():
        out_d, in_d, k = _dims(m)
        tensors[f"{name}.alpha"] = torch.tensor(alpha).half()
        if algo == "loha":
            if k is not None and k != (1, 1):  # LyCORIS use_tucker: a core per factor for k×k convs
                for i in ("1", "2"):
                    tensors[f"{name}.hada_t{i}"] = rnd(rank, rank, *k)
                    tensors[f"{name}.hada_w{i}_a"] = rnd(rank, out_d)
                    tensors[f"{name}.hada_w{i}_b"] = rnd(rank, in_d)
            else:
                flat = in_d * (math.prod(k) if k else 1)
                for i in ("1", "2"):
                    tensors[f"{name}.hada_w{i}_a"] = rnd(out_d, rank)
                    tensors[f"{name}.hada_w{i}_b"] = rnd(rank, flat)
        elif k is None:
            tensors[f"{name}.lora_down.weight"] = rnd(rank, in_d)
            tensors[f"{name}.lora_up.weight"] = rnd(out_d, rank)
        else:
            tensors[f"{name}.lora_down.weight"] = rnd(rank, in_d, *k)
            tensors[f"{name}.lora_up.weight"] = rnd(out_d, rank, 1, 1)
    return tensors, modules


def _loha_delta(tensors, name, shape):
    """ΔW of a LoHa module from its file tensors (the LyCORIS formulas, Tucker or flat), × alpha/rank."""
    w = []
    for i in ("1", "2"):
        a, b = tensors[f"{name}.hada_w{i}_a"].float(), tensors[f"{name}.hada_w{i}_b"].float()
        t = tensors.get(f"{name}.hada_t{i}")
        if t is not None:
            w.append(torch.einsum("ijhw,ip,jr->prhw", t.float(), a, b))
        else:
            w.append((a @ b).reshape(shape))
    rank = tensors[f"{name}.hada_w1_b"].shape[0]
    return w[0] * w[1] * float(tensors[f"{name}.alpha"]) / rank


@pytest.fixture(scope="module")
def models():
    return {"sd1": tiny_components(), "sdxl": tiny_components(family="sdxl")}


def _fresh_network(components, family, algo, train_te):
    return Network.create(components.unet, components.text_encoders if train_te else [], algo=algo, rank=8,
                          alpha=8, unet_key_style="sgm" if family == "sdxl" else "diffusers",
                          train_text_encoder=train_te)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("algo", ["lierla", "c3lier", "loha"])
@pytest.mark.parametrize("with_te", [False, True], ids=["unet-only", "with-te"])
def test_original_file_resumes_into_the_right_modules(models, family, algo, with_te):
    c = models[family]
    tensors, modules = original_file(c, algo, with_te)
    # a pass that does not train the text encoder (iLECO, ADDifT, LoRA without BASE) …
    net = _fresh_network(c, family, algo, train_te=False)
    result = net.load_kohya(tensors, parts=("unet",))
    n_te = sum(1 for n in modules if n.startswith("lora_te"))
    assert len(result.skipped.get("te", [])) == n_te
    if with_te:
        assert result.skipped_line("network_resume") == (
            f"network_resume: skipped {n_te} text-encoder module(s) of the file (this pass does not train them)")
    # … and a LoRA pass with BASE, which trains the text encoder
    net_te = _fresh_network(c, family, algo, train_te=True)
    net_te.load_kohya(tensors, parts=("unet", "te"))
    for n, wanted in ((net, {k: m for k, m in modules.items() if k.startswith("lora_unet_")}), (net_te, modules)):
        by_module = {id(a.org_module): a for a in n.adapters()}
        assert set(by_module) >= {id(m) for m in wanted.values()}
        for name, m in wanted.items():
            a = by_module[id(m)]
            assert float(a.alpha) == 2.0 and a.rank == 4, name
            if f"{name}.hada_t1" in tensors:
                torch.testing.assert_close(a.delta_weight(), _loha_delta(tensors, name, m.weight.shape),
                                           rtol=1e-4, atol=1e-5)
                continue
            state = a.file_state()
            for sub, t in state.items():
                if sub != "alpha":  # the file's tensors, bit for bit (fp16 → fp32 is exact)
                    assert torch.equal(t.float(), tensors[f"{name}.{sub}"].float()), f"{name}.{sub}"
    # our own names are kept, so the next save is in our key style (SGM for SDXL)
    if family == "sdxl":
        assert all(not k.startswith("lora_unet_down_blocks") for k in net.state_dict_kohya())


def test_a_file_that_does_not_fit_is_refused_with_its_module_names(models):
    sd1_file, _ = original_file(models["sd1"], "lierla", with_te=False)
    net = _fresh_network(models["sdxl"], "sdxl", "lierla", train_te=False)
    with pytest.raises(ValueError, match=r"match nothing in this model .*e\.g\. lora_unet_"):
        net.load_kohya(sd1_file, parts=("unet",))
    # SD1's single-encoder names do not fit SDXL's two encoders when the pass trains them
    te_file, _ = original_file(models["sd1"], "lierla", with_te=True)
    te_only = {k: v for k, v in te_file.items() if k.startswith("lora_te_")}
    net_te = _fresh_network(models["sdxl"], "sdxl", "lierla", train_te=True)
    with pytest.raises(ValueError, match="lora_te_text_model_encoder_layers_0"):
        net_te.load_kohya(te_only, parts=("unet", "te"))


# -- end to end: the run a user starts ----------------------------------------------------------

def _run(cfg, components, tmp_path):
    said = []
    run = TrainingRun(cfg, components, OutputPaths.under(tmp_path), log=said.append, device=torch.device("cpu"))
    return run.run(mode_for(cfg.mode)), said


def test_ileco_resumes_an_original_sdxl_lora_with_text_encoder_keys(tmp_path):
    c = tiny_components(family="sdxl")
    tensors, modules = original_file(c, "lierla", with_te=True)
    path = tmp_path / "old_sdxl.safetensors"
    save_network(path, tensors, {"ss_network_module": "network.lora"})
    n_te = sum(1 for n in modules if n.startswith("lora_te"))
    cfg = Config.defaults("iLECO").replace(original_prompt="a cat", target_prompt="a dog").with_overrides(
        {**SMALL, "train_iterations": 1, "save_lora_name": "resumed", "network_resume": str(path)})
    result, said = _run(cfg, c, tmp_path)
    assert result.ok, result.message
    skipped = [m for m in said if "skipped" in m]
    assert skipped == [f"network_resume: skipped {n_te} text-encoder module(s) of the file "
                       "(this pass does not train them)"], said


def test_lora_without_base_resumes_an_original_sd1_locon_with_text_encoder_keys(tmp_path):
    data = draw_demo_images(tmp_path / "images", count=2)
    c = tiny_components()
    tensors, _ = original_file(c, "c3lier", with_te=True)
    path = tmp_path / "old_sd1.safetensors"
    save_network(path, tensors, {})
    cfg = make_cfg(data, train_iterations=1, network_type="c3lier", network_resume=str(path),
                   network_blocks="IN01,IN02,OUT11")
    result, said = _run(cfg, c, tmp_path)
    assert result.ok, result.message
    assert sum("skipped" in m and "text-encoder" in m for m in said) == 1, said


def test_resume_refuses_a_file_of_another_family_naming_the_setting_and_modules(tmp_path):
    sd1_file, _ = original_file(tiny_components(), "lierla", with_te=False)
    path = tmp_path / "sd1.safetensors"
    save_network(path, sd1_file, {})
    cfg = Config.defaults("iLECO").replace(original_prompt="a cat", target_prompt="").with_overrides(
        {**SMALL, "train_iterations": 1, "save_lora_name": "x", "network_resume": str(path)})
    result, _ = _run(cfg, tiny_components(family="sdxl"), tmp_path)
    assert not result.ok
    assert "network_resume" in result.message and "lora_unet_" in result.message, result.message


@pytest.mark.parametrize("algo", ["lierla", "loha"])
def test_difference_loads_an_original_sdxl_copier(tmp_path, algo):
    c = tiny_components(family="sdxl")
    tensors, modules = original_file(c, algo, with_te=True)
    path = tmp_path / "copier.safetensors"
    save_network(path, tensors, {})
    meta, extra = mode_inputs(tmp_path / "in")["Difference"]
    cfg = Config.defaults("Difference").replace(**meta).with_overrides(
        {**SMALL, **extra, "train_iterations": 1, "save_lora_name": "diff", "diff_load_1st_pass": str(path)})
    result, said = _run(cfg, c, tmp_path)
    assert result.ok, result.message
    n_unet = sum(1 for n in modules if n.startswith("lora_unet_"))
    assert any(f"Copier loaded from {path} ({n_unet} modules)" in m for m in said), said
    n_te = sum(1 for n in modules if n.startswith("lora_te"))
    assert [m for m in said if "skipped" in m and "text-encoder" in m] == [
        f"diff_load_1st_pass: skipped {n_te} text-encoder module(s) of {path} (the prompt is encoded once, so "
        "the copier's text encoder is not used)"], said


# -- CSV logs -----------------------------------------------------------------------------------

def original_csv(path, n_groups):
    """A log made by the original's rules (spec §8.4): [key, value] rows, then Step, Loss (the EMA),
    Learning Rate 1…k, one row per step."""
    import csv
    rows = [["network_rank", 16], ["network_alpha", 8], ["train_learning_rate", 0.0001],
            ["train_iterations", 5], ["train_lr_scheduler", "cosine"], ["model_version", "sd_v1"],
            ["train_optimizer", "adamw"], ["save_lora_name", "old"],
            ["Step", "Loss"] + [f"Learning Rate {i + 1}" for i in range(n_groups)]]
    ema = [0.31, 0.29, 0.27, 0.26, 0.25]
    for step in range(1, 6):
        rows.append([step, ema[step - 1]] + [1e-4 * (6 - step) / 5 * (i + 1) for i in range(n_groups)])
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return ema, [[1e-4 * (6 - s) / 5 * (i + 1) for s in range(1, 6)] for i in range(n_groups)]


@pytest.mark.parametrize("n_groups", [1, 2])
def test_plot_reads_the_originals_csv_log_by_its_header(tmp_path, n_groups):
    from trainer.plot import plot_log
    path = tmp_path / "old-20240101_120000.csv"
    ema, lrs = original_csv(path, n_groups)
    fig = plot_log(path, tmp_path / "old.png")
    loss_ax, lr_ax = fig.axes
    assert [(line.get_label(), list(line.get_ydata())) for line in loss_ax.lines] == [("Loss (smoothed)", ema)]
    assert [(line.get_label(), list(line.get_ydata())) for line in lr_ax.lines] == [
        (f"Learning Rate {i + 1}", lrs[i]) for i in range(n_groups)]
    assert (tmp_path / "old.png").stat().st_size > 0


def test_plot_still_reads_our_csv_log(tmp_path):
    from trainer.plot import plot_log
    path = tmp_path / "ours.csv"
    path.write_text("mode,LoRA\nStep,Loss,Loss (smoothed),Learning Rate 1\n1,0.5,0.5,0.001\n2,0.3,0.48,0.0009\n")
    loss_ax, lr_ax = plot_log(path).axes
    assert [(line.get_label(), list(line.get_ydata())) for line in loss_ax.lines] == [
        ("Loss", [0.5, 0.3]), ("Loss (smoothed)", [0.5, 0.48])]
    assert [list(line.get_ydata()) for line in lr_ax.lines] == [[0.001, 0.0009]]


# -- presets and saved JSONs ----------------------------------------------------------------------

def test_int8_model_precision_is_not_offered_and_a_json_carrying_it_says_why(tmp_path):
    import json
    from trainer.config import SETTINGS_BY_NAME, SettingError
    row = SETTINGS_BY_NAME["train_model_precision"]
    assert "int8" not in row.choices  # no listed value may always fail
    assert "as stored in the file" not in row.help_en  # "model" is fp16, as in the original
    path = tmp_path / "old.json"  # a settings JSON the original saved with int8 chosen
    path.write_text(json.dumps({"mode": "LoRA", "train_model_precision": "int8"}))
    with pytest.raises(SettingError) as e:
        Config.load_preset(path)
    msg = str(e.value)
    assert "train_model_precision" in msg and "'int8'" in msg and "not implemented" in msg and "fp16" in msg


# -- docs/DIFFERENCES.md --------------------------------------------------------------------------

def test_differences_page_is_linked_and_names_only_real_settings():
    """A user switching reads docs/DIFFERENCES.md from either README; every setting it tells them to
    change must exist (a renamed setting would leave the page giving advice that fails)."""
    import re
    from pathlib import Path
    from trainer.config import SETTINGS_BY_NAME
    from trainer.optim import SCHEDULER_NAMES
    root = Path(__file__).resolve().parent.parent
    page = (root / "docs" / "DIFFERENCES.md").read_text(encoding="utf-8")
    for readme in ("README.md", "README_ja.md"):
        assert "(docs/DIFFERENCES.md)" in (root / readme).read_text(encoding="utf-8"), readme
    words = {w for code in re.findall(r"`([^`]+)`", page) for w in re.split(r"[ =,]", code)
             if re.fullmatch(r"[a-z]+(_[a-z0-9]+)+", w)}
    not_settings = {"cycle_momentum", "max_lr", "time_ids", "hada_t1", "hada_t2"}  # scheduler args, tensors
    unknown = {w for w in words - not_settings - set(SCHEDULER_NAMES)
               if not w.startswith(("ss_", "lora_te"))} - set(SETTINGS_BY_NAME)
    assert not unknown, unknown
    assert {"train_lr_warmup_steps", "train_iterations", "lora_trigger_word", "caption_emphasis",
            "network_resume", "diff_load_1st_pass", "train_model_precision"} <= words
