"""`python -m trainer …` as a user runs it: exit codes, what it prints, the files it writes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config import Config
from trainer.demo import draw_demo_images

ROOT = Path(__file__).resolve().parent.parent


def cli(*args, cwd):
    env = {**os.environ, "TT_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "trainer", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return draw_demo_images(tmp_path_factory.mktemp("imgs"), count=2)


SMALL = ["--set", "image_size=64", "--set", "image_min_length=64", "--set", "image_buckets_step=64",
         "--set", "train_model_precision=fp32", "--set", "logging_save_csv=true"]


def test_train_from_a_preset_prints_what_it_saved(images, tmp_path):
    r = cli("train", "--preset", ROOT / "presets" / "LoRA.json", "--data", images, "--name", "cli_lora",
            "--iterations", 3, "--rank", 4, *SMALL, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert str(tmp_path / "output" / "cli_lora.safetensors") in [str((tmp_path / line).resolve()) for line in lines]
    assert (tmp_path / "output" / "cli_lora.safetensors").is_file()
    assert any(line.endswith(".csv") for line in lines)
    assert "3/3" in r.stderr and "s/it" in r.stderr and "ETA" in r.stderr
    assert r.stderr.count("Saved ") == 1, r.stderr  # logged once, not again as the final message


def test_ctrl_c_saves_what_was_trained_like_stop(images, tmp_path):
    import queue
    import signal
    import threading

    env = {**os.environ, "TT_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    # 10^12 steps: before, the save-name check walked every step and step 1 never came
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "train", "--data", str(images), "--name", "cc",
                             "--iterations", "1000000000000", "--rank", "4", *map(str, SMALL)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(x) for x in proc.stderr], daemon=True)
    reader.start()
    seen = []
    try:
        while not any("/1000000000000 loss" in x for x in seen):
            seen.append(lines.get(timeout=240))
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=240)
        out = proc.stdout.read()  # stderr stays with the reader (communicate() would take lines from it)
    finally:
        proc.kill()
    reader.join(60)
    while not lines.empty():
        seen.append(lines.get())
    err = "".join(seen)
    assert proc.returncode == 130, err
    saved = sorted((tmp_path / "output").glob("cc_*steps.safetensors"))
    assert len(saved) == 1 and str(saved[0].name) in err and "Stopped at step" in err, err
    assert saved[0].name in out and "Traceback" not in err


def test_a_single_file_checkpoint_is_used_as_the_model(images, tmp_path):
    from trainer.models.loading import save_ldm_checkpoint
    from trainer.models.tiny import tiny_components

    ckpt = save_ldm_checkpoint(tiny_components(), tmp_path / "tiny.safetensors")
    r = cli("train", "--model", ckpt, "--data", images, "--name", "from_file", "--iterations", 2, *SMALL, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "model tiny" in r.stderr and (tmp_path / "output" / "from_file.safetensors").is_file()


def test_bad_setting_names_setting_and_value_and_writes_nothing(images, tmp_path):
    r = cli("train", "--data", images, "--set", "train_batch_size=abc", cwd=tmp_path)
    assert r.returncode == 2
    assert "train_batch_size" in r.stderr and "abc" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "output").exists()


def test_missing_model_names_the_path(images, tmp_path):
    r = cli("train", "--data", images, "--model", "nope.safetensors", cwd=tmp_path)
    assert r.returncode == 2 and "nope.safetensors" in r.stderr and "Traceback" not in r.stderr


def test_missing_data_folder_is_a_clear_error(tmp_path):
    r = cli("train", "--data", tmp_path / "missing", "--iterations", 1, *SMALL, cwd=tmp_path)
    assert r.returncode == 2 and "missing" in r.stderr and "Traceback" not in r.stderr
    assert not list((tmp_path / "output").glob("*.safetensors")) if (tmp_path / "output").exists() else True


def test_json_only_writes_a_preset_that_loads_back(images, tmp_path):
    r = cli("train", "--preset", ROOT / "presets" / "LoRA.json", "--data", images, "--name", "j", "--json-only",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    written = list((tmp_path / "jsons").glob("j-*.json"))
    assert len(written) == 1
    cfg = Config.load_preset(written[0])
    assert cfg.save_lora_name == "j" and cfg.lora_data_directory == str(images)
    assert json.loads(written[0].read_text(encoding="utf-8"))["mode"] == "LoRA"
    assert not (tmp_path / "output").exists()


def test_demo_trains_and_writes_file_csv_and_plot(tmp_path):
    r = cli("demo", "--workdir", tmp_path / "demo", "--steps", 40, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "demo" / "output" / "demo.safetensors").is_file()
    pngs = list((tmp_path / "demo" / "logs").glob("*.png"))
    assert len(pngs) == 1 and pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    line = [x for x in r.stdout.splitlines() if x.startswith("Denoising loss")][0]
    assert "lower" in line


def test_plot_and_settings_commands(tmp_path):
    log = tmp_path / "x.csv"
    log.write_text("mode,LoRA\nsave_lora_name,x\nStep,Loss,Loss (smoothed),Learning Rate 1\n1,0.5,0.5,0.001\n"
                   "2,0.4,0.49,0.0009\n", encoding="utf-8")
    r = cli("plot", log, cwd=tmp_path)
    assert r.returncode == 0 and (tmp_path / "x.png").read_bytes()[:4] == b"\x89PNG"
    r = cli("settings", "--mode", "iLECO", "--lang", "ja", cwd=tmp_path)
    assert r.returncode == 0 and "network_rank" in r.stdout and "lora_data_directory" not in r.stdout


def test_a_second_ctrl_c_quits_at_once(capsys):
    from trainer.__main__ import _CtrlCStops

    class Run:
        stopped = 0

        def stop(self):
            self.stopped += 1

    run = Run()
    ctrl_c = _CtrlCStops(run)
    ctrl_c(2, None)  # the first: what the tab's Stop does
    assert run.stopped == 1 and "Ctrl-C again" in capsys.readouterr().err
    with pytest.raises(KeyboardInterrupt):
        ctrl_c(2, None)
