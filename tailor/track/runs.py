"""`tailor runs`: the run folders under an output directory, one at a time or side by side.

Everything comes from the files a run writes (job.yaml, manifest.json, summary.json,
eval/summary.json, metrics.jsonl): nothing is kept anywhere else, so a run copied to another
machine lists and compares the same.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tailor.train.rundir import read_json

# The measures `compare` and `list` show, in order: (label, where in the run's record).
MEASURES = [
    ("steps", ("train", "steps")),
    ("train loss", ("train", "final_train_loss")),
    ("validation loss", ("train", "final_val_loss")),
    ("validation token accuracy", ("train", "final_val_token_accuracy")),
    ("tokens/s", ("train", "tokens_per_s_median")),
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


class RunNotFound(LookupError):
    pass


def find_runs(output_dir: str | Path) -> list[Path]:
    """Run folders (those with a job.yaml) under output_dir/NAME/, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    runs = [p for p in root.glob("*/*") if (p / "job.yaml").is_file()]
    return sorted(runs, key=lambda p: (p.name, p.parent.name))


def resolve_run(ref: str, output_dir: str | Path) -> Path:
    """A run given as a folder, NAME/RUN-ID under output_dir, or a RUN-ID or NAME (its latest run)."""
    for candidate in (Path(ref), Path(output_dir) / ref):
        if (candidate / "job.yaml").is_file():
            return candidate
    runs = find_runs(output_dir)
    matches = [r for r in runs if r.name == ref] or [r for r in runs if r.parent.name == ref][-1:]
    if len(matches) == 1:
        return matches[0]
    known = ", ".join(f"{r.parent.name}/{r.name}" for r in runs[-5:]) or "none"
    raise RunNotFound(f"no run '{ref}' (as a folder, or under {output_dir}); "
                      + ("it names several runs, give NAME/RUN-ID" if matches else f"recent runs: {known}"))


def load_run_record(run_dir: Path) -> dict:
    """What a run folder says about itself."""
    return {
        "path": str(run_dir), "name": run_dir.parent.name, "id": run_dir.name,
        "status": "done" if (run_dir / "DONE").exists() else "unfinished",
        "job": _job_with_defaults(yaml.safe_load((run_dir / "job.yaml").read_text(encoding="utf-8")) or {}),
        "manifest": read_json(run_dir / "manifest.json") or {},
        "train": read_json(run_dir / "summary.json") or {},
        "eval": read_json(run_dir / "eval" / "summary.json") or {},
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
    return [(k, [f.get(k) for f in flat]) for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1]


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
