"""trainer/jobs.py: the queue as an object: order, persistence (atomic, across a new JobQueue), duplicate
names, delete by id, a failing job never stopping the rest, each job's result, Stop pausing the queue."""
import json
import threading
import time
from pathlib import Path

import pytest

from trainer.config import Config
from trainer.engine import RunResult
from trainer.jobs import DONE, FAILED, QUEUED, RUNNING, STOPPED, JobQueue, QueueError


def cfg(name, **kw):
    return Config.defaults("LoRA").replace(save_lora_name=name, **kw)


class FakeRun:
    """Stands in for a TrainingRun: counts steps until stopped (or until `steps`)."""

    def __init__(self, steps):
        self.steps = steps
        self.stopped = threading.Event()

    def stop(self):
        self.stopped.set()


def runner_for(outcomes=None, step_time=0.0, steps=3, started=None):
    """A runner whose result depends on the job name: "fail*" raises, "bad*" returns ok=False."""
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
    started = threading.Event()
    run = runner_for(step_time=0.05, steps=1000, started=started)
    q = JobQueue(tmp_path, run)
    q.add(cfg("long"))
    q.add(cfg("next"))
    q.start()
    assert started.wait(10)
    while not q.live() or q.live().step < 2:
        time.sleep(0.01)
    msg = q.stop()
    assert "Stopping long (job 1)" in msg and "1 queued job(s) wait" in msg
    assert q.wait(30)
    jobs = q.jobs()
    assert jobs[0].status == STOPPED and 2 <= jobs[0].steps < 1000 and jobs[0].files[0].endswith(f"long_{jobs[0].steps}steps.safetensors")
    assert jobs[1].status == QUEUED  # paused, not run
    assert q.stop() == "Nothing is training"
    assert q.start() and q.wait(120)
    assert q.jobs()[1].status == DONE


def test_stop_before_the_run_exists_stops_it_as_soon_as_it_is_attached(tmp_path):
    gate = threading.Event()
    stopped_at_attach = []

    def run(c, control):
        gate.wait(10)
        fake = FakeRun(5)
        control.attach(fake)
        stopped_at_attach.append(fake.stopped.is_set())
        return RunResult(False, "Stopped before training began; nothing was saved", stopped=True)

    q = JobQueue(tmp_path, run)
    q.add(cfg("early"))
    q.start()
    time.sleep(0.1)
    q.stop()
    gate.set()
    assert q.wait(10)
    assert stopped_at_attach == [True] and q.jobs()[0].status == STOPPED


def test_running_job_cannot_be_deleted_and_live_progress_is_reported(tmp_path):
    started = threading.Event()
    q = JobQueue(tmp_path, runner_for(step_time=0.05, steps=200, started=started))
    job = q.add(cfg("live"))
    q.start()
    assert started.wait(10)
    while not q.live() or q.live().step < 3:
        time.sleep(0.01)
    with pytest.raises(QueueError, match="press Stop first"):
        q.delete(job.id)
    lp = q.live()
    assert lp.job_id == job.id and lp.total == 200 and lp.loss == 0.5 and len(lp.history) >= 3
    assert q.running.name == "live"
    q.stop()
    q.wait(30)
    assert q.live() is None and q.clear_finished() == 1 and q.jobs() == []


def test_queues_are_independent_objects(tmp_path):
    a = JobQueue(tmp_path / "a", runner_for())
    b = JobQueue(tmp_path / "b", runner_for())
    a.add(cfg("x"))
    assert b.jobs() == [] and b.add(cfg("x")).id == 1
