"""`tailor runs`: the run folders under an output directory, one at a time or side by side.

Everything comes from the files a run writes (read through tailor.runs.Run): nothing is kept
anywhere else, so a run copied to another machine lists and compares the same. Finding runs
(Run.find, Run.resolve) is the run folder's own business.
"""

from __future__ import annotations

import json

from tailor.files import read_json
from tailor.runs import Run

# The measures `compare` and `list` show, in order: (label, where in the run's record).
MEASURES = [
    ("steps", ("train", "steps")),
    ("train loss", ("train", "final_train_loss")),
    ("validation loss", ("train", "final_val_loss")),
    ("validation token accuracy", ("train", "final_val_token_accuracy")),
    ("tokens/s", ("train", "tokens_per_s_median")),
    ("weights per process (MB)", ("train", "weights_mb")),
    ("peak memory per process (MB)", ("train", "peak_memory_mb")),
    ("test answer loss", ("eval", "tuned", "loss")),
    ("test token accuracy", ("eval", "tuned", "token_accuracy")),
    ("test ROUGE-L", ("eval", "tuned", "rouge_l")),
    ("ROUGE-L gain over base", ("eval", "gain", "rouge_l")),
    ("test chrF", ("eval", "tuned", "chrf")),
    ("test BLEU", ("eval", "tuned", "bleu")),
    ("test label accuracy", ("eval", "tuned", "label_accuracy")),
    ("test macro-F1", ("eval", "tuned", "macro_f1")),
    ("general questions", ("eval", "retention", "tuned", "qa_accuracy")),
    ("general-question drop", ("eval", "retention", "qa_drop")),
    ("general-text perplexity rise", ("eval", "retention", "perplexity_increase")),
    ("gate passed", ("eval", "gate", "passed")),
]


def load_run_record(run: Run) -> dict:
    """What a run folder says about itself."""
    return {
        "path": str(run.path), "name": run.name, "id": run.id,
        "status": "done" if run.done else "unfinished",
        "job": _job_with_defaults(run.raw_job() or {}),
        "manifest": read_json(run.manifest_file) or {},  # as written, whatever version of Tailor wrote it
        "train": run.summary() or {},
        "eval": run.eval_summary() or {},
    }


def _job_with_defaults(raw: dict) -> dict:
    """The job as this version of Tailor reads it: keys a run written by an older version lacks get
    their defaults, so they do not show as differences. A job this version rejects is shown as written."""
    from tailor.spec import SpecError, parse_job

    try:
        return parse_job(raw).model_dump(mode="json")
    except (SpecError, ValueError):
        return raw


def measure(record: dict, where: tuple) -> object:
    value = record
    for key in where:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"training.learning_rate": 0.0002, ...}: nested job keys as dotted paths."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def config_differences(records: list[dict]) -> list[tuple[str, list]]:
    """(key, [value per run]) for every job key whose value is not the same in all runs; the
    output folder and data paths of runs that differ only in where they ran are kept, since
    a different file is a different experiment."""
    flat = [flatten(r["job"]) for r in records]
    keys = sorted(set().union(*flat))
    return [(k, [f.get(k) for f in flat]) for k in keys
            if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1]


def format_value(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)
