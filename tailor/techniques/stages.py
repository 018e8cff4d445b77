"""Running stages one after the other, each from where the one before ended, with a gate between.

Technique sequential runs the job's `stages:`; transfer (domain text, then the task) and behavioral
(demonstrations, then preferences) are two-stage runs built by their recipes. Each stage is a run
folder of its own, RUN/stages/N-NAME/, trained by its technique's recipe; a stage that is DONE is
never trained again, so --resume restarts at the unfinished stage.

The gate: after each stage, the model is scored on the validation data of that stage and of every
stage before it. A stage's score right after it trained is its baseline; when a later stage raises
that loss by more than sequential.max_regression (a share), the later stage made the model forget
the earlier one: on_regression stop ends the run there and keeps the stage before it as the result
(the one that regressed stays in its folder to inspect); warn says so and goes on.

The run folder holds the result (adapter/ or model/) of the last stage kept, so evaluation, the
report, `tailor runs` and serving read it like any other run; metrics.jsonl joins the stages' curves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple

import torch
from rich.console import Console

from tailor.evaluate.report import write_report
from tailor.runs import Run
from tailor.spec import Job
from tailor.techniques import common


class Stage(NamedTuple):
    name: str
    job: Job  # the stage's own job: its technique, data and training keys
    recipe: Callable  # what trains it: task.run, multitask.run, preference.run (with its options)
    # Which records of its validation data the gate scores it on (preference pairs: their chosen answers).
    kinds: frozenset = frozenset({"chat", "text"})


def run_stages(job: Job, stages: list[Stage], resume: bool = False, console: Console | None = None,
               show_progress: bool = True) -> Path:
    r = common.start(job, console)
    run = common.run_folder(r, resume)
    if common.finished(r):
        return run.path
    if r.is_main:
        run.write_job(job)
    r.say(f"[bold]{job.name}[/] ({job.technique}): {len(stages)} stage(s): " + " → ".join(st.name for st in stages))
    r.say(f"run folder: {run.path}")

    record = run.stages_record() or {"stages": []}
    done_names = [s["name"] for s in record["stages"]]
    previous, stopped = None, None
    for i, (name, stage_job, recipe, _) in enumerate(stages):
        stage = run.stage(i, name)
        if name in done_names:  # trained and gated before an interruption
            previous = stage
            continue
        r.say(f"[bold]stage {i + 1}/{len(stages)}: {name}[/] ({stage_job.technique})")
        recipe(stage_job, resume=stage.checkpoints_dir.is_dir(), console=console, show_progress=show_progress,
               run_dir=stage, start_from=previous)
        previous = stage
        if r.is_main:
            entry = _gate(run, stage, name, stages[:i + 1], record["stages"], job, r.say)
            record["stages"].append(entry)
            run.write_stages_record(record)
        shared = [record]
        if r.accelerator.num_processes > 1:
            torch.distributed.broadcast_object_list(shared, src=0)
        record = shared[0]
        if record["stages"][-1]["regressions"] and job.sequential.on_regression == "stop" and i > 0:
            stopped = name
            kept = run.stage(i - 1, stages[i - 1].name)
            r.say(f"[red]stopped at stage {name}[/]: it made the model forget an earlier stage. The run's result is "
                  f"stage {stages[i - 1].name}'s, the last that passed the gate; {name}'s stays in {stage.path} to "
                  "inspect" + (", and the stages after it did not run" if i < len(stages) - 1 else "")
                  + " (sequential.on_regression: warn goes on instead)")
            previous = kept
            break

    if r.is_main:
        _assemble(run, previous, record, stopped, job)
        r.say(f"[green]done[/]: {len(record['stages'])} of {len(stages)} stage(s) → {run.path}")
    common.evaluate_and_close(r, 0)
    return run.path


# --- the gate -----------------------------------------------------------------------------------


def _gate(run: Run, stage: Run, name: str, stages: list[Stage], before: list[dict], job: Job, say) -> dict:
    """Score the model this stage ended with on every stage's validation data so far; compare each
    earlier stage's score with its baseline."""
    from tailor.models.generate import load_run

    model, tokenizer = load_run(stage)
    bf16 = next(model.parameters()).dtype == torch.bfloat16
    losses = {}
    for i, (stage_name, stage_job, _, kinds) in enumerate(stages):
        _, records = common.splits(stage_job, run.stage(i, stage_name))  # as its recipe read them
        records = [ex for ex in records if ex.kind in kinds]
        losses[stage_name] = validation_loss(model, tokenizer, records, stage_job.training.max_seq_len, bf16)
    baselines = {s["name"]: s["baseline"] for s in before}
    regressions = []
    for stage_name, baseline in baselines.items():
        now = losses.get(stage_name)
        if baseline is None or now is None or job.sequential.max_regression is None:
            continue
        rise = now / baseline - 1
        if rise > job.sequential.max_regression:
            regressions.append({"stage": stage_name, "baseline": baseline, "now": now, "rise": rise})
    line = ", ".join(f"{n} {v:.4f}" + (f" (was {baselines[n]:.4f}, {v / baselines[n] - 1:+.1%})"
                                        if baselines.get(n) else "")
                     for n, v in losses.items() if v is not None)
    say(f"gate after {name}: validation loss " + (line or "— (no validation data)"))
    for r in regressions:
        say(f"[red]regression: stage {r['stage']}'s validation loss rose {r['rise']:+.1%} "
            f"({r['baseline']:.4f} → {r['now']:.4f}), more than sequential.max_regression "
            f"{job.sequential.max_regression:.0%}[/]")
    return {"name": name, "folder": str(stage.path), "baseline": losses.get(name), "losses": losses,
            "regressions": regressions}


def validation_loss(model, tokenizer, records: list, max_len: int, bf16: bool) -> float | None:
    """Mean loss per label token on conversations (their answers), plain text (every token) and
    preference pairs (their chosen answers): one number any stage's data gives."""
    from tailor.train.loss import encoded_loss

    encoded = [e for ex in common.demonstrations(records, with_chosen=True)
               for e in common.encode(tokenizer, ex, max_len)]
    scored = encoded_loss(model, encoded, tokenizer.pad_token_id, bf16=bf16, batch_size=8)
    return scored.mean if scored.tokens else None


# --- the run folder -----------------------------------------------------------------------------


def _assemble(run: Run, last: Run, record: dict, stopped: str | None, job: Job) -> None:
    """The last stage's result and the joined curves, in the run folder."""
    run.copy_result_of(last)
    manifest = last.manifest().model_copy(update={
        "name": job.name, "technique": job.technique, "run_dir": str(run.path),
        "stages": [s["folder"] for s in record["stages"]], "result_of": str(last.path)})
    run.write_manifest(manifest)

    # Steps and epochs run on across stages (each row keeps its stage's own as stage_step, stage_epoch).
    rows, offset, epochs, summaries = [], 0, 0.0, []
    for entry in record["stages"]:
        stage = Run(entry["folder"])
        summary = stage.summary() or {}
        summaries.append({"stage": entry["name"], **summary})
        stage_rows = [r for r in stage.metrics() if r.get("type") in ("train", "eval")]
        for r in stage_rows:
            rows.append({**r, "stage": entry["name"], "stage_step": r["step"], "step": r["step"] + offset,
                         "stage_epoch": r["epoch"], "epoch": round(r["epoch"] + epochs, 4)})
        offset += summary.get("steps", 0)
        epochs += max((r["epoch"] for r in stage_rows), default=0.0)
    run.write_metrics(rows)
    kept = last.summary() or {}  # the final numbers are those of the stage kept
    summary = {k: kept.get(k) for k in ("final_train_loss", "final_val_loss", "final_val_token_accuracy",
                                                 "final_val", "tokens_per_s_median")}
    for key in ("weights_mb", "peak_memory_mb"):
        summary[key] = max((st.get(key) or 0 for st in summaries), default=None) or None
    summary.update({"steps": offset, "stopped_at_stage": stopped, "result_of": last.id,
                    "regressions": [r | {"after": s["name"]} for s in record["stages"] for r in s["regressions"]],
                    "stages": summaries})
    run.write_summary(summary)
    run.write_stages_record({**record, "stopped_at": stopped, "result_of": last.id})
    write_report(run)
    run.mark_done()
