"""Experiment trackers: the rows of metrics.jsonl, also in TensorBoard or MLflow.

`tracking: [tensorboard, mlflow]` in the job turns them on. Both are optional extras, imported
only when asked for, and get the same numbers: every train and eval row as it is written
(train/loss, eval/val_loss … by optimizer step), the job's settings as parameters, and the
evaluation's scores at the end (test/rouge_l_tuned, retention/qa_drop …).

    TensorBoard  RUN/tensorboard/  ->  tensorboard --logdir runs/
    MLflow       an SQLite store, output.dir/mlflow.db unless output.mlflow_uri says otherwise
                 ->  mlflow ui --backend-store-uri sqlite:///runs/mlflow.db
"""

from __future__ import annotations

import time

from tailor.errors import TailorError
from tailor.runs import Run

INSTALL = {"tensorboard": 'pip install "tailor-llm[tensorboard]" (or: pip install tensorboard)',
           "mlflow": 'pip install "tailor-llm[mlflow]" (or: pip install mlflow-skinny sqlalchemy alembic)'}


class TrackerError(TailorError, RuntimeError):
    """A tracker the job asks for that cannot start (not installed)."""


def numbers(row: dict) -> dict[str, float]:
    """The numeric values of a metrics row, minus its bookkeeping keys."""
    return {k: float(v) for k, v in row.items()
            if k not in ("type", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)}


def eval_numbers(summary: dict) -> dict[str, float]:
    """The evaluation summary as flat metric names: test/rouge_l_base, test/rouge_l_tuned,
    test/rouge_l_gain, retention/qa_accuracy_tuned, retention/qa_drop, gate/passed."""
    out = {}
    for name in ("base", "tuned"):
        out.update({f"test/{k}_{name}": v for k, v in numbers(summary[name]).items()})
    out.update({f"test/{k}_gain": v for k, v in numbers(summary.get("gain", {})).items()})
    r = summary.get("retention")
    if r:
        for name in ("base", "tuned"):
            out[f"retention/qa_accuracy_{name}"] = r[name]["qa_accuracy"]
            out[f"retention/text_perplexity_{name}"] = r[name]["text_perplexity"]
        out["retention/qa_drop"] = r["qa_drop"]
        out["retention/perplexity_increase"] = r["perplexity_increase"]
    out["gate/passed"] = float(summary["gate"]["passed"])
    return out


class TensorBoard:
    def __init__(self, run: Run, params: dict):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise TrackerError(f"tracking: tensorboard needs the tensorboard package ({e}); "
                               f"{INSTALL['tensorboard']}") from e
        self.writer = SummaryWriter(log_dir=str(run.tensorboard_dir))
        self.writer.add_text("job", "\n".join(f"    {k}: {v}" for k, v in sorted(params.items())))

    def log(self, row: dict) -> None:
        for key, value in numbers(row).items():
            self.writer.add_scalar(f"{row.get('type', 'train')}/{key}", value, row.get("step", 0))
        self.writer.flush()

    def log_final(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MLflow:
    """One MLflow run per Tailor run, in an experiment named after the job. A resumed run logs into
    the same MLflow run (its id is kept in RUN/mlflow_run_id)."""

    def __init__(self, run: Run, experiment: str, params: dict, uri: str):
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as e:
            raise TrackerError(f"tracking: mlflow needs MLflow ({e}); {INSTALL['mlflow']}") from e
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        id_file = run.mlflow_id_file
        if id_file.exists():
            self.run_id = id_file.read_text(encoding="utf-8").strip()
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=run.id,
                                                 tags={"tailor.run_dir": str(run.path)}).info.run_id
            id_file.write_text(self.run_id, encoding="utf-8")
            from mlflow.entities import Param

            # MLflow caps a parameter value at 6,000 characters; a job value is never near that.
            self.client.log_batch(self.run_id, params=[Param(k, str(v)[:6000]) for k, v in sorted(params.items())])

    def log(self, row: dict) -> None:
        self._log({f"{row.get('type', 'train')}/{k}": v for k, v in numbers(row).items()}, row.get("step", 0))

    def log_final(self, values: dict[str, float], step: int) -> None:
        self._log(values, step)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)

    def _log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])


def open_trackers(names: list[str], run: Run, experiment: str, params: dict, mlflow_uri: str) -> list:
    trackers = []
    for name in names:
        if name == "tensorboard":
            trackers.append(TensorBoard(run, params))
        elif name == "mlflow":
            trackers.append(MLflow(run, experiment, params, mlflow_uri))
    return trackers
