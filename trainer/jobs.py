"""The training queue: ordered jobs, persisted under ``jsons/``, run one at a time in a worker thread.

A :class:`JobQueue` is an object (no module state): the UI, the Web-UI tab and the tests each make
their own. Jobs are added with their validated :class:`~trainer.config.Config`; a save name that is
already queued or running is refused. The worker runs the queued jobs in order; a job that fails
(bad data, a missing model, an exception anywhere) is marked failed with its message and the next
one starts. Every job keeps its result (message, files, CSV, steps). :meth:`JobQueue.stop` stops the
running job at its next step: by default the engine saves what was trained (``<name>_<N>steps``) and the
queue pauses, the jobs still queued waiting for :meth:`JobQueue.start`; ``save=False`` cancels the job
without saving it (status ``cancelled``), ``go_on=True`` lets the queue go on with the next job, as the
original did.

The queue does not know where models come from: a *runner* does. :func:`host_runner` makes one from a
host (:class:`StandaloneHost` here, ``trainer.host.webui.WebUIHost`` inside the Web-UI).
"""
from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import shutil
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from .atomic import atomic_write_text
from .config import Config, SettingError

log = logging.getLogger("traintrain.jobs")

QUEUED, RUNNING, DONE, STOPPED, FAILED = "queued", "running", "done", "stopped", "failed"
CANCELLED = "cancelled"  # stopped with "Cancel without saving": nothing of the stopped pass was written
FINISHED = (DONE, STOPPED, CANCELLED, FAILED)
ACTIVE = (QUEUED, RUNNING)
STORE_NAME = "queue.json"
LOCK_NAME = "queue.lock"
FILES_DIR = "queue_files"
TINY_MODEL = ""  # Config.model "" = the tiny built-in model


class QueueError(ValueError):
    """A queue request that cannot be done (duplicate name, unknown id, deleting the running job)."""


class QueueLockedError(QueueError):
    """Another live process owns the queue of this folder."""


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT on Windows
        import ctypes

        handle = ctypes.windll.kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        code = ctypes.c_ulong()
        ok = ctypes.windll.kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        ctypes.windll.kernel32.CloseHandle(handle)
        return bool(ok) and code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _lock_owner(lock: Path) -> int | None:
    try:
        return int(lock.read_text(encoding="utf-8").split()[0])
    except (OSError, ValueError, IndexError):
        return None


_HELD_LOCKS: set = set()  # lock files this process owns (one owner per process, however many JobQueues)


def acquire_queue_lock(store_dir: Path) -> Path:
    """Make this process the owner of ``store_dir``'s queue: two apps on one workdir would each rewrite
    queue.json whole, lose each other's jobs, reuse ids and train at once. A lock left by a dead process is
    taken over. Raises QueueLockedError naming the folder and the owner's pid."""
    store_dir.mkdir(parents=True, exist_ok=True)
    lock = store_dir / LOCK_NAME
    me = os.getpid()
    for _ in range(5):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _lock_owner(lock)
            if owner == me:
                return lock
            if owner is not None and _pid_alive(owner):
                raise QueueLockedError(
                    f"the queue in {store_dir} is owned by another TrainTrain process (pid {owner}); one workdir "
                    f"has one queue: stop that process or use another --workdir (the lock file is {lock})") from None
            # stale (dead pid, or unreadable): take it over; the rename and the re-read settle a race
            tmp = lock.with_name(f"{LOCK_NAME}.{me}.tmp")
            tmp.write_text(f"{me}\n", encoding="utf-8")
            os.replace(tmp, lock)
            if _lock_owner(lock) == me:
                break
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f"{me}\n")
        break
    else:
        raise QueueLockedError(f"the queue in {store_dir}: could not take the lock file {lock}")
    if lock not in _HELD_LOCKS:
        _HELD_LOCKS.add(lock)
        atexit.register(_release_lock, lock, me)
    return lock


def _release_lock(lock: Path, pid: int) -> None:
    if _lock_owner(lock) == pid:
        with contextlib.suppress(OSError):
            lock.unlink()
    _HELD_LOCKS.discard(lock)


_JOB_TYPES = {"id": int, "name": str, "mode": str, "settings": dict, "status": str, "message": str, "files": list,
              "csv": str, "steps": int, "added_at": (int, float), "started_at": (int, float, type(None)),
              "finished_at": (int, float, type(None))}


@dataclass
class Job:
    id: int
    name: str
    mode: str
    settings: dict  # Config.to_dict(): the preset format, so a job file is also a preset
    status: str = QUEUED
    message: str = ""
    files: list = field(default_factory=list)
    csv: str = ""
    steps: int = 0
    added_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None

    def config(self) -> Config:
        return Config.from_dict(self.settings)

    @classmethod
    def from_json(cls, d: dict) -> "Job":
        """A job from its JSON; ValueError naming the field and value when a type is wrong (a hand-edited
        or foreign queue file must not stop the app later, e.g. in max() over the ids)."""
        if not isinstance(d, dict):
            raise ValueError(f"a job is {type(d).__name__} {d!r:.80}, not an object")
        for k in ("id", "name", "mode", "settings"):
            if k not in d:
                raise ValueError(f"a job has no {k!r}")
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        for k, v in known.items():
            want = _JOB_TYPES[k]
            if isinstance(v, bool) and want is not str or not isinstance(v, want):
                raise ValueError(f"job field {k!r} is {v!r:.80} ({type(v).__name__})")
        if known.get("status", QUEUED) not in (QUEUED, RUNNING, *FINISHED):
            raise ValueError(f"job field 'status' is {known['status']!r:.80}")
        return cls(**known)


@dataclass
class LiveProgress:
    """What the running job reported last, plus the loss history of its current pass (for the live plot)."""
    job_id: int
    name: str
    phase: str = "prepare"
    step: int = 0
    total: int = 0
    loss: float | None = None
    loss_avg: float | None = None
    lrs: tuple = ()
    sec_per_it: float | None = None
    eta_s: float | None = None
    message: str = ""
    pass_name: str = ""
    history: list = field(default_factory=list)  # [(step, loss, smooth, lrs)] of the current pass
    sample_s: float = 0.0  # time spent drawing sample grids so far
    updated: float = 0.0


class RunControl:
    """Handed to a runner: progress and log sinks, and the link between Stop and the TrainingRun. The stop
    request belongs to this job, not to the queue: with "go on" the next job starts unstopped."""

    def __init__(self, queue: "JobQueue", job: Job):
        self._queue = queue
        self.job = job
        self._run = None
        self._lock = threading.Lock()
        self._stop = False
        self._cancel = False

    @property
    def stop_requested(self) -> bool:
        return self._stop

    @property
    def cancelled(self) -> bool:
        """Stopped with "Cancel without saving" (sticky: a later plain stop does not bring the save back)."""
        return self._cancel

    def attach(self, run) -> None:
        """Register the job's TrainingRun; a Stop pressed before this point stops it at once."""
        with self._lock:
            self._run = run
        if self._stop:
            self._stop_run(run)

    def stop(self, save: bool = True) -> None:
        with self._lock:
            self._stop = True
            self._cancel = self._cancel or not save
            run = self._run
        if run is not None:
            self._stop_run(run)

    def _stop_run(self, run) -> None:
        # a plain stop() for a save: runs that know no cancel (the CLI's, a host's) keep working
        if self._cancel:
            run.stop(save=False)
        else:
            run.stop()

    def progress(self, p) -> None:
        try:
            self._queue._on_progress(self.job, p)
        except Exception as e:  # noqa: BLE001 - the live view is bookkeeping: it never fails the training
            self._queue.console(f"TrainTrain: progress of job {self.job.id} not shown ({type(e).__name__}: {e})")

    def log(self, message: str) -> None:
        try:
            self._queue._on_log(self.job, message)
        except Exception:  # noqa: BLE001 - a log line is bookkeeping
            pass


class Runner(Protocol):
    def __call__(self, cfg: Config, control: RunControl) -> Any:  # -> RunResult-like
        ...


def _atomic_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False))


class JobQueue:
    """Ordered, persisted training jobs, run one at a time by a worker thread."""

    def __init__(self, store_dir: Path | str, runner: Runner, *, on_change: Callable[[], None] | None = None,
                 console: Callable[[str], None] | None = None, lock: bool = True):
        self.store_dir = Path(store_dir)
        self.path = self.store_dir / STORE_NAME
        self.runner = runner
        self.on_change = on_change
        self._console = console or (lambda m: log.info(m))
        #: what the user should know about the queue file (set aside, not writable); the tab shows it
        self.notice = ""
        if lock:
            try:
                acquire_queue_lock(self.store_dir)
            except QueueLockedError:
                raise
            except OSError as e:  # a read-only or full jsons/: the queue still works, unguarded; say so
                self.notice = (f"The queue lock {self.store_dir / LOCK_NAME} could not be written ({e}); a second "
                               f"app on this folder would not be noticed")
        self._lock = threading.RLock()
        self._jobs: list[Job] = []
        self._next_id = 1
        self._version = 0
        self._worker: threading.Thread | None = None
        self._control: RunControl | None = None
        self._pause = threading.Event()  # set by Stop (unless "go on"): no further job starts
        self._live: LiveProgress | None = None
        self._log_lines: list[str] = []
        self._log_job: int | None = None
        self._load()

    def console(self, message: str) -> None:
        """A line for the console; a broken sink (closed stream, failing logger) never stops the queue."""
        try:
            self._console(message)
        except Exception:  # noqa: BLE001 - the console is bookkeeping
            with contextlib.suppress(Exception):
                import sys

                print(message, file=sys.__stderr__, flush=True)

    # --- persistence ---------------------------------------------------------------------
    def _load(self) -> None:
        if not self.path.exists():
            return
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or not isinstance(data.get("jobs", []), list):
                raise ValueError("not a queue object with a list of jobs")
            jobs = [Job.from_json(d) for d in data.get("jobs", [])]
            next_id = data.get("next_id", 1)
            if isinstance(next_id, bool) or not isinstance(next_id, int):
                raise ValueError(f"next_id is {next_id!r:.80}")
        except (OSError, ValueError, TypeError, AttributeError) as e:
            # Keep the unreadable file for the user; start with an empty queue.
            backup = self.path.with_name(f"queue.broken-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json")
            try:
                os.replace(self.path, backup)
                where = f"it was set aside as {backup}"
            except OSError as e2:
                where = f"it could not be set aside ({e2}); it will be replaced when the queue changes"
            self.notice = " ".join(filter(None, [
                self.notice, f"The queue file {self.path} could not be read ({e}); {where}. The queue starts empty."]))
            self.console(self.notice)
            return
        for j in jobs:
            if j.status == RUNNING:  # the app stopped while it ran: nothing of it was saved by us
                j.status = FAILED
                j.message = "Interrupted: the app stopped while this job was running; add it again to rerun it"
                j.finished_at = j.finished_at or time.time()
        self._jobs = jobs
        self._next_id = max([next_id] + [j.id + 1 for j in jobs])
        self._try_save()

    def _save(self) -> None:
        _atomic_json(self.path, {"version": 1, "next_id": self._next_id,
                                 "jobs": [asdict(j) for j in self._jobs]})

    def _try_save(self) -> str:
        """Save, or say why not ("" when saved): the worker and start-up go on without the file."""
        try:
            self._save()
        except Exception as e:  # noqa: BLE001 - disk full, read-only folder, a bad value in a job
            why = f"could not save the queue file {self.path} ({type(e).__name__}: {e})"
            self.console(f"TrainTrain: {why}")
            return why
        return ""

    def _notify(self) -> None:
        self._version += 1
        if self.on_change:
            with contextlib.suppress(Exception):
                self.on_change()

    def _changed(self) -> None:
        """A change asked for by the user: saved, or undone by the caller (QueueError)."""
        self._save()
        self._notify()

    def _commit(self, undo: Callable[[], None], what: str) -> None:
        """Persist a change; when that fails undo it and refuse, so memory and file never disagree."""
        try:
            self._changed()
        except Exception as e:  # noqa: BLE001
            undo()
            raise QueueError(f"{what}: could not save the queue file {self.path} ({type(e).__name__}: {e}); "
                             f"nothing was changed. Free disk space or make {self.store_dir} writable") from None

    # --- views -----------------------------------------------------------------------------
    @property
    def version(self) -> int:
        """Grows on every change of the job list (not on progress)."""
        return self._version

    def jobs(self) -> list[Job]:
        with self._lock:
            return [Job.from_json(asdict(j)) for j in self._jobs]

    def get(self, job_id: int) -> Job:
        with self._lock:
            for j in self._jobs:
                if j.id == int(job_id):
                    return Job.from_json(asdict(j))
        raise QueueError(f"job {job_id}: no such job in the queue")

    @property
    def running(self) -> Job | None:
        with self._lock:
            for j in self._jobs:
                if j.status == RUNNING:
                    return Job.from_json(asdict(j))
        return None

    @property
    def busy(self) -> bool:
        w = self._worker
        return w is not None and w.is_alive()

    def pending(self) -> list[Job]:
        return [j for j in self.jobs() if j.status == QUEUED]

    def live(self) -> LiveProgress | None:
        """A copy of the running job's last progress report (None when nothing runs)."""
        with self._lock:
            if self._live is None:
                return None
            lp = LiveProgress(**{k: getattr(self._live, k) for k in LiveProgress.__dataclass_fields__})
            lp.history = list(self._live.history)
            return lp

    def log_lines(self, last: int = 50) -> list[str]:
        with self._lock:
            return list(self._log_lines[-last:])

    # --- changes ---------------------------------------------------------------------------
    def add(self, cfg: Config, files: dict[str, str | Path] | None = None) -> Job:
        """Queue a job. ``files`` = {"original_image": path, ...}: copied into the queue's folder so the
        job still finds them after a restart (upload folders are temporary). Raises QueueError when
        the save name is already queued or running."""
        name = cfg.save_lora_name
        with self._lock:
            for j in self._jobs:
                if j.status in ACTIVE and j.name == name:
                    raise QueueError(f'save_lora_name: "{name}" is already {j.status} (job {j.id}); '
                                     f"choose another name or delete job {j.id}")
            job_id = self._next_id
            if files:
                try:
                    cfg = cfg.replace(**self._keep_files(job_id, files))
                except OSError:
                    shutil.rmtree(self.store_dir / FILES_DIR / str(job_id), ignore_errors=True)
                    raise
            job = Job(id=job_id, name=name, mode=cfg.mode, settings=cfg.to_dict(), added_at=time.time())
            self._jobs.append(job)
            self._next_id += 1

            def undo():
                self._jobs.remove(job)
                self._next_id = job_id
                shutil.rmtree(self.store_dir / FILES_DIR / str(job_id), ignore_errors=True)

            self._commit(undo, f"{name} was not added")
            return Job.from_json(asdict(job))

    def _keep_files(self, job_id: int, files: dict[str, str | Path]) -> dict[str, str]:
        out = {}
        folder = self.store_dir / FILES_DIR / str(job_id)
        for attr, src in files.items():
            if not src:
                continue
            src = Path(src)
            folder.mkdir(parents=True, exist_ok=True)
            dst = folder / f"{attr}{src.suffix.lower()}"
            tmp = dst.with_name(dst.name + ".tmp")
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
            out[attr] = str(dst.resolve())
        return out

    def delete(self, job_id: int | str) -> Job:
        """Remove a job (queued or finished) by id; the running job must be stopped first."""
        try:
            job_id = int(str(job_id).strip().lstrip("#").split()[0].rstrip(":"))
        except (ValueError, IndexError):
            raise QueueError(f"delete: {str(job_id)!r} is not a job id") from None
        with self._lock:
            for i, j in enumerate(self._jobs):
                if j.id == job_id:
                    if j.status == RUNNING:
                        raise QueueError(f"job {job_id} ({j.name}) is running: press Stop first")
                    del self._jobs[i]
                    self._commit(lambda: self._jobs.insert(i, j), f"job {job_id} was not deleted")
                    shutil.rmtree(self.store_dir / FILES_DIR / str(job_id), ignore_errors=True)
                    return j
        raise QueueError(f"job {job_id}: no such job in the queue")

    def clear_finished(self) -> int:
        with self._lock:
            before = list(self._jobs)
            keep = [j for j in self._jobs if j.status in ACTIVE]
            gone = [j for j in self._jobs if j.status not in ACTIVE]
            if not gone:
                return 0
            self._jobs = keep

            def undo():
                self._jobs = before

            self._commit(undo, "the finished jobs were not removed")
            for j in gone:
                shutil.rmtree(self.store_dir / FILES_DIR / str(j.id), ignore_errors=True)
            return len(gone)

    # --- running ---------------------------------------------------------------------------
    def start(self) -> bool:
        """Run the queued jobs (in a worker thread). False when already running or nothing is queued."""
        with self._lock:
            if self.busy or not any(j.status == QUEUED for j in self._jobs):
                return False
            self._pause.clear()
            self._worker = threading.Thread(target=self._work, name="traintrain-queue", daemon=True)
            self._worker.start()
            return True

    def stop(self, save: bool = True, go_on: bool = False) -> str:
        """Stop the running job at its next step. ``save``: what was trained is saved as ``<name>_<N>steps``
        (else the job is cancelled: nothing of it is saved). ``go_on``: the queue goes on with the next job
        (else it pauses until :meth:`start`). The last press decides both."""
        with self._lock:
            if not self.busy:
                return "Nothing is training"
            if go_on:
                self._pause.clear()
            else:
                self._pause.set()
            control = self._control
            running = next((j for j in self._jobs if j.status == RUNNING), None)
            waiting = [j for j in self._jobs if j.status == QUEUED]
        if control is not None:
            control.stop(save=save)
        what = f"{running.name} (job {running.id})" if running else "the queue"
        if save:
            head = f"Stopping {what} at the next step; what was trained will be saved"
        else:
            head = f"Cancelling {what} at the next step; nothing of it will be saved"
        if not waiting:
            tail = ""
        elif go_on:
            tail = f"; then the queue goes on with {waiting[0].name} (job {waiting[0].id})"
        else:
            tail = f"; the queue pauses: {len(waiting)} queued job(s) wait for Run Queue"
        return head + tail

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the worker is idle. True if it is."""
        w = self._worker
        if w is not None:
            w.join(timeout)
        return not self.busy

    def _next_job(self) -> Job | None:
        with self._lock:
            if self._pause.is_set():
                return None
            for j in self._jobs:
                if j.status == QUEUED:
                    # the control exists from the moment the job is running, so a Stop can always reach it
                    self._control = RunControl(self, j)
                    j.status = RUNNING
                    j.started_at = time.time()
                    j.message = "Starting"
                    self._live = LiveProgress(job_id=j.id, name=j.name, updated=time.time())
                    self._log_lines = []
                    self._log_job = j.id
                    why = self._try_save()
                    self._notify()
                    if why:
                        # the queue file cannot follow: fail this job with the reason and pause the rest
                        # (they would fail the same way) until the user fixes the folder and presses Run Queue
                        self._pause.set()
                        self._finish(j.id, FAILED, f"Not started: {why}", [], "", 0)
                        self.console(f"TrainTrain: job {j.id} ({j.name}) failed: Not started: {why}")
                        return None
                    return j
        return None

    def _work(self) -> None:
        try:
            while True:
                job = self._next_job()
                if job is None:
                    return
                self._run_one(job)
        except BaseException as e:  # noqa: BLE001 - the queue's own bookkeeping: no job may stay "running"
            why = f"Error in the queue itself: {type(e).__name__}: {e}"
            with contextlib.suppress(BaseException):
                self.console(f"TrainTrain: {why}\n{traceback.format_exc()}")
            with self._lock:
                for j in self._jobs:
                    if j.status == RUNNING:
                        self._finish(j.id, FAILED, why, j.files, j.csv, j.steps)
                self._control = None
                self._live = None

    def _run_one(self, job: Job) -> None:
        with self._lock:
            control = self._control if self._control is not None and self._control.job.id == job.id else None
            if control is None:
                control = self._control = RunControl(self, job)
        self.console(f"TrainTrain: job {job.id} ({job.name}, {job.mode}) started")
        status, message, files, csv, steps = FAILED, "", [], "", 0
        capture = _LogCapture(self, job)
        try:
            cfg = job.config()
            result = self.runner(cfg, control)
            files = [str(f) for f in getattr(result, "files", [])]
            csv = str(result.csv) if getattr(result, "csv", None) else ""
            steps = int(getattr(result, "steps", 0) or 0)
            message = str(result.message)
            if getattr(result, "stopped", False):
                status = CANCELLED if control.cancelled else STOPPED
            else:
                status = DONE if result.ok else FAILED
        except SettingError as e:
            message = str(e)
        except Exception as e:  # one failing job never stops the rest
            message = f"Error: {e}" if str(e) else f"Error: {type(e).__name__}"
            tb = traceback.format_exc()
            self._add_log(job, tb.rstrip())
            self.console(f"TrainTrain: job {job.id} ({job.name}) failed:\n{tb}")
        finally:
            capture.close()
            self._finish(job.id, status, message, files, csv, steps)
        self.console(f"TrainTrain: job {job.id} ({job.name}) {status}: {message}")

    def _finish(self, job_id: int, status: str, message: str, files: list, csv: str, steps: int) -> None:
        """Record a job's end in memory first (it can not fail), then try to save it."""
        with self._lock:
            for j in self._jobs:
                if j.id == job_id:
                    j.status, j.message, j.files, j.csv, j.steps = status, message, list(files), csv, steps
                    j.finished_at = time.time()
            self._control = None
            self._live = None
            why = self._try_save()
            if why and not message.startswith("Not started"):
                for j in self._jobs:
                    if j.id == job_id:
                        j.message = f"{message} (the queue file was not updated: {why})"
            self._notify()

    # --- callbacks from the running job -------------------------------------------------------
    def _on_progress(self, job: Job, p) -> None:
        with self._lock:
            lp = self._live
            if lp is None or lp.job_id != job.id:
                return
            if p.phase == "train":
                pass_name = p.message or job.name
                if pass_name != lp.pass_name or (lp.history and p.step <= lp.history[-1][0]):
                    lp.history = []
                lp.pass_name = pass_name
                lp.history.append((p.step, p.loss, p.loss_avg, tuple(p.lrs)))
                lp.step, lp.total, lp.loss, lp.loss_avg = p.step, p.total, p.loss, p.loss_avg
                lp.lrs, lp.sec_per_it, lp.eta_s = tuple(p.lrs), p.sec_per_it, p.eta_s
                lp.sample_s = getattr(p, "sample_s", 0.0)
            else:
                lp.message = p.message
            lp.phase = p.phase
            lp.updated = time.time()

    def _on_log(self, job: Job, message: str) -> None:
        self._add_log(job, message)
        self.console(message)

    def _add_log(self, job: Job, message: str) -> None:
        with self._lock:
            if self._log_job == job.id:
                self._log_lines.append(message)
                del self._log_lines[:-200]

    def log_job(self) -> int | None:
        """The id of the job whose lines :meth:`log_lines` holds (the running or the last one)."""
        return self._log_job


class _LogCapture(logging.Handler):
    """Warnings the data code logs (skipped images, long captions) while a job runs in the worker thread,
    added to the job's log lines so the tab shows them (the console gets them through logging itself)."""

    def __init__(self, queue: JobQueue, job: Job):
        super().__init__(logging.WARNING)
        self._queue, self._job, self._thread = queue, job, threading.get_ident()
        self._logger = logging.getLogger("trainer")
        self._logger.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self._thread:
            with contextlib.suppress(Exception):
                self._queue._add_log(self._job, record.getMessage())

    def close(self) -> None:
        self._logger.removeHandler(self)
        super().close()


# ------------------------------------------------------------------------------------------
# Hosts and the runner
# ------------------------------------------------------------------------------------------

class StandaloneHost:
    """Outside the Web-UI: models are files under ``model_dir`` (or the tiny built-in model);
    LoRAs go to ``lora_dir`` (default ``workdir/output``), logs, jsons and cache under ``workdir``."""

    name = "standalone"
    TINY_LABEL = "tiny-sd1 (built-in test model)"
    embeddings_dir = None  # a folder of textual-inversion embeddings (.safetensors), `ui --embeddings-dir`

    def __init__(self, workdir: Path | str = ".", *, model_dir: Path | str | None = None,
                 lora_dir: Path | str | None = None, vae_dir: Path | str | None = None, device=None):
        from .engine import OutputPaths

        self.workdir = Path(workdir).resolve()
        self.model_dir = Path(model_dir).resolve() if model_dir else None
        self.vae_dir = Path(vae_dir).resolve() if vae_dir else self.model_dir
        self._paths = OutputPaths.under(self.workdir)
        if lora_dir:
            self._paths.lora_dir = Path(lora_dir).resolve()
        self.device = device

    def paths(self):
        return self._paths

    def model_choices(self) -> list[str]:
        from .host.standalone import list_models

        return [self.TINY_LABEL] + list_models(self.model_dir)

    def vae_choices(self) -> list[str]:
        from .host.standalone import MODEL_EXTENSIONS

        found = []
        if self.vae_dir and self.vae_dir.is_dir():
            found = sorted(str(p.relative_to(self.vae_dir)) for p in self.vae_dir.rglob("*")
                           if p.is_file() and p.suffix.lower() in MODEL_EXTENSIONS and "vae" in p.name.lower())
        return ["None"] + found

    def default_model(self) -> str:
        """The first real model of ``model_dir``; the tiny test model only when there is none."""
        real = [m for m in self.model_choices() if m != self.TINY_LABEL]
        return real[0] if real else self.TINY_LABEL

    def model_value(self, label: str | None) -> str:
        """Dropdown label -> Config.model."""
        return TINY_MODEL if not label or label == self.TINY_LABEL else label

    def model_label(self, value: str | None) -> str:
        return self.TINY_LABEL if not value else value

    def model_family(self, label: str | None):
        """The family of a Model-list entry from its file's header only (the tab's block list); None when it
        cannot be told cheaply (a .ckpt, a missing file)."""
        from .models.families import Family
        from .models.loading import peek_family

        if not label or label == self.TINY_LABEL:
            return Family.SD1  # the built-in test model
        try:
            from .host.standalone import resolve_model_path

            path = resolve_model_path(label, self.model_dir)
        except ValueError:  # HostError: not found
            return None
        return peek_family(path) if path is not None else None

    @contextlib.contextmanager
    def session(self, cfg: Config, control: RunControl) -> Iterator[Any]:
        from .host.standalone import load_components
        from .models.embeddings import attach_dir

        yield attach_dir(load_components(cfg.model or None, cfg.vae or None, model_dir=self.model_dir,
                                         vae_dir=self.vae_dir, v_pred=cfg.model_v_pred or None),
                         self.embeddings_dir, control.log)

    def interrupted(self) -> bool:
        return False

    def on_progress(self, p) -> None:
        pass


def host_runner(host) -> Runner:
    """A runner that loads the job's model through ``host`` and trains it with the engine."""

    def run(cfg: Config, control: RunControl):
        from .engine import RunResult, TrainingRun, write_settings_json
        from .preflight import check_inputs

        paths = host.paths()
        try:
            mode = check_inputs(cfg)  # bad inputs and settings are reported before the model loads
        except ValueError as e:
            return RunResult(False, str(e))
        from .engine import output_problem

        problem = output_problem(cfg, paths)  # every folder the run writes to, before the model loads
        if problem:
            return RunResult(False, problem)
        if cfg.save_as_json:
            path = write_settings_json(cfg, paths, time.time())
            control.log(f"Settings saved to {path}")
        if control.stop_requested:
            what = "Cancelled" if getattr(control, "cancelled", False) else "Stopped"
            return RunResult(False, f"{what} before training began; nothing was saved", stopped=True)

        def progress(p):
            control.progress(p)
            host.on_progress(p)
            if host.interrupted():
                control.stop()

        try:
            with host.session(cfg, control) as components:
                run = TrainingRun(cfg, components, paths, on_progress=progress, log=control.log,
                                  device=getattr(host, "device", None))
                control.attach(run)
                watcher = _InterruptWatcher(host, run)
                try:
                    return run.run(mode)
                finally:
                    watcher.close()
        except ValueError as e:  # bad input found while preparing: data, model files, settings
            return RunResult(False, str(e), stopped=control.stop_requested)

    return run


class _InterruptWatcher:
    """Polls ``host.interrupted()`` (the Web-UI's Interrupt button) while a run prepares or trains."""

    def __init__(self, host, run, every: float = 0.5):
        self._done = threading.Event()
        self._thread = None
        if type(host).interrupted is StandaloneHost.interrupted:
            return
        self._thread = threading.Thread(target=self._poll, args=(host, run, every), daemon=True)
        self._thread.start()

    def _poll(self, host, run, every):
        while not self._done.wait(every):
            with contextlib.suppress(Exception):
                if host.interrupted():
                    run.stop()
                    return

    def close(self):
        self._done.set()
