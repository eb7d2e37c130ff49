"""Real-browser fixtures: `python -m trainer ui` on 127.0.0.1 (tiny model, one torch thread) and headless
Chromium (/usr/bin/chromium, fresh profile) driven by Playwright. Missing Chromium or Playwright is a
test FAILURE, never a skip: .ci/run installs both."""
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts" / "browser"
CHROMIUM = os.environ.get("TT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def artifacts():
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def chromium_browser():
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"Chromium is not installed at {CHROMIUM}: install it (apt-get install chromium "
                    f"chromium-driver; .ci/run does) -- the browser tests must run")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        pytest.fail(f"Playwright is not installed ({e}): pip install -r requirements-dev.txt")
    pw = sync_playwright().start()
    browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
    yield browser
    browser.close()
    pw.stop()


def start_ui(workdir: Path, log_path: Path, extra=()):
    port = _free_port()
    env = {**os.environ, "TT_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    log = open(log_path, "w", encoding="utf-8")
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "ui", "--workdir", str(workdir), "--port", str(port),
                             *extra], cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            log.close()
            pytest.fail(f"`python -m trainer ui` exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return proc, url, log
        except OSError:
            time.sleep(0.5)
    proc.kill()
    log.close()
    pytest.fail(f"the UI did not answer on {url} within 180 s:\n{log_path.read_text()[-3000:]}")


def stop_ui(proc, log):
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(20)
    log.close()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("ui_workdir")


@pytest.fixture(scope="module")
def ui_server(workdir, artifacts):
    proc, url, log = start_ui(workdir, artifacts / "server.log")
    yield url
    stop_ui(proc, log)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(ROOT / "tests" / "artifacts" / "browser" / "tmp", ignore_errors=True)
