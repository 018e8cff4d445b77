"""When the gate fails: the cause and the next settings (tailor/evaluate/ladder.py), and
`tailor train --until-gate-passes N`, which follows them."""

from __future__ import annotations

import pytest

from tailor.evaluate.ladder import next_step
from tailor.runs import Run

FORGOT = {"passed": False, "checks": [{"name": "gain on rouge_l", "passed": True},
                                      {"name": "general-question drop", "passed": False}]}
NO_GAIN = {"passed": False, "checks": [{"name": "gain on rouge_l", "passed": False},
                                       {"name": "general-question drop", "passed": True}]}
JOB = {"technique": "task", "training": {"learning_rate": 4e-4, "epochs": 4.0, "replay": {"share": 0.2}}}


def test_forgetting_halves_the_rate_and_replays_more():
    step = next_step(FORGOT, JOB, steps=40, examples=178)
    assert step.settings == {"training.learning_rate": 2e-4, "training.replay.share": 0.35}
    assert "forgot general skills" in step.cause and "178 training examples" in step.cause
    assert step.overrides() == ["training.learning_rate=0.0002", "training.replay.share=0.35"]
    # Twice halved from where it started: the epochs are halved too; the share stops at 0.5.
    later = {"technique": "task", "training": {"learning_rate": 1e-4, "epochs": 4.0, "replay": {"share": 0.5}}}
    step = next_step(FORGOT, later, steps=40, examples=178, start_lr=4e-4)
    assert step.settings == {"training.learning_rate": 5e-5, "training.epochs": 2.0}
    # Replay turned off: the first thing to try is turning it on.
    off = {"technique": "task", "training": {"learning_rate": 4e-4, "epochs": 4.0, "replay": {"enabled": False}}}
    step = next_step(FORGOT, off, 40, 178)
    assert step.settings == {"training.replay.enabled": True} and "replay was off" in step.cause
    # A technique that does not replay: only the schedule changes.
    pairs = {"technique": "preference", "training": {"learning_rate": 4e-4, "epochs": 4.0}}
    assert next_step(FORGOT, pairs, 40, 178).settings == {"training.learning_rate": 2e-4}


def test_no_gain_trains_longer():
    step = next_step(NO_GAIN, JOB, steps=12, examples=60)
    assert step.settings == {"training.epochs": 8.0, "training.learning_rate": pytest.approx(6e-4)}
    assert "did not learn the task" in step.cause
    assert next_step(NO_GAIN, JOB, steps=100, examples=60).settings == {"training.epochs": 8.0}
    capped = {"training": {"learning_rate": 4e-4, "epochs": 8.0}}
    assert next_step(NO_GAIN, capped, steps=100, examples=60) is None  # nothing left to try on this rung


def test_passed_or_skipped_gates_have_no_next_step():
    assert next_step({"passed": True, "checks": [{"name": "gain on rouge_l", "passed": True}]}, JOB, 10, 10) is None
    assert next_step({"passed": True, "checks": [{"name": "general-question drop", "passed": None}]}, JOB, 10, 10) \
        is None


def test_until_gate_passes_retries_with_the_next_rung(tmp_path, tiny_model_dir, make_job):
    from typer.testing import CliRunner

    from tailor.cli import app

    from conftest import prepared_conversations

    prepared = prepared_conversations(tmp_path, tiny_model_dir, 40, validation=4, test=4)
    # A gain of 1.0 is out of reach for the tiny random model: every attempt fails on gain.
    job = make_job(data={"train": [str(prepared)]}, training={"max_steps": None, "epochs": 1.0},
                   eval={"max_examples": 3, "max_new_tokens": 4, "retention": False,
                         "gate": {"min_gain": 1.0, "max_retention_drop": None}})
    result = CliRunner().invoke(app, ["train", str(job), "--no-progress", "--until-gate-passes", "1"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "gate failed" in result.stderr and "did not learn the task" in result.stderr
    assert "Attempt 2 of 2: epochs 1 → 2" in result.stderr
    assert "no attempt passed the gate" in result.stdout
    runs = sorted(p for p in (tmp_path / "runs" / "tiny").iterdir() if p.is_dir())
    assert len(runs) == 2
    assert [Run(r).raw_job()["training"]["epochs"] for r in runs] == [1.0, 2.0]
    assert "next try: tailor train" in result.stderr and "--set training.epochs=4" in result.stderr
    gate = Run(runs[-1]).eval_summary()["gate"]
    assert gate["next"]["set"]["training.epochs"] == 4.0
