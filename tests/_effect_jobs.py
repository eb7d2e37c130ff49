"""The trainings behind tests/test_mode_effects.py: each one a command-line run of a shipped preset
on the world model (tests/world.py), as a user would type it.

They take minutes on one CPU thread, so tests/conftest.py starts them in the background as soon as
the tests are collected: one at a time on the core that the one-threaded suite leaves idle (both
cores when only these tests run). The tests then wait for their job's result.

Every job keeps its preset's recipe (network, rank, alpha, optimizer, scheduler, timestep range,
strength, batch size) and overrides only what the tiny world needs, each said in ``why``:
64 px images (the presets say 512), fp32 (what fp16 means on a CPU varies between CPUs), a fixed
seed, and where the preset was tuned for SD1.5's size, the steps or the learning rate.
"""
from __future__ import annotations

import atexit
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

import world

ROOT = Path(__file__).resolve().parent.parent
PRESETS = ROOT / "presets"
TINY_WORLD = ["image_size=64", "image_min_length=64", "image_buckets_step=64", "train_model_precision=fp32",
              "train_seed=1"]


@dataclasses.dataclass(frozen=True)
class Job:
    preset: str
    args: tuple  # CLI arguments after the preset; "{dir}" is the job's input folder
    overrides: tuple = ()  # --set KEY=VALUE beyond TINY_WORLD
    why: str = ""


# red circle -> blue circle, same place, white background: the pair differs only in colour.
JOBS = {
    "ileco_red_to_blue": Job("iLECO.json", ("--original-prompt", "red", "--target-prompt", "blue")),
    "ileco_erase_red": Job("iLECO.json", ("--original-prompt", "red", "--target-prompt", "")),
    "leco_erase_red": Job("iLECO.json", ("--original-prompt", "red", "--target-prompt", ""),
                          ("leco_objective=erase", "leco_guidance_scale=1"), "the full LECO objective instead"),
    "difference": Job("Difference.json", ("--original-image", "{dir}/red.png", "--target-image", "{dir}/blue.png"),
                      ("train_iterations=150",), "150 steps per pass instead of 500 (time)"),
    "addift": Job("ADDifT_Action_SD1.5.json",
                  ("--original-image", "{dir}/red.png", "--target-image", "{dir}/blue.png"),
                  ("train_iterations=60", "train_learning_rate=1e-3"),
                  "the preset's 1e-4 was tuned for SD1.5: it moves the tiny model's colours little"),
    "multi_addift": Job("ADDifT_Action_SD1.5.json", ("--mode", "Multi-ADDifT", "--data", "{dir}/pairs"),
                        ("train_iterations=120", "train_learning_rate=1e-3", "diff_target_name=_b"),
                        "as ADDifT"),
    "lora_trigger": Job("LoRA.json", ("--data", "{dir}/concept",),
                        ("train_iterations=200", "train_learning_rate=1e-3", "lora_trigger_word=sks"),
                        "200 steps instead of 1000 at 10x the preset's rate (time)"),
}


def write_inputs(folder: Path) -> None:
    """The jobs' images: the red/blue circle pair, a folder of such pairs, and the concept images."""
    c, bg = world.COLOURS, world.BACKGROUNDS

    def save(img, path: Path, caption: str | None = None):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path)
        if caption is not None:
            path.with_suffix(".txt").write_text(caption)

    save(world.draw_shape("circle", c["red"], bg["white"]), folder / "red.png")
    save(world.draw_shape("circle", c["blue"], bg["white"]), folder / "blue.png")
    rng = np.random.default_rng(3)
    for i, (shape, back) in enumerate((s, b) for s in world.SHAPES for b in ("white", "grey")):
        cx, cy = rng.uniform(0.4, 0.6, 2)
        r = rng.uniform(0.2, 0.3)
        save(world.draw_shape(shape, c["red"], bg[back], 64, cx, cy, r), folder / "pairs" / f"{i:02d}.png")
        save(world.draw_shape(shape, c["blue"], bg[back], 64, cx, cy, r), folder / "pairs" / f"{i:02d}_b.png")
    # The new concept "sks": blue shapes on grey, captioned by shape (the trigger word is prefixed).
    for i in range(12):
        shape = world.SHAPES[i % 3]
        cx, cy = rng.uniform(0.4, 0.6, 2)
        img = world.draw_shape(shape, c["blue"], bg["grey"], 64, cx, cy, rng.uniform(0.2, 0.3))
        save(img, folder / "concept" / f"{i:02d}.png", shape)


@dataclasses.dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def files(self) -> list[Path]:
        """The LoRA files the CLI printed (one path per line)."""
        return [Path(line.strip()) for line in self.stdout.splitlines() if line.strip().endswith(".safetensors")]

    def explain(self) -> str:
        return f"rc {self.returncode} after {self.seconds:.0f}s\nstdout:\n{self.stdout[-2000:]}\nstderr:\n{self.stderr[-4000:]}"


def command(name: str, folder: Path) -> list[str]:
    job = JOBS[name]
    args = [a.replace("{dir}", str(folder)) for a in job.args]
    sets = [x for kv in (*TINY_WORLD, *job.overrides, f"save_lora_name={name}") for x in ("--set", kv)]
    return [sys.executable, "-m", "trainer", "train", "--preset", str(PRESETS / job.preset),
            "--model", str(world.WORLD_FILE), *args, *sets, "--workdir", str(folder / name)]


def _run(name: str, folder: Path) -> Result:
    saved = folder / name / "result.json"
    if KEEP and saved.is_file():  # a kept run (TT_EFFECTS_DIR): measure again without training again
        return Result(**json.loads(saved.read_text()))
    env = {**os.environ, "TT_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    t = time.time()
    with _LOCK:
        if _STATE.get("stopped"):
            return Result(-1, "", "stopped: the test session ended first", 0.0)
        p = subprocess.Popen(command(name, folder), cwd=folder, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        _STATE["running"].add(p)
    try:
        out, err = p.communicate(timeout=1200)
    finally:
        with _LOCK:
            _STATE["running"].discard(p)
    res = Result(p.returncode, out, err, time.time() - t)
    if KEEP and res.returncode == 0:
        saved.write_text(json.dumps(dataclasses.asdict(res)))
    return res


# Set TT_EFFECTS_DIR to keep the jobs' folder and reuse its finished jobs (when tuning the tests).
KEEP = os.environ.get("TT_EFFECTS_DIR", "")
_STATE: dict = {}
_LOCK = threading.Lock()


def start(workers: int = 1) -> None:
    """Start every job (idempotent)."""
    with _LOCK:
        if "futures" in _STATE:
            return
        if KEEP:
            folder = Path(KEEP)
            folder.mkdir(parents=True, exist_ok=True)
        else:
            folder = Path(tempfile.mkdtemp(prefix="traintrain-effects-"))
            atexit.register(shutil.rmtree, folder, True)
        write_inputs(folder)
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="effect-job")
        _STATE["running"] = set()
        _STATE["futures"] = {name: pool.submit(_run, name, folder) for name in JOBS}
        _STATE["pool"] = pool


def result(name: str) -> Result:
    """The job's result, waiting for it (starting the jobs first if nobody did)."""
    start(workers=2)
    fut: Future = _STATE["futures"][name]
    return fut.result()


def stop() -> None:
    """End of the test session: cancel the jobs not started and kill the running ones, so that a
    run which did not need them (-k, -x, a failure) does not wait minutes for them."""
    with _LOCK:
        if "futures" not in _STATE:
            return
        _STATE["stopped"] = True
        for fut in _STATE["futures"].values():
            fut.cancel()
        for p in _STATE["running"]:
            p.kill()
