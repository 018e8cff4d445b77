"""Data parallel training with torchrun: 2 CPU processes (gloo) match 1 process with the same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import train_losses
from tailor.spec import load_job
from tailor.techniques import task


def test_two_processes_equal_one_with_the_same_global_batch(make_job, tmp_path):
    # One epoch of 19 packed rows in global batches of 6: the last step has a single row, so the
    # second process has none and must still take part in the gradient all-reduce.
    path = make_job("ddp", training={"max_steps": None, "epochs": 1, "save_every": 2})
    single = task.run(load_job(path, ["training.batch_size=6"]), show_progress=False)
    assert len(train_losses(single)) == 4

    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "tailor", "train", str(path),
         "--set", "training.batch_size=3", "--set", f"output.dir={tmp_path / 'ddp-runs'}", "--no-progress"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 process(es)" in result.stderr
    runs = list((tmp_path / "ddp-runs" / "ddp").iterdir())
    assert len(runs) == 1 and (runs[0] / "DONE").exists()
    assert train_losses(runs[0]) == pytest.approx(train_losses(single), abs=1e-5)
