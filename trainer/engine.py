"""The training loop shared by every mode.

A `TrainingRun` owns one job: it picks the device and precisions, asks the mode to prepare its
data, builds the network, optimizer and scheduler, runs the steps, guards against NaN, writes the
CSV log, reports progress, honours a stop request and saves in the kohya format. Modes only say
how one step's loss is computed (trainer/modes/).
"""
from __future__ import annotations

import contextlib
import csv
import errno
import gc
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from .atomic import atomic_write_text
from .diffusion import NoiseSchedule, sample_timesteps, weighted_loss
from .optim import SCHEDULE_FREE, make_optimizer, make_scheduler
from .models.prompts import effective_clip_skip

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TrainingError(RuntimeError):
    """A job that cannot go on; the message says why and what to change."""


class StopRequested(Exception):
    """Raised inside preparation when the user pressed Stop."""


@dataclass
class OutputPaths:
    lora_dir: Path
    log_dir: Path
    json_dir: Path
    cache_dir: Path | None = None
    sample_dir: Path | None = None  # sample grids; None = "samples" next to log_dir

    @classmethod
    def under(cls, root: Path | str) -> "OutputPaths":
        root = Path(root)
        return cls(root / "output", root / "logs", root / "jsons", root / "cache", root / "samples")


@dataclass
class Progress:
    phase: str  # "prepare", "train", "save", "done"
    step: int = 0
    total: int = 0
    loss: float | None = None
    loss_avg: float | None = None
    lrs: tuple[float, ...] = ()
    sec_per_it: float | None = None
    eta_s: float | None = None
    message: str = ""  # phase "save" / "sample": the path of the file written
    sample_s: float = 0.0  # time spent drawing sample grids so far (not in sec_per_it)


@dataclass
class RunResult:
    ok: bool
    message: str
    files: list[Path] = field(default_factory=list)
    csv: Path | None = None
    steps: int = 0
    stopped: bool = False
    seed: int | None = None


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX). Without it, PyTorch emulates
    bf16 and a U-Net step is about 2x slower than in fp32 (bench/RESULTS.md)."""
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        try:
            if getattr(cpu, probe)():
                return True
        except Exception:  # private probes: absent or failing on some builds and platforms
            continue
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = f.read()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def model_dtype(name: str, device: torch.device, log: Callable[[str], None]) -> torch.dtype:
    """The dtype of the frozen model. fp16 on CPU runs as bf16 where the CPU has bf16 instructions
    and as fp32 elsewhere: CPU fp16 kernels are slow, fp16 needs a GradScaler that only CUDA has,
    and emulated bf16 is slower than fp32 (an explicit bf16 is kept: it halves the model's memory)."""
    if name == "int8":
        raise TrainingError("train_model_precision: 'int8' is not supported by this build; use bf16 or fp16")
    if name == "model":
        name = "fp16"
    dtype = PRECISIONS[name]
    if device.type == "cpu" and dtype == torch.float16:
        if cpu_has_native_bf16():
            log("train_model_precision: fp16 runs as bf16 on the CPU")
            dtype = torch.bfloat16
        else:
            log("train_model_precision: fp16 runs as fp32 on this CPU (it has no bf16 instructions, so bf16 "
                "would be slower); set bf16 to halve the model's memory instead")
            dtype = torch.float32
    return dtype


def place(module: torch.nn.Module, device, dtype: torch.dtype | None = None) -> None:
    """Move (and cast) a model. Calls nn.Module.to directly: diffusers' override warns on every
    intended cast."""
    torch.nn.Module.to(module, device=device, dtype=dtype)


def save_dtype(name: str) -> torch.dtype:
    return PRECISIONS["fp16" if name == "model" else name]


LARGE_RANK = 128
"""From this network_rank on, out-of-memory advice names the rank first: kohya's SD1.5 LoRA of rank
128 is about 75 M parameters, 1.2 GB with its gradients and AdamW's state in fp32."""

# what each place a run writes is called in messages; the CLI passes its flags instead
OUTPUT_NAMES = {"lora_dir": "the LoRA output folder", "log_dir": "logging_save_csv: the logs folder",
                "json_dir": "save_as_json: the settings folder"}


def existing_output(cfg, lora_dir: Path) -> Path | None:
    """A file this run would write that already exists (the final file or a save_per_steps one). Reads
    the folder once, so the work does not grow with train_iterations (10^12 steps plan in no time)."""
    final = Path(lora_dir) / f"{cfg.save_lora_name}.safetensors"
    if final.exists():
        return final
    every, total = cfg.save_per_steps, cfg.train_iterations
    if every <= 0:
        return None
    pattern = re.compile(re.escape(cfg.save_lora_name) + r"_(\d+)steps\.safetensors")
    try:
        names = os.listdir(lora_dir)
    except OSError:
        return None
    for name in sorted(names):
        m = pattern.fullmatch(name)
        if m and 0 < int(m.group(1)) < total and int(m.group(1)) % every == 0:
            return Path(lora_dir) / name
    return None


def output_problem(cfg, paths: OutputPaths, names: dict | None = None, which: tuple | None = None) -> str | None:
    """Why a folder the run will write to cannot take a file (a file in its place, read-only, a full disk,
    cannot be made), naming its setting and path; None when all can. Run before the model loads, so
    a bad folder costs no training. Makes the folders that are missing. (The latent cache is left out:
    the run goes on without it.) ``which``: only these of lora_dir, log_dir, json_dir."""
    names = {**OUTPUT_NAMES, **(names or {})}
    if which is None:
        which = ("lora_dir",) + (("log_dir",) if getattr(cfg, "logging_save_csv", False) else ()) + \
            (("json_dir",) if getattr(cfg, "save_as_json", False) else ())
    for key in which:
        folder = getattr(paths, key)
        problem = _folder_problem(Path(folder))
        if problem:
            return f"{names[key]}: {folder} {problem}"
    return None


# bytes the write test writes: a disk with less room than this is full for any LoRA
_WRITE_PROBE = 64 * 1024


def _folder_problem(folder: Path) -> str | None:
    if folder.exists() and not folder.is_dir():
        return "is a file, not a folder"
    parent = folder
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"cannot be made: {parent} is a file, not a folder"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"cannot be made ({e.strerror or e})"
    try:
        _write_probe(folder)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            free = ""
            with contextlib.suppress(OSError):
                free = f" ({shutil.disk_usage(folder).free // 1024} KB free)"
            return f"is on a full disk{free}: free some space or choose another folder"
        return f"is not writable ({e.strerror or e})"
    return None


def _write_probe(folder: Path) -> None:
    """Write and remove a small file in folder (OSError when it cannot take one)."""
    fd, tmp = tempfile.mkstemp(prefix=".traintrain-write-test-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(bytes(_WRITE_PROBE))
            f.flush()
            os.fsync(f.fileno())
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def network_dims(net) -> tuple:
    """(rank, alpha, conv_rank, conv_alpha) of a network's adapters, the most common of each kind
    (conv: 3x3 convolutions; conv_rank 0 when there are none)."""
    plain: Counter = Counter()
    conv: Counter = Counter()
    for a in net.adapters():
        kernel = tuple(getattr(a.org_module, "kernel_size", (1, 1)))
        (conv if kernel != (1, 1) else plain)[(int(a.rank), float(a.alpha))] += 1
    rank, alpha = plain.most_common(1)[0][0] if plain else (0, 0.0)
    conv_rank, conv_alpha = conv.most_common(1)[0][0] if conv else (0, 0.0)
    return rank, alpha, conv_rank, conv_alpha


class CsvLog:
    """One row per step: raw loss, smoothed loss and each parameter group's learning rate."""

    def __init__(self, path: Path, header: dict[str, object], n_groups: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = open(path, "w", newline="", encoding="utf-8")
        self._writer = csv.writer(self._file)
        for key, value in header.items():
            self._writer.writerow([key, value])
        self._writer.writerow(["Step", "Loss", "Loss (smoothed)"] + [f"Learning Rate {i + 1}" for i in range(n_groups)])

    def row(self, step: int, loss: float, smooth: float, lrs: tuple[float, ...]) -> None:
        self._writer.writerow([step, f"{loss:.6g}", f"{smooth:.6g}"] + [f"{lr:.6g}" for lr in lrs])
        self._file.flush()

    def close(self) -> None:
        self._file.close()


@dataclass
class Pass:
    """One network trained by one objective: LoRA mode has one, Difference has two."""

    cfg: object  # trainer.config.Config
    loss_fn: Callable[[int], torch.Tensor]  # step -> scalar loss
    name: str  # file stem
    train_text_encoder: bool = False
    save: bool = True


class TrainingRun:
    def __init__(self, cfg, components, paths: OutputPaths, *, on_progress: Callable[[Progress], None] | None = None,
                 log: Callable[[str], None] = print, device: torch.device | None = None):
        self.cfg = cfg
        self.components = components
        self.paths = paths
        self.on_progress = on_progress or (lambda p: None)
        self.log = log
        self.device = device or pick_device()
        self._stop = False
        self._completed = 0  # steps finished in the current pass
        self._stop_after: int | None = None  # steps finished in the pass when Stop was pressed
        self._discard = False  # Cancel: stop without saving what the stopped pass trained
        self._dims: dict[str, tuple] = {}  # pass name -> (rank, alpha, conv_rank, conv_alpha) when not the settings'
        self.started_at = time.time()
        self.session_id = uuid.uuid4().int % (2**31)
        self.networks: list = []  # applied networks, innermost first
        self.files: list[Path] = []
        self.summary: dict = {}  # filled by the mode: num images, tag frequency, ...
        # Read each step's loss one step late, without waiting for the device (None: on CUDA only)
        self.lagged_loss: bool | None = None
        self.sampler = None  # trainer.samples.TrainingSamples when sample_every_n_steps > 0

    # --- control -------------------------------------------------------------------------
    def stop(self, save: bool = True) -> None:
        """Stop at the next step (or at the next item while caching); what was trained is saved. Pressed
        before step 1 finished (the run still looks like it is preparing), nothing is saved. ``save=False``
        (Cancel) saves nothing of the stopped pass; it sticks, so a later plain stop (the Web-UI's Interrupt)
        does not bring the save back. Files saved before (save_per_steps, a finished pass) are kept."""
        if not save:
            self._discard = True
        if self._stop_after is None:
            self._stop_after = self._completed
        self._stop = True

    @property
    def stopping(self) -> bool:
        return self._stop

    def check_stop(self) -> None:
        if self._stop:
            raise StopRequested()

    # --- helpers for modes -----------------------------------------------------------------
    @property
    def family(self):
        return self.components.info.family

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond) -> torch.Tensor:
        """The U-Net's prediction with the currently applied networks at their multipliers."""
        kwargs = {}
        if getattr(cond, "added", None):  # SDXL: pooled text embedding + size ids
            kwargs["added_cond_kwargs"] = {k: v.to(self.device, self.dtype) for k, v in cond.added.items()}
        with self.autocast():
            out = self.components.unet(noisy.to(self.dtype), timesteps, encoder_hidden_states=cond.hidden.to(self.dtype),
                                       **kwargs).sample
        return out.float()

    def step_loss(self, pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, cfg=None,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
        cfg = cfg or self.cfg
        return weighted_loss(pred, target, timesteps, self.schedule, cfg.train_loss_function, cfg.train_snr_gamma, mask)

    def timesteps(self, batch: int, cfg=None) -> torch.Tensor:
        cfg = cfg or self.cfg
        return self.to_device(sample_timesteps(batch, cfg.train_min_timesteps, cfg.train_max_timesteps,
                                               cfg.train_fixed_timsteps_in_batch, self.generator, "cpu"))

    def randn(self, shape, dtype=torch.float32) -> torch.Tensor:
        return self.to_device(torch.randn(shape, generator=self.generator, dtype=dtype))

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host tensor on the run's device. On CUDA the copy goes through pinned memory without
        blocking, so the host does not wait for the GPU to finish its queued work (a plain .to()
        from pageable memory synchronises)."""
        if self.device.type == "cuda" and tensor.device.type == "cpu":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels [B,3,H,W] in [-1,1] -> scaled latents, in the VAE precision."""
        vae = self.components.vae
        dtype = PRECISIONS[self.cfg.train_VAE_precision]
        if self.device.type == "cpu" and dtype == torch.float16:
            dtype = torch.bfloat16
        place(vae, self.device, dtype)
        with torch.no_grad():
            dist = vae.encode(pixels.to(self.device, dtype)).latent_dist
            z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=self.generator).to(self.device, dtype)
        return (z.float() * self.components.scaling_factor)

    def release_vae(self) -> None:
        """Latents are cached; the VAE is not needed on the device any more."""
        place(self.components.vae, "cpu")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def progress(self, **kw) -> None:
        self.on_progress(Progress(**kw))

    # --- the run -----------------------------------------------------------------------------
    def run(self, mode) -> RunResult:
        """Train with `mode` (an object with `passes(run) -> Iterator[Pass]`)."""
        cfg = self.cfg
        self.log(f"Start training: mode {cfg.mode}, model {self.components.name}, device {self.device}")
        if not cfg.save_overwrite:
            path = existing_output(cfg, self.paths.lora_dir)
            if path is not None:
                return RunResult(False, f"save_lora_name: {path} already exists; choose another name or turn "
                                        f"on save_overwrite")
        problem = output_problem(cfg, self.paths)
        if problem:
            self.log(problem)
            return RunResult(False, problem)
        self.dtype = model_dtype(cfg.train_model_precision, self.device, self.log)
        self.lora_dtype = PRECISIONS[cfg.train_lora_precision]
        if self.device.type == "cpu" and self.lora_dtype == torch.float16:
            self.lora_dtype = torch.bfloat16
        seed = cfg.train_seed if cfg.train_seed >= 0 else random.randint(0, 2**32 - 1)
        self.seed = seed
        torch.manual_seed(seed)
        random.seed(seed)
        self.generator = torch.Generator().manual_seed(seed)
        info = self.components.info
        # v-prediction / zero terminal SNR: the setting, or what the checkpoint says about itself
        self.zero_terminal_snr = bool(getattr(cfg, "model_zero_terminal_snr", False)
                                      or getattr(info, "zero_terminal_snr", False))
        self.schedule = NoiseSchedule.create(self.device, cfg.model_v_pred or info.v_pred, self.zero_terminal_snr)
        self._freeze_model()
        from .samples import TrainingSamples
        self.sampler = TrainingSamples.for_run(self, mode)
        self.csv_path: Path | None = None
        steps_done = 0
        try:
            for p in mode.passes(self):
                steps_done = self._train_pass(p)
                if self._stop:
                    break
        except StopRequested:
            return RunResult(False, "Stopped before training began; nothing was saved", self.files, self.csv_path,
                             steps_done, True, seed)
        except TrainingError as e:
            return RunResult(False, str(e), self.files, self.csv_path, steps_done, self._stop, seed)
        except Exception as e:  # out of memory while preparing (VAE, text encoder, network)
            if not is_out_of_memory(e):
                raise
            message = self._oom_message(cfg, None)
            self.log(message)
            return RunResult(False, message, self.files, self.csv_path, steps_done, False, seed)
        finally:
            for net in reversed(self.networks):
                net.remove()
            self.networks.clear()
            for m in [self.components.unet, self.components.vae, *self.components.text_encoders]:
                place(m, "cpu")
            self._free_memory()
        saved = ", ".join(str(f) for f in self.files) or "nothing"
        if self._stop and self._discard:
            kept = f"; kept the files saved before the cancel: {saved}" if self.files else ""
            message = f"Cancelled at step {steps_done}; nothing was saved{kept}"
            self.log(message)
            return RunResult(False, message, self.files, self.csv_path, steps_done, True, seed)
        if self._stop and steps_done == 0 and not self.files:
            message = "Stopped before step 1 finished; nothing was saved"
            self.log(message)
            return RunResult(False, message, self.files, self.csv_path, 0, True, seed)
        if self._stop:
            return RunResult(True, f"Stopped at step {steps_done}; saved {saved}", self.files, self.csv_path,
                             steps_done, True, seed)
        return RunResult(True, f"Saved {saved}", self.files, self.csv_path, steps_done, False, seed)

    def _free_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _freeze_model(self) -> None:
        if self._stop:  # Stop pressed while loading: the first check in the pass ends the run
            return
        c = self.components
        for m in [c.unet, c.vae, *c.text_encoders]:
            m.requires_grad_(False)
            m.eval()
        place(c.unet, self.device, self.dtype)
        if self.cfg.use_gradient_checkpointing:
            c.unet.train()  # diffusers checkpoints only in training mode on older versions
            c.unet.enable_gradient_checkpointing()

    def _train_pass(self, p: Pass) -> int:
        from .networks.network import Network

        cfg = p.cfg
        c = self.components
        self._completed = 0
        self.check_stop()  # each preparation step below can take long on a big model: Stop ends it
        tes = c.text_encoders if p.train_text_encoder else []
        for te in tes:
            place(te, self.device, self.dtype)
            if cfg.use_gradient_checkpointing and hasattr(te, "gradient_checkpointing_enable"):
                te.train()
                _checkpoint_text_encoder(te)
                te.requires_grad_(False)  # HF may flip requires_grad on; only the adapters train
        net = Network.create(
            c.unet, tes, algo=cfg.network_type, rank=cfg.network_rank, alpha=cfg.network_alpha,
            conv_rank=cfg.network_conv_rank or cfg.network_rank, conv_alpha=cfg.network_conv_alpha or cfg.network_alpha,
            blocks=cfg.network_blocks, element=cfg.network_element, unet_key_style=self.unet_key_style,
            train_text_encoder=p.train_text_encoder, dtype=self.lora_dtype, te_layer_limits=self.te_layer_limits(tes),
            warn=self.log)
        self.check_stop()
        if cfg.network_resume:
            from .networks.files import load_network_file
            tensors, _ = load_network_file(cfg.network_resume)
            planned = network_dims(net)
            # a pass that trains no text encoder still resumes from a file that has one (the original
            # writes lora_te* keys by default): those are skipped and said so, anything else must fit
            parts = ("unet", "te") if net.te_modules else ("unet",)
            try:
                loaded = net.load_kohya(tensors, parts=parts)
            except ValueError as e:
                raise TrainingError(f"network_resume: {cfg.network_resume} does not fit this model: {e}") from e
            if loaded.skipped_line("network_resume"):
                self.log(loaded.skipped_line("network_resume"))
            self.log(f"Resumed from {cfg.network_resume}")
            self._note_resumed_dims(p, net, planned)
        self.check_stop()
        net.to(self.device)
        net.apply()
        self.networks.append(net)
        self.network = net  # the network this pass trains; modes set its multiplier per step
        n_unet, n_te = net.counts()
        rank, alpha = self._dims.get(p.name, (cfg.network_rank, cfg.network_alpha))[:2]
        self.log(f"Network {cfg.network_type} rank {rank} alpha {alpha}: "
                 f"{n_unet} U-Net modules, {n_te} text-encoder modules")
        if cfg.logging_verbose:  # the details its help promises: data counts and the trained modules
            self.log(verbose_summary(self.summary, net))
        if n_unet + n_te == 0:
            raise TrainingError(f"network_blocks: {cfg.network_blocks} selects no module of this model "
                                f"with network_element={cfg.network_element}")
        te_lr = cfg.train_textencoder_learning_rate or cfg.train_learning_rate
        groups = net.param_groups(cfg.train_learning_rate, te_lr)
        optimizer = make_optimizer(cfg.train_optimizer, groups, cfg.train_learning_rate,
                                   cfg.train_optimizer_settings, network=net, warn=self.log)
        scheduler = make_scheduler(cfg.train_lr_scheduler, optimizer, iterations=cfg.train_iterations,
                                   warmup_steps=cfg.train_lr_warmup_steps, num_cycles=cfg.train_lr_scheduler_num_cycles,
                                   power=cfg.train_lr_scheduler_power, step_rules=cfg.train_lr_step_rules,
                                   settings=cfg.train_lr_scheduler_settings, optimizer_name=cfg.train_optimizer)
        scaler = None
        if self.device.type == "cuda" and self.dtype == torch.float16 and self.lora_dtype == torch.float32:
            scaler = torch.amp.GradScaler("cuda")
        params = [q for g in groups for q in g["params"]]
        total = cfg.train_iterations
        every = cfg.save_per_steps
        self._check_free_space(p, params)
        self.check_stop()
        log = self._open_csv(p, len(groups)) if cfg.logging_save_csv else None
        wants_metric = getattr(scheduler, "wants_metric", False)
        lagged = self.lagged_loss if self.lagged_loss is not None else self.device.type == "cuda"
        # A scheduler fed the loss needs it in the step; schedule-free optimizers save weights derived
        # from their state, which the snapshot below does not cover: both read the loss in the step.
        reader = _LossReader(params, lagged and not wants_metric and cfg.train_optimizer not in SCHEDULE_FREE)
        smooth = None
        sampler = self.sampler
        if sampler:
            sampler.draw(p, net, 0, total)  # before training
        sampled_before = sampler.seconds if sampler else 0.0
        t0 = time.perf_counter()
        step = completed = 0
        oom_at = None

        def settle(done) -> None:
            """Book a step whose loss is known: NaN guard, CSV row, progress."""
            nonlocal smooth
            at, value, lrs = done
            if not math.isfinite(value):
                reader.restore()  # lagged: back to the weights before that step, the last finite ones
                self._nan_stop(p, net, optimizer, at, value)
            smooth = value if smooth is None else 0.9 * smooth + 0.1 * value
            if log:
                log.row(at, value, smooth, lrs)
            if cfg.logging_verbose:  # one line per step, unthrottled (the progress line is throttled)
                self.log(f"step {at}/{total}: loss {value:.6f} (avg {smooth:.6f}) lr "
                         + " ".join(f"{x:.3e}" for x in lrs))
            sampling = sampler.seconds - sampled_before if sampler else 0.0
            rate = (time.perf_counter() - t0 - sampling) / at
            eta = rate * (total - at) + (sampler.to_come(at, total) * sampler.seconds_per_grid if sampler else 0.0)
            self.progress(phase="train", step=at, total=total, loss=value, loss_avg=smooth, lrs=lrs,
                          sec_per_it=rate, eta_s=eta, message=p.name, sample_s=sampler.seconds if sampler else 0.0)

        try:
            for step in range(1, total + 1):
                if self._stop:
                    step -= 1
                    break
                loss = p.loss_fn(step)
                if reader.lagged:  # the previous step's loss has reached the host by now
                    done = reader.take()
                    reader.put(step, loss)
                    if done:
                        settle(done)
                else:
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        self._nan_stop(p, net, optimizer, step, value)  # the weights are still the last good ones
                (scaler.scale(loss) if scaler else loss).backward()
                loss = None
                if cfg.train_max_grad_norm and cfg.train_max_grad_norm > 0:
                    if scaler:
                        scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, cfg.train_max_grad_norm)
                reader.snapshot()
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                completed = self._completed = step
                if wants_metric:
                    scheduler.step(value if smooth is None else 0.9 * smooth + 0.1 * value)
                else:
                    scheduler.step()
                lrs = tuple(float(x) for x in _current_lrs(optimizer))
                if reader.lagged:
                    reader.note_lrs(lrs)
                else:
                    settle((step, value, lrs))
                if every > 0 and step % every == 0 and step < total and p.save:  # no set of 1e12 steps
                    if reader.lagged:
                        settle(reader.take())
                    self._save(p, net, optimizer, suffix=f"_{step}steps", steps=step)
                if sampler and sampler.due(step):
                    sampler.draw(p, net, step, total)
            if reader.lagged and reader.pending:
                settle(reader.take())
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            oom_at = step
        finally:
            if log:
                log.close()
        if oom_at is not None:  # out of the except block: the failed step's tensors are freed now
            loss = None
            self._out_of_memory(p, net, optimizer, reader, oom_at, completed, settle)
        if self._stop and self._stop_after == 0:
            # Stop pressed before step 1 finished, while the run still looked like it was preparing:
            # a one-step LoRA is of no use, so nothing of this pass is saved
            step = 0
        if (p.save or self._stop) and not self._discard:
            suffix = f"_{step}steps" if self._stop else ""
            # (Stop pressed during a per-step save: that file already holds these weights)
            if step > 0 and self.paths.lora_dir / f"{p.name}{suffix}.safetensors" not in self.files:
                self._save(p, net, optimizer, suffix=suffix, steps=step)
        if sampler and not self._discard:
            sampler.draw(p, net, step, total)  # the end (nothing when step N already drew this step)
        net.requires_grad_(False)
        net.set_multiplier(1.0)
        return step

    def _oom_message(self, cfg, step: int | None) -> str:
        where = f" at step {step}" if step else " while preparing"
        gpu = "GPU " if self.device.type == "cuda" else ""
        advice = []
        ranks = [r for r in (cfg.network_rank, cfg.network_conv_rank) if r]
        if max(ranks, default=0) >= LARGE_RANK:
            # the network, its gradients and the optimizer's state all grow with the rank
            conv = f", network_conv_rank {cfg.network_conv_rank}" if cfg.network_conv_rank else ""
            advice.append(f"lower network_rank (now {cfg.network_rank}{conv}; 4 to 64 is usual)")
        size = "x".join(str(s) for s in cfg.image_size)
        advice.append(f"lower train_batch_size (now {cfg.train_batch_size}) or image_size (now {size})")
        if not cfg.use_gradient_checkpointing:
            advice.append("turn on use_gradient_checkpointing (now off)")
        if getattr(self, "dtype", torch.float32) == torch.float32:  # fp16 runs as fp32 on some CPUs
            advice.append(f"use a half train_model_precision (now {cfg.train_model_precision}: bf16 or fp16)")
        if len(advice) > 1:
            advice[-1] = "or " + advice[-1]
        return f"Out of {gpu}memory{where}: " + ", ".join(advice)

    def _out_of_memory(self, p: Pass, net, optimizer, reader, step: int, done: int, settle) -> None:
        """Keep what the steps before the one that ran out of memory trained, then stop with advice."""
        gc.collect()
        self._free_memory()
        if reader.pending:
            pending = reader.take()
            if pending[0] <= done:  # a finished step whose loss was not read yet
                settle(pending)
        saved = ""
        with torch.no_grad():
            finite = all(torch.isfinite(q).all() for q in net.parameters())
        if done > 0 and p.save and finite:
            path = self._save(p, net, optimizer, suffix=f"_{done}steps", steps=done)
            saved = f"; the weights of step {done} are in {path}"
        message = self._oom_message(p.cfg, step) + saved
        self.log(message)
        raise TrainingError(message)

    def _nan_stop(self, p: Pass, net, optimizer, step: int, value: float) -> None:
        # The weights have not been updated with this loss yet: they are the last good ones.
        saved = ""
        if step > 1 and p.save and all(torch.isfinite(q).all() for q in net.parameters()):
            path = self._save(p, net, optimizer, suffix=f"_{step - 1}steps", steps=step - 1)
            saved = f"; the last good weights (step {step - 1}) are in {path}"
        raise TrainingError(f"The loss became {value} at step {step}, so training stopped{saved}. Lower "
                            f"train_learning_rate, use bf16 or fp32 train_model_precision, or a fp32 VAE "
                            f"(train_VAE_precision)")

    def te_layer_limits(self, text_encoders) -> list | None:
        """SD2 reads the penultimate layer of OpenCLIP-H: its last layer gets no adapter (kohya and
        diffusers build that encoder with 23 layers, so no loader has a place for one)."""
        if self.family.value != "sd2":
            return None
        from .models.prompts import _layer_index
        return [_layer_index(self.family, te, 1) for te in text_encoders]

    @property
    def unet_key_style(self) -> str:
        return "sgm" if self.family.value == "sdxl" else "diffusers"

    def _open_csv(self, p: Pass, n_groups: int) -> CsvLog:
        cfg = p.cfg
        stamp = time.strftime("%Y%m%d_%H%M%S", time.localtime(self.started_at))
        path = self.paths.log_dir / f"{p.name}-{stamp}.csv"
        header = {"mode": cfg.mode, "model": self.components.name, "network_type": cfg.network_type,
                  "network_rank": cfg.network_rank, "network_alpha": cfg.network_alpha,
                  "train_learning_rate": cfg.train_learning_rate, "train_iterations": cfg.train_iterations,
                  "train_optimizer": cfg.train_optimizer, "train_lr_scheduler": cfg.train_lr_scheduler,
                  "seed": self.seed, "save_lora_name": p.name}
        log = CsvLog(path, header, n_groups)
        self.csv_path = path
        self.log(f"Logging to {path}")
        return log

    def _save(self, p: Pass, net, optimizer, *, suffix: str, steps: int) -> Path:
        from .networks.files import build_metadata, save_network

        cfg = p.cfg
        path = self.paths.lora_dir / f"{p.name}{suffix}.safetensors"
        self.progress(phase="save", step=steps, total=cfg.train_iterations, message=str(path))
        schedule_free = cfg.train_optimizer in SCHEDULE_FREE
        if schedule_free:
            optimizer.eval()  # the averaged weights are the ones to keep
        try:
            tensors = net.state_dict_kohya(save_dtype(cfg.save_precision), strength=cfg.network_strength)
        finally:
            if schedule_free:
                optimizer.train()
        info = self.components.info
        v_pred = self.schedule.v_prediction
        family = "sd2-v" if info.family.value == "sd2" and v_pred else info.family.value
        extra = {"ss_network_strength": cfg.network_strength} if cfg.network_strength != 1 else {}
        if v_pred:
            extra["ss_v_parameterization"] = True
            extra["modelspec.prediction_type"] = "v"
        if self.zero_terminal_snr:
            extra["ss_zero_terminal_snr"] = True
        te_lr = cfg.train_textencoder_learning_rate or cfg.train_learning_rate
        rank, alpha, conv_rank, conv_alpha = self._dims.get(
            p.name, (cfg.network_rank, cfg.network_alpha, cfg.network_conv_rank, cfg.network_conv_alpha))
        if p.name in self._dims:  # resumed from a file of another rank: its tensors (and this file's) have that one
            extra["traintrain.network_resume"] = (f"{Path(cfg.network_resume).name}: rank {rank}, alpha {alpha:g} "
                                                  f"from the file (network_rank={cfg.network_rank} not used)")
        metadata = build_metadata(
            family=family, algo=cfg.network_type, rank=rank, alpha=alpha,
            conv_rank=conv_rank, conv_alpha=conv_alpha, output_name=path.stem,
            training_started_at=self.started_at, session_id=self.session_id, learning_rate=cfg.train_learning_rate,
            unet_lr=cfg.train_learning_rate, text_encoder_lr=te_lr if p.train_text_encoder else None,
            max_train_steps=cfg.train_iterations, steps=steps, lr_warmup_steps=cfg.train_lr_warmup_steps,
            lr_scheduler=cfg.train_lr_scheduler, mixed_precision=str(cfg.train_model_precision), seed=self.seed,
            optimizer=cfg.train_optimizer, min_snr_gamma=cfg.train_snr_gamma or None,
            clip_skip=effective_clip_skip(self.components, cfg.clip_skip),  # the Web-UI's when it was followed
            num_train_images=self.summary.get("num_train_images", 0), tag_frequency=self.summary.get("tag_frequency"),
            resolution=(cfg.image_size[1], cfg.image_size[0]), mode=cfg.mode, prompts=self.summary.get("prompts"),
            sd_model_name=self.components.name, title=path.stem, trigger_phrase=cfg.lora_trigger_word or None,
            extra=extra or None)
        try:
            save_network(path, tensors, metadata, overwrite=cfg.save_overwrite)
        except OSError as e:  # a full disk, a read-only folder, a file that appeared meanwhile
            kept = self._rescue(path, tensors, metadata)
            where = (f"; the trained weights are kept in {kept}: move that file where you want it" if kept else
                     "; the trained weights could not be written anywhere else either")
            raise TrainingError(f"Could not save {path}: {e}{where}. Any earlier file of that name is "
                                f"unchanged") from e
        self.files.append(path)
        self.log(f"Saved {path}")
        return path

    def _rescue(self, path: Path, tensors: dict, metadata: dict) -> Path | None:
        """Keep weights whose file could not be saved (a disk that filled up while training): in the
        workdir's rescued/ folder, else in the system's temp folder. None when neither takes them."""
        from .networks.files import save_network

        stamp = time.strftime("%Y%m%d_%H%M%S")
        for folder in (self.paths.log_dir.parent / "rescued", Path(tempfile.gettempdir()) / "traintrain-rescued"):
            target = folder / f"{path.stem}-{stamp}{path.suffix}"
            if folder == path.parent:
                continue
            try:
                save_network(target, tensors, metadata)
            except OSError:
                continue
            self.files.append(target)
            self.log(f"Could not save {path}; the trained weights are kept in {target}")
            return target
        return None

    def _note_resumed_dims(self, p: Pass, net, planned: tuple) -> None:
        """network_resume: the file's rank and alpha win over the settings' (its tensors have them);
        the log and the saved metadata say so."""
        got = network_dims(net)
        if got != planned:
            self._dims[p.name] = got
            self.log(f"network_resume: {p.cfg.network_resume} has rank {got[0]} alpha {got[1]:g}; the file's "
                     f"rank and alpha are kept (network_rank={p.cfg.network_rank}, network_alpha="
                     f"{p.cfg.network_alpha:g} are not used) and the saved metadata says so")

    def _check_free_space(self, p: Pass, params: list) -> None:
        """Before step 1: the LoRA folder has room for the file this pass saves (a disk that fills up
        later is met by _rescue)."""
        if not p.save:
            return
        size = sum(q.numel() for q in params) * save_dtype(p.cfg.save_precision).itemsize + _WRITE_PROBE  # + metadata
        folder = self.paths.lora_dir
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            return  # the folder was checked before the model loaded; the save reports anything else
        if free < size:
            raise TrainingError(f"The LoRA output folder {folder} has {free / 2**20:.1f} MB free, and "
                                f"{p.name}.safetensors needs about {size / 2**20:.1f} MB: free some space or "
                                f"choose another folder; nothing was trained")


def _checkpoint_text_encoder(te) -> None:
    try:
        te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    except TypeError:
        # transformers < 4.35 (the Web-UI's 4.30) only has reentrant checkpointing, which passes no
        # gradient to the adapters inside a segment unless the segment's input requires grad.
        te.gradient_checkpointing_enable()
        te.enable_input_require_grads()


def is_out_of_memory(e: BaseException) -> bool:
    """CUDA/HIP/MPS/CPU allocation failures (PyTorch raises RuntimeError subclasses with these texts)."""
    if isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


class _LossReader:
    """Each step's loss, read so that the host never waits for the device inside a step.

    Not lagged (CPU, where reading costs nothing): the engine reads the loss in the step, before
    backward, so a non-finite loss stops training before it touches the weights. Lagged (CUDA): the
    loss is copied to pinned host memory asynchronously and read during the next step, once it has
    landed; the trained weights are copied aside before every optimizer step, so when a loss turns out
    non-finite the weights go back to the ones before that step: the last finite ones."""

    def __init__(self, params: list, lagged: bool):
        self.lagged = lagged
        self.params = [q.detach() for q in params]
        self.backup = [q.clone() for q in self.params] if lagged else []
        self.pending: list | None = None  # [step, host value, event, lrs]

    def put(self, step: int, loss: torch.Tensor) -> None:
        value = loss.detach().float().reshape(())
        event = None
        if value.device.type == "cuda":
            host = torch.empty((), dtype=torch.float32, pin_memory=True)
            host.copy_(value, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = value.to("cpu", copy=True)
        self.pending = [step, host, event, ()]

    def note_lrs(self, lrs: tuple) -> None:
        self.pending[3] = lrs

    def take(self) -> tuple | None:
        if self.pending is None:
            return None
        step, host, event, lrs = self.pending
        self.pending = None
        if event is not None:
            event.synchronize()  # usually long done: the device is a step ahead by now
        return step, float(host), lrs

    def snapshot(self) -> None:
        if self.lagged:
            _copy_all(self.backup, self.params)

    def restore(self) -> None:
        if self.lagged:
            _copy_all(self.params, self.backup)


def _copy_all(dst: list, src: list) -> None:
    with torch.no_grad():
        if hasattr(torch, "_foreach_copy_"):
            torch._foreach_copy_(dst, src)  # a few kernel launches instead of one per tensor
        else:
            for d, s in zip(dst, src):
                d.copy_(s)


def _current_lrs(optimizer) -> Iterator[float]:
    for g in optimizer.param_groups:
        lr = g.get("d", 1.0) * g["lr"] if "d" in g and g.get("lr") else g.get("lr")
        yield lr if lr is not None else 0.0


def write_settings_json(cfg, paths: OutputPaths, started_at: float) -> Path:
    """`save_as_json`: the job's settings next to its logs, in the preset format."""
    stamp = time.strftime("%Y%m%d_%H%M%S", time.localtime(started_at))
    path = paths.json_dir / f"{cfg.save_lora_name}-{stamp}.json"
    atomic_write_text(path, json.dumps(cfg.to_dict(), indent=4, ensure_ascii=False))
    return path


def verbose_summary(summary: dict, net) -> str:
    """logging_verbose: the run's data counts and how many modules train in each block."""
    import collections
    import re

    data = ", ".join(f"{k} {v}" for k, v in summary.items() if isinstance(v, (int, float, str)))
    blocks = collections.Counter()
    for m in net.adapters():
        name = m.lora_name
        hit = re.match(r"lora_(unet|te\d?)_((?:down|up|input|output)_blocks_\d+|mid_block|middle_block|"
                       r"text_model_encoder_layers_\d+)?", name)
        blocks[(hit.group(1) + ("_" + hit.group(2) if hit.group(2) else "")) if hit else name] += 1
    parts = ", ".join(f"{k} {n}" for k, n in blocks.items())
    return f"Data: {data or 'none'}. Trained modules by block: {parts}"
