"""trainer/ui.py without a browser: the Blocks build, and each handler called with real values
(mode visibility, presets, validation, start -> a real job on the tiny model with live status and
plot, queue add / duplicate / delete, the Plot tab)."""
import json
import threading
from pathlib import Path

import pytest

import gradio as gr  # noqa: E402  (a requirement: missing is a failure, not a skip)

from trainer.config import BLOCK_IDS, MODES, SETTINGS, Config  # noqa: E402
from trainer.jobs import DONE, QUEUED, JobQueue, StandaloneHost  # noqa: E402
from trainer.ui import PASS1, PASS2, TrainTrainUI, _ui_value  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def upd(d):
    """An update dict without gradio's type marker."""
    return {k: v for k, v in d.items() if k != "__type__"}


def values_for(ui, cfg: Config, model=None, **meta):
    """The widget values (input_names order) that show ``cfg``."""
    second = cfg.second_pass or cfg
    out = []
    for n in ui.input_names:
        if n == "mode":
            out.append(cfg.mode)
        elif n == "model":
            out.append(model or ui.host.default_model())
        elif n == "vae":
            out.append("None")
        elif n.startswith("1:"):
            s = next(s for s in PASS1 if s.name == n[2:])
            out.append(_ui_value(s, getattr(cfg, s.name)))
        elif n.startswith("2:"):
            s = next(s for s in PASS2 if s.name == n[2:])
            out.append(_ui_value(s, getattr(second, s.name)))
        else:
            out.append(meta.get(n, getattr(cfg, n) or None))
    return out


def set_value(ui, values, name, value):
    values = list(values)
    values[ui.input_names.index(name)] = value
    return values


def small(data, name, iterations=4, **kw):
    return Config.load_preset(ROOT / "presets" / "LoRA.json").with_overrides({
        "lora_data_directory": str(data), "image_size": "64", "image_min_length": 64, "image_buckets_step": 64,
        "train_iterations": iterations, "train_model_precision": "fp32", "network_rank": 4, "save_lora_name": name,
        "train_batch_size": 1, "logging_save_csv": True, "latent_cache_on_disk": False, **kw})


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from trainer.demo import draw_demo_images

    return draw_demo_images(tmp_path_factory.mktemp("imgs"), count=2)


def test_every_setting_has_a_widget_generated_from_the_table(ui):
    names = {s.name for s in PASS1} | {s.name for s in PASS2}
    assert names == {s.name for s in SETTINGS}
    w = ui.widgets
    assert len(w["settings"]) == len(ui.input_names)
    by_id = {getattr(c, "elem_id", None): c for c in ui.blocks.blocks.values()}
    for s in PASS1:
        c = by_id[f"tt_{s.name}"]
        assert c.label == s.label
        kind = {"dropdown": gr.Dropdown, "text": gr.Textbox, "checkbox": gr.Checkbox,
                "checkgroup": gr.CheckboxGroup, "radio": gr.Radio}[s.widget]
        assert isinstance(c, kind), s.name
    assert isinstance(by_id["tt_network_blocks"], gr.CheckboxGroup)
    assert by_id["tt2_network_rank"] is not None and by_id["tt2_use_2nd_pass_settings"] is not None
    for elem in ("tt_start", "tt_stop", "tt_queue_add", "tt_preset", "tt_model", "tt_vae", "tt_status",
                 "tt_live_plot", "tt_queue_table", "tt_log_plot", "tt_original_image", "tt_original_prompt"):
        assert elem in by_id, elem


def test_defaults_make_the_default_config(ui):
    cfg, files = ui.config_from_values(values_for(ui, Config.defaults("LoRA")))
    assert cfg == Config.defaults("LoRA") and files == {}


@pytest.mark.parametrize("mode", MODES)
def test_mode_change_shows_only_that_modes_settings(ui, mode):
    out = ui.change_mode(mode)
    assert [upd(u)["visible"] for u in out[:len(PASS1)]] == [s.visible_in(mode) for s in PASS1]
    second, prompts, images = (upd(u)["visible"] for u in out[-3:])
    assert second == (mode == "Difference")
    assert prompts == (mode in ("iLECO", "Difference", "ADDifT"))
    assert images == (mode in ("Difference", "ADDifT"))
    visible = {s.name for s, u in zip(PASS1, out) if upd(u)["visible"]}
    if mode == "Multi-ADDifT":
        assert "diff_target_name" in visible
    else:
        assert "diff_target_name" not in visible
    assert ("diff_save_1st_pass" in visible) == (mode == "Difference")


SIDES = ["Original prompt (− side)", "Target prompt (+ side)", "Original image (− side)", "Target image (+ side)"]
PLAIN = ["Original prompt", "Target prompt (iLECO: empty = erase)", "Original image", "Target image"]


@pytest.mark.parametrize("mode", MODES)
def test_slider_modes_label_original_and_target_as_minus_and_plus_sides(ui, mode):
    out = ui.change_mode(mode)
    labels = [upd(u)["label"] for u in out[len(PASS1):len(PASS1) + 4]]
    assert labels == (SIDES if mode in ("ADDifT", "Multi-ADDifT") else PLAIN)
    suffix = upd(out[[s.name for s in PASS1].index("diff_target_name")])["label"]
    if mode == "Multi-ADDifT":  # no image widgets there: the suffix setting says which image is which side
        assert suffix == "diff target name (marks the + side image; the image without it is the − side)"
    else:
        assert suffix == "diff target name"


def test_a_loaded_preset_labels_the_sides_of_its_mode(ui):
    out = ui.load_preset("ADDifT_Style_SD1.5")
    vals = dict(zip(ui.input_names, out[1:1 + len(ui.input_names)]))
    assert [upd(vals[n])["label"] for n in ("original_prompt", "target_prompt", "original_image", "target_image")] \
        == SIDES
    out = ui.load_preset("Difference_Use2ndPass")
    vals = dict(zip(ui.input_names, out[1:1 + len(ui.input_names)]))
    assert upd(vals["original_image"])["label"] == "Original image" and "value" not in upd(vals["original_image"])


def test_load_a_shipped_preset_fills_every_widget(ui):
    out = ui.load_preset("Difference_Use2ndPass")
    assert out[0] == "Loaded preset Difference_Use2ndPass (Difference)"
    vals = dict(zip(ui.input_names, out[1:1 + len(ui.input_names)]))
    assert upd(vals["mode"])["value"] == "Difference"
    assert upd(vals["1:network_rank"])["value"] == "16" and upd(vals["1:train_learning_rate"])["value"] == "0.0005"
    assert upd(vals["2:use_2nd_pass_settings"])["value"] is True  # bug #18: the flag is honoured
    assert upd(vals["2:network_rank"])["value"] == "4" and upd(vals["2:train_learning_rate"])["value"] == "0.0001"
    assert upd(vals["1:network_blocks"])["value"] == list(BLOCK_IDS)
    assert upd(vals["1:diff_save_1st_pass"])["visible"] is True and upd(vals["1:diff_target_name"])["visible"] is False
    assert [upd(u)["visible"] for u in out[-3:]] == [True, True, True]
    # the values shown make the preset's Config again
    shown = [upd(vals[n]).get("value") for n in ui.input_names]
    shown[ui.input_names.index("model")] = ui.host.default_model()
    for i, n in enumerate(ui.input_names):
        if n in ("original_image", "target_image"):
            shown[i] = None
    cfg, _ = ui.config_from_values(shown)
    assert cfg == Config.load_preset(ROOT / "presets" / "Difference_Use2ndPass.json")


def test_load_preset_errors_are_messages(ui):
    assert ui.load_preset(None)[0] == "Choose a preset to load"
    assert "not found" in ui.load_preset("nope")[0]
    (ui.user_preset_dir).mkdir(parents=True, exist_ok=True)
    (ui.user_preset_dir / "broken.json").write_text('{"train_batch_size": "abc"}', encoding="utf-8")
    out = ui.load_preset("broken")
    assert out[0].startswith("Error: ") and 'train_batch_size: "abc"' in out[0]
    assert all(upd(u) == {} for u in out[1:])


def test_save_preset_round_trips_and_never_overwrites_silently(ui, tmp_path):
    cfg = Config.defaults("iLECO").replace(save_lora_name="mine", network_rank=4, train_learning_rate=3e-4)
    values = values_for(ui, cfg, original_prompt="red", target_prompt="blue")
    msg, dropdown = ui.save_preset("", False, *values)
    path = tmp_path / "presets" / "mine.json"
    assert msg == f"Preset saved: {path}" and upd(dropdown)["value"] == "mine" and "mine" in upd(dropdown)["choices"]
    assert Config.load_preset(path) == cfg.replace(original_prompt="red", target_prompt="blue")
    assert "mine" in ui.preset_names() and "LoRA" in ui.preset_names()
    msg, _ = ui.save_preset("mine", False, *values)
    assert "exists" in msg and "overwrite" in msg
    values = set_value(ui, values, "1:network_rank", "8")
    assert ui.save_preset("mine", True, *values)[0].startswith("Preset saved")
    assert json.loads(path.read_text(encoding="utf-8"))["network_rank"] == "8"
    assert "cannot have" in ui.save_preset("a/b", False, *values)[0]
    loaded = ui.load_preset("mine")
    assert loaded[0] == "Loaded preset mine (iLECO)"
    bad = set_value(ui, values, "1:train_iterations", "-5")
    assert ui.save_preset("x", False, *bad)[0].startswith("Error: train_iterations")


def test_copy_first_pass_into_the_second_pass_panel(ui):
    values = values_for(ui, Config.defaults("Difference").replace(network_rank=32, train_iterations=77))
    out = dict(zip([s.name for s in PASS2], ui.copy_first_pass(*values)))
    assert upd(out["network_rank"])["value"] == "32" and upd(out["train_iterations"])["value"] == "77"
    assert upd(out["use_2nd_pass_settings"])["value"] is True


def test_second_pass_values_are_used_only_when_ticked(ui):
    cfg = Config.defaults("Difference")
    values = set_value(ui, values_for(ui, cfg), "2:network_rank", "4")
    got, _ = ui.config_from_values(values)
    assert got.second_pass is None
    got, _ = ui.config_from_values(set_value(ui, values, "2:use_2nd_pass_settings", True))
    assert got.second_pass.network_rank == 4 and got.network_rank == 16


def test_bad_values_are_named_in_the_message_and_queue_nothing(ui, images):
    values = set_value(ui, values_for(ui, small(images, "x")), "1:train_batch_size", "abc")
    msg, table, choices = ui.start(*values)
    assert msg.startswith("Error: train_batch_size: \"abc\"") and "Traceback" not in msg
    assert ui.queue.jobs() == []
    values = set_value(ui, values_for(ui, small(images, "x")), "1:lora_data_directory", "/no/such/folder")
    assert "lora_data_directory" in ui.start(*values)[0] and "/no/such/folder" in ui.add_to_queue(*values)[0]
    values = values_for(ui, Config.defaults("ADDifT").replace(save_lora_name="p"))
    assert "original image: no image" in ui.add_to_queue(*values)[0]
    values = values_for(ui, Config.defaults("iLECO").replace(save_lora_name="p"))
    assert "original_prompt" in ui.add_to_queue(*values)[0]
    assert ui.queue.jobs() == []


def test_an_existing_output_is_refused_before_queueing(ui, images, tmp_path):
    (tmp_path / "output").mkdir()
    (tmp_path / "output" / "taken.safetensors").write_bytes(b"x")
    msg = ui.add_to_queue(*values_for(ui, small(images, "taken")))[0]
    assert "taken.safetensors already exists" in msg and "save_overwrite" in msg
    assert ui.add_to_queue(*values_for(ui, small(images, "taken", save_overwrite=True)))[0].startswith("Added")


def test_queue_add_duplicate_delete_and_persistence(ui, images, tmp_path):
    msg, table, choices = ui.add_to_queue(*values_for(ui, small(images, "q1")))
    tiny = ui.host.TINY_LABEL
    assert msg == f"Added q1 to the queue (job 1); press Run Queue or Start Training · model: {tiny}"
    assert upd(table)["value"] == [["1", "q1", "LoRA", QUEUED, "", tiny]]
    assert upd(choices)["choices"] == ["1: q1 (queued)"]
    assert "already queued" in ui.add_to_queue(*values_for(ui, small(images, "q1")))[0]
    ui.add_to_queue(*values_for(ui, small(images, "q2")))
    ui.add_to_queue(*values_for(ui, small(images, "q3")))
    msg, table, _ = ui.delete_job("1: q1 (queued)")
    assert msg == "Deleted job 1 (q1, queued)"
    assert [r[1] for r in upd(table)["value"]] == ["q2", "q3"]
    assert ui.delete_job(None)[0] == "Choose a job to delete"
    # a new app on the same folder shows the same queue
    again = TrainTrainUI(StandaloneHost(tmp_path))
    assert [r[1] for r in upd(again.queue_view()[0])["value"]] == ["q2", "q3"]
    assert again.queue.jobs()[0].config().lora_data_directory == str(images)


def test_start_runs_a_job_with_live_status_and_plot_and_saves(ui, images, tmp_path):
    # the job waits at steps 3 and 6 until the test has polled: no race with a machine that trains 8 steps
    # between two polls
    holds = {3: (threading.Event(), threading.Event()), 6: (threading.Event(), threading.Event())}

    def hold(p):
        if p.phase == "train" and p.step in holds and not holds[p.step][0].is_set():
            holds[p.step][0].set()
            holds[p.step][1].wait(60)

    ui.host.on_progress = hold
    msg, table, _ = ui.start(*values_for(ui, small(images, "ui_run", iterations=8)))
    assert msg == f"Started ui_run (job 1, LoRA) · model: {ui.host.TINY_LABEL}"
    statuses, figures, tables, logs, state = [], [], [], [], {}
    for step, (reached, release) in holds.items():
        assert reached.wait(600), f"the job never reached step {step}"
        status, plot, table, choices, log, state = ui.poll(state)
        statuses.append(status)
        figures.append(upd(plot).get("value"))
        logs.append(upd(log).get("value"))
        if "value" in upd(table):  # the table is only sent when it changed
            tables.append(upd(table)["value"])
        release.set()
    assert ui.queue.wait(600)
    assert statuses[0].startswith("Training ui_run (job 1) · step 3/8 · ") and " · step 6/8 · " in statuses[1]
    for part in ("loss ", "(avg ", "lr ", " s/it", "ETA ", f"model: {ui.host.TINY_LABEL}"):
        assert part in statuses[1]
    assert all(f is not None for f in figures), "the live plot never updated"
    assert [len(f.axes[0].lines[0].get_xdata()) for f in figures] == [3, 6]  # it grew while training
    assert logs[0].startswith(f"Job 1 (ui_run, running) · model: {ui.host.TINY_LABEL}")  # the tab's job log
    assert "Start training: mode LoRA" in logs[0]
    status, plot, table, choices, log, state = ui.poll(state)
    assert status.startswith("Idle · last: ui_run (job 1) done: Saved ")
    assert (tmp_path / "output" / "ui_run.safetensors").is_file()
    if "value" in upd(table):
        tables.append(upd(table)["value"])
    assert tables and tables[-1][0][3] == DONE
    # the Plot tab lists and draws the run's CSV (only from logs/)
    files = ui.log_files()
    assert len(files) == 1 and files[0].startswith("ui_run-") and files[0].endswith(".csv")
    fig, where = ui.draw_log(files[0])
    assert fig is not None and where.endswith(files[0]) and len(fig.axes[0].lines[0].get_xdata()) == 8
    assert upd(ui.refresh_logs())["value"] == files[0]
    assert ui.draw_log("../queue.json")[0] is None
    assert ui.draw_log("../../etc/passwd")[1].startswith("Error")


def hold_at_step(ui, step):
    """The running job waits after reporting ``step`` until the returned ``release`` is set."""
    reached, release = threading.Event(), threading.Event()

    def hold(p):
        if p.phase == "train" and p.step == step and not reached.is_set():
            reached.set()
            release.wait(60)

    ui.host.on_progress = hold
    return reached, release


def test_stop_and_cancel_buttons_say_what_they_do(ui):
    by_id = {getattr(c, "elem_id", None): c for c in ui.blocks.blocks.values()}
    assert by_id["tt_stop"].value == "Stop and save" and by_id["tt_cancel"].value == "Cancel without saving"
    assert by_id["tt_stop_go_on"].value is False and "go on with the next job" in by_id["tt_stop_go_on"].label
    help_text = by_id["tt_stop_help"].value
    for part in ("**Stop and save**", "<name>_<steps>steps", "**Cancel without saving**", "saves nothing",
                 "queue pauses", "next queued job starts"):
        assert part in help_text, part
    assert ui.cancel() == "Nothing is training" and ui.stop(True) == "Nothing is training"


def test_cancel_and_go_on_writes_no_file_and_the_next_job_trains(ui, images, tmp_path):
    reached, release = hold_at_step(ui, 2)
    ui.add_to_queue(*values_for(ui, small(images, "ui_long", iterations=300)))
    ui.add_to_queue(*values_for(ui, small(images, "ui_next", iterations=2)))
    ui.run_queue()
    assert reached.wait(600)
    msg = ui.cancel(True)  # "go on with the next job" ticked
    assert msg == ("Cancelling ui_long (job 1) at the next step; nothing of it will be saved; then the queue goes "
                   "on with ui_next (job 2)")
    release.set()
    assert ui.queue.wait(600)
    first, second = ui.queue.jobs()
    assert first.status == "cancelled" and first.message == "Cancelled at step 2; nothing was saved"
    assert second.status == DONE
    assert sorted(p.name for p in (tmp_path / "output").glob("*.safetensors")) == ["ui_next.safetensors"]
    rows = upd(ui.queue_view()[0])["value"]
    assert [r[3] for r in rows] == ["cancelled", "done"]


def test_stop_and_save_pauses_the_queue_by_default(ui, images, tmp_path):
    reached, release = hold_at_step(ui, 2)
    ui.add_to_queue(*values_for(ui, small(images, "ui_long", iterations=300)))
    ui.add_to_queue(*values_for(ui, small(images, "ui_next", iterations=2)))
    ui.run_queue()
    assert reached.wait(600)
    msg = ui.stop(False)
    assert msg == ("Stopping ui_long (job 1) at the next step; what was trained will be saved; the queue pauses: "
                   "1 queued job(s) wait for Run Queue")
    release.set()
    assert ui.queue.wait(600)
    assert [j.status for j in ui.queue.jobs()] == ["stopped", QUEUED]
    assert [p.name for p in (tmp_path / "output").glob("*.safetensors")] == ["ui_long_2steps.safetensors"]
    assert ui.status_line().startswith("Idle · last: ui_long (job 1) stopped: Stopped at step 2; saved ")


def test_poll_reports_no_change_when_nothing_changed(ui, images):
    _, _, _, _, _, state = ui.poll({})
    status, plot, table, choices, log, state2 = ui.poll(state)
    assert upd(table) == {} and upd(choices) == {} and upd(plot) == {} and upd(log) == {}
    ui.add_to_queue(*values_for(ui, small(images, "changed")))
    status, plot, table, choices, log, state3 = ui.poll(state2)
    assert upd(table)["value"][0][1] == "changed" and status == "Idle · 1 queued"


def test_plot_tab_without_logs_says_so(ui):
    fig, msg = ui.draw_log(None)
    assert fig is None and "No CSV logs" in msg
    assert upd(ui.refresh_logs())["choices"] == []


def test_stop_when_idle_and_run_queue_when_empty(ui):
    assert ui.stop() == "Nothing is training"
    assert ui.run_queue()[0] == "Nothing is queued"


def test_model_and_vae_lists_refresh(ui, tmp_path):
    from trainer.models.loading import save_ldm_checkpoint
    from trainer.models.tiny import tiny_components

    models = tmp_path / "models"
    host = StandaloneHost(tmp_path, model_dir=models)
    u = TrainTrainUI(host, queue=JobQueue(tmp_path / "q", lambda c, ctl: None))
    assert upd(u.refresh_models()[0])["choices"] == [host.TINY_LABEL]
    save_ldm_checkpoint(tiny_components(), models / "mine.safetensors")
    (models / "my_vae.safetensors").write_bytes(b"")
    got = upd(u.refresh_models("mine.safetensors")[0])
    assert got["choices"] == [host.TINY_LABEL, "mine.safetensors", "my_vae.safetensors"]
    assert got["value"] == "mine.safetensors"
    assert upd(u.refresh_vaes()[0])["choices"] == ["None", "my_vae.safetensors"]
    values = values_for(u, Config.defaults(), model="mine.safetensors")
    assert u.config_from_values(values)[0].model == "mine.safetensors"
    assert u.config_from_values(values_for(u, Config.defaults(), model=host.TINY_LABEL))[0].model == ""
    assert host.default_model() == "mine.safetensors"  # a real model listed: the tiny one is not the default


def test_the_cli_has_a_ui_command_that_listens_on_localhost_only(monkeypatch, capsys):
    from trainer.__main__ import main
    import trainer.__main__ as cli
    import trainer.ui as ui_module

    seen = {}

    def fake_launch(host, **kw):
        seen.update(kw, host=host)

    monkeypatch.setattr(ui_module, "launch", fake_launch)
    monkeypatch.setattr(cli, "_port_problem", lambda host, port: "")  # the ports may be busy on this machine
    assert main(["ui", "--port", "7999", "--workdir", "/tmp/tt-ui-cli"]) == 0
    assert seen["port"] == 7999 and seen["listen"] is False and seen["auth"] is None
    assert "warning" not in capsys.readouterr().err
    assert main(["ui", "--listen"]) == 0 and seen["listen"] is True and seen["port"] == 7860
    assert "warning: --listen without --auth" in capsys.readouterr().err
    assert main(["ui", "--listen", "--auth", "me:s3cret:x"]) == 0 and seen["auth"] == ("me", "s3cret:x")
    assert "warning" not in capsys.readouterr().err
    assert main(["ui", "--auth", "nopassword"]) == 2
    assert capsys.readouterr().err.strip() == "error: --auth 'nopassword': expected user:password (both non-empty)"


def test_ui_port_busy_or_out_of_range_is_one_line(tmp_path, monkeypatch, capsys):
    import socket

    from trainer.__main__ import main
    import trainer.ui as ui_module

    monkeypatch.setattr(ui_module, "launch", lambda *a, **k: pytest.fail("must not start"))
    for port in ("0", "70000"):
        assert main(["ui", "--port", port, "--workdir", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err == f"error: --port {port}: out of range (allowed: 1 to 65535)\n"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["ui", "--port", str(port), "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --port {port}: 127.0.0.1:{port} cannot be used (") and err.count("\n") == 1
    assert "Traceback" not in err


def test_a_second_ui_on_one_workdir_is_refused_naming_the_workdir_and_owner(tmp_path, monkeypatch, capsys):
    import subprocess
    import sys

    from trainer.__main__ import main
    import trainer.__main__ as cli

    monkeypatch.setattr(cli, "_port_problem", lambda host, port: "")
    code = ("import sys; from trainer.jobs import JobQueue; JobQueue(sys.argv[1], None); "
            "print('owner', flush=True); sys.stdin.read()")
    owner = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "jsons")], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert owner.stdout.readline().strip() == "owner"
        assert main(["ui", "--workdir", str(tmp_path), "--port", "7861"]) == 2
    finally:
        owner.stdin.close()
        owner.wait(10)
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith(f"error: the queue in {tmp_path / 'jsons'} is owned by another TrainTrain process "
                              f"(pid {owner.pid})")
    assert not any("Traceback" in line for line in err)


def test_the_standalone_app_serves_no_queue_json_and_asks_for_a_password(tmp_path, monkeypatch):
    """gradio's file route: the queue file (every job's settings and absolute paths) is not served."""
    import socket
    import urllib.error
    import urllib.request

    from trainer.ui import blocked_paths, launch

    host = StandaloneHost(tmp_path)
    monkeypatch.chdir(tmp_path)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    u = launch(host, port=port, block=False, auth=("me", "pw"))
    try:
        u.queue.add(Config.defaults("LoRA").replace(save_lora_name="secret_job"))
        queue_file = (tmp_path / "jsons" / "queue.json").resolve()
        assert "secret_job" in queue_file.read_text(encoding="utf-8")
        assert str(queue_file.parent) in blocked_paths(host) and str(tmp_path.resolve()) in blocked_paths(host)
        codes = []
        for route in ("gradio_api/file=", "file="):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/{route}{queue_file}", timeout=30) as r:
                    body = r.read()
                    codes.append((r.status, b"secret_job" in body))
            except urllib.error.HTTPError as e:
                codes.append((e.code, b"secret_job" in e.read()))
        assert all(code >= 400 and not leaked for code, leaked in codes), codes
        # the login: the page's config is refused without it
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=30)
            raise AssertionError("the app answered without the password")
        except urllib.error.HTTPError as e:
            assert e.code in (401, 403)
    finally:
        u.blocks.close()


def test_help_texts_follow_the_language(tmp_path):
    host = StandaloneHost(tmp_path)
    host.lang = "ja"  # as WebUIHost sets it from the Web-UI's localization
    u = TrainTrainUI(host, queue=JobQueue(tmp_path / "q", lambda c, ctl: None))
    u.build()
    by_id = {getattr(c, "elem_id", None): c for c in u.blocks.blocks.values()}
    rank = next(s for s in SETTINGS if s.name == "network_rank")
    assert by_id["tt_network_rank"].info == rank.help_ja
    assert TrainTrainUI(host, lang="en", queue=u.queue).lang == "en"


def test_uploaded_images_pass_gradio_even_with_forges_save_pil_to_cache(ui, images, monkeypatch):
    """Forge (modules/ui_tempdir.py) replaces gradio's processing_utils.save_pil_to_cache with
    save_pil_to_file(pil_image, cache_dir=None, format="png"): no name=. gradio 4+ calls it with name= to
    preprocess gr.Image(type="filepath"), so in a real Forge every Difference/ADDifT job failed inside gradio
    (TypeError) before the tab's handler ran. The image widgets take PIL images, saved by the tab itself."""
    from PIL import Image
    from gradio import processing_utils

    def forge_save_pil_to_file(pil_image, cache_dir=None, format="png"):  # Forge's signature
        raise AssertionError("the tab's images must not go through save_pil_to_cache")

    monkeypatch.setattr(processing_utils, "save_pil_to_cache", forge_save_pil_to_file)
    w = ui.widgets
    assert w["original_image"].type == "pil" and w["target_image"].type == "pil"
    src = sorted(Path(images).glob("*.png"))
    payload = [w["original_image"].data_model(path=str(p), orig_name=p.name) for p in src[:2]]
    pil = [w[n].preprocess(p) for n, p in zip(("original_image", "target_image"), payload)]
    assert all(isinstance(x, Image.Image) and x.mode == "RGBA" for x in pil)
    cfg = Config.load_preset(ROOT / "presets" / "Difference.json").with_overrides({"save_lora_name": "pair"})
    vals = values_for(ui, cfg, original_image=pil[0], target_image=pil[1])
    msg = ui.add_to_queue(*vals)[0]
    assert msg.startswith("Added pair to the queue"), msg
    kept = ui.queue.jobs()[0].config()
    for attr, p in zip(("original_image", "target_image"), src):
        with Image.open(getattr(kept, attr)) as a, Image.open(p) as b:
            assert a.convert("RGBA").tobytes() == b.convert("RGBA").tobytes()


# --- issue 10: the tab's own inputs and notices ---------------------------------------------------------

def test_add_and_run_with_an_unwritable_queue_file_say_why_and_never_hang(ui, images, monkeypatch):
    import errno

    import trainer.jobs as jobs_module

    real = jobs_module._atomic_json

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(jobs_module, "_atomic_json", full)
    msg = ui.add_to_queue(*values_for(ui, small(images, "q_full")))[0]
    assert msg.startswith("Error: q_full was not added: could not save the queue file") and "No space left" in msg
    assert ui.queue.jobs() == []
    monkeypatch.setattr(jobs_module, "_atomic_json", real)
    ui.add_to_queue(*values_for(ui, small(images, "q_full")))
    monkeypatch.setattr(jobs_module, "_atomic_json", full)
    ui.run_queue()
    assert ui.queue.wait(30)
    job = ui.queue.jobs()[0]
    assert job.status == "failed" and "No space left" in job.message
    assert ui.stop() == "Nothing is training" and "q_full (job 1) failed: Not started: could not save" in ui.status_line()


def test_a_set_aside_queue_file_is_announced_in_the_tab(tmp_path):
    (tmp_path / "jsons").mkdir()
    (tmp_path / "jsons" / "queue.json").write_text('{"version": 1, "next_id": 3, "jobs": [{"id": "two", '
                                                   '"name": "x", "mode": "LoRA", "settings": {}}]}', encoding="utf-8")
    u = TrainTrainUI(StandaloneHost(tmp_path))
    u.build()
    aside = list((tmp_path / "jsons").glob("queue.broken-*.json"))
    assert len(aside) == 1 and "two" in aside[0].read_text(encoding="utf-8")
    for shown in (u.widgets["message"].value, u.status_line(), u.job_log()):
        assert "could not be read" in shown and str(aside[0]) in shown and "'id'" in shown


def _real_models(tmp_path):
    """A --model-dir with one checkpoint listed (the list reads names only; nothing is loaded here)."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "real.safetensors").write_bytes(b"")
    return models


def test_presets_never_switch_the_model_the_data_or_the_name(tmp_path, images):
    host = StandaloneHost(tmp_path, model_dir=_real_models(tmp_path))
    u = TrainTrainUI(host, queue=JobQueue(tmp_path / "q", lambda c, ctl: None))
    u.build()
    assert host.default_model() == "real.safetensors" and u.widgets["model"].value == "real.safetensors"
    for preset in ("LoRA", "Difference", "iLECO"):
        out = u.load_preset(preset)
        vals = dict(zip(u.input_names, out[1:1 + len(u.input_names)]))
        for kept in ("model", "vae", "1:lora_data_directory", "1:save_lora_name"):
            assert "value" not in upd(vals[kept]), (preset, kept, vals[kept])
    (u.user_preset_dir).mkdir(parents=True)
    mine = Config.defaults("LoRA").replace(model="real.safetensors", lora_data_directory=str(images),
                                           save_lora_name="from_preset")
    mine.save_preset(u.user_preset_dir / "full.json")
    vals = dict(zip(u.input_names, u.load_preset("full")[1:1 + len(u.input_names)]))
    assert upd(vals["model"])["value"] == "real.safetensors"
    assert upd(vals["1:lora_data_directory"])["value"] == str(images)
    assert upd(vals["1:save_lora_name"])["value"] == "from_preset"
    msg = u.add_to_queue(*values_for(u, small(images, "on_real"), model="real.safetensors"))[0]
    assert msg.endswith("· model: real.safetensors")
    assert upd(u.queue_view()[0])["value"][0][-1] == "real.safetensors"


def test_preset_names_from_a_request_stay_in_the_presets_folder(ui, tmp_path):
    outside = tmp_path / "outside.json"
    Config.defaults("LoRA").replace(save_lora_name="stolen").save_preset(outside)
    (ui.user_preset_dir).mkdir(parents=True, exist_ok=True)
    for name in ("../outside", str(tmp_path / "outside"), "../../" + str(tmp_path / "outside").lstrip("/")):
        msg = ui.load_preset(name)[0]
        assert msg.startswith("Error: preset ") and "not found" in msg, (name, msg)


def test_image_paths_from_a_request_must_be_uploads_of_the_tab(ui, tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"not for the queue")
    cfg = Config.load_preset(ROOT / "presets" / "Difference.json").with_overrides({"save_lora_name": "pair"})
    for value in (str(secret), {"path": str(secret)}, "/tmp/traintrain-uploads/../../" + str(secret).lstrip("/")):
        msg = ui.add_to_queue(*values_for(ui, cfg, original_image=value, target_image=value))[0]
        assert msg.startswith("Error: original_image: ") and "not an image uploaded in the Original image" in msg
    assert ui.queue.jobs() == []


def _huge_png(path, w, h):
    """A PNG whose header says w x h (a few bytes on disk): what Pillow's decompression-bomb check sees."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * (3 * w + 1)))
                     + chunk(b"IEND", b""))
    return path


def test_an_unreadable_upload_and_a_size_mismatch_name_the_widgets(ui, tmp_path):
    from PIL import Image

    w = ui.widgets
    bomb = _huge_png(tmp_path / "huge.png", 20000, 20000)
    bad = w["original_image"].preprocess(w["original_image"].data_model(path=str(bomb), orig_name="huge.png"))
    cfg = Config.load_preset(ROOT / "presets" / "Difference.json").with_overrides({"save_lora_name": "pair"})
    small_img = Image.new("RGBA", (64, 64), (255, 0, 0, 255))
    msg = ui.add_to_queue(*values_for(ui, cfg, original_image=bad, target_image=small_img))[0]
    assert msg.startswith("Error: original_image: the Original image upload could not be read "
                          "(DecompressionBombError: Image size (400000000 pixels)"), msg
    assert msg.count("\n") == 0 and "Traceback" not in msg
    other = Image.new("RGBA", (96, 64), (0, 0, 255, 255))
    msg = ui.add_to_queue(*values_for(ui, cfg, original_image=small_img, target_image=other))[0]
    assert "Original image is 64x64, Target image is 96x64" in msg, msg
    assert "traintrain-uploads" not in msg and ".png" not in msg
    assert ui.queue.jobs() == []


def test_the_job_log_shows_a_failed_jobs_traceback_and_the_data_warnings(tmp_path):
    import logging

    def runner(cfg, control):
        control.log("Settings saved to /somewhere.json")
        logging.getLogger("trainer.data.dataset").warning("skipped broken.png: not an image")
        raise RuntimeError("boom while loading")

    u = TrainTrainUI(StandaloneHost(tmp_path), queue=JobQueue(tmp_path / "q", runner, console=lambda m: None))
    u.queue.add(Config.defaults("LoRA").replace(save_lora_name="logged"))
    u.queue.start()
    assert u.queue.wait(10)
    text = u.job_log()
    assert text.startswith(f"Job 1 (logged, failed) · model: {u.host.TINY_LABEL}")
    for line in ("Settings saved to /somewhere.json", "skipped broken.png: not an image",
                 "Traceback (most recent call last)", "RuntimeError: boom while loading"):
        assert line in text


def test_the_standalone_entry_prints_the_queues_lines_to_the_console(tmp_path, monkeypatch):
    """`python -m trainer ui` configures logging (the library never does at import): job lines, a failed job's
    traceback and the data code's warnings reach the console."""
    import subprocess
    import sys

    code = (
        "import logging, sys\n"
        "import trainer.__main__ as cli, trainer.jobs, types\n"
        "assert not logging.root.handlers, 'configured at import'\n"
        "cli._port_problem = lambda h, p: ''\n"
        "def fake_launch(host, **kw):\n"
        "    from trainer.jobs import JobQueue\n"
        "    from trainer.config import Config\n"
        "    def runner(cfg, control):\n"
        "        logging.getLogger('trainer.data.captions').warning('caption of a.png cut at 75 tokens')\n"
        "        raise RuntimeError('boom')\n"
        "    q = JobQueue(host.paths().json_dir, runner)\n"
        "    q.add(Config.defaults('LoRA').replace(save_lora_name='c'))\n"
        "    q.start(); q.wait(30)\n"
        "sys.modules['trainer.ui'] = types.SimpleNamespace(launch=fake_launch)  # no gradio: a quick test\n"
        "sys.exit(cli.main(['ui', '--workdir', sys.argv[1]]))\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    for line in ("TrainTrain: job 1 (c, LoRA) started", "caption of a.png cut at 75 tokens",
                 "RuntimeError: boom", "TrainTrain: job 1 (c) failed: Error: boom"):
        assert line in r.stderr, r.stderr


SDXL_BLOCKS = ["BASE"] + [f"IN{i:02d}" for i in range(9)] + ["M00"] + [f"OUT{i:02d}" for i in range(9)]


@pytest.fixture()
def family_models(tmp_path):
    """Model files with only what family detection reads (header-only: the probe key's shape, or our metadata):
    an SDXL and an SD1 checkpoint as their files name the cross-attention, one of our saves, and a pickle."""
    import torch
    from safetensors.torch import save_file

    from trainer.models.families import LDM_PROBE_KEY

    models = tmp_path / "models"
    models.mkdir()
    save_file({LDM_PROBE_KEY: torch.zeros(2, 2048)}, str(models / "xl.safetensors"))
    save_file({LDM_PROBE_KEY: torch.zeros(2, 768)}, str(models / "sd15.safetensors"))
    save_file({"x": torch.zeros(1)}, str(models / "ours_xl.safetensors"),
              metadata={"traintrain.configs": json.dumps({"family": "sdxl"})})
    (models / "old.ckpt").write_bytes(b"not read: a pickle is read whole, so the list stays SD1.5's")
    (models / "xl_folder" / "unet").mkdir(parents=True)  # a diffusers folder: its unet/config.json says
    (models / "xl_folder" / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": 2048}))
    (models / "xl_folder" / "model_index.json").write_text("{}")
    host = StandaloneHost(tmp_path, model_dir=models)
    u = TrainTrainUI(host)
    u.build()
    yield u
    u.queue.wait(60)


def test_the_block_list_shows_the_chosen_models_family_and_keeps_the_ticks(family_models):
    ui = family_models
    every_sd1 = list(BLOCK_IDS)
    # every block ticked on SD1.5's list -> every SDXL block; a partial tick keeps the IDs SDXL has
    b1, b2, shown = ui.change_model("xl.safetensors", every_sd1, ["BASE", "IN04", "IN10", "OUT02", "OUT11"],
                                    every_sd1)
    assert upd(b1) == {"choices": SDXL_BLOCKS, "value": SDXL_BLOCKS} and shown == SDXL_BLOCKS
    assert upd(b2) == {"choices": SDXL_BLOCKS, "value": ["BASE", "IN04", "OUT02"]}
    for model in ("ours_xl.safetensors", "xl_folder"):
        assert ui.host.model_choices().count(model) == 1
        assert upd(ui.change_model(model, SDXL_BLOCKS[:3], None, shown)[0]) == {"choices": SDXL_BLOCKS,
                                                                                 "value": SDXL_BLOCKS[:3]}
    # back on SD1.5: every SDXL block ticked is every block again; a pickle or a missing file: SD1.5's list
    for model in ("sd15.safetensors", "old.ckpt", "gone.safetensors", ui.host.TINY_LABEL):
        b1, b2, shown2 = ui.change_model(model, SDXL_BLOCKS, ["IN04"], SDXL_BLOCKS)
        assert upd(b1) == {"choices": every_sd1, "value": every_sd1}, model
        assert upd(b2)["value"] == ["IN04"] and shown2 == every_sd1
    # a partial SD1.5 selection on another SD1.5 model stays exactly as ticked
    assert upd(ui.change_model("sd15.safetensors", SDXL_BLOCKS, None, every_sd1)[0])["value"] == SDXL_BLOCKS


def test_a_preset_loaded_with_an_sdxl_model_chosen_shows_sdxl_blocks(family_models):
    ui = family_models
    out = ui.load_preset("LoRA", "xl.safetensors")  # the shipped preset's SD1.5 list: every block
    vals = dict(zip(ui.input_names, out[1:1 + len(ui.input_names)]))
    for key in ("1:network_blocks", "2:network_blocks"):
        assert upd(vals[key])["choices"] == SDXL_BLOCKS and upd(vals[key])["value"] == SDXL_BLOCKS
    assert upd(ui.load_preset("LoRA", "sd15.safetensors")[1 + ui.input_names.index("1:network_blocks")])["value"] \
        == list(BLOCK_IDS)
    by_id = {getattr(c, "elem_id", None): c for c in ui.blocks.blocks.values()}
    assert ui.host.default_model() == "old.ckpt" and len(by_id["tt_network_blocks"].choices) == len(BLOCK_IDS)


def test_a_past_runs_settings_reload_from_the_preset_list_with_its_images_or_say_they_are_gone(ui, tmp_path):
    """The original lists jsons/ runs by name: save_as_json files come back as "run: NAME"; their images (outside
    the folders gradio serves) are sent as pictures, and a deleted one is named in the message."""
    from PIL import Image

    from trainer.engine import write_settings_json
    from trainer.ui import RUN_PREFIX

    pics = tmp_path / "elsewhere"
    pics.mkdir()
    Image.new("RGBA", (64, 64), (200, 30, 30, 255)).save(pics / "a.png")
    Image.new("RGBA", (64, 64), (30, 30, 200, 255)).save(pics / "b.png")
    cfg = Config.defaults("ADDifT").replace(original_image=str(pics / "a.png"), target_image=str(pics / "b.png"))
    cfg = cfg.with_overrides({"save_lora_name": "slider", "network_rank": 8})
    path = write_settings_json(cfg, ui.host.paths(), 0.0)
    name = RUN_PREFIX + path.stem
    assert name in ui.preset_names() and not any(n.startswith(RUN_PREFIX + "queue") for n in ui.preset_names())
    out = ui.load_preset(name)
    assert out[0] == f"Loaded past run {path.stem} (ADDifT)"
    vals = dict(zip(ui.input_names, out[1:1 + len(ui.input_names)]))
    assert upd(vals["1:network_rank"])["value"] == "8" and upd(vals["1:save_lora_name"])["value"] == "slider"
    shown = upd(vals["original_image"])["value"]
    assert isinstance(shown, Image.Image) and shown.getpixel((5, 5)) == (200, 30, 30, 255)  # a picture, not a path
    (pics / "b.png").unlink()
    out = ui.load_preset(name)
    assert out[0].endswith(f"; Target image {pics / 'b.png'} is gone (upload it again)")
    vals = dict(zip(ui.input_names, out[1:1 + len(ui.input_names)]))
    assert "value" not in upd(vals["target_image"]) and isinstance(upd(vals["original_image"])["value"], Image.Image)
    assert ui.load_preset(RUN_PREFIX + "../presets/x")[0].startswith("Error: preset")  # stays in jsons/
