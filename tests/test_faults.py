"""Faults during a run, end to end on the tiny model: non-finite losses (read in the step or one step
late, as on CUDA), out of memory, Stop while caching / in a step / in a save, a disk that fills up or a
folder that refuses writes at save time. Each ends in a clear message and leaves no partial output.
(The bad-input matrix and where each item is tested: bench/RESULTS.md, "Nothing lost, nothing broken".)"""
import contextlib
import csv
import errno
import os
import signal
import stat
import subprocess
from pathlib import Path

import pytest
import torch

from trainer.config import Config
from trainer.demo import TRIGGER, draw_demo_images
from trainer.engine import OutputPaths, TrainingRun, existing_output, is_out_of_memory
from trainer.models.tiny import tiny_components
from trainer.modes.lora import LoRAMode
from trainer.networks import files as files_mod
from trainer.networks.files import load_network_file, save_network

BLOCKS = "IN01,IN02,OUT11"  # a few U-Net blocks: fast, and no text encoder in the graph


def make_cfg(data: Path, **overrides) -> Config:
    values = {
        "lora_data_directory": str(data), "lora_trigger_word": TRIGGER, "save_lora_name": "t",
        "image_size": "64", "image_min_length": 64, "image_buckets_step": 64, "network_rank": 4, "network_alpha": 4,
        "network_blocks": BLOCKS, "train_learning_rate": 1e-3, "train_batch_size": 2, "train_iterations": 6,
        "train_seed": 0, "train_model_precision": "fp32", "save_precision": "fp32", "logging_save_csv": True,
        "latent_cache_on_disk": False,
    }
    values.update(overrides)
    return Config.defaults("LoRA").with_overrides(values)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return draw_demo_images(tmp_path_factory.mktemp("images"), count=4)


@pytest.fixture(scope="module")
def components():
    return tiny_components()


def start(cfg, root, components, mode=None, lagged=None, **kw):
    run = TrainingRun(cfg, components, OutputPaths.under(root), log=lambda m: None, device=torch.device("cpu"), **kw)
    run.lagged_loss = lagged
    return run, run.run(mode or LoRAMode())


def csv_rows(path):
    rows = list(csv.reader(open(path, encoding="utf-8")))
    return rows[[r[0] for r in rows].index("Step") + 1:]


def tensors(path):
    return load_network_file(path)[0]


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def files_in(folder: Path):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --- the loss read one step late (as on CUDA, where reading it in the step would wait for the GPU) ---

def test_reading_the_loss_a_step_late_changes_nothing(data, tmp_path, components):
    _, now = start(make_cfg(data, save_lora_name="now"), tmp_path, components, lagged=False)
    _, late = start(make_cfg(data, save_lora_name="late"), tmp_path, components, lagged=True)
    assert now.ok and late.ok, (now.message, late.message)
    assert csv_rows(now.csv) == csv_rows(late.csv)  # one row per step, same losses and learning rates
    assert [int(r[0]) for r in csv_rows(late.csv)] == [1, 2, 3, 4, 5, 6]
    assert same(tensors(now.files[0]), tensors(late.files[0]))


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("lagged", [False, True], ids=["in-step", "one-step-late"])
def test_non_finite_loss_keeps_exactly_the_last_finite_weights(data, tmp_path, components, monkeypatch, bad, lagged):
    real = LoRAMode.loss

    def loss(self, step):
        value = real(self, step)
        return value * float(bad) if step == 4 else value

    _, ref = start(make_cfg(data, train_iterations=3, save_lora_name="ref", train_lr_scheduler="constant"), tmp_path,
                   components)
    monkeypatch.setattr(LoRAMode, "loss", loss)
    _, result = start(make_cfg(data, train_iterations=8, train_lr_scheduler="constant"), tmp_path, components,
                      lagged=lagged)
    assert not result.ok
    assert "step 4" in result.message and "train_learning_rate" in result.message
    assert bad.lstrip("-") in result.message.lower()
    assert [p.name for p in result.files] == ["t_3steps.safetensors"]
    assert files_in(tmp_path / "output") == ["ref.safetensors", "t_3steps.safetensors"]
    saved = tensors(result.files[0])
    assert all(torch.isfinite(t).all() for t in saved.values())
    assert same(saved, tensors(ref.files[0]))  # the weights after step 3, not a later or earlier step
    assert [int(r[0]) for r in csv_rows(result.csv)] == [1, 2, 3]


# --- out of memory --------------------------------------------------------------------------------

OOM_ERRORS = {
    "cuda": lambda: torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    "cuda-runtime": lambda: RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 8.00 GiB total)"),
    "cpu": lambda: RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
                                "memory: you tried to allocate 9663676416 bytes. Error code 12"),
    "mps": lambda: RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB)"),
    "python": lambda: MemoryError(),
}


@pytest.mark.parametrize("kind", sorted(OOM_ERRORS))
def test_out_of_memory_in_a_step_gives_advice_keeps_the_steps_done_and_the_app_keeps_working(
        data, tmp_path, components, monkeypatch, kind):
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    c = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = components.unet(x, torch.tensor([500]), encoder_hidden_states=c).sample
    real = LoRAMode.loss

    def loss(self, step):
        if step == 3:
            raise OOM_ERRORS[kind]()
        return real(self, step)

    monkeypatch.setattr(LoRAMode, "loss", loss)
    _, result = start(make_cfg(data, train_iterations=8), tmp_path, components)
    assert not result.ok and "Traceback" not in result.message
    for name in ("train_batch_size", "use_gradient_checkpointing", "train_model_precision"):
        assert name in result.message
    assert "at step 3" in result.message
    assert [p.name for p in result.files] == ["t_2steps.safetensors"]  # the two finished steps are kept
    assert files_in(tmp_path / "output") == ["t_2steps.safetensors"]
    # the app keeps working: the model is as it was, and the next run in this process trains and saves
    with torch.no_grad():
        after = components.unet(x, torch.tensor([500]), encoder_hidden_states=c).sample
    assert torch.equal(before, after) and not any(q.requires_grad for q in components.unet.parameters())
    monkeypatch.setattr(LoRAMode, "loss", real)
    _, again = start(make_cfg(data, train_iterations=2, save_lora_name="again"), tmp_path, components)
    assert again.ok and [p.name for p in again.files] == ["again.safetensors"]


def test_out_of_memory_while_preparing_names_the_settings(data, tmp_path, components, monkeypatch):
    def encode(self, pixels):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr(TrainingRun, "encode_images", encode)
    _, result = start(make_cfg(data), tmp_path, components)
    assert not result.ok and "while preparing" in result.message and "train_batch_size" in result.message
    assert files_in(tmp_path / "output") == []


def test_only_allocation_failures_count_as_out_of_memory():
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("x"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory"))


# --- Stop -----------------------------------------------------------------------------------------

def test_stop_while_caching_saves_nothing_and_leaves_only_whole_cache_files(data, tmp_path, components, monkeypatch):
    real = TrainingRun.encode_images
    calls = []

    def encode(self, pixels):
        calls.append(pixels.shape[0])
        self.stop()  # pressed while the first batch is being encoded
        return real(self, pixels)

    monkeypatch.setattr(TrainingRun, "encode_images", encode)
    cfg = make_cfg(data, latent_cache_on_disk=True, train_batch_size=1)
    _, result = start(cfg, tmp_path, components)
    assert result.stopped and not result.ok and "nothing was saved" in result.message
    assert calls == [1]  # no further batch after Stop
    assert files_in(tmp_path / "output") == []
    cached = files_in(tmp_path / "cache")
    assert len(cached) == 1 and cached[0].endswith(".safetensors")  # the finished latent, no temp file
    monkeypatch.setattr(TrainingRun, "encode_images", real)
    _, again = start(cfg.replace(train_iterations=1), tmp_path, components)
    assert again.ok and len(files_in(tmp_path / "cache")) == 4


def test_stop_during_a_step_finishes_that_step_and_saves_it(data, tmp_path, components, monkeypatch):
    real = LoRAMode.loss

    def loss(self, step):
        if step == 3:
            self.run.stop()  # pressed while step 3 computes
        return real(self, step)

    monkeypatch.setattr(LoRAMode, "loss", loss)
    _, result = start(make_cfg(data, train_iterations=20), tmp_path, components)
    assert result.ok and result.stopped and result.steps == 3
    assert [p.name for p in result.files] == ["t_3steps.safetensors"]
    assert [int(r[0]) for r in csv_rows(result.csv)] == [1, 2, 3]


@pytest.mark.parametrize("lagged", [False, True], ids=["in-step", "one-step-late"])
def test_stop_during_a_save_completes_that_file_once(data, tmp_path, components, lagged):
    holder = {}

    def on_progress(p):
        if p.phase == "save" and p.step == 2:
            holder["run"].stop()

    cfg = make_cfg(data, train_iterations=10, save_per_steps=2)
    run = TrainingRun(cfg, components, OutputPaths.under(tmp_path), log=lambda m: None, device=torch.device("cpu"),
                      on_progress=on_progress)
    run.lagged_loss = lagged
    holder["run"] = run
    result = run.run(LoRAMode())
    assert result.ok and result.stopped and result.steps == 2, result.message
    assert [p.name for p in result.files] == ["t_2steps.safetensors"]
    assert files_in(tmp_path / "output") == ["t_2steps.safetensors"]
    assert all(torch.isfinite(t).all() for t in tensors(result.files[0]).values())


# --- the disk at save time ------------------------------------------------------------------------

def _full_disk(fh, data):
    fh.write(data[: len(data) // 3])
    raise OSError(errno.ENOSPC, "No space left on device")


def _read_only_folder(*args, **kwargs):
    raise PermissionError(errno.EACCES, "Permission denied")  # what mkstemp meets in a read-only folder


@pytest.mark.parametrize("fault", ["full disk", "read-only folder"])
def test_save_failure_names_the_file_and_keeps_the_previous_one(data, tmp_path, components, monkeypatch, fault):
    out = tmp_path / "output"
    _, first = start(make_cfg(data, train_iterations=1), tmp_path, components)
    before = first.files[0].read_bytes()
    real = LoRAMode.loss

    def loss(self, step):  # the fault comes during training, after the folders were checked
        if step == 1:
            if fault == "full disk":
                monkeypatch.setattr(files_mod, "_write_all", _full_disk)
            else:
                monkeypatch.setattr(files_mod.tempfile, "mkstemp", _read_only_folder)
        return real(self, step)

    monkeypatch.setattr(LoRAMode, "loss", loss)
    _, result = start(make_cfg(data, train_iterations=2, save_overwrite=True), tmp_path, components)
    assert not result.ok and str(out / "t.safetensors") in result.message and "unchanged" in result.message
    assert "could not be written anywhere else" in result.message  # every disk of this test refuses
    assert (out / "t.safetensors").read_bytes() == before
    assert files_in(out) == ["t.safetensors"]  # no temp file, no partial file


def test_interrupt_in_the_middle_of_a_write_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "a.safetensors"
    data = {"lora_unet_x.lora_down.weight": torch.ones(2, 2)}
    save_network(path, data, {})
    before = path.read_bytes()

    def killed(fh, payload):
        fh.write(payload[:7])
        raise KeyboardInterrupt

    monkeypatch.setattr(files_mod, "_write_all", killed)
    with pytest.raises(KeyboardInterrupt):
        save_network(path, {"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, {}, overwrite=True)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["a.safetensors"]


# --- precision on the CPU -------------------------------------------------------------------------

@pytest.mark.parametrize("native,expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_fp16_on_the_cpu_runs_as_bf16_only_where_the_cpu_has_bf16(monkeypatch, native, expected):
    from trainer import engine

    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: native)
    said = []
    assert engine.model_dtype("fp16", torch.device("cpu"), said.append) == expected
    assert said and "train_model_precision" in said[0]
    assert engine.model_dtype("bf16", torch.device("cpu"), said.append) == torch.bfloat16  # asked for: kept
    assert engine.model_dtype("fp16", torch.device("cuda"), said.append) == torch.float16


def test_the_cpu_bf16_probe_answers():
    from trainer.engine import cpu_has_native_bf16

    assert cpu_has_native_bf16() in (True, False)


# --- a queue of three with the real engine: the failing job in the middle stops nothing ------------

def test_out_of_memory_in_the_middle_job_of_a_queue_of_three(data, tmp_path, monkeypatch):
    from trainer.jobs import DONE, FAILED, JobQueue, StandaloneHost, host_runner

    real = LoRAMode.loss

    def loss(self, step):
        if self.run.cfg.save_lora_name == "boom" and step == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")
        return real(self, step)

    monkeypatch.setattr(LoRAMode, "loss", loss)
    host = StandaloneHost(tmp_path / "work", device=torch.device("cpu"))
    q = JobQueue(tmp_path / "queue", host_runner(host), console=lambda m: None)
    for name in ("first", "boom", "last"):
        q.add(make_cfg(data, save_lora_name=name, train_iterations=3, logging_save_csv=False))
    assert q.start() and q.wait(600)
    jobs = {j.name: j for j in q.jobs()}
    assert jobs["first"].status == DONE and jobs["last"].status == DONE
    assert jobs["boom"].status == FAILED and "train_batch_size" in jobs["boom"].message
    out = tmp_path / "work" / "output"
    assert files_in(out) == ["boom_1steps.safetensors", "first.safetensors", "last.safetensors"]


# --- captions encoded in batches give what one at a time gives --------------------------------------

@pytest.mark.parametrize("emphasis", [False, True], ids=["literal", "caption_emphasis"])
def test_captions_encoded_in_batches_equal_one_at_a_time(components, emphasis):
    from types import SimpleNamespace

    from trainer.models.prompts import encode_prompts
    from trainer.modes.lora import encode_captions

    run = SimpleNamespace(components=components, check_stop=lambda: None, autocast=lambda: torch.autocast("cpu", enabled=False))
    texts = ["", "a cat", "(a red:1.4) cat, [blue] sky", "word " * 100, "tree, " * 60, "x"]
    got = encode_captions(run, texts, clip_skip=1, batch=2, emphasis=emphasis)
    assert set(got) == set(texts)
    for text in texts:
        with torch.no_grad():
            alone = encode_prompts(components, [text], clip_skip=1, emphasis=emphasis).hidden
        assert got[text][0].shape == alone.shape and got[text][1] is None
        torch.testing.assert_close(got[text][0], alone, rtol=1e-5, atol=1e-5)


def test_reading_the_loss_late_in_a_two_pass_mode_changes_nothing(data, tmp_path, components):
    from trainer.modes import mode_for

    images = sorted(data.glob("*.png"))
    results = {}
    for lagged in (False, True):
        cfg = make_cfg(data, save_lora_name=f"d{lagged}", train_iterations=3).replace(
            mode="Difference", original_image=str(images[0]), target_image=str(images[1]))
        _, results[lagged] = start(cfg, tmp_path, components, mode=mode_for("Difference"), lagged=lagged)
        assert results[lagged].ok, results[lagged].message
    assert same(tensors(results[False].files[-1]), tensors(results[True].files[-1]))


# --- issue 10: no hang, nothing lost ---------------------------------------------------------------

@contextlib.contextmanager
def within(seconds: float):
    """Fail (instead of hanging the suite) when the block takes longer than `seconds`."""
    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def stop_at(step):
    holder = {}

    def on_progress(p):
        if p.phase == "train" and p.step >= step:
            holder["run"].stop()
    return holder, on_progress


@pytest.mark.parametrize("every", [0, 1])
def test_a_trillion_steps_start_at_once_and_stop_keeps_them(data, tmp_path, components, every):
    cfg = make_cfg(data, train_iterations=10**12, save_per_steps=every, logging_save_csv=False)
    holder, on_progress = stop_at(2)
    run = TrainingRun(cfg, components, OutputPaths.under(tmp_path), log=lambda m: None, device=torch.device("cpu"),
                      on_progress=on_progress)
    holder["run"] = run
    with within(60):  # before: the name check (and the per-step save plan) walked 10^12 steps
        result = run.run(LoRAMode())
    assert result.ok and result.stopped and result.steps == 2, result.message
    assert files_in(tmp_path / "output") == (["t_1steps.safetensors"] if every else []) + ["t_2steps.safetensors"]


def test_an_existing_per_step_file_of_a_trillion_step_run_is_found_at_once(data, tmp_path, components):
    out = tmp_path / "output"
    out.mkdir()
    (out / "t_3000steps.safetensors").write_bytes(b"mine")
    (out / "t_2999steps.safetensors").write_bytes(b"not on the plan")
    with within(20):
        _, result = start(make_cfg(data, train_iterations=10**12, save_per_steps=1000), tmp_path, components)
    assert not result.ok and "save_lora_name" in result.message and "t_3000steps" in result.message
    assert (out / "t_3000steps.safetensors").read_bytes() == b"mine"
    # the final step is saved as t.safetensors, so t_3000steps is no clash for a run of 3000 steps
    assert existing_output(make_cfg(data, train_iterations=3000, save_per_steps=1000), out) is None
    assert existing_output(make_cfg(data, train_iterations=3001, save_per_steps=1000), out) is not None


def test_stop_before_step_1_finished_saves_nothing_and_says_so(data, tmp_path, components, monkeypatch):
    real = LoRAMode.loss

    def loss(self, step):
        if step == 1:
            self.run.stop()  # the tab still shows "Preparing" during step 1 (its progress comes after it)
        return real(self, step)

    monkeypatch.setattr(LoRAMode, "loss", loss)
    _, result = start(make_cfg(data, train_iterations=20), tmp_path, components)
    assert result.stopped and not result.ok and result.files == [] and result.steps == 0
    assert "nothing was saved" in result.message
    assert files_in(tmp_path / "output") == []


def test_stop_while_the_engine_prepares_the_network_ends_the_run(data, tmp_path, components, monkeypatch):
    from trainer import engine

    real = engine.make_optimizer

    def slow_preparation(*args, **kwargs):
        holder["run"].stop()  # pressed while the optimizer is built (long for a big network)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "make_optimizer", slow_preparation)
    holder = {}
    run = TrainingRun(make_cfg(data), components, OutputPaths.under(tmp_path), log=lambda m: None,
                      device=torch.device("cpu"))
    holder["run"] = run
    result = run.run(LoRAMode())
    assert result.stopped and not result.ok and "nothing was saved" in result.message
    assert result.steps == 0 and files_in(tmp_path / "output") == []


def test_a_batch_larger_than_the_data_is_cut_to_it_with_a_message(data, tmp_path, components):
    said = []
    run = TrainingRun(make_cfg(data, train_iterations=2, train_batch_size=100000), components,
                      OutputPaths.under(tmp_path), log=said.append, device=torch.device("cpu"))
    with within(60):  # before: every step stacked 100000 copies of the 4 latents
        result = run.run(LoRAMode())
    assert result.ok, result.message
    assert any("train_batch_size=100000" in m and "4 training samples" in m for m in said), said


def test_resume_keeps_the_files_rank_and_the_metadata_says_so(data, tmp_path, components):
    _, first = start(make_cfg(data, train_iterations=1, network_rank=16, network_alpha=8, save_lora_name="r16"),
                     tmp_path, components)
    said = []
    run = TrainingRun(make_cfg(data, train_iterations=1, network_rank=4, network_alpha=4, save_lora_name="again",
                               network_resume=str(first.files[0])),
                      components, OutputPaths.under(tmp_path), log=said.append, device=torch.device("cpu"))
    result = run.run(LoRAMode())
    assert result.ok, result.message
    saved, meta = load_network_file(result.files[0])
    assert {t.shape[0] for k, t in saved.items() if k.endswith("lora_down.weight")} == {16}
    assert meta["ss_network_dim"] == "16" and float(meta["ss_network_alpha"]) == 8
    assert "rank 16" in meta["traintrain.network_resume"]
    assert any("network_resume" in m and "rank 16" in m and "network_rank=4" in m for m in said), said


def test_out_of_memory_advice_names_a_large_rank(data, tmp_path, components, monkeypatch):
    def loss(self, step):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr(LoRAMode, "loss", loss)
    _, big = start(make_cfg(data, network_rank=1024, network_alpha=1), tmp_path, components)
    assert "network_rank (now 1024" in big.message and "train_batch_size" in big.message
    assert "image_size (now 64x64)" in big.message
    _, small = start(make_cfg(data, network_rank=4, use_gradient_checkpointing=True), tmp_path, components)
    assert "network_rank" not in small.message and "use_gradient_checkpointing" not in small.message


# --- where the run writes: checked before the model loads; a disk that fills up later ----------------

AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@contextlib.contextmanager
def small_disk(folder: Path, size_kb: int, read_only: bool = False):
    """A real tmpfs of size_kb at folder (root, as in CI); None elsewhere (the caller patches instead)."""
    folder.mkdir(parents=True, exist_ok=True)
    if not AS_ROOT:
        yield None
        return
    opts = f"size={size_kb}k" + (",ro" if read_only else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path) -> None:
    with contextlib.suppress(OSError), open(folder / "filler", "wb") as f:
        while True:
            f.write(bytes(1 << 16))
            f.flush()


def cli_in_process(*args):
    from trainer.__main__ import main

    return main(["train", *map(str, args)])


def never_load(monkeypatch):
    from trainer.host import standalone

    def refuse(*a, **k):
        raise AssertionError("the model was loaded although a folder cannot be written")
    monkeypatch.setattr(standalone, "load_components", refuse)


CLI_SMALL = ["--set", "image_size=64", "--set", "image_min_length=64", "--set", "image_buckets_step=64",
             "--set", "train_model_precision=fp32", "--iterations", 2, "--rank", 4]


@pytest.mark.parametrize("case", ["workdir is a file", "output-dir is a file", "output-dir read-only",
                                  "output-dir on a full disk", "output-dir cannot be made"])
def test_a_folder_the_run_cannot_write_is_refused_before_the_model_loads(data, tmp_path, monkeypatch, capsys,
                                                                        case):
    from trainer import engine

    never_load(monkeypatch)
    work, out = tmp_path / "work", tmp_path / "out"
    flags = ["--workdir", work, "--output-dir", out]
    with contextlib.ExitStack() as stack:
        if case == "workdir is a file":
            work.write_text("x")
            flags, setting, shown = ["--workdir", work], "--workdir", work / "output"
        elif case == "output-dir is a file":
            out.write_text("x")
            setting, shown = "--output-dir", out
        elif case == "output-dir cannot be made":
            (tmp_path / "afile").write_text("x")
            out = tmp_path / "afile" / "deeper" / "out"
            flags, setting, shown = ["--workdir", work, "--output-dir", out], "--output-dir", out
        elif case == "output-dir read-only":
            setting, shown = "--output-dir", out
            if stack.enter_context(small_disk(out, 256, read_only=True)) is None:
                out.chmod(0o555)  # not root: the folder's mode refuses
                stack.callback(out.chmod, 0o755)
        else:
            setting, shown = "--output-dir", out
            if stack.enter_context(small_disk(out, 256)) is None:
                monkeypatch.setattr(engine, "_write_probe", lambda f: (_ for _ in ()).throw(
                    OSError(errno.ENOSPC, "No space left on device")))
            else:
                fill(out)
        code = cli_in_process("--data", data, *flags, *CLI_SMALL)
        err = capsys.readouterr().err
        assert code == 2 and setting in err and str(shown) in err, err
        assert "Traceback" not in err
        if case == "output-dir on a full disk":
            assert "full disk" in err
        if out.is_dir():
            assert [p.name for p in out.iterdir()] in ([], ["filler"])  # no probe left behind


def test_a_disk_that_fills_up_during_training_keeps_the_weights_elsewhere(data, tmp_path, components, monkeypatch):
    out = tmp_path / "output"
    real_loss, real_save = LoRAMode.loss, files_mod.save_network
    with small_disk(out, 4096) as disk:
        def loss(self, step):
            if step == 2:  # the disk fills up while training
                if disk is not None:
                    fill(disk)
                else:
                    def full(path, *a, **k):
                        if Path(path).parent == out:
                            raise OSError(errno.ENOSPC, "No space left on device")
                        return real_save(path, *a, **k)
                    monkeypatch.setattr(files_mod, "save_network", full)
            return real_loss(self, step)

        monkeypatch.setattr(LoRAMode, "loss", loss)
        _, result = start(make_cfg(data, train_iterations=3), tmp_path, components)
        assert not result.ok and str(out / "t.safetensors") in result.message
        kept = [p for p in result.files if p.parent == tmp_path / "rescued"]
        assert len(kept) == 1 and str(kept[0]) in result.message and "kept in" in result.message
        assert sorted(tensors(kept[0])) and all(torch.isfinite(t).all() for t in tensors(kept[0]).values())
        assert [p for p in files_in(out) if p != "filler"] == []  # no partial file on the full disk


def test_files_are_written_with_the_umask_and_keep_the_mode_they_replace(tmp_path):
    from trainer.atomic import atomic_write_text
    from trainer.config import save_preset

    previous = os.umask(0o022)
    try:
        lora = tmp_path / "a.safetensors"
        save_network(lora, {"lora_unet_x.lora_down.weight": torch.ones(2, 2)}, {})
        text = atomic_write_text(tmp_path / "q.json", "{}")
        preset = Path(save_preset(Config.defaults("LoRA"), tmp_path / "p.json"))
        for path in (lora, text, preset):
            assert stat.S_IMODE(path.stat().st_mode) == 0o644, path  # before: 0o600 (mkstemp's)
        lora.chmod(0o640)
        save_network(lora, {"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, {}, overwrite=True)
        assert stat.S_IMODE(lora.stat().st_mode) == 0o640  # an overwritten file keeps its mode
        os.umask(0o077)
        atomic_write_text(tmp_path / "private.json", "{}")
        assert stat.S_IMODE((tmp_path / "private.json").stat().st_mode) == 0o600
    finally:
        os.umask(previous)


def test_the_tab_refuses_a_job_whose_lora_folder_is_a_file_before_loading(data, tmp_path, monkeypatch):
    from trainer.jobs import FAILED, JobQueue, StandaloneHost, host_runner

    def refuse(self, *a, **k):
        raise AssertionError("the model was loaded although the LoRA folder cannot be written")

    monkeypatch.setattr(StandaloneHost, "session", refuse)
    (tmp_path / "loras").write_text("not a folder")
    host = StandaloneHost(tmp_path / "work", lora_dir=tmp_path / "loras", device=torch.device("cpu"))
    q = JobQueue(tmp_path / "queue", host_runner(host), console=lambda m: None)
    q.add(make_cfg(data, train_iterations=2))
    assert q.start() and q.wait(60)
    job = q.jobs()[0]
    assert job.status == FAILED and str(tmp_path / "loras") in job.message and "not a folder" in job.message


def test_the_cli_prints_out_of_memory_advice_once(data, tmp_path, monkeypatch, capsys):
    def loss(self, step):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr(LoRAMode, "loss", loss)
    code = cli_in_process("--data", data, "--workdir", tmp_path, *CLI_SMALL)
    err = capsys.readouterr().err
    assert code == 1 and err.count("Out of memory") == 1, err  # before: logged, then again as the result


def test_stop_while_reading_the_images_ends_the_reading(data, tmp_path, components, monkeypatch):
    from trainer.data import dataset

    real, read = dataset.load_image, []

    def load_image(path, **kw):
        read.append(path)
        holder["run"].stop()  # pressed while the first image is read (thousands take minutes)
        return real(path, **kw)

    monkeypatch.setattr(dataset, "load_image", load_image)
    holder = {}
    run = TrainingRun(make_cfg(data), components, OutputPaths.under(tmp_path), log=lambda m: None,
                      device=torch.device("cpu"))
    holder["run"] = run
    result = run.run(LoRAMode())
    assert result.stopped and "nothing was saved" in result.message and len(read) == 1


def test_stop_while_loading_the_latent_cache_ends_the_loading(data, tmp_path, components, monkeypatch):
    from trainer.data.cache import LatentCache

    cfg = make_cfg(data, latent_cache_on_disk=True, train_iterations=1)
    _, first = start(cfg, tmp_path / "fill", components)  # fills the disk cache
    assert first.ok, first.message
    real, read = LatentCache._load, []

    def load(self, folder, key):
        read.append(key)
        holder["run"].stop()  # pressed while the first cached latent is read (a large cache takes a while)
        return real(self, folder, key)

    monkeypatch.setattr(LatentCache, "_load", load)
    holder = {}
    paths = OutputPaths.under(tmp_path / "fill")
    run = TrainingRun(cfg.with_overrides({"save_lora_name": "again"}), components, paths, log=lambda m: None,
                      device=torch.device("cpu"))
    holder["run"] = run
    result = run.run(LoRAMode())
    assert result.stopped and "nothing was saved" in result.message and len(read) == 1
    assert not (paths.lora_dir / "again.safetensors").exists()


def test_stop_while_reading_multi_addift_pairs_ends_the_reading(tmp_path, components, monkeypatch):
    from PIL import Image

    from trainer.data import pairs
    from trainer.modes.addift import MultiADDifTMode

    folder = tmp_path / "pairs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64), (200, 40, 40)).save(folder / f"p{i}.png")
        Image.new("RGB", (64, 64), (40, 40, 200)).save(folder / f"p{i}_b.png")
    real, read = pairs.load_image, []

    def load_image(path, **kw):
        read.append(path)
        holder["run"].stop()  # pressed while the first pair is read
        return real(path, **kw)

    monkeypatch.setattr(pairs, "load_image", load_image)
    cfg = Config.defaults("Multi-ADDifT").with_overrides({
        "lora_data_directory": str(folder), "diff_target_name": "_b", "save_lora_name": "m", "image_size": "64",
        "image_min_length": 64, "image_buckets_step": 64, "network_rank": 4, "network_alpha": 4,
        "network_blocks": BLOCKS, "train_iterations": 2, "train_model_precision": "fp32",
        "latent_cache_on_disk": False})
    holder = {}
    run = TrainingRun(cfg, components, OutputPaths.under(tmp_path), log=lambda m: None, device=torch.device("cpu"))
    holder["run"] = run
    result = run.run(MultiADDifTMode())
    assert result.stopped and "nothing was saved" in result.message
    assert len(read) <= 2  # the first pair's two images, then no more
