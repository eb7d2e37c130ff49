"""Faults during a run, end to end on the tiny model: non-finite losses (read in the step or one step
late, as on CUDA), out of memory, Stop while caching / in a step / in a save, a disk that fills up or a
folder that refuses writes at save time. Each ends in a clear message and leaves no partial output.
(The bad-input matrix and where each item is tested: bench/RESULTS.md, "Nothing lost, nothing broken".)"""
import csv
import errno
import os
from pathlib import Path

import pytest
import torch

from trainer.config import Config
from trainer.demo import TRIGGER, draw_demo_images
from trainer.engine import OutputPaths, TrainingRun, is_out_of_memory
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
    if fault == "full disk":
        monkeypatch.setattr(files_mod, "_write_all", _full_disk)
    else:
        monkeypatch.setattr(files_mod.tempfile, "mkstemp", _read_only_folder)
    _, result = start(make_cfg(data, train_iterations=2, save_overwrite=True), tmp_path, components)
    assert not result.ok and str(out / "t.safetensors") in result.message and "unchanged" in result.message
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

def test_captions_encoded_in_batches_equal_one_at_a_time(components):
    from types import SimpleNamespace

    from trainer.models.prompts import encode_prompts
    from trainer.modes.lora import encode_captions

    run = SimpleNamespace(components=components, check_stop=lambda: None, autocast=lambda: torch.autocast("cpu", enabled=False))
    texts = ["", "a cat", "(a red:1.4) cat, [blue] sky", "word " * 100, "tree, " * 60, "x"]
    got = encode_captions(run, texts, clip_skip=1, batch=2)
    assert set(got) == set(texts)
    for text in texts:
        with torch.no_grad():
            alone = encode_prompts(components, [text], clip_skip=1).hidden
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
