"""Data parallel training with torchrun: 2 CPU processes (gloo) match 1 process with the same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tailor.runs import Run
from tailor.spec import load_job
from tailor.techniques import run as run_technique
from tailor.techniques import task

from conftest import train_losses


def train_on_two_processes(path: Path, out: Path, batch_size: int) -> tuple[subprocess.CompletedProcess, Path]:
    """`tailor train` under torchrun with 2 CPU processes; (the process, its only run folder)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "tailor", "train", str(path),
         "--set", f"training.batch_size={batch_size}", "--set", f"output.dir={out}", "--no-progress"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [run for job in out.iterdir() for run in job.iterdir()]
    assert len(runs) == 1 and Run(runs[0]).done
    return result, runs[0]


def test_two_processes_equal_one_with_the_same_global_batch(make_job, tmp_path):
    # One epoch of 19 packed rows in global batches of 6: the last step has a single row, so the
    # second process has none and must still take part in the gradient all-reduce.
    path = make_job("ddp", training={"max_steps": None, "epochs": 1, "save_every": 2})
    single = task.run(load_job(path, ["training.batch_size=6"]), show_progress=False)
    assert len(train_losses(single)) == 4

    result, run_dir = train_on_two_processes(path, tmp_path / "ddp-runs", batch_size=3)
    assert "on 2 process(es)" in result.stderr and run_dir.parent.name == "ddp"
    assert train_losses(run_dir) == pytest.approx(train_losses(single), abs=1e-5)


def test_preference_training_on_two_processes_equals_one(make_job, tmp_path):
    # The preference loss through the same engine: a staged run (behavioral, preference stage only),
    # reference log-probabilities written by rank 0 and read by both, pairs split across ranks.
    import json

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({
        "prompt": [{"role": "user", "content": f"lamp question {i}?"}],
        "chosen": [{"role": "assistant", "content": f"Hello spark! answer {i} glows. Keep glowing!"}],
        "rejected": [{"role": "assistant", "content": f"Dear customer. answer {i}. Regards."}]}) + "\n"
        for i in range(14)), encoding="utf-8")
    path = make_job("ddp-pref", technique="behavioral", data={"train": [str(pairs)], "validation_fraction": 0.0},
                    behavioral={"demonstration_epochs": 0, "preference_learning_rate": 1e-2},
                    training={"max_steps": 3, "packing": False}, sequential={"max_regression": None})
    single = run_technique(load_job(path, ["training.batch_size=4"]), show_progress=False)

    _, run_dir = train_on_two_processes(path, tmp_path / "ddp-runs", batch_size=2)
    assert run_dir.parent.name == "ddp-pref"
    assert train_losses(run_dir) == pytest.approx(train_losses(single), abs=1e-5)
