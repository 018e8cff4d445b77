"""The throughput benchmark runs end to end on a tiny model (its numbers are not checked: it is
not a timed test, only a check that the script still works and prints its machine-readable line)."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _train_throughput(tiny_model_dir, *extra: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "train_throughput.py"), "--model", str(tiny_model_dir),
         "--examples", "12", "--eval-examples", "4", "--max-steps", "3", "--threads", "1", "--warmup-steps", "1",
         "--no-compile", *extra],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_train_throughput_bench_runs_on_a_tiny_model(tiny_model_dir):
    result = _train_throughput(tiny_model_dir, "--data", "support")
    lines = result.stdout.strip().splitlines()
    assert re.fullmatch(r"tailor/trainer=\d+\.\d\d tailor/trl=\d+\.\d\d utilisation=\d+% "
                        r"loss_delta=[+-]\d+\.\d% memory/trl=\d+\.\d\d", lines[-1]), lines[-1]
    for variant in ("tailor", "trainer", "trl"):
        assert re.search(rf"pass 1 {variant}\s+\d+\.\d tok/s", result.stdout)


def test_train_throughput_bench_reads_the_public_corpus(tiny_model_dir):
    # Tailor's variant alone: the peers read the same examples (tested above), and each costs a process.
    result = _train_throughput(tiny_model_dir, "--data", "corpus", "--variants", "tailor")
    assert re.search(r"pass 1 tailor\s+\d+\.\d tok/s", result.stdout), result.stdout


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


def test_serve_load_bench_answers_rude_clients_and_keeps_every_rating(tiny_model_dir):
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "serve_load.py"), "--model", str(tiny_model_dir),
         "--clients", "8", "--requests", "40", "--max-tokens", "8", "--hang-up-after", "0.05"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    fields = dict(item.split("=") for item in last.split())
    assert fields["errors"] == "0" and int(fields["feedback_sent"]) > 0, result.stdout
    assert fields["feedback_sent"] == fields["feedback_stored"], last
    assert "bad: 400" in result.stdout and "hung up" in result.stdout, result.stdout
