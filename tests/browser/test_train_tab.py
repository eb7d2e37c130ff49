"""The Train tab in a real browser (headless Chromium + Playwright) against `python -m trainer ui` on
127.0.0.1 with the tiny built-in model: pick a preset, start a short training, watch the status line
and the live plot update, queue a second job (a duplicate name is refused), stop, check the files,
run the queue, switch modes, draw the log in the Plot tab. Screenshots go to tests/artifacts/browser/."""
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
