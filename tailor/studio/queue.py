"""The studio's training queue: each job is its own `tailor train JOB.yaml` process, recorded in
SQLite, so that a closed page loses nothing and a restarted studio finds its jobs again.

A job's process runs in a session of its own: it outlives the studio, and cancelling it signals its
whole process group (torchrun's workers too). A studio that starts again reattaches to the jobs that
still run (a process is recognised by its pid and its start time, since pids are reused) and marks
the others interrupted; Resume submits the job again with --resume, which continues its run folder
from the last checkpoint. Linux only: processes are recognised through /proc.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

from tailor.errors import TailorError
from tailor.runs import Run

STATES = ("queued", "running", "done", "failed", "cancelled", "interrupted")
RESUMABLE = ("interrupted", "failed", "cancelled")
_SCHEMA = """CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY, name TEXT, job_path TEXT, args TEXT, state TEXT, created REAL, started REAL,
    ended REAL, pid INTEGER, proc_start TEXT, log_path TEXT, run_dir TEXT, exit_code INTEGER, message TEXT,
    resumed_from INTEGER)"""
_RUN_FOLDER = re.compile(r"^run folder: (.+?)\s*$", re.MULTILINE)  # printed by the technique's setup
_STOPPED = "the studio stopped while it ran; Resume continues from its last checkpoint"
_UNFINISHED = ("it ended while the studio was not its parent, its run unfinished; Resume continues from its "
               "last checkpoint")
log = logging.getLogger(__name__)


class QueueError(TailorError):
    """A queue action the job's state does not allow: cancel a finished job, resume a running one."""


def default_command(job_path: Path, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "tailor", "train", str(job_path), "--no-progress", *args]


def _stat(pid: int | str) -> list[str] | None:
    """/proc/PID/stat from field 3 (the state) on; None when the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # the command name before it may hold spaces and ")"


def process_start(pid: int) -> str | None:
    """When a live process started (field 22, clock ticks since boot): with the pid, this names one
    process even after the pid is reused. None when it is gone or a zombie, which is as good as gone."""
    fields = _stat(pid)
    return None if fields is None or fields[0] in ("Z", "X") else fields[19]


def _group_runs(pgid: int) -> bool:
    """Whether a process of the group still runs; zombies do not count, since an init that does not
    reap orphans (some containers) would otherwise keep a group alive forever."""
    return any(f is not None and f[2] == str(pgid) and f[0] not in ("Z", "X")
               for f in map(_stat, (p.name for p in Path("/proc").iterdir() if p.name.isdigit())))


class JobQueue:
    """The training jobs of one workspace; FastAPI's threads and the ticking thread share it."""

    def __init__(self, db_path: Path, logs_dir: Path, *, max_running: int = 1,
                 command: Callable[[Path, list[str]], list[str]] | None = None, poll_seconds: float = 0.5,
                 workdir: Path | None = None):
        self.db_path, self.logs_dir = Path(db_path).resolve(), Path(logs_dir).resolve()
        self.max_running, self.poll_seconds = max_running, poll_seconds
        self.command = command or default_command
        # The jobs' working folder: a job's relative output.dir lands in the workspace
        self.workdir = Path(workdir).resolve() if workdir else self.db_path.parent
        self._lock = threading.RLock()
        self._procs: dict[int, subprocess.Popen] = {}  # our own children, waited on so none stays a zombie
        self._scanned: dict[int, int] = {}  # job id -> how far its log was searched for the run folder
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.execute("PRAGMA journal_mode=WAL")  # the pages read while the ticking thread writes
            db.execute(_SCHEMA)
            for job in db.execute("SELECT * FROM jobs WHERE state = 'running'").fetchall():
                # Still running: tick() watches it; it is not our child, so its end is read from its run folder
                if job["pid"] is None or process_start(job["pid"]) != job["proc_start"]:
                    _update(db, job["id"], "running", state="interrupted", ended=time.time(), message=_STOPPED)

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.db_path, timeout=30)
        db.row_factory = sqlite3.Row
        try:
            with db:  # one transaction: committed, or rolled back on an error
                yield db
        finally:
            db.close()

    # --- what the pages call ----------------------------------------------------------------------

    def submit(self, job_path: Path, args: Sequence[str] = (), name: str | None = None,
               resumed_from: int | None = None) -> int:
        job_path = Path(job_path).resolve()
        if not job_path.is_file():
            raise QueueError(f"{job_path}: no such job file; write one (see examples/) or pick another")
        with self._db() as db:
            job_id = db.execute("INSERT INTO jobs (name, job_path, args, state, created, resumed_from) "
                                "VALUES (?, ?, ?, 'queued', ?, ?)", (name or job_path.stem, str(job_path),
                                                                     json.dumps(list(args)), time.time(),
                                                                     resumed_from)).lastrowid
            db.execute("UPDATE jobs SET log_path = ? WHERE id = ?", (str(self.logs_dir / f"{job_id}.log"), job_id))
        return job_id

    def get(self, job_id: int) -> dict | None:
        with self._db() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _as_dict(row) if row else None

    def list(self, limit: int = 100) -> list[dict]:
        """The newest jobs first."""
        with self._db() as db:
            return [_as_dict(r) for r in db.execute("SELECT * FROM jobs ORDER BY id DESC LIMIT ?", (limit,))]

    def cancel(self, job_id: int, grace_seconds: float = 10.0) -> None:
        """A queued job never starts; a running one gets SIGTERM (it may save), SIGKILL after the grace."""
        with self._lock, self._db() as db:
            job = self._must_get(job_id)
            if job["state"] == "queued":
                _update(db, job_id, "queued", state="cancelled", ended=time.time())
                return
            if job["state"] != "running":
                raise QueueError(f"job {job_id} ({job['name']}) is {job['state']}: only a queued or running job "
                                 "can be cancelled")
            _update(db, job_id, "running", state="cancelled", ended=time.time())
            proc = self._procs.get(job_id)
        # Outside the lock: the pages must not freeze for the grace period
        if proc is None and process_start(job["pid"]) != job["proc_start"]:
            return  # it ended meanwhile, and its pid may be another process's now
        with suppress(ProcessLookupError):
            os.killpg(job["pid"], signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline and _group_runs(job["pid"]):
            if proc is not None:
                proc.poll()  # reap our child as soon as it ends
            time.sleep(0.05)
        with suppress(ProcessLookupError):
            os.killpg(job["pid"], signal.SIGKILL)
        if proc is not None:
            proc.wait()

    def resume(self, job_id: int) -> int:
        """A new job that continues this one's run folder from its last checkpoint."""
        job = self._must_get(job_id)
        if job["state"] not in RESUMABLE:
            raise QueueError(f"job {job_id} ({job['name']}) is {job['state']}: only an interrupted, failed or "
                             "cancelled job can be resumed")
        args = job["args"] + ([] if "--resume" in job["args"] else ["--resume"])
        return self.submit(Path(job["job_path"]), args, name=job["name"], resumed_from=job_id)

    def log_tail(self, job_id: int, lines: int = 50) -> str:
        """The last lines of the job's log, read from its end: a long training's log stays unread."""
        try:
            with open(self._must_get(job_id)["log_path"], "rb") as f:
                pos, data = f.seek(0, os.SEEK_END), b""
                while pos > 0 and data.count(b"\n") <= lines:
                    step = min(pos, 8192)
                    pos -= step
                    f.seek(pos)
                    data = f.read(step) + data
        except FileNotFoundError:
            return ""  # not started yet
        return b"\n".join(data.splitlines()[-lines:]).decode("utf-8", "replace") if lines > 0 else ""

    def _must_get(self, job_id: int) -> dict:
        job = self.get(job_id)
        if job is None:
            raise QueueError(f"no job {job_id} in {self.db_path}; the jobs page lists the ones there are")
        return job

    # --- the ticking ------------------------------------------------------------------------------

    def tick(self) -> None:
        """Record the jobs that ended, then start queued ones, oldest first, while fewer than max_running run."""
        with self._lock, self._db() as db:
            for job in map(_as_dict, db.execute("SELECT * FROM jobs WHERE state = 'running'").fetchall()):
                run_dir = job["run_dir"] or self._find_run_dir(db, job)
                proc, now = self._procs.get(job["id"]), time.time()
                if proc is not None and proc.poll() is not None:
                    code = proc.returncode
                    _update(db, job["id"], "running", state="done" if code == 0 else "failed", ended=now,
                            exit_code=code, message=None if code == 0 else f"exit {code}; see {job['log_path']}")
                elif proc is None and process_start(job["pid"]) != job["proc_start"]:
                    # Not our child, so no exit status: the run folder says whether it finished
                    done = bool(run_dir) and Run(run_dir).done
                    _update(db, job["id"], "running", state="done" if done else "interrupted", ended=now,
                            message=None if done else _UNFINISHED)
            for job_id in [i for i, p in self._procs.items() if p.poll() is not None]:
                del self._procs[job_id]  # reaped; cancelled jobs' too
            running = db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'running'").fetchone()[0]
            queued = db.execute("SELECT * FROM jobs WHERE state = 'queued' ORDER BY id LIMIT ?",
                                (max(0, self.max_running - running),)).fetchall()
            for job in map(_as_dict, queued):
                self._start(db, job)

    def _start(self, db: sqlite3.Connection, job: dict) -> None:
        if not _update(db, job["id"], "queued", state="running", started=time.time()):
            return  # another studio on this workspace took it
        try:
            with open(job["log_path"], "ab") as log_file:
                # A session of its own: the job outlives the studio, and cancel signals its whole group
                proc = subprocess.Popen(self.command(Path(job["job_path"]), job["args"]), stdin=subprocess.DEVNULL,
                                        stdout=log_file, stderr=subprocess.STDOUT, cwd=self.workdir,
                                        start_new_session=True, env=_job_environment())
        except OSError as e:
            _update(db, job["id"], "running", state="failed", ended=time.time(), message=f"could not start: {e}")
            return
        self._procs[job["id"]] = proc
        db.execute("UPDATE jobs SET pid = ?, proc_start = ? WHERE id = ?", (proc.pid, process_start(proc.pid),
                                                                            job["id"]))

    def _find_run_dir(self, db: sqlite3.Connection, job: dict) -> str | None:
        """The first `run folder: PATH` line of the log, searched from where the last tick stopped."""
        start = self._scanned.get(job["id"], 0)
        try:
            with open(job["log_path"], "rb") as f:
                f.seek(start)
                chunk = f.read(1 << 20)
        except FileNotFoundError:
            return None
        chunk = chunk[:chunk.rfind(b"\n") + 1]  # a line still being written is searched next time
        self._scanned[job["id"]] = start + len(chunk)
        found = _RUN_FOLDER.search(chunk.decode("utf-8", "replace"))
        if not found:
            return None
        self._scanned.pop(job["id"])
        run_dir = str((self.workdir / found.group(1)).resolve())  # printed relative to the job's cwd
        db.execute("UPDATE jobs SET run_dir = ? WHERE id = ?", (run_dir, job["id"]))
        return run_dir

    def start(self) -> JobQueue:
        """Tick every poll_seconds in a daemon thread."""
        if self._thread is None or not self._thread.is_alive():
            self._stopping.clear()
            self._thread = threading.Thread(target=self._loop, name="tailor-studio-queue", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop ticking. Running jobs go on: a studio started again reattaches to them."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while True:
            try:
                self.tick()
            except Exception:  # a locked database or a full disk now must not end the queue for good
                log.exception("the studio's queue could not tick; trying again")
            if self._stopping.wait(self.poll_seconds):
                return

    def __enter__(self) -> JobQueue:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# What torchrun, SLURM's srun or an earlier in-process DeepSpeed run leave in an environment. A
# studio job is one process; with these it would take itself for one of a group and wait for the rest.
_GROUP_VARIABLES = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                    "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def _job_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in _GROUP_VARIABLES}


def _update(db: sqlite3.Connection, job_id: int, from_state: str, **columns) -> bool:
    """Set columns of a job still in `from_state`; False when it has left it (a cancel won the race)."""
    sets = ", ".join(f"{name} = ?" for name in columns)
    cur = db.execute(f"UPDATE jobs SET {sets} WHERE id = ? AND state = ?", (*columns.values(), job_id, from_state))
    return cur.rowcount == 1


def _as_dict(row: sqlite3.Row) -> dict:
    job = dict(row)
    job["args"] = json.loads(job["args"] or "[]")
    return job
