"""trainer/host/webui.py, scripts/traintrain.py and install.py against a faithful fake of the Web-UI's
`modules.*` (tests/fake_webui): the loaded weights are reused, the Web-UI's model is freed and restored
(also after an error or a stop), progress and Interrupt go through shared.state, LoRAs land in
cmd_opts.lora_dir, the tab registers, and install.py installs only what is missing."""
import importlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
FAKE = Path(__file__).resolve().parent / "fake_webui"


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from trainer.models.loading import save_ldm_checkpoint
    from trainer.models.tiny import tiny_components

    folder = tmp_path_factory.mktemp("webui") / "models" / "Stable-diffusion"
    return save_ldm_checkpoint(tiny_components(), folder / "tiny-sd1.safetensors")


@pytest.fixture()
def webui(tiny_ckpt, tmp_path, monkeypatch):
    """The fake Web-UI with the tiny checkpoint loaded, as after its start-up."""
    monkeypatch.syspath_prepend(str(FAKE))
    for name in [m for m in sys.modules if m == "modules" or m.startswith("modules.") or m == "launch"]:
        monkeypatch.delitem(sys.modules, name)
    from modules import sd_models, sd_vae, shared

    shared.cmd_opts.lora_dir = str(tmp_path / "models" / "Lora")
    sd_models.checkpoint_dir = str(tiny_ckpt.parent)
    sd_vae.vae_path = str(tmp_path / "models" / "VAE")
    sd_models.list_models()
    sd_vae.refresh_vae_list()
    sd_models.load_model()
    sd_models.events.clear()
    yield sys.modules["modules"]


def _host(tmp_path):
    from trainer.host.webui import WebUIHost

    return WebUIHost(tmp_path / "ext")


class _Control:
    def __init__(self):
        self.lines = []

    def log(self, m):
        self.lines.append(m)


def test_lists_and_paths_come_from_the_webui(webui, tmp_path, tiny_ckpt):
    from trainer.host.webui import LOADED_LABEL

    host = _host(tmp_path)
    assert host.paths().lora_dir == tmp_path / "models" / "Lora"
    assert host.paths().log_dir == (tmp_path / "ext" / "logs").resolve()
    assert host.model_choices() == [LOADED_LABEL, "tiny-sd1.safetensors"]
    assert host.vae_choices() == ["None"]
    assert host.model_value(LOADED_LABEL) == "" and host.model_value("tiny-sd1.safetensors") == "tiny-sd1.safetensors"
    assert host.lang == "en"
    from modules import shared

    shared.opts.localization = "ja_JP"
    assert _host(tmp_path).lang == "ja"
    shared.opts.localization = "None"
    vae_dir = tmp_path / "models" / "VAE"
    vae_dir.mkdir(parents=True)
    (vae_dir / "my.vae.safetensors").write_bytes(b"")
    host.refresh()
    assert host.vae_choices() == ["None", "my.vae.safetensors"]


def test_session_reuses_the_loaded_weights_frees_and_restores(webui, tmp_path, tiny_ckpt):
    from modules import call_queue, sd_models, shared

    from trainer.config import Config
    from trainer.models.tiny import tiny_components

    host = _host(tmp_path)
    reference = tiny_components()
    loaded = shared.sd_model
    shared.state.sampling_steps = 20  # left by the last txt2img (A1111's state.begin does not reset it)
    with host.session(Config.defaults(), _Control()) as comps:
        # /sdapi/v1/progress shows this job's step count from the start, not the last generation's
        assert (shared.state.sampling_step, shared.state.sampling_steps) == (0, Config.defaults().train_iterations)
        assert call_queue.queue_lock.locked()  # no generation while training
        assert loaded.placement == "cpu"  # the Web-UI's copy is off the device
        assert shared.state.job == "TrainTrain"
        for k, v in reference.unet.state_dict().items():
            assert torch.equal(comps.unet.state_dict()[k], v), k
        te_ref = reference.text_encoders[0].state_dict()
        te = comps.text_encoders[0].state_dict()
        assert all(torch.equal(te[k], v) for k, v in te_ref.items())
        assert comps.info.family.value == "sd1" and not comps.info.v_pred
    assert loaded.placement == "device" and shared.sd_model is loaded
    assert not call_queue.queue_lock.locked()
    assert ("load", "tiny-sd1.safetensors") not in sd_models.events  # the file was not read again
    assert [e[0] for e in sd_models.events] == ["to_cpu", "to_device"]
    assert shared.state.history[-2:] == [("begin", "TrainTrain"), ("end", "TrainTrain")]


def test_the_model_is_restored_after_an_error(webui, tmp_path):
    from modules import call_queue, shared

    from trainer.config import Config

    host = _host(tmp_path)
    loaded = shared.sd_model
    with pytest.raises(RuntimeError, match="boom"):
        with host.session(Config.defaults(), _Control()):
            raise RuntimeError("boom")
    assert loaded.placement == "device" and not call_queue.queue_lock.locked()
    assert shared.state.history[-1] == ("end", "TrainTrain")


def test_the_model_is_restored_when_loading_fails(webui, tmp_path, monkeypatch):
    from modules import shared

    from trainer.config import Config
    from trainer.host import webui as adapter

    def broken(*a, **k):
        raise ValueError("cannot convert")

    monkeypatch.setattr("trainer.models.convert.ldm_to_diffusers", broken)
    host = adapter.WebUIHost(tmp_path / "ext")
    with pytest.raises(ValueError, match="cannot convert"):
        with host.session(Config.defaults(), _Control()):
            pass
    assert shared.sd_model.placement == "device"


def test_a_lora_merged_by_the_webui_makes_it_read_the_file(webui, tmp_path, monkeypatch):
    from modules import shared

    from trainer.config import Config

    # A1111's Lora extension merged a prompt's LoRA into this layer and keeps a backup
    layer = dict(shared.sd_model.named_modules())["model.diffusion_model.input_blocks.1.1.proj_in"]
    layer.network_current_names = (("some_lora", 1.0, 1.0, None),)
    with torch.no_grad():
        layer.weight.add_(1.0)
    control = _Control()
    with _host(tmp_path).session(Config.defaults(), control) as comps:
        from trainer.models.tiny import tiny_components

        ref = tiny_components().unet.state_dict()
        assert torch.equal(comps.unet.state_dict()["down_blocks.0.attentions.0.proj_in.weight"],
                           ref["down_blocks.0.attentions.0.proj_in.weight"])
    assert any("checkpoint file" in line for line in control.lines)


def test_another_checkpoint_is_read_from_its_file(webui, tmp_path, tiny_ckpt):
    import shutil

    from modules import sd_models, shared

    from trainer.config import Config

    other = tiny_ckpt.parent / "other.safetensors"
    shutil.copyfile(tiny_ckpt, other)
    sd_models.list_models()
    host = _host(tmp_path)
    with host.session(Config.defaults().replace(model="other.safetensors"), _Control()) as comps:
        assert comps.name == "tiny-sd1"  # the name stored in the file's metadata
        assert shared.sd_model.placement == "cpu"
    assert shared.sd_model.placement == "device"
    with pytest.raises(ValueError, match="nope"):
        with host.session(Config.defaults().replace(model="nope.safetensors"), _Control()):
            pass
    assert shared.sd_model.placement == "device"


def _images(tmp_path):
    from trainer.demo import draw_demo_images

    return draw_demo_images(tmp_path / "imgs", count=2)


def _small_cfg(data, name, iterations):
    from trainer.config import Config

    return Config.load_preset(ROOT / "presets" / "LoRA.json").with_overrides({
        "lora_data_directory": str(data), "image_size": "64", "image_min_length": 64, "image_buckets_step": 64,
        "train_iterations": iterations, "train_model_precision": "fp32", "network_rank": 4,
        "save_lora_name": name, "train_batch_size": 1, "latent_cache_on_disk": False})


def test_a_job_trains_into_the_lora_folder_with_webui_progress(webui, tmp_path):
    from modules import shared

    from trainer.jobs import DONE, JobQueue, host_runner

    host = _host(tmp_path)
    seen = []
    host_on_progress = host.on_progress

    def spy(p):
        host_on_progress(p)
        seen.append((shared.state.sampling_step, shared.state.sampling_steps, shared.state.textinfo))

    host.on_progress = spy
    q = JobQueue(tmp_path / "ext" / "jsons", host_runner(host))
    q.add(_small_cfg(_images(tmp_path), "webui_job", 3))
    q.start()
    assert q.wait(300)
    job = q.jobs()[0]
    assert job.status == DONE, job.message
    assert Path(job.files[-1]) == tmp_path / "models" / "Lora" / "webui_job.safetensors"
    assert Path(job.files[-1]).is_file()
    steps = [s for s in seen if s[2] and "step" in s[2]]
    assert [s[0] for s in steps] == [1, 2, 3] and all(s[1] == 3 for s in steps)
    assert "TrainTrain: step 3/3 loss" in steps[-1][2]
    assert shared.sd_model.placement == "device"


def test_samples_are_drawn_inside_the_webui_while_it_is_held(webui, tmp_path):
    """Sample grids are drawn with our sampler on the weights being trained (the Web-UI's loaded model),
    while the Web-UI's lock is held and its model is off the device; they land next to the extension's logs."""
    from modules import call_queue, shared

    from trainer.jobs import DONE, JobQueue, host_runner
    from trainer.samples import read_grid_info

    host = _host(tmp_path)
    held, steps = [], []
    host_on_progress = host.on_progress

    def spy(p):
        host_on_progress(p)
        if p.phase == "sample":
            held.append((call_queue.queue_lock.locked(), shared.sd_model.placement, shared.state.textinfo))
        elif p.phase == "train":
            steps.append(shared.state.textinfo)

    host.on_progress = spy
    q = JobQueue(tmp_path / "ext" / "jsons", host_runner(host))
    q.add(_small_cfg(_images(tmp_path), "webui_samples", 2).with_overrides({
        "sample_every_n_steps": 1, "sample_steps": 1, "sample_cfg_scale": 1, "lora_trigger_word": "ttdemo"}))
    q.start()
    assert q.wait(300)
    assert q.jobs()[0].status == DONE, q.jobs()[0].message
    grids = sorted((tmp_path / "ext" / "samples" / "webui_samples").glob("*.png"))
    assert [g.stem.split("-", 1)[1] for g in grids] == ["step00000", "step00001", "step00002"]
    assert [p for p, _ in read_grid_info(grids[-1])["rows"]][0] == "ttdemo"
    assert len(held) == 3 and all(locked and placement == "cpu" for locked, placement, _ in held)
    assert all(text == f"TrainTrain: sample grid {g}" for g, (_, _, text) in zip(grids, held))
    assert "(sampling " in steps[-1] and "step 2/2" in steps[-1]  # the progress shows the time spent sampling
    assert shared.sd_model.placement == "device" and not call_queue.queue_lock.locked()


def test_a_failed_jobs_traceback_reaches_the_webuis_console(webui, tmp_path, monkeypatch, capsys):
    """A1111 configures no logging by default (logging.info is dropped): the tab's queue prints its lines,
    so the traceback that the tab's message points to ("look up to see its traceback") is in the console."""
    import logging

    from trainer.ui import TrainTrainUI

    monkeypatch.setattr(logging.root, "handlers", [])  # as in A1111 without --loglevel
    host = _host(tmp_path)

    def boom(*a, **k):
        raise RuntimeError("boom in the model loading")

    monkeypatch.setattr(host, "_components", boom)
    ui = TrainTrainUI(host)
    ui.queue.add(_small_cfg(_images(tmp_path), "console_job", 1))
    ui.queue.start()
    assert ui.queue.wait(60)
    out = capsys.readouterr().out
    assert "TrainTrain: job 1 (console_job, LoRA) started" in out
    assert "Traceback (most recent call last)" in out and "RuntimeError: boom in the model loading" in out
    assert "TrainTrain: job 1 (console_job) failed: Error: boom in the model loading" in out


def test_the_webui_interrupt_stops_training_and_saves(webui, tmp_path):
    from modules import shared

    from trainer.jobs import STOPPED, JobQueue, host_runner

    host = _host(tmp_path)
    q = JobQueue(tmp_path / "ext" / "jsons", host_runner(host))
    q.add(_small_cfg(_images(tmp_path), "interrupted", 400))
    host_on_progress = host.on_progress

    def press_interrupt_at_step_2(p):
        # the user presses the Web-UI's Interrupt while step 2 is reported: on the training's own thread, so a
        # fast machine cannot finish the 400 steps before the press (a polling thread could miss them all)
        host_on_progress(p)
        if p.phase == "train" and p.step == 2:
            shared.state.interrupt()

    host.on_progress = press_interrupt_at_step_2
    q.start()
    assert q.wait(300)
    job = q.jobs()[0]
    assert job.status == STOPPED, job.message
    assert 2 <= job.steps <= 3 and "Stopped at step" in job.message
    saved = Path(job.files[-1])
    assert saved.parent == tmp_path / "models" / "Lora" and saved.name == f"interrupted_{job.steps}steps.safetensors"
    assert shared.sd_model.placement == "device"


def test_the_extension_registers_its_tab(webui, tmp_path, monkeypatch):
    from modules import script_callbacks

    script_callbacks.callback_map["callbacks_ui_tabs"].clear()
    spec = importlib.util.spec_from_file_location("traintrain.py", ROOT / "scripts" / "traintrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "EXT_ROOT", str(ROOT))
    tabs = script_callbacks.ui_tabs_callback()
    assert len(tabs) == 1
    blocks, title, elem_id = tabs[0]
    import gradio as gr

    assert isinstance(blocks, gr.Blocks) and title == "TrainTrain" and elem_id == "traintrain"


# --- install.py ----------------------------------------------------------------------------------

def _run_install(installed, monkeypatch, transformers_version=None):
    monkeypatch.syspath_prepend(str(FAKE))
    monkeypatch.delitem(sys.modules, "launch", raising=False)
    import launch

    launch.installed = set(installed)
    launch.pip_calls = []
    if transformers_version:
        real = importlib.metadata.version
        monkeypatch.setattr(importlib.metadata, "version",
                            lambda n: transformers_version if n == "transformers" else real(n))
    spec = importlib.util.spec_from_file_location("traintrain_install", ROOT / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: nothing runs on import
    assert launch.pip_calls == []
    module.main()
    return module, launch.pip_calls


def test_install_adds_only_what_is_missing_and_never_the_webuis_packages(monkeypatch):
    module, calls = _run_install({"diffusers", "matplotlib", "ftfy", "prodigyopt"}, monkeypatch)
    wanted = {name for name, _ in module.requirements()}
    asked = " ".join(calls)
    for owned in ("torch", "gradio", "transformers", "numpy", "Pillow", "safetensors"):
        assert f'"{owned}' not in asked
    for present in ("diffusers", "matplotlib", "ftfy", "prodigyopt"):
        assert f'"{present}' not in asked
    assert any('"schedulefree' in c for c in calls) and "gradio" in wanted
    # every call pins what is installed, so nothing the Web-UI has can move
    assert all(c.startswith('install -c "') for c in calls)


def test_install_caps_diffusers_beside_the_webuis_old_transformers(monkeypatch):
    """A real A1111 1.10.1 (transformers 4.30.2) got diffusers 0.37.1 under the old cap (<0.40), and the first
    training failed: diffusers 0.37+ imports transformers.Dinov2WithRegistersConfig (4.48+) with its models.
    0.36 imports and trains there."""
    _, calls = _run_install(set(), monkeypatch, transformers_version="4.30.2")
    diffusers = [c for c in calls if '"diffusers' in c]
    assert len(diffusers) == 1 and diffusers[0].endswith(',<0.37"'), diffusers
    _, calls = _run_install(set(), monkeypatch, transformers_version="4.46.1")  # Forge's pin (it brings diffusers)
    assert ",<0.37" in next(c for c in calls if '"diffusers' in c)
    _, calls = _run_install(set(), monkeypatch, transformers_version="4.48.0")
    assert "<0." not in next(c for c in calls if '"diffusers' in c)


def test_install_pins_every_installed_distribution(monkeypatch):
    module, _ = _run_install({"x"}, monkeypatch)
    pins = module.installed_pins()
    assert any(p.lower().startswith("torch==") for p in pins)
    assert all("==" in p for p in pins)


def test_forge_reads_the_selected_checkpoint_and_lets_forge_reload_by_itself(webui, tmp_path, monkeypatch):
    """Forge: no LDM-layout model to reuse (FakeInitialModel before the first generation, forge_objects
    after); the checkpoint chosen in the header is read from its file and Forge's models are unloaded."""
    from modules import sd_models

    from trainer.config import Config

    class FakeInitialModel:
        cond_stage_model = None

    calls = []
    monkeypatch.setattr(sd_models, "forge_model_reload", lambda: calls.append("forge_model_reload"), raising=False)
    monkeypatch.setattr(sd_models, "unload_model_weights", lambda sd_model=None, info=None: calls.append("unload"))
    monkeypatch.setattr(sd_models, "send_model_to_cpu", lambda m: calls.append("to_cpu"))
    monkeypatch.setattr(sd_models, "send_model_to_device", lambda m: calls.append("to_device"))
    sd_models.model_data.sd_model = FakeInitialModel()
    with _host(tmp_path).session(Config.defaults(), _Control()) as comps:
        assert comps.name == "tiny-sd1" and comps.info.family.value == "sd1"
    assert calls == ["unload"]


def test_a_second_webui_on_one_install_keeps_its_own_queue_and_says_so(webui, tmp_path):
    """Two Web-UIs started from one install share the extension's jsons/: the second must neither lose its tab
    nor rewrite the first one's queue (issue 10, one queue owner per folder)."""
    import os
    import subprocess

    from trainer.ui import TrainTrainUI

    host = _host(tmp_path)
    shared_jsons = host.paths().json_dir
    code = ("import sys; from trainer.jobs import JobQueue; JobQueue(sys.argv[1], None); "
            "print('owner', flush=True); sys.stdin.read()")
    owner = subprocess.Popen([sys.executable, "-c", code, str(shared_jsons)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert owner.stdout.readline().strip() == "owner"
        ui = TrainTrainUI(host)
        assert ui.queue.store_dir == shared_jsons / f"instance-{os.getpid()}"
        assert f"pid {owner.pid}" in ui.queue.notice and str(ui.queue.store_dir) in ui.queue.notice
        assert str(ui.queue.store_dir) in ui.status_line()
    finally:
        owner.stdin.close()
        owner.wait(10)
    assert not (shared_jsons / "queue.json").exists()  # the first one's queue was never written by the second


def test_the_webuis_clip_skip_conditions_prompts_as_our_clip_skip_does(webui, tmp_path):
    """The Web-UI's Clip skip option (opts.CLIP_stop_at_last_layers) is followed while our clip_skip is 1,
    exactly as our clip_skip=2 would encode; our clip_skip above 1 overrides it."""
    from modules import shared

    from trainer.config import Config
    from trainer.models.prompts import encode_prompts
    from trainer.models.tiny import tiny_components

    ours = tiny_components()
    with torch.no_grad():
        skip1 = encode_prompts(ours, "a red circle", clip_skip=1).hidden
        skip2 = encode_prompts(ours, "a red circle", clip_skip=2).hidden
    assert not torch.allclose(skip1, skip2)
    for option, ours_setting, want in [(2, 1, skip2), (1, 1, skip1), (1, 2, skip2)]:
        shared.opts.CLIP_stop_at_last_layers = option
        control = _Control()
        with _host(tmp_path).session(Config.defaults(), control) as comps, torch.no_grad():
            got = encode_prompts(comps, "a red circle", clip_skip=ours_setting).hidden
        assert torch.allclose(got, want, atol=1e-6), (option, ours_setting)
    shared.opts.CLIP_stop_at_last_layers = 1


def _register_embedding(name, n=3):
    from modules import sd_hijack

    from trainer.models.tiny import tiny_components

    te = tiny_components().text_encoders[0]
    dim = getattr(te, "text_model", te).embeddings.token_embedding.embedding_dim
    vec = torch.randn(n, dim, generator=torch.Generator().manual_seed(3))
    sd_hijack.model_hijack.embedding_db.register_embedding(sd_hijack.Embedding(vec, name))
    return vec


def test_a_webui_embedding_in_a_prompt_encodes_to_its_vectors(webui, tmp_path):
    from test_embeddings import grown_vocabulary_hidden

    from trainer.config import Config
    from trainer.models.prompts import encode_prompts

    vec = _register_embedding("webemb")
    control = _Control()
    with _host(tmp_path).session(Config.defaults(), control) as comps, torch.no_grad():
        got = encode_prompts(comps, "a photo of webemb cat").hidden
        want = grown_vocabulary_hidden(comps.text_encoders[0], comps.tokenizers[0], "a photo of", vec, "cat", -1, True)
    assert torch.allclose(got, want, atol=1e-5)
    assert any("1 textual-inversion embedding(s)" in line for line in control.lines)


def test_an_ileco_job_with_a_webui_embedding_in_its_prompt_trains(webui, tmp_path):
    from trainer.config import Config
    from trainer.jobs import DONE, JobQueue, host_runner
    from trainer.networks.files import load_network_file

    from modules import shared

    _register_embedding("webemb")
    shared.opts.CLIP_stop_at_last_layers = 2  # followed (our clip_skip is 1): the file must say 2
    host = _host(tmp_path)
    q = JobQueue(tmp_path / "ext" / "jsons", host_runner(host))
    cfg = Config.load_preset(ROOT / "presets" / "iLECO.json").replace(
        original_prompt="webemb, cat", target_prompt="dog").with_overrides({
            "image_size": "64", "train_iterations": 3, "train_model_precision": "fp32", "network_rank": 4,
            "save_lora_name": "webui_emb", "train_batch_size": 1, "save_as_json": False})
    q.add(cfg)
    q.start()
    assert q.wait(300)
    shared.opts.CLIP_stop_at_last_layers = 1
    job = q.jobs()[0]
    assert job.status == DONE, job.message
    tensors, meta = load_network_file(tmp_path / "models" / "Lora" / "webui_emb.safetensors")
    assert meta["ss_clip_skip"] == "2"  # what the prompts were encoded with, not our setting's 1
    assert tensors and all(torch.isfinite(t).all() for t in tensors.values())
    assert any(k.endswith("lora_up.weight") and t.abs().sum() > 0 for k, t in tensors.items())  # it learned
    assert "original prompt: webemb, cat" in meta["ss_training_comment"]


def test_the_block_list_follows_the_webuis_model_family(webui, tmp_path, tiny_ckpt):
    """The tab's block list asks the host for the family: the loaded model's file header, else the Web-UI's
    own flags (an SDXL model loaded from a .ckpt); a listed checkpoint by its header; nothing is loaded."""
    from modules import sd_models

    from trainer.host.webui import LOADED_LABEL
    from trainer.models.families import Family
    from trainer.networks.targets import family_block_ids
    from trainer.ui import TrainTrainUI

    host = _host(tmp_path)
    assert host.model_family(LOADED_LABEL) is Family.SD1
    assert host.model_family("tiny-sd1.safetensors") is Family.SD1
    model = sd_models.model_data.sd_model
    model.sd_checkpoint_info = type("Info", (), {"filename": str(tmp_path / "xl.ckpt")})()  # header unreadable
    model.is_sd1, model.is_sdxl = False, True
    assert host.model_family(LOADED_LABEL) is Family.SDXL
    assert host.model_family("no-such-model") is None
    ui = TrainTrainUI(host)
    assert ui.block_ids_for(LOADED_LABEL) == tuple(family_block_ids(Family.SDXL))
    assert "OUT11" not in ui.block_ids_for(LOADED_LABEL) and "OUT08" in ui.block_ids_for(LOADED_LABEL)
    assert sd_models.events == []  # nothing was loaded or moved to answer
