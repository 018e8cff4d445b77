"""Sweeps on the tiny model: the space checked against the job schema, a sweep that prunes, is
killed and resumes, keeps only its best trial's weights, and whose best.yaml trains; the
objective and the retention rule read back from the trials' own run folders."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tailor.runs import Run
from tailor.spec import GateSpec, load_job
from tailor.sweep.space import SpaceError, read_space
from tailor.sweep.study import RETENTION_PENALTY, Objective, SweepFolder

from conftest import prepared_conversations


@pytest.fixture
def sweep_job(tmp_path, tiny_model_dir) -> Path:
    prepared = prepared_conversations(tmp_path, tiny_model_dir, 60, validation=8, test=8)
    job = {"name": "tiny", "model": {"base": str(tiny_model_dir), "dtype": "float32"},
           "data": {"train": [str(prepared)]},
           "adapter": {"kind": "lora", "rank": 4, "alpha": 8},
           "training": {"learning_rate": 1e-2, "epochs": 2, "batch_size": 2, "max_seq_len": 256, "log_every": 2,
                        "eval_every": 4, "save_every": 4, "warmup_ratio": 0.1, "threads": 1, "seed": 7,
                        "replay": {"enabled": False}},
           "eval": {"max_examples": 4, "gate": {"metric": "token_accuracy", "min_gain": 0.0,
                                                "max_retention_drop": 0.5}},
           "output": {"dir": str(tmp_path / "runs")}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job), encoding="utf-8")
    return path


def _space(tmp_path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_the_space_is_checked_against_the_job_schema(tmp_path, sweep_job):
    with pytest.raises(SpaceError, match=r"training.learnig_rate: not a job key; did you mean "
                                         r"'training.learning_rate'"):
        read_space(_space(tmp_path, "training.learnig_rate: {log_uniform: [1.0e-4, 1.0e-2]}\n"), sweep_job)
    with pytest.raises(SpaceError, match=r"adapter.rank = 0 is not a valid value"):  # the schema's own rule
        read_space(_space(tmp_path, "adapter.rank: {categorical: [0, 4]}\n"), sweep_job)
    with pytest.raises(SpaceError, match=r"did you mean 'adapter.rank'\?; adapter.alpha = 0 is not"):  # all at once
        read_space(_space(tmp_path, "adapter.rnk: {int: [2, 8]}\nadapter.alpha: {categorical: [0, 8]}\n"), sweep_job)
    with pytest.raises(SpaceError, match=r"expected one of log_uniform, uniform, int, categorical"):
        read_space(_space(tmp_path, "training.epochs: {normal: [1, 3]}\n"), sweep_job)
    with pytest.raises(SpaceError, match=r"low 3 must be below high 1"):
        read_space(_space(tmp_path, "training.epochs: {int: [3, 1]}\n"), sweep_job)
    with pytest.raises(SpaceError, match=r"log_uniform: low must be above 0"):
        read_space(_space(tmp_path, "training.warmup_ratio: {log_uniform: [0.0, 0.2]}\n"), sweep_job)
    params = read_space(_space(tmp_path, "training.learning_rate: {log_uniform: [1.0e-4, 1.0e-2]}\n"
                                         "adapter.lora_top_blocks: {int: [1, 2]}\n"
                                         "training.layer_lr_decay: {uniform: [0.8, 1.0]}\n"), sweep_job)
    assert [(p.key, p.kind) for p in params] == [("training.learning_rate", "log_uniform"),
                                                 ("adapter.lora_top_blocks", "int"),
                                                 ("training.layer_lr_decay", "uniform")]


def _fake_trial(root: Path, name: str, val: float, qa_drop: float) -> Run:
    run = Run.new(root, name)
    run.write_summary({"steps": 10, "final_val": {"val_rouge_l": val}})
    retention = {"base": {"qa_accuracy": 0.6, "text_perplexity": 10.0},
                 "tuned": {"qa_accuracy": 0.6 - qa_drop, "text_perplexity": 10.0}, "questions": 40,
                 "qa_drop": qa_drop, "perplexity_increase": 0.0}
    run.write_eval({"gain": {"rouge_l": val - 0.1}, "retention": retention, "gate": {"passed": True}}, [], None)
    return run


def test_a_trial_that_forgets_ranks_below_every_trial_that_does_not(tmp_path):
    objective = Objective("rouge_l", base=0.1, gate=GateSpec(metric="rouge_l", max_retention_drop=0.05))
    forgets = objective.score(_fake_trial(tmp_path, "a", val=0.9, qa_drop=0.20))  # the best gain, over the limit
    keeps = objective.score(_fake_trial(tmp_path, "b", val=0.12, qa_drop=0.05))  # a small gain, at the limit
    assert forgets["gain"] == pytest.approx(0.8) and forgets["retention_passed"] is False
    assert keeps["gain"] == pytest.approx(0.02) and keeps["retention_passed"] is True
    assert forgets["value"] == pytest.approx(0.8 - RETENTION_PENALTY) and keeps["value"] == pytest.approx(0.02)
    assert forgets["value"] < keeps["value"]
    assert "general-question drop" in forgets["retention_reasons"][0]


def _finished_trials(db: Path) -> list:
    import optuna

    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{db}")
    return study.trials


def test_a_killed_sweep_resumes_prunes_and_keeps_the_best(tmp_path, sweep_job):
    import optuna

    space = _space(tmp_path, "training.learning_rate: {log_uniform: [1.0e-5, 3.0e-2]}\n"
                             "adapter.rank: {categorical: [2, 4, 8]}\n")
    folder = SweepFolder(tmp_path / "sweep")
    command = [sys.executable, "-m", "tailor", "sweep", str(sweep_job), "--space", str(space), "--trials", "6",
               "--out", str(folder.path)]
    env = {**os.environ, "COLUMNS": "200"}
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # Killed while a trial after the third trains: its run folder has rows and no DONE.
    deadline = time.monotonic() + 240
    killed_in = None
    while killed_in is None and time.monotonic() < deadline and first.poll() is None:
        for n in (3, 4, 5):
            run = folder.run_of(f"trial-{n:03d}")
            if run is not None and run.metrics() and not run.done:
                first.send_signal(signal.SIGKILL)
                killed_in = n
                break
        time.sleep(0.02)
    log = first.communicate(timeout=60)[0]
    assert killed_in is not None, log
    trials = _finished_trials(folder.study_db)
    assert any(t.state == optuna.trial.TrialState.RUNNING for t in trials), log

    # The second start in this process (a new one would only import everything again).
    from tailor.sweep.study import sweep

    said = []
    result = sweep(sweep_job, space, folder.path, trials=6, say=lambda m, **k: said.append(str(m)))
    assert result["trials"] == 6 and result["best"] is not None
    assert any("was interrupted: it continues from its last checkpoint" in m for m in said), said
    trials = _finished_trials(folder.study_db)
    state = optuna.trial.TrialState
    counted = [t for t in trials if t.state in (state.COMPLETE, state.PRUNED)]
    assert len(counted) == 6, [(t.number, t.state) for t in trials]
    assert any(t.state == state.PRUNED for t in trials), said
    continued = [t for t in trials if t.user_attrs.get("resumes") is not None]
    assert continued and continued[0].user_attrs["name"] == f"trial-{continued[0].user_attrs['resumes']:03d}"
    assert trials[0].user_attrs.get("start") and trials[0].params == {"training.learning_rate": 1e-2,
                                                                      "adapter.rank": 4}

    # The objective, read back from each finished trial's own run folder.
    base = json.loads(folder.state_file.read_text())["base"]
    gate = load_job(sweep_job).eval.gate
    complete = [t for t in trials if t.state == state.COMPLETE]
    for t in complete:
        run = folder.run_of(t.user_attrs["name"])
        assert run.done and run.job().name == t.user_attrs["name"]
        val = run.summary()["final_val"]["val_token_accuracy"]
        retention = run.eval_summary()["retention"]
        forgot = retention["qa_drop"] > gate.max_retention_drop
        assert t.value == pytest.approx(val - base - (RETENTION_PENALTY if forgot else 0.0))
        assert run.job().training.learning_rate == pytest.approx(t.params["training.learning_rate"])
        assert run.job().adapter.rank == t.params["adapter.rank"]

    # --keep best: only the best trial keeps weights; best.yaml is its job, and it trains.
    best = max(complete, key=lambda t: (t.value, -t.number))
    for t in trials:
        run = folder.run_of(t.user_attrs.get("name", ""))
        if run is not None:
            assert run.has_adapter == (t.number == best.number), t.number
            assert not run.checkpoints_dir.exists() or t.number == best.number
    best_job = load_job(folder.best_job_file, [f"output.dir={tmp_path / 'best-runs'}"])
    assert best_job.training.learning_rate == pytest.approx(best.params["training.learning_rate"])
    assert best_job.adapter.rank == best.params["adapter.rank"] and best_job.name == "tiny"
    html = folder.report_file.read_text()
    assert "Plotly.newPlot" in html and html.count("<tr") == len(trials) + 1

    from tailor.techniques import run as run_technique

    trained = Run(run_technique(best_job, show_progress=False))
    assert trained.done and trained.has_adapter


def test_a_sweep_folder_refuses_another_job(tmp_path, sweep_job):
    from tailor.sweep.study import SweepError, sweep

    space = _space(tmp_path, "training.learning_rate: {log_uniform: [1.0e-4, 1.0e-2]}\n")
    out = tmp_path / "sweep"
    out.mkdir()
    SweepFolder(out).state_file.write_text(json.dumps({"job": "/elsewhere/job.yaml", "job_sha256": "x",
                                                       "space": {}}))
    with pytest.raises(SweepError, match="holds a sweep of another job file"):
        sweep(sweep_job, space, out, trials=1, say=lambda *a, **k: None)


def test_the_quickstart_sweep_step_runs_its_trials_and_names_the_best(tmp_path, sweep_job):
    """`tailor quickstart --sweep`'s step 9 on the tiny model (the quickstart test runs the real
    model without it: it is not part of make demo's path)."""
    import io

    from rich.console import Console

    from tailor.quickstart import SWEEP_TRIALS, sweep_demo

    job = load_job(sweep_job)
    job.eval.retention = False  # the general-skills probe has its own tests: here, only the step
    buffer = io.StringIO()
    sweep_demo(job, tmp_path / "qs-sweep", 2, Console(file=buffer, width=200))
    text = buffer.getvalue()
    assert text.count("\ntrial ") + text.startswith("trial ") >= SWEEP_TRIALS, text
    assert "best: trial" in text and "--trials 12" in text
    assert (tmp_path / "qs-sweep" / "study" / "best.yaml").is_file()
