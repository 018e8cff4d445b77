"""Files that are never seen half-written: every package writes and reads through these.

A writer puts the new content under a temporary name beside the target and renames it in place
(os.replace is atomic on one file system), so a reader, or a run killed mid-write, sees the old
file or the new one. Readers take what a live or killed writer may have left: a missing file is
None, a JSONL line cut short is skipped.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def write_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: str | Path, value, ensure_ascii: bool = True) -> None:
    write_atomic(path, json.dumps(value, indent=1, ensure_ascii=ensure_ascii))


def write_jsonl(path: str | Path, rows, ensure_ascii: bool = True) -> None:
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=ensure_ascii) + "\n" for r in rows))


def replace_dir(built: str | Path, final: str | Path) -> None:
    """Put a folder built under a temporary name in place of `final`, which may exist: a reader
    sees the old folder or the new one, never a half-written one."""
    built, final = Path(built), Path(final)
    old = final.parent / f".{final.name}.old"
    if final.exists():
        os.replace(final, old)
    os.replace(built, final)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def building(final: str | Path) -> Iterator[Path]:
    """`with building(final) as tmp:` fill the folder `tmp` (not created: save_pretrained and
    copytree make it); when the block ends it replaces `final` (replace_dir), and when the block
    fails it is removed, so `final` is never half-written."""
    final = Path(final)
    tmp = final.parent / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # what an interrupted writer left
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, final)


def read_json(path: str | Path) -> dict | None:
    """A JSON file, or None where it has not been written (yet)."""
    path = Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of a JSONL file; [] where it has not been written (yet). A line cut short by a kill
    is skipped: the writer that resumes rewrites it."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return rows


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


def take_lock(path: str | Path) -> tuple[int | None, str]:
    """An exclusive flock on `path` (created if missing), held until its descriptor is closed or
    the process ends (the system lets go of a killed process's lock, so a stale one never blocks).
    Returns (descriptor, "") when taken, with this process's id written in the file, or (None, the
    holder's process id as the file says it) when another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        return None, holder
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd, ""
