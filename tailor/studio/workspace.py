"""The studio's workspace: one folder that holds everything the studio reads and writes.

    data/       files uploaded or copied in (raw, as users have them)
    prepared/   one folder per `prepare` (card, rejects, splits)
    jobs/       job files (YAML), written by the job editor and the advisor
    runs/       run folders, as `tailor train` writes them (output.dir of every studio job)
    feedback.db the feedback store of the playground
    .studio/    the queue's database and the jobs' logs

Every path a page names is resolved here and must stay inside its folder: no absolute paths, no
"..", no symlink that leads out. A page never takes a path it did not list.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import yaml

from tailor.errors import TailorError
from tailor.files import write_atomic
from tailor.runs import Run

# What `tailor prepare` reads (docs/data.md), as uploaded files may be named.
DATA_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".csv", ".tsv", ".parquet", ".txt", ".md")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class WorkspaceError(TailorError, ValueError):
    """A name or path a page sent that the workspace does not hold or will not take."""


@dataclass
class Workspace:
    root: Path

    def __post_init__(self):
        self.root = Path(self.root).resolve()
        for folder in (self.data_dir, self.prepared_dir, self.jobs_dir, self.runs_dir, self.logs_dir,
                       self.notes_dir / "advice", self.notes_dir / "prepared"):
            folder.mkdir(parents=True, exist_ok=True)

    data_dir = property(lambda self: self.root / "data")
    prepared_dir = property(lambda self: self.root / "prepared")
    jobs_dir = property(lambda self: self.root / "jobs")
    runs_dir = property(lambda self: self.root / "runs")
    notes_dir = property(lambda self: self.root / ".studio")
    logs_dir = property(lambda self: self.notes_dir / "logs")
    queue_db = property(lambda self: self.notes_dir / "queue.db")
    feedback_url = property(lambda self: f"sqlite:///{self.root / 'feedback.db'}")

    # --- names and paths from pages -------------------------------------------------------------

    @staticmethod
    def check_name(name: str, what: str = "name") -> str:
        """A file or folder name a user chose: letters, digits, '.', '_', '-'; no path."""
        if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
            raise WorkspaceError(f"{what} {name!r}: use letters, digits, '.', '_' and '-' (at most 100, "
                                 "starting with a letter or digit), no folders")
        return name

    def inside(self, folder: Path, relative: str) -> Path:
        """`relative` under `folder`, refused when it is absolute, climbs out with '..', or is (or
        passes through) a symlink that leads out of the workspace."""
        if not relative or Path(relative).is_absolute() or ".." in Path(relative).parts or "\x00" in relative:
            raise WorkspaceError(f"{relative!r}: not a path inside {folder.relative_to(self.root)}/")
        path = folder / relative
        if not path.resolve().is_relative_to(self.root) or not path.resolve().is_relative_to(folder.resolve()):
            raise WorkspaceError(f"{relative!r} leads outside the workspace (a symlink?); the studio only "
                                 f"reads what is inside {self.root}")
        return path

    def data_file(self, name: str) -> Path:
        path = self.inside(self.data_dir, name)
        if not path.is_file():
            raise WorkspaceError(f"no data file {name!r} in the workspace; upload it on the Data page")
        return path

    def prepared(self, name: str) -> Path:
        path = self.inside(self.prepared_dir, name)
        if not (path / "card.json").is_file():
            raise WorkspaceError(f"no prepared dataset {name!r} in the workspace; prepare one on the Data page")
        return path

    def job_file(self, name: str) -> Path:
        path = self.inside(self.jobs_dir, self.check_name(name, "job") + ("" if name.endswith(".yaml") else ".yaml"))
        return path

    def write_job(self, name: str, job: dict, header: str = "") -> Path:
        """jobs/NAME.yaml, written whole or not at all, its runs going to the workspace's runs/."""
        path = self.job_file(name)
        job = {**job, "output": {**(job.get("output") or {}), "dir": str(self.runs_dir)}}
        write_atomic(path, header + yaml.safe_dump(job, sort_keys=False, allow_unicode=True))
        return path

    # What the studio remembers beside a job or a prepared set, for its pages: the advisor's training
    # time for a job it wrote (the run page shows it), the allow-list a set was prepared with (the
    # card page anonymizes its rejects the same way).
    def advice_file(self, job_name: str) -> Path:
        return self.notes_dir / "advice" / f"{self.check_name(job_name, 'job')}.json"

    def prepared_settings_file(self, name: str) -> Path:
        return self.notes_dir / "prepared" / f"{self.check_name(name, 'dataset name')}.json"

    def run(self, name: str, run_id: str) -> Run:
        run = Run(self.inside(self.runs_dir, f"{self.check_name(name, 'run name')}/{self.check_name(run_id, 'run')}"))
        if not run.exists:
            raise WorkspaceError(f"no run {name}/{run_id} in the workspace")
        return run

    # --- uploads --------------------------------------------------------------------------------

    def save_upload(self, name: str, stream: BinaryIO, max_bytes: int) -> Path:
        """The uploaded file as data/NAME, written to a temporary name and renamed when complete;
        refused (and nothing left) past max_bytes or for a kind prepare does not read."""
        name = self.check_name(Path(name or "").name, "file name")
        if not name.lower().endswith(DATA_SUFFIXES):
            raise WorkspaceError(f"{name}: tailor prepare reads {', '.join(DATA_SUFFIXES)} files; rename it or "
                                 "convert it")
        target = self.inside(self.data_dir, name)
        partial = target.with_name(f".{name}.partial")
        written = 0
        try:
            with open(partial, "wb") as out:
                while chunk := stream.read(1 << 20):
                    written += len(chunk)
                    if written > max_bytes:
                        raise WorkspaceError(f"{name}: larger than the upload limit of {max_bytes / 1e6:.0f} MB "
                                             "(tailor studio --max-upload-mb); copy big files into "
                                             f"{self.data_dir} instead")
                    out.write(chunk)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        return target

    # --- what the home page lists ---------------------------------------------------------------

    def data_files(self) -> list[dict]:
        return [{"name": p.name, "bytes": p.stat().st_size} for p in sorted(self.data_dir.iterdir())
                if p.is_file() and not p.name.startswith(".") and not p.is_symlink()]

    def prepared_sets(self) -> list[dict]:
        sets = []
        for folder in sorted(p for p in self.prepared_dir.iterdir() if (p / "card.json").is_file()):
            card = json.loads((folder / "card.json").read_text(encoding="utf-8"))
            splits = {k: v.get("records", 0) for k, v in (card.get("splits") or {}).items()}
            sets.append({"name": folder.name, "splits": splits, "verdict": card.get("verdict")})
        return sets

    def job_files(self) -> list[str]:
        return sorted(p.stem for p in self.jobs_dir.glob("*.yaml"))

    def runs(self) -> list[Run]:
        return list(reversed(Run.find(self.runs_dir)))
