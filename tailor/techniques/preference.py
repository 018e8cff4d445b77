"""The preference phase: chosen/rejected pairs and a preference loss (preference.loss: DPO, IPO or
ORPO). Technique behavioral runs it after its demonstrations stage; a sequential job runs it as a
`technique: preference` stage.

Reads top to bottom: the pairs, the model (continuing the stage before, if any), the reference
log-probabilities of that starting model (once, kept in the run folder so a resume uses the same
ones), train, save, evaluate.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from tailor.data import DataError
from tailor.files import read_json, write_atomic
from tailor.runs import Run
from tailor.spec import Job
from tailor.techniques import common
from tailor.train.loop import train
from tailor.train.preference import PreferenceLoss, encode_pairs, pair_rows, reference_logprobs


def run(job: Job, resume: bool = False, console: Console | None = None, show_progress: bool = True,
        run_dir: Run | None = None, start_from: Run | None = None, watch=None) -> Path:
    r = common.start(job, console)
    r.start_from = common.continued_from(job, start_from)  # an earlier stage, or model.from_run

    # 1. The pairs.
    train_raw, val_raw = common.data_and_folder(r, resume, run_dir)
    train_raw = [ex for ex in train_raw if ex.kind == "preference"]
    val_raw = [ex for ex in val_raw if ex.kind == "preference"]
    if not train_raw:
        raise DataError([f"{', '.join(map(str, job.data.train))}: no preference pairs to train on; give records "
                         "with prompt, chosen and rejected (or OpenAI's preference format)"])
    if common.finished(r):
        return r.run.path
    common.open_run_trackers(r, watch)

    # 2. Each pair as two examples side by side in a row.
    common.base_model(r)
    max_len = job.training.max_seq_len
    train_set, dropped = encode_pairs(r.tokenizer, train_raw, max_len)
    val_set, val_dropped = encode_pairs(r.tokenizer, val_raw, max_len)
    if dropped + val_dropped:
        r.say(f"[yellow]{dropped + val_dropped} pair(s) dropped: training.max_seq_len={max_len} cut off an answer[/]")
    rows = pair_rows(train_set, max_len, job.training.packing)
    val_rows = pair_rows(val_set, max_len, job.training.packing)
    stats = {"train_pairs": len(train_set) // 2, "validation_pairs": len(val_set) // 2,
             "dropped_pairs": dropped + val_dropped, "train_tokens": sum(len(e) for e in train_set), "rows": len(rows)}
    # a pair longer than max_len has a row of its own, as long as the pair
    room = sum(max(max_len, sum(len(train_set[i]) for i in row)) for row in rows)
    stats["padding_share"] = 1 - stats["train_tokens"] / max(1, room)
    common.auto_settings(r, stats["train_pairs"], len(rows))

    # 3. The model, and the reference: the same model as it starts, scored once.
    model = common.model_to_train(r)
    if job.preference.loss != "orpo":
        _attach_reference(r, model, train_set, rows, val_set, val_rows)
    common.record_start(r, model, stats, stats["train_pairs"], stats["validation_pairs"], unit="pairs",
                        preference=job.preference.model_dump())

    # 4. Train with the preference loss: its mean over the pairs of each step.
    objective = PreferenceLoss(model, job.preference.loss, job.preference.beta, job.preference.sft_weight)
    summary = train(model, train_set, rows, val_set, val_rows, common.settings(r), r.run, r.accelerator,
                    r.tokenizer.pad_token_id, resume=resume, show_progress=show_progress, trackers=r.trackers,
                    objective=objective, row_units=[len(row) // 2 for row in rows], say=r.say)
    if summary.get("final_val"):
        v = summary["final_val"]
        r.say(f"held-out pairs: chosen preferred in {v['val_preference_accuracy']:.0%}, "
              f"reward margin {v['val_reward_margin']:+.3f}")

    # 5. Save, and evaluate against the base.
    common.finish(r, model, summary)
    common.evaluate_and_close(r, summary["steps"])
    return r.run.path


def _attach_reference(r: common.Recipe, model, train_set, rows, val_set, val_rows) -> None:
    """Every example's reference log-probability: computed by the main process before the first
    step and kept in the run folder, so a resumed run (whose model has moved) uses the same ones."""
    path = r.run.reference_file
    if r.is_main and not path.exists():
        r.say(f"reference log-probabilities of {len(train_set) + len(val_set)} answers (once, before training)")
        pad_id, batch_size = r.tokenizer.pad_token_id, r.job.training.batch_size
        values = {"train": reference_logprobs(model, train_set, rows, pad_id, batch_size, r.bf16),
                  "validation": reference_logprobs(model, val_set, val_rows, pad_id, batch_size, r.bf16)}
        write_atomic(path, json.dumps(values))
    r.accelerator.wait_for_everyone()
    values = read_json(path)
    if len(values["train"]) != len(train_set) or len(values["validation"]) != len(val_set):
        raise DataError([f"{path}: made for other data ({len(values['train'])} train answers, now {len(train_set)}); "
                         "delete it to recompute, or start a new run"])
    for examples, logps in ((train_set, values["train"]), (val_set, values["validation"])):
        for ex, value in zip(examples, logps):
            ex.ref_logp = value
