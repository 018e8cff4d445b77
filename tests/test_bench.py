"""The throughput benchmark runs end to end on a tiny model (its numbers are not checked: it is
not a timed test, only a check that the script still works and prints its machine-readable line)."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_throughput_bench_runs_on_a_tiny_model(tiny_model_dir):
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "train_throughput.py"), "--model", str(tiny_model_dir),
         "--examples", "12", "--eval-examples", "4", "--max-steps", "3", "--threads", "1", "--warmup-steps", "1",
         "--no-compile"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert re.fullmatch(r"tailor/trainer=\d+\.\d\d tailor/trl=\d+\.\d\d utilisation=\d+% "
                        r"loss_delta=\d+\.\d% memory/trl=\d+\.\d\d", lines[-1]), lines[-1]
    for variant in ("tailor", "trainer", "trl"):
        assert re.search(rf"pass 1 {variant}\s+\d+\.\d tok/s", result.stdout)


def test_generate_throughput_bench_runs_on_a_tiny_model(tiny_model_dir):
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "generate_throughput.py"), "--model", str(tiny_model_dir),
         "--prompts", "3", "--max-new-tokens", "4", "--repeats", "1", "--threads", "1"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"one-at-a-time_float32=\d+\.\d batched_float32=\d+\.\d "
                        r"one-at-a-time_bfloat16=\d+\.\d batched_bfloat16=\d+\.\d", last), last
