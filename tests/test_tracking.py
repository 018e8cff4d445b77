"""tracking: [tensorboard, mlflow] get the same numbers as metrics.jsonl, and the evaluation's."""

import pytest

from tailor.runs import Run

from conftest import assert_declared


def test_tensorboard_and_mlflow_receive_every_row(tmp_path, make_job):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tailor.spec import load_job
    from tailor.techniques import task

    uri = f"sqlite:///{tmp_path / 'ml.db'}"
    job = load_job(make_job("tracked", tracking=["tensorboard", "mlflow"], output={"mlflow_uri": uri},
                            data={"validation_fraction": 0.25}, training={"max_steps": 3, "eval_every": 1}))
    run_dir = task.run(job, show_progress=False)
    assert_declared(run_dir)
    rows = Run(run_dir).metrics()
    train = [r for r in rows if r["type"] == "train"]
    evals = [r for r in rows if r["type"] == "eval"]

    events = EventAccumulator(str(Run(run_dir).tensorboard_dir))
    events.Reload()
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars("train/loss")] == \
        [(r["step"], r["loss"]) for r in train]
    assert [e.step for e in events.Scalars("eval/val_loss")] == [r["step"] for r in evals]

    client = MlflowClient(tracking_uri=uri)
    run_id = (Run(run_dir).mlflow_id_file).read_text().strip()
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(r["step"], pytest.approx(r["loss"])) for r in train]
    run = client.get_run(run_id)
    assert run.data.params["training.max_steps"] == "3" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "tracked"


def test_a_missing_tracker_says_how_to_install_it(tmp_path, make_job, monkeypatch):
    import builtins

    from typer.testing import CliRunner

    from tailor.cli import app

    real_import = builtins.__import__

    def no_mlflow(name, *args, **kwargs):
        if name.startswith("mlflow"):
            raise ImportError("No module named 'mlflow'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    result = CliRunner().invoke(app, ["train", str(make_job("t", tracking=["mlflow"])), "--no-progress"])
    assert result.exit_code == 2 and "tailor-llm[mlflow]" in result.stderr


def test_eval_numbers_flatten_the_summary():
    from tailor.track.trackers import eval_numbers

    summary = {"base": {"rouge_l": 0.1, "perplexity": None}, "tuned": {"rouge_l": 0.3, "perplexity": 5.0},
               "gain": {"rouge_l": 0.2}, "gate": {"passed": True},
               "retention": {"base": {"qa_accuracy": 0.5, "text_perplexity": 10.0},
                             "tuned": {"qa_accuracy": 0.4, "text_perplexity": 11.0},
                             "qa_drop": 0.1, "perplexity_increase": 0.1}}
    values = eval_numbers(summary)
    assert values["test/rouge_l_tuned"] == 0.3 and values["test/rouge_l_gain"] == 0.2
    assert "test/perplexity_base" not in values  # None is not a number
    assert values["retention/qa_drop"] == 0.1 and values["gate/passed"] == 1.0
