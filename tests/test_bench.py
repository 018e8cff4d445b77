"""The throughput benchmark runs end to end on a tiny model (its numbers are not checked: it is
not a timed test, only a check that the script still works and prints its machine-readable line)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("data", ["support", "corpus"])
def test_train_throughput_bench_runs_on_a_tiny_model(tiny_model_dir, data):
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "train_throughput.py"), "--model", str(tiny_model_dir),
         "--examples", "12", "--eval-examples", "4", "--max-steps", "3", "--threads", "1", "--warmup-steps", "1",
         "--no-compile", "--data", data],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert re.fullmatch(r"tailor/trainer=\d+\.\d\d tailor/trl=\d+\.\d\d utilisation=\d+% "
                        r"loss_delta=[+-]\d+\.\d% memory/trl=\d+\.\d\d", lines[-1]), lines[-1]
    for variant in ("tailor", "trainer", "trl"):
        assert re.search(rf"pass 1 {variant}\s+\d+\.\d tok/s", result.stdout)


def test_train_profile_bench_splits_a_step_into_classes(tiny_model_dir):
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "train_profile.py"), "--model", str(tiny_model_dir), "--max-len", "64",
         "--warmup", "1", "--steps", "2", "--threads", "1", "--top", "0"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    shares = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\S+)\s+(\d+\.\d+)\s+\d+%$", result.stdout, re.M)}
    assert set(shares) == {"matmul", "attention", "element-wise", "casts", "optimizer", "framework"}
    assert shares["matmul"] > 0 and shares["attention"] > 0, result.stdout


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


def test_outcome_bench_writes_held_out_sets_from_the_public_corpus(tmp_path):
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("outcome", ROOT / "bench" / "outcome.py")
    outcome = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(outcome)

    for name, (n_train, n_test) in {"trivia": (222, 39), "coding": (82, 14)}.items():
        train, test = outcome.write_set(name, tmp_path / name)
        rows = {split: [json.loads(line) for line in f.read_text().splitlines()] for split, f in
                (("train", train), ("test", test))}
        assert (len(rows["train"]), len(rows["test"])) == (n_train, n_test)
        assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in rows["train"] + rows["test"])
        held_out = {r["messages"][0]["content"] for r in rows["test"]}
        assert not held_out & {r["messages"][0]["content"] for r in rows["train"]}  # the split holds out
        assert outcome.write_set(name, tmp_path / "again")[0].read_text() == train.read_text()  # seeded
