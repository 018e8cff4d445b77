"""Task-specific fine-tuning: supervised training on one task's conversations (and plain text:
continued pre-training on the domain's documents, loss on every token).

The recipe reads the job top to bottom: check the data, load the base model, attach the adapter,
train, save, evaluate. It is the only place that reads the job spec; everything it calls takes
explicit arguments.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from tailor.runs import Run
from tailor.spec import Job
from tailor.techniques import common
from tailor.train.loop import train
from tailor.train.packing import make_rows


def run(job: Job, resume: bool = False, console: Console | None = None, show_progress: bool = True,
        run_dir: Run | None = None, start_from: Run | None = None, demonstrations: bool | None = None,
        watch=None) -> Path:
    """run_dir and start_from are for stages (tailor/techniques/stages.py): the stage's fixed
    folder, and the finished stage whose weights this one continues. demonstrations (behavioral's
    first stage): True, preference pairs count as their chosen conversations; False, they are left
    to the preference stage; None (technique task), they are an error. watch: a tracker of the
    caller's that gets every metrics row (a sweep's trial: tailor/sweep)."""
    r = common.start(job, console)
    r.start_from = common.continued_from(job, start_from)  # an earlier stage, or model.from_run

    # 1. The data, checked record by record before any weights load, and the run folder.
    train_raw, val_raw = common.data_and_folder(r, resume, run_dir)
    if demonstrations is not None:
        train_raw, val_raw = (common.demonstrations(raw, demonstrations) for raw in (train_raw, val_raw))
    common.only_kinds(train_raw + val_raw, {"chat", "text"}, "task",
                      "Train preference pairs with technique behavioral, or convert them to conversations.")
    if common.finished(r):
        return r.run.path
    common.open_run_trackers(r, watch)

    # 2. The base model's tokenizer turns the records into examples packed into rows; its own answers
    # to general prompts join them (training.replay), so that the task does not cost its general skills.
    common.base_model(r)
    train_raw = common.with_replay(r, train_raw)
    max_len = job.training.max_seq_len
    train_set = [e for ex in train_raw for e in common.encode(r.tokenizer, ex, max_len)]
    val_set = [e for ex in val_raw for e in common.encode(r.tokenizer, ex, max_len)]
    stats = common.encoding_stats(train_set, val_set)
    train_set = [e for e in train_set if e.n_labels]  # an answer cut off entirely leaves nothing to learn
    val_set = [e for e in val_set if e.n_labels]
    rows = make_rows(train_set, max_len, job.training.packing)
    val_rows = make_rows(val_set, max_len, job.training.packing)
    stats["rows"] = len(rows)
    stats["padding_share"] = 1 - stats["train_tokens"] / max(1, len(rows) * max_len)
    common.say_truncated(stats, max_len, r.say)
    common.auto_settings(r, len(train_set), len(rows))  # `auto` settings, for this model and this data

    # 3. The model with its adapter (or an earlier stage's).
    model = common.model_to_train(r)
    common.record_start(r, model, stats, len(train_set), len(val_set))

    # 4. Train.
    summary = train(model, train_set, rows, val_set, val_rows, common.settings(r), r.run, r.accelerator,
                    r.tokenizer.pad_token_id, resume=resume, show_progress=show_progress,
                    score_samples=common.sample_scorer(r, val_raw), trackers=r.trackers, say=r.say)

    # 5. Save, with how much each layer changed, and 6. evaluate against the base.
    common.finish(r, model, summary)
    common.evaluate_and_close(r, summary["steps"])
    return r.run.path
