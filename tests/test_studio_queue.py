"""The studio's training queue with a fake `tailor train`: jobs one at a time, failures, cancel of a
whole process group, and a studio that restarts while its jobs run (or die)."""

import json
import os
import signal
import sqlite3
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest

from tailor.studio.queue import JobQueue, QueueError, process_start

# Stands in for `tailor train JOB`: announces its run folder as tailor does, then waits until the test
# drops `release` there (or 20 s pass, so that a failed test leaves no process behind for long).
FAKE_TRAIN = r'''
import json, os, signal, subprocess, sys, time
from pathlib import Path

job_file = Path(sys.argv[1])
job = json.loads(job_file.read_text())
run = Path("runs") / job_file.stem
run.mkdir(parents=True, exist_ok=True)
(run / "args.json").write_text(json.dumps(sys.argv[2:]))
(run / "env.json").write_text(json.dumps({k: os.environ.get(k) for k in ("LOCAL_RANK", "MASTER_PORT", "HOME")}))
if job.get("ignore_term"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if job.get("child"):  # a worker in the job's process group, as torchrun's are
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    (run / "child.pid").write_text(str(child.pid))
print("loading the model", flush=True)
print(f"run folder: {run}", flush=True)
deadline = time.time() + 20
while not (run / "release").exists() and time.time() < deadline:
    time.sleep(0.02)
if job.get("exit"):
    sys.exit(job["exit"])
(run / "DONE").write_text("")
'''


def make_queue(root: Path, **options) -> JobQueue:
    script = root / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    return JobQueue(root / ".studio" / "queue.db", root / ".studio" / "logs", workdir=root,
                    command=lambda job, args: [sys.executable, str(script), str(job), *args], **options)


def job_file(root: Path, name: str, **options) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(json.dumps(options))  # JSON is YAML; the fake reads its options from it
    return path


def release(root: Path, name: str) -> None:
    (root / "runs" / name).mkdir(parents=True, exist_ok=True)
    (root / "runs" / name / "release").touch()


def wait_for(check, queue: JobQueue | None = None, timeout: float = 15.0):
    """check()'s first true result, ticking the queue meanwhile; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if queue is not None:
            queue.tick()
        if result := check():
            return result
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def state(queue: JobQueue, job_id: int) -> str:
    return queue.get(job_id)["state"]


def test_jobs_run_one_at_a_time_oldest_first(tmp_path):
    q = make_queue(tmp_path)
    first, second = q.submit(job_file(tmp_path, "first")), q.submit(job_file(tmp_path, "second"))
    wait_for(lambda: q.get(first)["run_dir"], q)
    assert (state(q, first), state(q, second)) == ("running", "queued")
    assert q.get(first)["run_dir"] == str((tmp_path / "runs" / "first").resolve())
    assert [job["id"] for job in q.list()] == [second, first]
    assert q.log_tail(first).splitlines() == ["loading the model", "run folder: runs/first"]

    release(tmp_path, "first")
    wait_for(lambda: state(q, second) == "running", q)
    assert state(q, first) == "done" and q.get(first)["exit_code"] == 0
    release(tmp_path, "second")
    wait_for(lambda: state(q, second) == "done", q)
    assert q.get(second)["started"] >= q.get(first)["ended"]


def test_a_job_is_one_process_whatever_group_the_studio_was_started_in(tmp_path, monkeypatch):
    """A studio started under torchrun or srun (or after an in-process DeepSpeed run) must not hand
    LOCAL_RANK and the rendezvous address to its jobs: each would wait for a group that never comes."""
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_PORT", "29500")
    q = make_queue(tmp_path)
    job_id = q.submit(job_file(tmp_path, "alone"))
    wait_for(lambda: (tmp_path / "runs" / "alone" / "env.json").is_file(), q)
    seen = json.loads((tmp_path / "runs" / "alone" / "env.json").read_text())
    assert seen == {"LOCAL_RANK": None, "MASTER_PORT": None, "HOME": os.environ.get("HOME")}
    release(tmp_path, "alone")
    wait_for(lambda: state(q, job_id) == "done", q)


def test_a_failing_job_ends_failed_with_its_exit_code(tmp_path):
    q = make_queue(tmp_path)
    job_id = q.submit(job_file(tmp_path, "bad", exit=3))
    release(tmp_path, "bad")
    wait_for(lambda: state(q, job_id) not in ("queued", "running"), q)
    job = q.get(job_id)
    assert (job["state"], job["exit_code"]) == ("failed", 3)
    assert job["message"] == f"exit 3; see {job['log_path']}" and Path(job["log_path"]).is_file()


def test_log_tail_gives_the_last_lines(tmp_path):
    q = make_queue(tmp_path)
    job_id = q.submit(job_file(tmp_path, "noisy"))
    Path(q.get(job_id)["log_path"]).write_text("".join(f"line {i}\n" for i in range(20000)))
    assert q.log_tail(job_id, lines=3) == "line 19997\nline 19998\nline 19999"
    assert q.log_tail(job_id, lines=0) == ""


def test_cancel_stops_the_whole_process_group(tmp_path):
    q = make_queue(tmp_path)
    job_id = q.submit(job_file(tmp_path, "long", child=True))
    quick = q.submit(job_file(tmp_path, "quick"))
    run_dir = Path(wait_for(lambda: q.get(job_id)["run_dir"], q))
    pid, worker = q.get(job_id)["pid"], int((run_dir / "child.pid").read_text())
    assert process_start(worker) is not None

    q.cancel(job_id)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    # The worker is an orphan now: gone, or a zombie where init does not reap (some containers)
    assert process_start(worker) is None
    release(tmp_path, "quick")
    wait_for(lambda: state(q, quick) == "done", q)  # the reaped exit of the cancelled job did not overwrite it
    assert state(q, job_id) == "cancelled"
    with pytest.raises(QueueError, match=rf"job {quick} \(quick\) is done"):
        q.cancel(quick)


def test_cancel_kills_a_job_that_ignores_sigterm_after_the_grace(tmp_path):
    q = make_queue(tmp_path)
    job_id = q.submit(job_file(tmp_path, "stubborn", ignore_term=True))
    wait_for(lambda: q.get(job_id)["run_dir"], q)
    began = time.monotonic()
    q.cancel(job_id, grace_seconds=0.5)
    assert 0.5 <= time.monotonic() - began < 5
    with pytest.raises(ProcessLookupError):
        os.kill(q.get(job_id)["pid"], 0)
    assert state(q, job_id) == "cancelled"


def test_a_new_studio_reattaches_to_a_job_that_still_runs(tmp_path):
    a = make_queue(tmp_path, poll_seconds=0.05)
    with a:  # the ticking thread
        job_id = a.submit(job_file(tmp_path, "long"))
        wait_for(lambda: a.get(job_id)["run_dir"])
    pid = a.get(job_id)["pid"]
    assert process_start(pid) is not None  # stopping the studio left the job running

    b = make_queue(tmp_path)
    b.tick()
    assert state(b, job_id) == "running"
    release(tmp_path, "long")
    wait_for(lambda: state(b, job_id) != "running", b)
    job = b.get(job_id)
    assert (job["state"], job["exit_code"]) == ("done", None)  # not b's child: its run folder tells
    a.tick()  # a reaps its child, as the old studio's exit would; the record stays
    assert state(b, job_id) == "done"


def test_a_job_that_died_unwatched_is_interrupted_and_resumes(tmp_path):
    a = make_queue(tmp_path)
    job_id = a.submit(job_file(tmp_path, "long"), ["--set", "training.epochs=2"])
    wait_for(lambda: a.get(job_id)["run_dir"], a)
    a.stop()
    pid = a.get(job_id)["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: process_start(pid) is None)

    b = make_queue(tmp_path)
    job = b.get(job_id)
    assert job["state"] == "interrupted" and "Resume continues" in job["message"]
    with pytest.raises(QueueError, match="is interrupted"):
        b.cancel(job_id)
    resumed = b.resume(job_id)
    assert b.get(resumed)["args"] == ["--set", "training.epochs=2", "--resume"]
    assert b.get(resumed)["resumed_from"] == job_id
    b.cancel(resumed)
    again = b.resume(resumed)  # --resume once, not twice
    assert b.get(again)["args"] == ["--set", "training.epochs=2", "--resume"]

    release(tmp_path, "long")
    wait_for(lambda: state(b, again) == "done", b)
    assert json.loads((tmp_path / "runs" / "long" / "args.json").read_text())[-1] == "--resume"
    with pytest.raises(QueueError, match="is done"):
        b.resume(again)
    a.tick()  # reaps the killed child


@pytest.mark.parametrize("same_start", [True, False])
def test_a_reused_pid_is_not_taken_for_the_job(tmp_path, same_start):
    q = make_queue(tmp_path)
    job_id = q.submit(job_file(tmp_path, "old"))
    me = os.getpid()  # alive; with another start time it stands for a reused pid
    with closing(sqlite3.connect(q.db_path)) as db, db:
        db.execute("UPDATE jobs SET state = 'running', pid = ?, proc_start = ? WHERE id = ?",
                   (me, process_start(me) if same_start else "1", job_id))
    job = make_queue(tmp_path).get(job_id)
    assert job["state"] == ("running" if same_start else "interrupted")
    if not same_start:
        assert job["message"].startswith("the studio stopped while it ran")
