"""Multi-task fine-tuning: several tasks in one model, each step's rows drawn task by task.

Every record names its task (`task:` on a data.train entry, a task column, or the record's own
`task` key). Each task is packed on its own, so a row is one task's; steps draw rows by the task
probabilities of multitask.sampling; validation reports the loss and token accuracy of every task
on its own (val_loss/TASK) beside the overall numbers; an optional instruction per task becomes
the system prompt of that task's conversations.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from tailor.data import DataError
from tailor.data.chat import with_instructions
from tailor.runs import Run
from tailor.spec import Job
from tailor.techniques import common
from tailor.train.loop import train
from tailor.train.mixture import MixturePlan, task_probabilities
from tailor.train.packing import make_rows


def run(job: Job, resume: bool = False, console: Console | None = None, show_progress: bool = True,
        run_dir: Run | None = None, start_from: Run | None = None, watch=None) -> Path:
    r = common.start(job, console)
    r.start_from = common.continued_from(job, start_from)  # an earlier stage, or model.from_run

    # 1. The data: every record with its task, and each task's instruction as its system prompt.
    train_raw, val_raw = common.data_and_folder(r, resume, run_dir)
    common.only_kinds(train_raw + val_raw, {"chat", "text"}, "multitask",
                      "Train preference pairs with technique behavioral, or as a preference stage.")
    _every_record_has_a_task(train_raw)
    train_raw = with_instructions(train_raw, job.multitask.instructions)
    val_raw = with_instructions(val_raw, job.multitask.instructions)
    if common.finished(r):
        return r.run.path
    common.open_run_trackers(r, watch)

    # 2. Each task encoded and packed on its own.
    common.base_model(r)
    train_raw = common.with_replay(r, train_raw)  # a task of its own, "general", when training.replay is on
    max_len = job.training.max_seq_len
    tasks = sorted({ex.task for ex in train_raw})
    encoded = {split: {t: [e for ex in raw if ex.task == t for e in common.encode(r.tokenizer, ex, max_len)]
                       for t in tasks} for split, raw in (("train", train_raw), ("validation", val_raw))}
    stats = common.encoding_stats(*(sum(encoded[split].values(), []) for split in ("train", "validation")))
    train_set, val_set, task_rows, val_groups, rows, val_rows = [], [], {}, {}, [], []
    for task in tasks:
        task_rows[task] = _add_rows(encoded["train"][task], train_set, rows, max_len, job.training.packing)
        val_groups[task] = _add_rows(encoded["validation"][task], val_set, val_rows, max_len, job.training.packing)
    stats["rows"] = len(rows)
    stats["padding_share"] = 1 - stats["train_tokens"] / max(1, len(rows) * max_len)
    common.say_truncated(stats, max_len, r.say)
    common.auto_settings(r, len(train_set), len(rows))

    # 3. How often each task is drawn.
    sizes = {t: len(task_rows[t]) for t in tasks}
    try:
        probabilities = task_probabilities(sizes, job.multitask.sampling, job.multitask.temperature,
                                           job.multitask.weights)
    except ValueError as exc:
        raise DataError([str(exc)]) from None
    plan = MixturePlan.make(task_rows, probabilities, common.settings(r), r.accelerator.num_processes)
    r.say("tasks: " + ", ".join(f"{t} {sizes[t]} rows → p {probabilities[t]:.2f}" for t in tasks)
          + f" (sampling {job.multitask.sampling})")

    # 4. The model, and 5. train.
    model = common.model_to_train(r)
    task_info = {t: {"train_rows": sizes[t], "validation_rows": len(val_groups[t]), "probability": probabilities[t],
                     "instruction": job.multitask.instructions.get(t)} for t in tasks}
    common.record_start(r, model, stats, len(train_set), len(val_set), tasks=task_info)
    summary = train(model, train_set, rows, val_set, val_rows, common.settings(r), r.run, r.accelerator,
                    r.tokenizer.pad_token_id, resume=resume, show_progress=show_progress,
                    score_samples=common.sample_scorer(r, val_raw), trackers=r.trackers, plan=plan,
                    val_groups={t: g for t, g in val_groups.items() if g}, say=r.say)
    summary["tasks"] = {t: {"probability": probabilities[t], "rows_drawn": n}
                        for t, n in plan.counts(summary["steps"]).items()}

    # 6. Save, and evaluate against the base (per task, too).
    common.finish(r, model, summary)
    common.evaluate_and_close(r, summary["steps"])
    return r.run.path


def _every_record_has_a_task(examples: list) -> None:
    untagged = [ex for ex in examples if not ex.task]
    if untagged:
        where = ", ".join(f"{ex.meta.get('source')}:{ex.meta.get('line')}" for ex in untagged[:5])
        raise DataError([f"technique multitask: {len(untagged)} record(s) have no task, e.g. {where}. Name each "
                         "data.train entry's task ({path: support.jsonl, task: support}), or give the records a "
                         "task key or task_column"])
    if len({ex.task for ex in examples}) < 2:
        raise DataError([f"technique multitask needs at least two tasks; every record is task "
                         f"{examples[0].task!r}. Use technique task for one task"])


def _add_rows(encoded: list, examples: list, rows: list, max_len: int, packing: bool) -> list[int]:
    """Append one task's examples and its packed rows (as global indices); returns its row indices."""
    encoded = [e for e in encoded if e.n_labels]
    offset, first_row = len(examples), len(rows)
    examples.extend(encoded)
    rows.extend([[offset + i for i in row] for row in make_rows(encoded, max_len, packing)])
    return list(range(first_row, len(rows)))
