"""The run folder, the API between training, evaluation and serving.

runs/<name>/<run-id>/
  job.yaml          the resolved job, every default filled in
  manifest.json     model, data hashes, seed, versions, hardware, data summary
  metrics.jsonl     one row per logging step and per validation
  checkpoints/      step-NNNNNNN/ folders (see checkpoint.py)
  adapter/ | model/ the result: a PEFT adapter or a full model folder
  DONE              written last; a run without it can be resumed
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from importlib import metadata
from pathlib import Path


def new_run_dir(output_dir: str | Path, name: str) -> Path:
    root = Path(output_dir) / name
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run = root / stamp
    n = 1
    while run.exists():
        n += 1
        run = root / f"{stamp}-{n}"
    run.mkdir()
    return run


def latest_run_dir(output_dir: str | Path, name: str) -> Path | None:
    root = Path(output_dir) / name
    if not root.is_dir():
        return None
    runs = sorted((p for p in root.iterdir() if (p / "job.yaml").exists()), key=lambda p: p.stat().st_mtime)
    return runs[-1] if runs else None


def replace_dir(built: Path, final: Path) -> None:
    """Put a folder built under a temporary name in place of `final`, which may exist: a reader
    sees the old folder or the new one, never a half-written one."""
    import shutil

    old = final.parent / f".{final.name}.old"
    if final.exists():
        os.replace(final, old)
    os.replace(built, final)
    shutil.rmtree(old, ignore_errors=True)


def read_json(path: Path) -> dict | None:
    """A run folder's JSON file, or None where the run has not written it (yet)."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def path_sha256(path: str | Path) -> str:
    """A file's sha256, or a folder's: over its files' relative paths and contents, in order."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path)}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("tailor-llm", "torch", "transformers", "peft", "accelerate"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


class MetricsLog:
    """metrics.jsonl: appended and flushed row by row, so a live reader (or a crash) sees every row.
    Each row also goes to the trackers (TensorBoard, MLflow: tailor.track.trackers) given."""

    def __init__(self, path: Path, enabled: bool = True, trackers=()):
        self.path = path
        self.enabled = enabled
        self.trackers = list(trackers) if enabled else []

    def truncate_after(self, step: int) -> None:
        """On resume: drop rows written after the checkpoint; the resumed run writes them again."""
        if not self.enabled or not self.path.exists():
            return
        rows = [r for r in read_jsonl(self.path) if r.get("step", 0) <= step]
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in rows))

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        for tracker in self.trackers:
            tracker.log(row)


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of a JSONL file the run writes (metrics.jsonl, eval/examples.jsonl)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut short by a kill: the resume rewrites it
                    pass
    return rows
