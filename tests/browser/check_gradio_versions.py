"""Session check (not collected by pytest): the tab under another gradio, nested the way the Web-UI renders
an on_ui_tabs tab (built first, then `.render()`ed inside a Tab of the main Blocks, queue enabled), driven
by Playwright: the live status polls, Start / duplicate / Stop work, the mode switch shows its panels.
Training is faked (no model), so the other venv needs only gradio (+ its pins), torch and this repo.

    python tests/browser/check_gradio_versions.py /tmp/g341/bin/python   # gradio 3.41.2 (A1111 pins)
    python tests/browser/check_gradio_versions.py /tmp/g440/bin/python   # gradio 4.40.0 (Forge)

Screenshots go to tests/artifacts/gradio-<version>/.
"""
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
SERVE = r'''
import sys, time
sys.path.insert(0, sys.argv[3])
import gradio as gr
from trainer.engine import Progress, RunResult
from trainer.jobs import JobQueue, StandaloneHost
from trainer.ui import TrainTrainUI

class FakeRun:
    stopped = False
    def stop(self):
        self.stopped = True

def runner(cfg, control):
    run = FakeRun()
    control.attach(run)
    n = cfg.train_iterations
    for i in range(1, n + 1):
        if run.stopped:
            return RunResult(True, f"Stopped at step {i - 1}", [], None, i - 1, True)
        time.sleep(0.3)
        control.progress(Progress("train", i, n, 1.0 / i, 1.0 / i, (1e-4,), 0.3, 0.3 * (n - i), cfg.save_lora_name))
    return RunResult(True, "Saved (fake)", [], None, n)

ui = TrainTrainUI(StandaloneHost(sys.argv[1]), queue=JobQueue(sys.argv[1] + "/jsons", runner))
ui.precheck = lambda cfg: None
tab = ui.build()  # the Web-UI calls on_ui_tabs() before it builds its own Blocks
with gr.Blocks(analytics_enabled=False) as demo:
    with gr.Tabs():
        with gr.Tab("txt2img"):
            gr.Textbox(label="prompt")
        with gr.Tab("TrainTrain", id="traintrain", elem_id="tab_traintrain"):
            tab.render()
demo.queue(64)
demo.launch(server_name="127.0.0.1", server_port=int(sys.argv[2]), prevent_thread_lock=True)
print("gradio", gr.__version__, flush=True)
while True:
    time.sleep(1)
'''


def main(python: str) -> int:
    from playwright.sync_api import sync_playwright

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    work = tempfile.mkdtemp(prefix="tt-gradio-check-")
    version = subprocess.run([python, "-c", "import gradio; print(gradio.__version__)"], capture_output=True,
                             text=True, check=True).stdout.strip()
    out = ROOT / "tests" / "artifacts" / f"gradio-{version}"
    out.mkdir(parents=True, exist_ok=True)
    server = subprocess.Popen([python, "-c", SERVE, work, str(port), str(ROOT)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    ok = True
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                  args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                        "--disable-component-update", "--no-first-run"])
            page = b.new_page(viewport={"width": 1400, "height": 1500})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url, wait_until="domcontentloaded")
            page.locator("button", has_text=re.compile(r"^\s*TrainTrain\s*$")).first.click()
            page.wait_for_selector("#tt_start", state="visible", timeout=60000)

            def text(eid):
                return page.locator(f"#{eid} textarea, #{eid} input").first.input_value()

            def check(what, cond, detail=""):
                nonlocal ok
                ok &= bool(cond)
                print(f"{'ok  ' if cond else 'FAIL'} {what} {detail}")

            box = page.locator("#tt_train_iterations textarea, #tt_train_iterations input").first
            box.fill("60")
            box.blur()
            page.click("#tt_start")
            page.wait_for_timeout(2500)
            check("start", text("tt_message").startswith("Started untitled"), text("tt_message"))
            first = text("tt_status")
            page.wait_for_timeout(3000)
            later = text("tt_status")
            steps = [int(m.group(1)) for m in (re.search(r"step (\d+)/60", t) for t in (first, later)) if m]
            check("status polls", len(steps) == 2 and steps[1] > steps[0], f"{first!r} -> {later!r}")
            check("live plot", page.locator("#tt_live_plot img").count() == 1)
            page.screenshot(path=str(out / "training.png"))
            page.click("#tt_queue_add")
            page.wait_for_timeout(1500)
            check("duplicate refused", "already running" in text("tt_message"), text("tt_message"))
            page.click("#tt_stop")
            page.wait_for_timeout(3000)
            check("stop", "stopped: Stopped at step" in text("tt_status"), text("tt_status"))
            page.locator("#tt_mode label", has_text="Difference").first.click()
            page.wait_for_timeout(1500)
            check("Difference panels", page.locator("#tt_second").is_visible()
                  and page.locator("#tt_original_image").is_visible()
                  and not page.locator("#tt_diff_target_name").is_visible())
            page.screenshot(path=str(out / "difference.png"))
            check("no page errors", not errors, errors[:3])
            b.close()
    finally:
        server.terminate()
        server.wait(10)
    print(f"gradio {version}: {'all ok' if ok else 'FAILED'}; screenshots in {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
