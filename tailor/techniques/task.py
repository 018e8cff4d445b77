"""Task-specific fine-tuning: supervised training on one task's conversations (and plain text:
continued pre-training on the domain's documents, loss on every token).

The recipe reads the job top to bottom: check the data, load the base model, attach the adapter,
train, save, evaluate. It is the only place that reads the job spec; everything it calls takes
explicit arguments.
"""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console

from tailor.spec import Job
from tailor.techniques import common
from tailor.train.loop import train
from tailor.train.packing import make_rows


def run(job: Job, resume: bool = False, console: Console | None = None, show_progress: bool = True,
        run_dir: Path | None = None, start_from: Path | None = None, demonstrations: bool | None = None) -> Path:
    """run_dir and start_from are for stages (tailor/techniques/stages.py): the stage's fixed
    folder, and the finished stage whose weights this one continues. demonstrations (behavioral's
    first stage): True, preference pairs count as their chosen conversations; False, they are left
    to the preference stage; None (technique task), they are an error."""
    accelerator, say = common.start(job, console)
    start_from = common.continued_from(job, start_from)  # an earlier stage, or model.from_run

    # 1. The data, checked record by record before any weights load, and the run folder.
    run_dir, train_raw, val_raw = common.data_and_folder(job, resume, accelerator, say, run_dir)
    if demonstrations is not None:
        train_raw, val_raw = (common.demonstrations(raw, demonstrations) for raw in (train_raw, val_raw))
    common.only_kinds(train_raw + val_raw, {"chat", "text"}, "task",
                      "Train preference pairs with technique behavioral, or convert them to conversations.")
    if common.finished(run_dir, say):
        return run_dir
    trackers = common.open_run_trackers(job, run_dir) if accelerator.is_main_process else []

    # 2. The base model's tokenizer turns the records into examples packed into rows.
    resolved, tokenizer, dtype = common.base_model(job, accelerator)
    max_len = job.training.max_seq_len
    train_set = [e for ex in train_raw for e in common.encode(tokenizer, ex, max_len)]
    val_set = [e for ex in val_raw for e in common.encode(tokenizer, ex, max_len)]
    stats = common.encoding_stats(train_set, val_set)
    train_set = [e for e in train_set if e.n_labels]  # an answer cut off entirely leaves nothing to learn
    val_set = [e for e in val_set if e.n_labels]
    rows = make_rows(train_set, max_len, job.training.packing)
    val_rows = make_rows(val_set, max_len, job.training.packing)
    stats["rows"] = len(rows)
    stats["padding_share"] = 1 - stats["train_tokens"] / max(1, len(rows) * max_len)
    common.say_truncated(stats, max_len, say)

    # 3. The model with its adapter (or an earlier stage's).
    model = common.model_to_train(job, resolved, dtype, accelerator.device, start_from)
    common.record_start(job, run_dir, resolved, dtype, model, accelerator, stats, say, len(train_set), len(val_set),
                        start_from)

    # 4. Train.
    score_samples = common.sample_scorer(tokenizer, val_raw, job.training.val_generate,
                                         job.training.val_generate_tokens, bf16=dtype == torch.bfloat16)
    summary = train(model, train_set, rows, val_set, val_rows, common.settings(job, dtype), run_dir, accelerator,
                    tokenizer.pad_token_id, resume=resume, show_progress=show_progress, score_samples=score_samples,
                    trackers=trackers)

    # 5. Save, with how much each layer changed, and 6. evaluate against the base.
    common.finish(model, tokenizer, job, run_dir, resolved, summary, trackers, accelerator, say)
    common.evaluate_and_close(job, run_dir, trackers, summary["steps"], accelerator, say)
    return run_dir
