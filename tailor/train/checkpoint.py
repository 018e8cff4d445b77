"""Checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint, checkpoints/step-NNNNNNN/, holds:

    trainable.safetensors, optimizer.pt   the trainable weights and optimizer state (DDP: whole, by rank 0);
                                          under FSDP2 `sharded/`, under DeepSpeed `deepspeed/`: each
                                          process's shards (tailor/train/distributed.py)
    scheduler.pt                          the learning-rate schedule's state
    rng-RANK.json                         every random-number state of process RANK
    state.json                            the step, early stopping's state
    checksums.json                        the xxh3-128 hash and size of every other file; written last

Crash safety. A checkpoint is written to `.step-NNNNNNN.tmp`; every file and folder in it is
fsynced, checksums.json is written, and only then is it renamed into place (and the folder holding
it fsynced), so a kill or a power cut leaves either the whole new checkpoint or none of it. Older
checkpoints are pruned only after the new one is in place. On resume, `newest_complete` checks the
newest checkpoint's files against checksums.json and falls back to the one before when they differ.

Nothing here unpickles arbitrary objects: `.pt` files are read with torch.load(weights_only=True),
which only builds tensors, numbers, strings and plain containers, and the RNG states are JSON. A
checkpoint in the pickle format of older versions of Tailor (rng-0.pt) is refused, not read.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import xxhash
from safetensors.torch import load_file
from torch import nn

from tailor.errors import TailorError
from tailor.files import replace_dir

PREFIX = "step-"
CHECKSUMS = "checksums.json"
# A checksum against damage, not tampering (whoever can change a file can change its checksum):
# xxh3-128 reads 20+ GB/s where sha256 reads 2, which matters for a full fine-tune's tens of GB.
HASH = "xxh3_128"
# Test hook: seconds save_checkpoint sleeps between writing a checkpoint's files and publishing
# it, so that a test can kill a run while it saves (tests/test_faults.py). Unset in real use.
SAVE_STALL = "TAILOR_TEST_SAVE_STALL"


class CheckpointError(TailorError, RuntimeError):
    """A checkpoint that cannot be written or resumed from."""


class UnsafeCheckpoint(CheckpointError):
    """A checkpoint file that holds Python objects, which loading could run as code."""


# --- random-number states, as JSON ---------------------------------------------------------------


def rng_state() -> dict:
    """Every RNG the run draws from, in plain JSON types (a pickle of them could hold code)."""
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(words), gauss],
             "numpy": [name, keys.tolist(), pos, has_gauss, cached],
             "torch": _hex(torch.get_rng_state())}
    if torch.cuda.is_available():
        state["cuda"] = [_hex(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unhex(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unhex(s) for s in state["cuda"]])


def _hex(t: torch.Tensor) -> str:
    return t.numpy().tobytes().hex()


def _unhex(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray.fromhex(text), dtype=torch.uint8)


# --- saving ----------------------------------------------------------------------------------------


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(folder: Path, step: int, model, optimizer, scheduler, state: dict, parallel,
                    rank: int = 0, is_main: bool = True, keep: int = 2) -> Path:
    """The weights and optimizer as `parallel` (tailor/train/distributed.py) keeps them: whole,
    by rank 0, under DDP; each rank its shards under FSDP and DeepSpeed. Every rank its RNG.
    A write that fails (a full disk) leaves the checkpoints before it as they were."""
    final = checkpoint_path(folder, step)
    tmp = folder / f".{final.name}.tmp"
    try:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # what a killed save of this step left
            tmp.mkdir(parents=True)
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            (tmp / "state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
        _barrier()
        parallel.save(tmp, model, optimizer, is_main)
        (tmp / f"rng-{rank}.json").write_text(json.dumps(rng_state()), encoding="utf-8")
        _barrier()
        if is_main:
            _stall_for_tests()
            publish(tmp, final)
            prune(folder, keep, final)
    except CheckpointError:
        raise
    except Exception as exc:
        full = _disk_full(folder, exc)  # asked before the half-written checkpoint frees its space
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if full or isinstance(exc, OSError):
            raise _save_failed(folder, step, exc, full) from exc
        raise
    _barrier()
    return final


def publish(tmp: Path, final: Path) -> None:
    """Make the checkpoint built in `tmp` durable, then put it in place: fsync every file (hashing
    it on the way) and folder, write checksums.json, rename, fsync the folder holding it. Without
    the fsyncs a power cut could leave the rename on disk but not the data it names."""
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    sums = {p.relative_to(tmp).as_posix(): {HASH: _sync_and_hash(p), "bytes": p.stat().st_size} for p in files}
    _write_synced(tmp / CHECKSUMS, json.dumps({"files": sums}, indent=1))
    for d in sorted((p for p in tmp.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        _fsync_dir(d)
    _fsync_dir(tmp)
    replace_dir(tmp, final)  # a checkpoint of this step from before a fallback is replaced as one
    _fsync_dir(final.parent)


def prune(folder: Path, keep: int, newest: Path) -> None:
    """Remove all but the newest `keep` checkpoints (the best one stays whatever its age), once
    `newest` is in place and its files are all there: until then the one before is the fallback."""
    problem = verify(newest, full=False)
    if problem:
        raise CheckpointError(f"{newest}: {problem} just after it was written; the file system lost data. "
                              "The earlier checkpoints are kept; check the disk, then --resume")
    best = best_checkpoint(folder)
    for old in list_checkpoints(folder)[:-keep]:
        if old not in (best, newest):
            remove(old)
    for left in folder.glob(f".{PREFIX}*.removed"):  # what a kill during a removal left
        shutil.rmtree(left, ignore_errors=True)


def remove(checkpoint: Path) -> None:
    """Out of the list first (one rename), then deleted: a kill halfway through leaves no
    half-deleted checkpoint under a checkpoint's name."""
    gone = checkpoint.with_name(f".{checkpoint.name}.removed")
    shutil.rmtree(gone, ignore_errors=True)
    os.replace(checkpoint, gone)
    shutil.rmtree(gone, ignore_errors=True)


def _sync_and_hash(path: Path) -> str:
    with open(path, "rb") as f:
        digest = _hash_stream(f)
        os.fsync(f.fileno())  # flushes what any process wrote to the file, not only this handle
    return digest


def file_hash(path: Path) -> str:
    with open(path, "rb") as f:
        return _hash_stream(f)


def _hash_stream(f) -> str:
    h = xxhash.xxh3_128()
    for chunk in iter(lambda: f.read(1 << 22), b""):
        h.update(chunk)
    return h.hexdigest()


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """A folder's entries (a file created or renamed in it) reach the disk only when it is fsynced."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _stall_for_tests() -> None:
    seconds = os.environ.get(SAVE_STALL)
    if seconds:
        time.sleep(float(seconds))


def _disk_full(folder: Path, exc: Exception) -> bool:
    """Whether `exc` came from a full disk. Only Python's own writes say so with an errno: torch.save
    raises a RuntimeError about positions in its zip file, safetensors an error naming os error 28."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left on device" in str(exc):
        return True
    try:
        return shutil.disk_usage(folder).free < 2 ** 20
    except OSError:
        return False


def _save_failed(folder: Path, step: int, exc: Exception, full: bool) -> CheckpointError:
    """The error a user sees when a checkpoint cannot be written: which run, why, where --resume starts."""
    done = [c for c in list_checkpoints(folder) if (c / CHECKSUMS).is_file()]
    resume = (f"`tailor train JOB --resume` continues from step {int(done[-1].name[len(PREFIX):])} ({done[-1]})"
              if done else "`tailor train JOB --resume` starts it again from step 0 (no checkpoint was complete yet)")
    why = (f"the disk is full (no space left on the disk holding {folder})" if full
           else f"it could not be written ({exc})")
    return CheckpointError(f"run {folder.parent}: saving the checkpoint of step {step} failed: {why}. The earlier "
                           f"checkpoints are intact; free space or fix the cause, then {resume}")


# --- finding and checking ------------------------------------------------------------------------


def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"{PREFIX}{step:07d}"


def list_checkpoints(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def verify(path: Path, full: bool = True) -> str | None:
    """None when every file of the checkpoint matches checksums.json; else what is wrong. full
    False: sizes only (cheap), True: every file's hash too."""
    listing = path / CHECKSUMS
    if not listing.is_file():
        if any(path.glob("rng-*.pt")):
            return (f"written by an older version of Tailor in the pickle format ({path / 'rng-0.pt'}), which can "
                    "run code when loaded; Tailor no longer reads it")
        return f"no {CHECKSUMS} (not written by Tailor, or cut short)"
    try:
        files = json.loads(listing.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError):
        return f"{CHECKSUMS} is unreadable"
    for name, want in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != want["bytes"]:
            return f"{name} has {f.stat().st_size} bytes where {want['bytes']} were written"
        if full and file_hash(f) != want[HASH]:
            return f"{name} differs from what was written (checksum mismatch)"
    return None


def newest_complete(folder: Path, is_main: bool, say) -> Path | None:
    """The checkpoint to resume from: the newest whose files match their checksums (None: there
    is none yet, start from the beginning). The main process checks and says why it skips any
    (they are removed: the resumed run writes them again); the others are told which."""
    found = [None, None]  # the checkpoint's name, or the error every process raises
    if is_main:
        try:
            chosen = _newest_complete(folder, say)
            found[0] = chosen.name if chosen else None
        except CheckpointError as exc:
            found[1] = str(exc)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(found, src=0)
    if found[1]:
        raise CheckpointError(found[1])
    return folder / found[0] if found[0] else None


def _newest_complete(folder: Path, say) -> Path | None:
    skipped = []  # (checkpoint, what is wrong with it), newest first
    for path in reversed(list_checkpoints(folder)):
        problem = verify(path)
        if problem is None:
            for bad, why in skipped:
                say(f"[yellow]{bad}: {why}; it is incomplete or corrupt, so the run resumes from {path.name} "
                    f"instead (and writes {bad.name} again)[/]")
                remove(bad)
            return path
        skipped.append((path, problem))
    if not skipped:
        return None
    reasons = "; ".join(f"{p.name}: {why}" for p, why in skipped)
    raise CheckpointError(f"{folder}: no complete checkpoint to resume from ({reasons}). Start afresh: run without "
                          "--resume. (A checkpoint of an older version of Tailor resumes with that version, if you "
                          "trust its files.)")


BEST = "best.json"


def mark_best(folder: Path, step: int, metric: str, value: float) -> None:
    """Name the checkpoint of `step` the best so far (checkpoints/best.json); pruning keeps it."""
    tmp = folder / f".{BEST}.tmp"
    best = {"step": step, "checkpoint": checkpoint_path(folder, step).name, "metric": metric, "value": value}
    tmp.write_text(json.dumps(best, indent=1), encoding="utf-8")
    os.replace(tmp, folder / BEST)


def best_checkpoint(folder: Path) -> Path | None:
    path = folder / BEST
    return folder / json.loads(path.read_text(encoding="utf-8"))["checkpoint"] if path.exists() else None


# --- loading -------------------------------------------------------------------------------------


def load_plain(path: Path, allowed: list | None = None, map_location=None):
    """A .pt file of tensors, numbers, strings and plain containers (an optimizer's or a schedule's
    state), read without running any code a planted file may hold. allowed: classes it may also
    build (DeepSpeed's loss scaler); they must be inert, holding data only."""
    try:
        with torch.serialization.safe_globals(allowed or []):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise unsafe(path, str(exc)) from None


def unsafe(path: Path, detail: str) -> UnsafeCheckpoint:
    found = re.search(r"GLOBAL (\S+)", detail)
    what = f"it calls for {found.group(1)}" if found else detail.splitlines()[0] if detail else "it is no tensor file"
    return UnsafeCheckpoint(
        f"{path}: holds Python objects besides tensors, numbers and strings ({what}); loading it could run code, so "
        "Tailor refuses it. Start afresh: run without --resume; or, if you trust where the file came from, load it "
        "yourself (torch.load(…, weights_only=False)) and save its tensors and numbers again")


def load_weights(path: Path, model) -> None:
    """The trainable weights of a checkpoint written whole, into `model` (optimizer and RNG untouched)."""
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    unknown = [n for n in weights if n not in params]
    if missing or unknown:
        raise CheckpointError(f"{path}: checkpoint does not match the model being trained (missing {missing[:3]}, "
                              f"unexpected {unknown[:3]}); start a new run without --resume")
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t)


def load_checkpoint(path: Path, model, optimizer, scheduler, parallel, rank: int = 0) -> dict:
    parallel.load(path, model, optimizer)
    scheduler.load_state_dict(load_plain(path / "scheduler.pt"))
    rng_file = path / f"rng-{rank}.json"
    if rng_file.exists():
        set_rng_state(json.loads(rng_file.read_text(encoding="utf-8")))
    return json.loads((path / "state.json").read_text(encoding="utf-8"))


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
