"""Faults a training run must survive: SIGKILL at random instants (inside checkpoint saves too), a
checkpoint file damaged on disk, a full disk, a planted pickle, a second process on the same run.

The killed runs are forked from a fork server that has torch, transformers and Tailor imported
already, so each starts in a fraction of a second (a fresh interpreter would take seconds). Not
from this process: after the tests before it, it holds threads (OpenMP's pool, servers' threads)
whose locks a forked child inherits taken, and waits on forever. The reference run is a child too,
so that every run is made the same way. Every child is a daemon: one that hangs is ended when the
suite ends, rather than joined forever (pytest would never exit).
"""

from __future__ import annotations

import errno
import io
import json
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from tailor.runs import Run, RunLocked
from tailor.spec import load_job
from tailor.techniques import task
from tailor.train.checkpoint import (
    CHECKSUMS,
    HASH,
    SAVE_STALL,
    CheckpointError,
    UnsafeCheckpoint,
    file_hash,
    list_checkpoints,
    verify,
)

FORK = multiprocessing.get_context("forkserver")
# What a run imports (deepspeed and mlflow come through accelerate's unwrap_model: 1.4 s a child)
FORK.set_forkserver_preload(["torch", "transformers", "peft", "deepspeed", "plotly", "tailor.techniques.task",
                             "tailor.evaluate.report", "test_faults"])
KILLS, STEPS, STALL = 20, 10, 0.05


def run(job_path: Path, *overrides: str, resume: bool = False, console: Console | None = None) -> Path:
    return task.run(load_job(job_path, list(overrides)), resume=resume, show_progress=False,
                    console=console or Console(file=io.StringIO()))


def losses_by_step(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in Run(run_dir).metrics() if r["type"] == "train"]


def result_weights(run_dir: Path) -> dict:
    return load_file(str(Run(run_dir).adapter_dir / "adapter_model.safetensors"))


def small_job(make_job, name: str, steps: int = 4, **training):
    return make_job(name, training={"max_steps": steps, "save_every": 1, "keep_checkpoints": 2, **training},
                    eval={"enabled": False})


# --- kills ------------------------------------------------------------------------------------------


def _train_in_child(path: Path, out: Path, resume: bool) -> None:
    # One process each. A DeepSpeed run earlier in the suite leaves LOCAL_RANK in the environment
    # the fork server copied (DeepSpeed reads it while it trains); with it, accelerate would take this
    # process for one of a torchrun group and wait for a MASTER_ADDR.
    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(name, None)
    os.environ[SAVE_STALL] = str(STALL)  # each save pauses before it publishes: room for a kill inside it
    run(path, f"output.dir={out}", resume=resume)


def _saving_since(out: Path, started: float) -> bool:
    """A checkpoint being written (its temporary folder) by the child started at `started`."""
    return any(tmp.stat().st_mtime >= started for tmp in out.glob("*/*/checkpoints/.step-*.tmp"))


def _kill_sometime(child, out: Path, started: float, instant: float, in_save: bool, delay: float) -> bool | None:
    """SIGKILL `child` `instant` seconds after it started, or (in_save) at the first checkpoint save
    after that, `delay` seconds into it. None: it finished first; else whether a save was cut."""
    child.join(max(0.0, started + instant - time.time()))
    deadline = time.time() + 120
    while in_save and child.is_alive() and not _saving_since(out, started):
        assert time.time() < deadline, "the run has neither saved nor ended in 2 minutes"
        time.sleep(0.002)
    if in_save:
        time.sleep(delay)
    if not child.is_alive():
        return None
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    return _saving_since(out, started)


def _tear_newest(out: Path, pick: float) -> Path | None:
    """What a power cut does to files that were never fsynced: cut one file of the newest
    checkpoint in half (only while an older checkpoint exists to fall back to). The one torn."""
    checkpoints = [c for folder in out.glob("*/*/checkpoints") for c in list_checkpoints(folder)]
    if len(checkpoints) < 2:
        return None
    newest = checkpoints[-1]
    files = sorted(json.loads((newest / CHECKSUMS).read_text())["files"])
    victim = newest / files[int(pick * len(files))]
    os.truncate(victim, victim.stat().st_size // 2)
    return newest


def test_killed_twenty_times_at_random_instants_ends_as_the_uninterrupted_run(make_job, tmp_path):
    path = small_job(make_job, "faults", STEPS)
    warm = FORK.Process(target=int, daemon=True)  # starts the fork server, so that its start is not timed below
    warm.start()
    warm.join()
    started = time.perf_counter()
    reference_child = FORK.Process(target=_train_in_child, args=(path, tmp_path / "whole", False), daemon=True)
    reference_child.start()
    reference_child.join(120)
    assert reference_child.exitcode == 0, f"the uninterrupted run failed (exit {reference_child.exitcode})"
    span = time.perf_counter() - started  # how long one uninterrupted run takes, stalls included
    whole = Run.latest(tmp_path / "whole", "faults").path
    rng = random.Random(22)
    kills, cut_saves, tears_wanted, tears, torn, finished = 0, 0, 0, 0, set(), []
    out = tmp_path / "faulted-0"
    while True:
        latest = Run.latest(out, "faults")
        if latest is not None and latest.done:  # a run that outlived its kill: check it, then fault a new one
            finished.append(latest.path)
            if kills == KILLS:
                break
            out, latest = tmp_path / f"faulted-{len(finished)}", None
        # Everything random is drawn before anything timed, so the seed fixes the same draws on any machine.
        instant, in_save, delay, tear, pick = rng.uniform(0, span), rng.random() < 0.5, rng.uniform(0, STALL), \
            rng.random() < 0.3, rng.random()
        child_started = time.time()
        child = FORK.Process(target=_train_in_child, args=(path, out, latest is not None), daemon=True)
        child.start()
        if kills == KILLS:
            child.join(120)
            if child.is_alive():
                child.kill()
        else:
            cut = _kill_sometime(child, out, child_started, instant, in_save, delay)
            if cut is not None:
                kills, cut_saves = kills + 1, cut_saves + cut
                killed = Run.latest(out, "faults")
                for checkpoint in list_checkpoints(killed.checkpoints_dir) if killed else []:
                    # a kill never leaves a half-written checkpoint under its final name (one torn
                    # below stays torn until a resumed run skips it)
                    problem = verify(checkpoint)
                    assert problem is None or checkpoint in torn, f"kill {kills}: {checkpoint}: {problem}"
                tears_wanted += tear
                if tears_wanted > tears and (checkpoint := _tear_newest(out, pick)):
                    tears, torn = tears + 1, torn | {checkpoint}
        assert child.exitcode in (0, -signal.SIGKILL), f"the run failed by itself (exit {child.exitcode}): see stderr"
    assert kills == KILLS and cut_saves >= 1 and tears >= 1, (kills, cut_saves, tears)
    reference, reference_weights = losses_by_step(whole), result_weights(whole)
    assert [s for s, _ in reference] == list(range(1, STEPS + 1))
    for faulted in finished:
        assert losses_by_step(faulted) == reference  # exactly: CPU, float32, the same seeds
        weights = result_weights(faulted)
        assert weights.keys() == reference_weights.keys()
        assert all(torch.equal(weights[k], reference_weights[k]) for k in weights)


# --- damaged checkpoints ---------------------------------------------------------------------------


def interrupted(run_dir: Path) -> Run:
    """The run as a kill after its last checkpoint leaves it: no result, no DONE."""
    import shutil

    shutil.rmtree(Run(run_dir).adapter_dir)
    Run(run_dir).done_file.unlink()
    return Run(run_dir)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before_and_says_so(make_job, damage):
    path = small_job(make_job, f"damaged-{damage}")
    whole = run(path)
    reference = losses_by_step(whole)
    folder = interrupted(whole)
    newest = list_checkpoints(folder.checkpoints_dir)[-1]
    assert newest.name == "step-0000004"
    weights = newest / "trainable.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "truncate":
        weights.write_bytes(data[:len(data) // 2])
    else:  # the same size, one bit different: only the checksum tells
        data[-1] ^= 1
        weights.write_bytes(data)
    said = io.StringIO()
    run(path, resume=True, console=Console(file=said, width=1000))
    assert Run(whole).summary()["resumed_from_step"] == 3
    message = said.getvalue()
    assert "step-0000004" in message and "trainable.safetensors" in message and "resumes from step-0000003" in message
    assert losses_by_step(whole) == reference


def test_a_run_with_no_complete_checkpoint_is_refused_with_the_reasons(make_job):
    path = small_job(make_job, "all-damaged", steps=2, keep_checkpoints=1)
    folder = interrupted(run(path))
    (list_checkpoints(folder.checkpoints_dir)[-1] / CHECKSUMS).unlink()
    with pytest.raises(CheckpointError, match=r"no complete checkpoint to resume from \(step-0000002: no checksums"
                                              r".*Start afresh: run without --resume"):
        run(path, resume=True)


# --- pickles ---------------------------------------------------------------------------------------


class Payload:
    """What a planted pickle does when it is loaded: here, leave a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(file: Path, marker: Path, checkpoint: Path | None = None) -> None:
    """A pickle with a payload in place of `file`; with the checkpoint's checksums made to match, as
    someone who planted it would."""
    torch.save({"state": {}, "param_groups": Payload(marker)}, file)
    if checkpoint is not None:
        listing = json.loads((checkpoint / CHECKSUMS).read_text())
        name = file.relative_to(checkpoint).as_posix()
        listing["files"][name] = {HASH: file_hash(file), "bytes": file.stat().st_size}
        (checkpoint / CHECKSUMS).write_text(json.dumps(listing))


@pytest.mark.parametrize("planted", ["optimizer.pt", "scheduler.pt"])
def test_a_planted_pickle_in_a_checkpoint_is_refused_and_never_runs(make_job, tmp_path, planted):
    path = small_job(make_job, f"planted-{planted[:5]}", steps=1)
    folder = interrupted(run(path))
    checkpoint = list_checkpoints(folder.checkpoints_dir)[-1]
    marker = tmp_path / "payload-ran"
    plant(checkpoint / planted, marker, checkpoint)
    with pytest.raises(UnsafeCheckpoint) as refused:
        run(path, resume=True)
    message = str(refused.value)
    assert str(checkpoint / planted) in message and "could run code" in message and "posix.system" in message
    assert "run without --resume" in message
    assert not marker.exists()


def test_a_checkpoint_of_the_old_pickle_format_is_refused(make_job, tmp_path):
    path = small_job(make_job, "old-format", steps=1)
    folder = interrupted(run(path))
    checkpoint = list_checkpoints(folder.checkpoints_dir)[-1]
    (checkpoint / CHECKSUMS).unlink()
    (checkpoint / "rng-0.json").unlink()
    plant(checkpoint / "rng-0.pt", tmp_path / "payload-ran")  # how versions before checksums kept the RNG states
    with pytest.raises(CheckpointError, match=r"rng-0.pt\), which can run code when loaded.*run without --resume"):
        run(path, resume=True)
    assert not (tmp_path / "payload-ran").exists()


def test_a_planted_shard_index_is_refused_and_never_runs(tmp_path):
    """FSDP's shards come with an index (.metadata) that torch unpickles with pickle.load."""
    import pickle

    from tailor.train.distributed import _safe_reader

    marker = tmp_path / "payload-ran"
    (tmp_path / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(UnsafeCheckpoint, match=r"\.metadata: holds Python objects.*posix.system"):
        _safe_reader(tmp_path).read_metadata()
    assert not marker.exists()


def test_deepspeeds_files_are_read_without_running_a_planted_pickle(tmp_path):
    pytest.importorskip("deepspeed")
    from tailor.train.distributed import _WeightsOnlyEngine

    marker = tmp_path / "payload-ran"
    plant(tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    with pytest.raises(UnsafeCheckpoint, match="could run code"):
        _WeightsOnlyEngine(None).load(str(tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    assert not marker.exists()


# --- a full disk ----------------------------------------------------------------------------------


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint_and_says_how_to_continue(make_job, monkeypatch):
    path = small_job(make_job, "disk-full", steps=4, save_every=2)
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if ".step-0000004.tmp" in str(f):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(CheckpointError) as failed:
        run(path)
    monkeypatch.undo()
    folder = Run.latest(Path(load_job(path, []).output.dir), "disk-full")
    message = str(failed.value)
    assert f"run {folder.path}" in message and "the disk is full" in message
    assert "--resume` continues from step 2" in message
    assert [c.name for c in list_checkpoints(folder.checkpoints_dir)] == ["step-0000002"]
    assert not list(folder.checkpoints_dir.glob(".step-*"))  # the half-written one is gone: its space is free
    run(path, resume=True)
    assert folder.done and folder.summary()["resumed_from_step"] == 2


# --- two writers ----------------------------------------------------------------------------------


def _hold_lock(run_dir: Path, ready) -> None:
    Run(run_dir).lock()
    ready.send(True)
    time.sleep(60)


def test_a_second_process_on_the_same_run_is_refused_until_the_first_ends(make_job):
    path = small_job(make_job, "two-writers", steps=1)
    folder = interrupted(run(path))
    ready, ready_child = FORK.Pipe()
    holder = FORK.Process(target=_hold_lock, args=(folder.path, ready_child), daemon=True)
    holder.start()
    try:
        assert ready.poll(30)
        with pytest.raises(RunLocked, match=rf"run two-writers/{folder.id} is being written by another process "
                                            rf"\(pid {holder.pid}\)"):
            run(path, resume=True)
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # a killed holder's lock is gone with it
        holder.join()
    run(path, resume=True)
    assert folder.done
