"""trainer/jobs.py: the queue as an object: order, persistence (atomic, across a new JobQueue), duplicate
names, delete by id, a failing job never stopping the rest, each job's result, Stop / Cancel pausing the queue
or going on with the next job."""
import json
import threading
import time
from pathlib import Path

import pytest

from trainer.config import Config
from trainer.engine import RunResult
from trainer.jobs import CANCELLED, DONE, FAILED, QUEUED, RUNNING, STOPPED, JobQueue, QueueError


def cfg(name, **kw):
    return Config.defaults("LoRA").replace(save_lora_name=name, **kw)


class FakeRun:
    """Stands in for a TrainingRun: counts steps until stopped (or until `steps`)."""

    def __init__(self, steps):
        self.steps = steps
        self.stopped = threading.Event()
        self.save = True

    def stop(self, save=True):
        self.save = self.save and save  # as the engine: a cancel sticks
        self.stopped.set()


def runner_for(outcomes=None, step_time=0.0, steps=3, started=None, hold_at=None):
    """A runner whose result depends on the job name: "fail*" raises, "bad*" returns ok=False.
    ``hold_at=(step, event)``: after reporting that step the job sets the event and waits for Stop, so a test
    acts on a job that is certainly still running (no race with a fast machine finishing first)."""
    order = []

    def run(c, control):
        order.append(c.save_lora_name)
        if started is not None:
            started.set()
        if c.save_lora_name.startswith("fail"):
            raise RuntimeError("CUDA exploded")
        if c.save_lora_name.startswith("bad"):
            return RunResult(False, "lora_data_directory: no images")
        n = steps if c.save_lora_name in ("long", "live") else 3
        fake = FakeRun(n)
        control.attach(fake)
        done = 0
        for i in range(1, n + 1):
            if fake.stopped.is_set():
                break
            time.sleep(step_time)
            done = i
            from trainer.engine import Progress

            control.progress(Progress("train", i, n, 0.5, 0.5, (1e-4,), step_time, 0.0, c.save_lora_name))
            if hold_at and i == hold_at[0] and not hold_at[1].is_set():  # the first job that gets there
                hold_at[1].set()
                fake.stopped.wait(30)
        if fake.stopped.is_set() and not fake.save:
            return RunResult(False, f"Cancelled at step {done}; nothing was saved", [], None, done, True)
        if fake.stopped.is_set():
            return RunResult(True, f"Stopped at step {done}", [Path(f"/out/{c.save_lora_name}_{done}steps.safetensors")],
                             None, done, True)
        return RunResult(True, "Saved", [Path(f"/out/{c.save_lora_name}.safetensors")], Path("/logs/x.csv"), n)

    run.order = order
    return run


def test_jobs_run_in_order_and_keep_their_results(tmp_path):
    run = runner_for()
    q = JobQueue(tmp_path, run)
    for n in ("a", "b", "c"):
        q.add(cfg(n))
    assert [j.status for j in q.jobs()] == [QUEUED] * 3
    assert q.start()
    assert q.wait(30)
    assert run.order == ["a", "b", "c"]
    jobs = q.jobs()
    assert [j.status for j in jobs] == [DONE] * 3
    assert jobs[0].files == ["/out/a.safetensors"] and jobs[0].csv == "/logs/x.csv" and jobs[0].steps == 3
    assert all(j.started_at and j.finished_at >= j.started_at for j in jobs)


def test_a_failing_job_in_a_queue_of_three_does_not_stop_the_others(tmp_path):
    run = runner_for()
    q = JobQueue(tmp_path, run, console=lambda m: None)
    for n in ("first", "fail_middle", "bad_third", "last"):
        q.add(cfg(n))
    q.start()
    assert q.wait(30)
    by_name = {j.name: j for j in q.jobs()}
    assert run.order == ["first", "fail_middle", "bad_third", "last"]
    assert by_name["first"].status == DONE and by_name["last"].status == DONE
    assert by_name["fail_middle"].status == FAILED and "CUDA exploded" in by_name["fail_middle"].message
    assert by_name["bad_third"].status == FAILED and "no images" in by_name["bad_third"].message


def test_duplicate_save_names_are_refused_while_queued_or_running(tmp_path):
    q = JobQueue(tmp_path, runner_for())
    q.add(cfg("same"))
    with pytest.raises(QueueError, match='save_lora_name: "same" is already queued'):
        q.add(cfg("same"))
    q.add(cfg("other"))
    q.start()
    assert q.wait(30)
    q.add(cfg("same"))  # the first one is done: the name is free again (the engine guards the file)
    assert [j.name for j in q.jobs()] == ["same", "other", "same"]


def test_delete_by_id_also_the_first(tmp_path):
    q = JobQueue(tmp_path, runner_for())
    a, b, c = (q.add(cfg(n)) for n in "abc")
    assert q.delete(a.id).name == "a"  # index 0 (the original could not delete it, bug #1)
    assert q.delete(f"{c.id}: c (queued)").name == "c"  # the UI's choice label works too
    assert [j.name for j in q.jobs()] == ["b"]
    with pytest.raises(QueueError, match="no such job"):
        q.delete(a.id)
    with pytest.raises(QueueError, match="not a job id"):
        q.delete("x")


def test_the_queue_survives_a_restart(tmp_path):
    q = JobQueue(tmp_path, runner_for())
    q.add(cfg("one", train_iterations=7))
    q.add(cfg("two"))
    q.delete(q.jobs()[1].id)
    q.add(cfg("three", network_rank=4))
    data = json.loads((tmp_path / "queue.json").read_text(encoding="utf-8"))
    assert [j["name"] for j in data["jobs"]] == ["one", "three"]
    assert not list(tmp_path.glob("*.tmp"))  # written atomically
    q2 = JobQueue(tmp_path, runner_for())
    jobs = q2.jobs()
    assert [j.name for j in jobs] == ["one", "three"] and [j.status for j in jobs] == [QUEUED, QUEUED]
    assert jobs[0].config().train_iterations == 7 and jobs[1].config().network_rank == 4
    assert q2.add(cfg("four")).id == 4  # ids are never reused
    q2.start()
    assert q2.wait(30)
    assert [j.status for j in JobQueue(tmp_path, runner_for()).jobs()] == [DONE] * 3


def test_a_job_running_when_the_app_died_is_marked_failed_not_rerun(tmp_path):
    q = JobQueue(tmp_path, runner_for())
    q.add(cfg("crashed"))
    data = json.loads((tmp_path / "queue.json").read_text(encoding="utf-8"))
    data["jobs"][0]["status"] = RUNNING
    (tmp_path / "queue.json").write_text(json.dumps(data), encoding="utf-8")
    job = JobQueue(tmp_path, runner_for()).jobs()[0]
    assert job.status == FAILED and "Interrupted" in job.message


def test_an_unreadable_queue_file_is_kept_aside(tmp_path):
    (tmp_path / "queue.json").write_text("{not json", encoding="utf-8")
    lines = []
    q = JobQueue(tmp_path, runner_for(), console=lines.append)
    assert q.jobs() == [] and "could not be read" in lines[0]
    assert list(tmp_path.glob("queue.broken-*.json"))


def test_input_files_are_copied_into_the_queue_folder(tmp_path):
    img = tmp_path / "upload" / "Tmp123.PNG"
    img.parent.mkdir()
    img.write_bytes(b"png")
    q = JobQueue(tmp_path / "jsons", runner_for())
    job = q.add(Config.defaults("ADDifT").replace(save_lora_name="pair"), {"original_image": img, "target_image": img})
    kept = job.config().original_image
    assert Path(kept).read_bytes() == b"png" and Path(kept).parent == (tmp_path / "jsons" / "queue_files" / "1")
    assert Path(kept).name == "original_image.png"
    img.unlink()  # the upload folder is temporary
    assert Path(JobQueue(tmp_path / "jsons", runner_for()).jobs()[0].config().target_image).is_file()
    q.delete(job.id)
    assert not (tmp_path / "jsons" / "queue_files" / "1").exists()


def test_stop_stops_the_running_job_and_pauses_the_queue(tmp_path):
    at_step_2 = threading.Event()
    run = runner_for(steps=1000, hold_at=(2, at_step_2))
    q = JobQueue(tmp_path, run)
    q.add(cfg("long"))
    q.add(cfg("next"))
    q.start()
    assert at_step_2.wait(10)
    assert q.live().step == 2
    msg = q.stop()
    assert "Stopping long (job 1)" in msg and "1 queued job(s) wait" in msg
    assert q.wait(30)
    jobs = q.jobs()
    assert jobs[0].status == STOPPED and jobs[0].steps == 2 and jobs[0].files[0].endswith("long_2steps.safetensors")
    assert jobs[1].status == QUEUED  # paused, not run
    assert q.stop() == "Nothing is training"
    assert q.start() and q.wait(120)
    assert q.jobs()[1].status == DONE


def held_queue(tmp_path, *names):
    """A queue of ``names`` whose first job is held at step 2 (certainly running when the test acts)."""
    at_step_2 = threading.Event()
    run = runner_for(steps=1000, hold_at=(2, at_step_2))
    q = JobQueue(tmp_path, run)
    for n in names:
        q.add(cfg(n))
    q.start()
    assert at_step_2.wait(10)
    return q, run


def test_stop_and_go_on_saves_the_job_and_the_queue_runs_the_next(tmp_path):
    q, run = held_queue(tmp_path, "long", "next", "third")
    msg = q.stop(save=True, go_on=True)
    assert msg == ("Stopping long (job 1) at the next step; what was trained will be saved; then the queue goes "
                   "on with next (job 2)")
    assert q.wait(30)
    jobs = q.jobs()
    assert jobs[0].status == STOPPED and jobs[0].files[0].endswith("long_2steps.safetensors")
    # the stop was the first job's only: the next ones train to their end
    assert [(j.name, j.status) for j in jobs[1:]] == [("next", DONE), ("third", DONE)]
    assert jobs[1].files == ["/out/next.safetensors"] and run.order == ["long", "next", "third"]


def test_cancel_saves_nothing_marks_the_job_cancelled_and_pauses_the_queue(tmp_path):
    q, run = held_queue(tmp_path, "long", "next")
    msg = q.stop(save=False)
    assert msg == ("Cancelling long (job 1) at the next step; nothing of it will be saved; the queue pauses: "
                   "1 queued job(s) wait for Run Queue")
    assert q.wait(30)
    first, second = q.jobs()
    assert first.status == CANCELLED and first.files == [] and first.steps == 2
    assert first.message == "Cancelled at step 2; nothing was saved"
    assert second.status == QUEUED and run.order == ["long"]
    # a cancelled job is a finished one: it survives a restart as such and is cleared with the finished
    assert [j.status for j in JobQueue(tmp_path, runner_for()).jobs()] == [CANCELLED, QUEUED]


def test_cancel_and_go_on_runs_the_next_job(tmp_path):
    q, run = held_queue(tmp_path, "long", "next")
    msg = q.stop(save=False, go_on=True)
    assert msg.startswith("Cancelling long (job 1)") and msg.endswith("then the queue goes on with next (job 2)")
    assert q.wait(30)
    assert [(j.name, j.status) for j in q.jobs()] == [("long", CANCELLED), ("next", DONE)]


def test_the_last_stop_pressed_decides_the_pause_but_a_cancel_sticks(tmp_path):
    entered, release, fakes = threading.Event(), threading.Event(), []

    def run(c, control):
        fake = FakeRun(5)
        fakes.append(fake)
        control.attach(fake)
        if c.save_lora_name == "long":
            entered.set()
            release.wait(30)  # both presses reach the job while it still runs
        if fake.stopped.is_set():
            return RunResult(False, "Cancelled at step 1; nothing was saved", [], None, 1, True)
        return RunResult(True, "Saved", [Path("/out/next.safetensors")], None, 5)

    q = JobQueue(tmp_path, run)
    q.add(cfg("long"))
    q.add(cfg("next"))
    q.start()
    assert entered.wait(10)
    q.stop(save=False)  # cancel and pause ...
    q.stop(save=True, go_on=True)  # ... then Stop and save with "go on": the queue goes on, nothing is saved
    release.set()
    assert q.wait(30)
    assert fakes[0].save is False and not fakes[1].stopped.is_set()
    assert [(j.name, j.status) for j in q.jobs()] == [("long", CANCELLED), ("next", DONE)]


def test_stop_before_the_run_exists_stops_it_as_soon_as_it_is_attached(tmp_path):
    gate, entered = threading.Event(), threading.Event()
    stopped_at_attach = []

    def run(c, control):
        entered.set()
        gate.wait(10)
        fake = FakeRun(5)
        control.attach(fake)
        stopped_at_attach.append(fake.stopped.is_set())
        return RunResult(False, "Stopped before training began; nothing was saved", stopped=True)

    q = JobQueue(tmp_path, run)
    q.add(cfg("early"))
    q.start()
    assert entered.wait(10)  # the job runs, its TrainingRun does not exist yet
    q.stop()
    gate.set()
    assert q.wait(10)
    assert stopped_at_attach == [True] and q.jobs()[0].status == STOPPED


def test_running_job_cannot_be_deleted_and_live_progress_is_reported(tmp_path):
    at_step_3 = threading.Event()
    q = JobQueue(tmp_path, runner_for(steps=200, hold_at=(3, at_step_3)))
    job = q.add(cfg("live"))
    q.start()
    assert at_step_3.wait(10)
    with pytest.raises(QueueError, match="press Stop first"):
        q.delete(job.id)
    lp = q.live()
    assert lp.job_id == job.id and lp.total == 200 and lp.loss == 0.5 and len(lp.history) == 3
    assert q.running.name == "live"
    q.stop()
    q.wait(30)
    assert q.live() is None and q.clear_finished() == 1 and q.jobs() == []


def test_queues_are_independent_objects(tmp_path):
    a = JobQueue(tmp_path / "a", runner_for())
    b = JobQueue(tmp_path / "b", runner_for())
    a.add(cfg("x"))
    assert b.jobs() == [] and b.add(cfg("x")).id == 1


# --- the queue's own bookkeeping never hangs a job (issue 10) ------------------------------------------------

def _disk_full(monkeypatch):
    """The queue file cannot be written (disk full / read-only jsons/): the real writer, failing as the OS would."""
    import errno

    import trainer.jobs as jobs_module

    real = jobs_module._atomic_json

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(jobs_module, "_atomic_json", full)
    return lambda: monkeypatch.setattr(jobs_module, "_atomic_json", real)


def test_add_with_an_unwritable_queue_file_refuses_and_adds_nothing(tmp_path, monkeypatch):
    img = tmp_path / "up.png"
    img.write_bytes(b"png")
    q = JobQueue(tmp_path / "jsons", runner_for(), console=lambda m: None)
    q.add(cfg("kept"))
    restore = _disk_full(monkeypatch)
    with pytest.raises(QueueError, match=r"lost was not added: could not save the queue file .*No space left"):
        q.add(Config.defaults("ADDifT").replace(save_lora_name="lost"), {"original_image": img})
    assert [j.name for j in q.jobs()] == ["kept"]
    assert not (tmp_path / "jsons" / "queue_files" / "2").exists()  # its copied inputs are gone too
    with pytest.raises(QueueError, match="job 1 was not deleted"):
        q.delete(1)
    assert [j.name for j in q.jobs()] == ["kept"]
    restore()
    assert q.add(cfg("lost")).id == 2  # the refused add used no id
    assert [j.name for j in JobQueue(tmp_path / "jsons", runner_for()).jobs()] == ["kept", "lost"]


def test_run_with_an_unwritable_queue_file_fails_the_job_with_the_reason_and_the_queue_still_works(tmp_path, monkeypatch):
    lines = []
    q = JobQueue(tmp_path, runner_for(), console=lines.append)
    q.add(cfg("first"))
    q.add(cfg("second"))
    restore = _disk_full(monkeypatch)
    assert q.start()
    assert q.wait(10), "the worker hangs"
    first, second = q.jobs()
    assert first.status == FAILED and "could not save the queue file" in first.message
    assert "No space left" in first.message and second.status == QUEUED  # paused, not failed in a row
    assert q.running is None and q.live() is None and q.stop() == "Nothing is training"
    assert any("No space left" in m for m in lines)
    restore()
    assert q.start() and q.wait(10)
    assert q.jobs()[1].status == DONE


def test_the_worker_survives_a_broken_console_and_progress_bookkeeping(tmp_path):
    def console(m):
        raise OSError("the console stream is closed")

    q = JobQueue(tmp_path, runner_for(), console=console)
    q._on_progress = lambda job, p: 1 / 0  # the live view's bookkeeping fails at every step
    q.add(cfg("a"))
    q.add(cfg("fail_b"))
    q.add(cfg("c"))
    q.start()
    assert q.wait(10)
    assert [j.status for j in q.jobs()] == [DONE, FAILED, DONE]
    assert "CUDA exploded" in q.jobs()[1].message


def test_a_crash_inside_the_worker_ends_the_job_failed_never_running(tmp_path):
    q = JobQueue(tmp_path, runner_for(), console=lambda m: None)
    q.add(cfg("a"))

    def broken_finish(*a, **k):
        broken_finish.calls += 1
        if broken_finish.calls == 1:
            raise RuntimeError("bookkeeping bug")
        return real(*a, **k)

    broken_finish.calls = 0
    real = q._finish
    q._finish = broken_finish
    q.start()
    assert q.wait(10)
    job = q.jobs()[0]
    assert job.status == FAILED and "Error in the queue itself: RuntimeError: bookkeeping bug" in job.message
    assert q.stop() == "Nothing is training"


@pytest.mark.parametrize("bad", [
    {"id": "two"}, {"status": "weird"}, {"settings": "x"}, {"steps": None}, {"id": True}])
def test_a_queue_file_with_a_wrong_type_is_set_aside_and_said_where(tmp_path, bad):
    q = JobQueue(tmp_path, runner_for())
    q.add(cfg("one"))
    data = json.loads((tmp_path / "queue.json").read_text(encoding="utf-8"))
    data["jobs"][0].update(bad)
    (tmp_path / "queue.json").write_text(json.dumps(data), encoding="utf-8")
    lines = []
    q2 = JobQueue(tmp_path, runner_for(), console=lines.append)
    aside = list(tmp_path.glob("queue.broken-*.json"))
    assert q2.jobs() == [] and len(aside) == 1 and json.loads(aside[0].read_text(encoding="utf-8")) == data
    key = next(iter(bad))
    assert f"'{key}'" in q2.notice and str(aside[0]) in q2.notice and lines == [q2.notice]
    assert q2.add(cfg("again")).id == 1


# --- one workdir, one queue owner ---------------------------------------------------------------------------

def _owner_process(store):
    import subprocess
    import sys

    code = ("import sys; from trainer.jobs import JobQueue; JobQueue(sys.argv[1], None); "
            "print('owner', flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code, str(store)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, cwd=Path(__file__).resolve().parent.parent)
    assert proc.stdout.readline().strip() == "owner"
    return proc


def test_a_second_process_on_the_same_folder_is_refused_naming_the_folder_and_owner(tmp_path):
    from trainer.jobs import QueueLockedError

    owner = _owner_process(tmp_path)
    try:
        with pytest.raises(QueueLockedError) as e:
            JobQueue(tmp_path, runner_for())
        assert str(tmp_path) in str(e.value) and f"pid {owner.pid}" in str(e.value)
    finally:
        owner.stdin.close()
        owner.wait(10)
    # the owner exited (its lock is removed at exit); a lock of a dead process is taken over too
    assert not (tmp_path / "queue.lock").exists()
    (tmp_path / "queue.lock").write_text(f"{owner.pid}\n", encoding="utf-8")  # as after kill -9
    JobQueue(tmp_path, runner_for()).add(cfg("mine"))
    assert (tmp_path / "queue.lock").read_text(encoding="utf-8").split()[0] == str(__import__("os").getpid())


def test_a_folder_where_the_lock_cannot_be_written_still_gives_a_queue_and_says_so(tmp_path, monkeypatch):
    import errno
    import os

    import trainer.jobs as jobs_module

    real_open = os.open

    def read_only(path, *a, **k):
        if str(path).endswith("queue.lock"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(jobs_module.os, "open", read_only)
    q = JobQueue(tmp_path, runner_for(), console=lambda m: None)
    assert "queue.lock could not be written" in q.notice and "Read-only" in q.notice
    assert q.add(cfg("still")).id == 1
