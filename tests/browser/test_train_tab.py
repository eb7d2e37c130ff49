"""The Train tab in a real browser (headless Chromium + Playwright) against `python -m trainer ui` on
127.0.0.1 with the tiny built-in model: pick a preset, start a short training, watch the status line
and the live plot update, queue a second job (a duplicate name is refused), stop, check the files,
run the queue, switch modes, draw the log in the Plot tab; then train once in every mode from the tab
(LoRA, iLECO, Difference with its copier and 2nd pass, ADDifT, Multi-ADDifT) and check each mode's files.
Screenshots go to tests/artifacts/browser/."""
import json
import re
import time
from pathlib import Path

import pytest

from trainer.config import Config
from trainer.demo import draw_demo_images

ROOT = Path(__file__).resolve().parent.parent.parent


def _text(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first.input_value()


def _fill(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} textarea, #{elem_id} input").first
    box.fill(value)
    box.dispatch_event("change")
    box.blur()


def _wait_text(page, elem_id: str, pattern: str, timeout_s: float) -> str:
    """Wait until the box's text matches the regex; return it (fail with the last text seen)."""
    deadline = time.time() + timeout_s
    text = ""
    while time.time() < deadline:
        text = _text(page, elem_id)
        if re.search(pattern, text):
            return text
        page.wait_for_timeout(250)
    raise AssertionError(f"#{elem_id} never matched {pattern!r} in {timeout_s} s; last: {text!r}")


def _step(status: str) -> int:
    m = re.search(r"step (\d+)/(\d+)", status)
    return int(m.group(1)) if m else -1


def _choose(page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").first.click()
    page.get_by_role("option", name=option, exact=True).first.click()


def _plot_image(page, elem_id: str):
    return page.locator(f"#{elem_id} img, #{elem_id} svg.main-svg, #{elem_id} canvas")


@pytest.fixture(scope="module")
def prepared(workdir):
    """A preset that trains the tiny model on generated images in a few seconds a step."""
    data = draw_demo_images(workdir / "images", count=2)
    cfg = Config.load_preset(ROOT / "presets" / "LoRA.json").with_overrides({
        "lora_data_directory": str(data), "image_size": "64", "image_min_length": 64, "image_buckets_step": 64,
        "train_iterations": 300, "train_batch_size": 1, "network_rank": 4, "train_model_precision": "fp32",
        "save_lora_name": "browser1", "logging_save_csv": True, "latent_cache_on_disk": False,
        "train_learning_rate": 1e-3})
    cfg.save_preset(workdir / "presets" / "browser_small.json")
    return data


def test_train_queue_stop_and_plot_in_a_browser(chromium_browser, ui_server, workdir, prepared, artifacts):
    context = chromium_browser.new_context(viewport={"width": 1400, "height": 1600})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(ui_server, wait_until="domcontentloaded")
        page.wait_for_selector("#tt_start", timeout=60_000)
        _wait_text(page, "tt_status", r"^Idle", 30)
        page.screenshot(path=artifacts / "01_loaded.png")

        # pick a preset (listed after Refresh: it was written after the app started)
        page.click("#tt_preset_refresh")
        page.wait_for_timeout(500)
        _choose(page, "tt_preset", "browser_small")
        page.click("#tt_preset_load")
        _wait_text(page, "tt_message", r"Loaded preset browser_small \(LoRA\)", 30)
        assert _text(page, "tt_lora_data_directory") == str(prepared)
        assert _text(page, "tt_save_lora_name") == "browser1"
        assert _text(page, "tt_train_iterations") == "300"

        # start: the status line and the plot follow the training
        page.click("#tt_start")
        _wait_text(page, "tt_message", r"Started browser1 \(job 1, LoRA\)", 30)
        first = _wait_text(page, "tt_status", r"^Training browser1 \(job 1\) · step \d+/300", 300)
        for part in ("loss ", "(avg ", "· lr ", " s/it", "ETA "):
            assert part in first, first
        _plot_image(page, "tt_live_plot").first.wait_for(state="visible", timeout=120_000)
        later = _wait_text(page, "tt_status", rf"step (?!{_step(first)}/)\d+/300", 120)
        assert _step(later) > _step(first)
        page.screenshot(path=artifacts / "02_training.png")

        # a second job while the first trains; the same name again is refused
        _fill(page, "tt_save_lora_name", "browser2")
        _fill(page, "tt_train_iterations", "5")
        page.click("#tt_queue_add")
        _wait_text(page, "tt_message", r"Added browser2 to the queue \(job 2\); it runs after the current job", 30)
        page.click("#tt_queue_add")
        _wait_text(page, "tt_message", r'save_lora_name: "browser2" is already queued \(job 2\)', 30)
        table = page.locator("#tt_queue_table")
        table.get_by_text("browser2").first.wait_for(timeout=30_000)
        page.screenshot(path=artifacts / "03_queued.png")

        # stop: the running job stops at its next step and saves; the queue waits
        page.click("#tt_stop")
        _wait_text(page, "tt_message", r"Stopping browser1 \(job 1\) at the next step.*1 queued job\(s\) wait", 30)
        stopped = _wait_text(page, "tt_status", r"^Idle · last: browser1 \(job 1\) stopped: Stopped at step \d+", 180)
        steps = int(re.search(r"Stopped at step (\d+)", stopped).group(1))
        assert 1 <= steps < 300
        out = workdir / "output"
        assert sorted(p.name for p in out.glob("*.safetensors")) == [f"browser1_{steps}steps.safetensors"]
        assert "1 queued" in stopped
        page.screenshot(path=artifacts / "04_stopped.png")

        # run the queue: job 2 trains to the end
        page.click("#tt_queue_run")
        _wait_text(page, "tt_status", r"^Idle · last: browser2 \(job 2\) done: Saved .*browser2\.safetensors", 400)
        assert (out / "browser2.safetensors").is_file()
        saved = json.loads((workdir / "jsons" / "queue.json").read_text(encoding="utf-8"))
        assert [(j["name"], j["status"]) for j in saved["jobs"]] == [("browser1", "stopped"), ("browser2", "done")]
        table.get_by_text("done").first.wait_for(timeout=30_000)
        page.screenshot(path=artifacts / "05_queue_done.png")

        # the mode selector shows only that mode's settings
        page.locator("#tt_mode label", has_text="Difference").click()
        page.locator("#tt_second").wait_for(state="visible", timeout=30_000)
        page.locator("#tt_original_image").wait_for(state="visible", timeout=30_000)
        assert page.locator("#tt_diff_save_1st_pass").is_visible()
        assert not page.locator("#tt_diff_target_name").is_visible()
        page.locator("#tt_second_acc").click()
        page.locator("#tt2_network_rank").wait_for(state="visible", timeout=30_000)
        page.screenshot(path=artifacts / "06_difference_mode.png", full_page=True)
        page.locator("#tt_mode label", has_text="Multi-ADDifT").click()
        page.locator("#tt_diff_target_name").wait_for(state="visible", timeout=30_000)
        assert not page.locator("#tt_second").is_visible() and not page.locator("#tt_original_image").is_visible()

        # the Plot tab draws the logs written by both jobs
        page.get_by_role("tab", name="Plot").click()
        page.click("#tt_log_refresh")
        page.wait_for_timeout(1000)
        _choose(page, "tt_log_file", next(p.name for p in (workdir / "logs").glob("browser1-*.csv")))
        _plot_image(page, "tt_log_plot").first.wait_for(state="visible", timeout=60_000)
        _wait_text(page, "tt_log_message", r"browser1-.*\.csv$", 30)
        page.screenshot(path=artifacts / "07_plot_tab.png")
        assert not errors, errors
    finally:
        page.screenshot(path=artifacts / "99_last.png")
        context.close()


# ---------------------------------------------------------------------------------------------
# Every mode from the tab, the way a person trains: pick the mode, fill its own inputs, queue it
# ---------------------------------------------------------------------------------------------
#: mode -> (save_lora_name, train_iterations). LoRA runs long enough (a few seconds) for the 1 s poll to show
#: its steps and the live plot; the rest train while the next modes are filled in.
MODE_JOBS = {
    "LoRA": ("m_lora", 30), "iLECO": ("m_ileco", 3), "Difference": ("m_diff", 3), "ADDifT": ("m_addift", 3),
    "Multi-ADDifT": ("m_multi", 3)}
DIFF_PASS2_STEPS = 2
#: elem_ids of the mode-specific inputs: shown in the modes listed, hidden in the others
MODE_INPUTS = {
    "tt_lora_data_directory": ("LoRA", "Difference", "Multi-ADDifT"),
    "tt_original_prompt": ("iLECO", "Difference", "ADDifT"),
    "tt_image_size": ("LoRA", "iLECO", "Multi-ADDifT"),
    "tt_original_image": ("Difference", "ADDifT"),
    "tt_target_image": ("Difference", "ADDifT"),
    "tt_second": ("Difference",),
    "tt_diff_save_1st_pass": ("Difference",),
    "tt_diff_target_name": ("Multi-ADDifT",),
    "tt_diff_alt_ratio": ("ADDifT", "Multi-ADDifT"),
    "tt_leco_objective": ("iLECO",),
}


@pytest.fixture(scope="module")
def mode_inputs(workdir):
    """Two same-size images for Difference/ADDifT and a folder of pairs (x.png + x_blue.png) for Multi-ADDifT."""
    from PIL import Image

    rings = draw_demo_images(workdir / "mode_images", count=2, seed=3)
    pairs = draw_demo_images(workdir / "mode_pairs", count=2, seed=4)
    for p in sorted(pairs.glob("ring_??.png")):
        r, g, b = Image.open(p).convert("RGB").split()
        Image.merge("RGB", (b, g, r)).save(p.with_name(p.stem + "_blue.png"))  # orange rings turn blue
    return {"original": rings / "ring_00.png", "target": rings / "ring_01.png", "pairs": pairs}


def _pick_mode(page, mode: str) -> None:
    page.locator("#tt_mode").get_by_label(mode, exact=True).check()
    for elem_id, modes in MODE_INPUTS.items():
        page.locator(f"#{elem_id}").wait_for(state="visible" if mode in modes else "hidden", timeout=30_000)


def _upload(page, elem_id: str, path: Path) -> None:
    page.locator(f"#{elem_id} input[type=file]").first.set_input_files(str(path))
    page.locator(f"#{elem_id} img").first.wait_for(state="visible", timeout=30_000)


def _queue_rows(page) -> dict[str, list[str]]:
    """The Queue list as shown: save name -> [job, name, mode, status, result]."""
    rows = page.eval_on_selector_all(  # gradio 6 draws the rows as ARIA grid rows (the <table> only sizes them)
        "#tt_queue_table [role=row]",
        "rows => rows.map(r => Array.from(r.querySelectorAll('[role=gridcell]')).map(c => c.innerText.trim()))")
    return {r[1]: r for r in rows if len(r) >= 5}


def _pixels(path) -> bytes:
    from PIL import Image

    return Image.open(path).convert("RGB").tobytes()


def _check_lora_file(path: Path, mode: str, steps: int) -> None:
    from safetensors import safe_open

    assert path.is_file(), f"{mode}: {path} was not written"
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
        down = f.get_tensor(next(k for k in keys if k.endswith(".lora_down.weight")))
    assert keys and all(re.fullmatch(r"lora_(unet|te)_\w+\.(lora_down\.weight|lora_up\.weight|alpha)", k)
                        for k in keys), (path, keys[:5])
    assert any(k.startswith("lora_unet_down_blocks_") for k in keys), (path, keys[:5])
    # only LoRA trains the text encoder (BASE is ticked); the other modes encode their prompts once
    assert any(k.startswith("lora_te_") for k in keys) == (mode == "LoRA"), (path, mode)
    assert down.shape[0] == 4, (path, down.shape)  # network_rank of the preset
    assert meta["ss_output_name"] == path.stem and meta["ss_network_module"] == "networks.lora", meta
    assert meta["ss_steps"] == str(steps), (path, meta["ss_steps"], steps)
    assert f"TrainTrain mode: {mode}" in meta["ss_training_comment"], meta["ss_training_comment"]


def test_every_mode_trains_from_the_tab(chromium_browser, ui_server, workdir, prepared, mode_inputs, artifacts):
    context = chromium_browser.new_context(viewport={"width": 1400, "height": 1600})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    out = workdir / "output"
    t0 = time.time()
    try:
        page.goto(ui_server, wait_until="domcontentloaded")
        page.wait_for_selector("#tt_start", timeout=60_000)
        _wait_text(page, "tt_status", r"^Idle", 30)
        assert not _plot_image(page, "tt_live_plot").count()
        page.click("#tt_preset_refresh")
        page.wait_for_timeout(500)
        _choose(page, "tt_preset", "browser_small")
        page.click("#tt_preset_load")
        _wait_text(page, "tt_message", r"Loaded preset browser_small \(LoRA\)", 30)
        jobs = {}

        def queue(mode: str, start: bool = False) -> None:
            name, steps = MODE_JOBS[mode]
            _fill(page, "tt_save_lora_name", name)
            _fill(page, "tt_train_iterations", str(steps))
            page.click("#tt_start" if start else "#tt_queue_add")
            verb = rf"Started {name} \(job (\d+), {mode}\)" if start else rf"Added {name} to the queue \(job (\d+)\)"
            jobs[mode] = int(re.search(verb, _wait_text(page, "tt_message", verb, 30)).group(1))

        # LoRA: the data folder; Start Training; the status line and the live plot follow it
        _pick_mode(page, "LoRA")
        assert _text(page, "tt_lora_data_directory") == str(prepared)
        queue("LoRA", start=True)
        _wait_text(page, "tt_status", rf"^Training m_lora \(job {jobs['LoRA']}\) · step \d+/30 · loss ", 120)
        _plot_image(page, "tt_live_plot").first.wait_for(state="visible", timeout=120_000)
        page.screenshot(path=artifacts / "modes_01_lora.png")

        # iLECO: the prompts (and no images, no data folder)
        _pick_mode(page, "iLECO")
        _fill(page, "tt_original_prompt", "orange ring")
        _fill(page, "tt_target_prompt", "blue ring")
        queue("iLECO")
        page.screenshot(path=artifacts / "modes_02_ileco.png")

        # Difference: the two images (uploaded), save the copier, the 2nd pass with its own step count
        _pick_mode(page, "Difference")
        _fill(page, "tt_original_prompt", "")
        _fill(page, "tt_target_prompt", "")
        _upload(page, "tt_original_image", mode_inputs["original"])
        _upload(page, "tt_target_image", mode_inputs["target"])
        page.locator("#tt_diff_save_1st_pass input[type=checkbox]").check()
        page.locator("#tt_second_acc").click()
        page.click("#tt_copy_first")
        page.wait_for_function(
            "() => document.querySelector('#tt2_use_2nd_pass_settings input[type=checkbox]').checked", timeout=30_000)
        _wait_text(page, "tt2_train_iterations", r"^3$", 30)
        _fill(page, "tt2_train_iterations", str(DIFF_PASS2_STEPS))
        queue("Difference")
        page.screenshot(path=artifacts / "modes_03_difference.png", full_page=True)

        # ADDifT: the same two image inputs, still holding the pair; remove it and upload it the other way round
        _pick_mode(page, "ADDifT")
        for elem_id, src in (("tt_original_image", "target"), ("tt_target_image", "original")):
            page.locator(f"#{elem_id} button[aria-label='Remove Image']").click()
            page.locator(f"#{elem_id} img").first.wait_for(state="detached", timeout=30_000)
            _upload(page, elem_id, mode_inputs[src])
        queue("ADDifT")
        page.screenshot(path=artifacts / "modes_04_addift.png")

        # Multi-ADDifT: a data folder of pairs and the target suffix
        _pick_mode(page, "Multi-ADDifT")
        _fill(page, "tt_lora_data_directory", str(mode_inputs["pairs"]))
        _fill(page, "tt_diff_target_name", "_blue")
        queue("Multi-ADDifT")
        page.click("#tt_queue_run")  # in case the queue ran dry between two additions
        _wait_text(page, "tt_message", r"^(The queue is already running|Running the queue \(\d+ job)", 30)
        page.screenshot(path=artifacts / "modes_05_queued.png")

        # each job's result in the Queue list
        deadline = time.time() + 240
        rows: dict[str, list[str]] = {}
        while time.time() < deadline:
            rows = _queue_rows(page)
            if all(rows.get(n, ["", "", "", "queued"])[3] in ("done", "failed", "stopped")
                   for n, _ in MODE_JOBS.values()):
                break
            page.wait_for_timeout(500)
        for mode, (name, _steps) in MODE_JOBS.items():
            row = rows.get(name)
            assert row is not None, f"{name} is not in the Queue list: {rows}"
            assert row[:4] == [str(jobs[mode]), name, mode, "done"], row
            assert re.match(rf"Saved .*{name}\.safetensors", row[4]), row
        last = max(jobs.values())
        last_name = next(MODE_JOBS[m][0] for m, j in jobs.items() if j == last)
        _wait_text(page, "tt_status", rf"^Idle · last: {last_name} \(job {last}\) done: Saved ", 30)
        assert _plot_image(page, "tt_live_plot").first.is_visible()
        page.screenshot(path=artifacts / "modes_06_done.png")

        # the files each mode must write, in the kohya layout
        for mode, (name, steps) in MODE_JOBS.items():
            _check_lora_file(out / f"{name}.safetensors", mode, DIFF_PASS2_STEPS if mode == "Difference" else steps)
        _check_lora_file(out / "m_diff_copy.safetensors", "Difference", MODE_JOBS["Difference"][1])
        saved = json.loads((workdir / "jsons" / "queue.json").read_text(encoding="utf-8"))
        by_name = {j["name"]: j for j in saved["jobs"]}
        assert all(by_name[n]["status"] == "done" for n, _ in MODE_JOBS.values()), by_name
        # the jobs kept the images uploaded in the page (ADDifT's the other way round) and the panel's values
        for name, kept in (("m_diff", ("original", "target")), ("m_addift", ("target", "original"))):
            settings = by_name[name]["settings"]
            for attr, src in zip(("original image", "target image"), kept):
                assert _pixels(settings[attr]) == _pixels(mode_inputs[src]), (name, attr, settings[attr])
        assert by_name["m_diff"]["settings"]["diff_save_1st_pass"] is True
        assert by_name["m_diff"]["settings"]["2nd pass"]["train_iterations"] == str(DIFF_PASS2_STEPS)
        assert by_name["m_multi"]["settings"]["diff_target_name"] == "_blue"
        assert by_name["m_ileco"]["settings"]["original prompt"] == "orange ring"
        assert not errors, errors
    finally:
        page.screenshot(path=artifacts / "modes_99_last.png", full_page=True)
        context.close()
        print(f"every-mode browser test: {time.time() - t0:.1f} s")
