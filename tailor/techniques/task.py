"""Task-specific fine-tuning: supervised training on one task's conversations.

The recipe reads the job top to bottom: check the data, load the base model, attach the adapter,
train, save. It is the only place that reads the job spec; everything it calls takes explicit
arguments.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
from rich.console import Console

from tailor.data import DataError, read_many
from tailor.data.chat import prepared_folders
from tailor.evaluate.report import write_report
from tailor.models import best_dtype, load_model, load_tokenizer, resolve_model
from tailor.models.hardware import hardware_summary
from tailor.spec import Job, dump_job
from tailor.track.trackers import eval_numbers, open_trackers
from tailor.train.adapters import AdapterConfig, apply_adapter, trainable_names
from tailor.train.attention import NAME as PACKED_ATTENTION
from tailor.train.attention import set_attention
from tailor.train.compiled import compile_blocks
from tailor.train.encode import encode_chat, encode_text
from tailor.train.layer_change import layer_change, metrics_row
from tailor.train.loop import TrainSettings, train
from tailor.train.packing import make_rows
from tailor.train.rundir import MetricsLog, path_sha256, latest_run_dir, new_run_dir, versions, write_atomic


# Settings that change how fast a run goes, not what it computes: a resume may change them.
SPEED_ONLY = {"threads", "compile"}
# Sections read after the weights are saved: a resume may change them too.
AFTER_TRAINING = {"eval", "tracking"}


class ResumeError(RuntimeError):
    pass


def run(job: Job, resume: bool = False, console: Console | None = None, show_progress: bool = True) -> Path:
    console = console or Console(stderr=True)
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    is_main = accelerator.is_main_process
    say = console.print if is_main else (lambda *a, **k: None)
    torch.set_num_threads(job.training.threads or max(1, (os.cpu_count() or 1) // accelerator.num_processes))

    # 1. The data, checked record by record before any weights load, and 2. the run folder. With
    # data.prepare the raw data is prepared into the run folder first, so the folder comes first.
    if job.data.prepare:
        run_dir = _run_dir(job, resume, accelerator)
        train_raw, val_raw = _prepared_data(job, run_dir, accelerator, say)
    else:
        train_raw, val_raw = _read_data(job)
        run_dir = _run_dir(job, resume, accelerator)
    if (run_dir / "DONE").exists():
        say(f"[green]{run_dir} already finished[/]; nothing to resume.")
        return run_dir
    trackers = _trackers(job, run_dir) if is_main else []

    # 3. The base model and its tokenizer.
    resolved = resolve_model(job.model.base, job.model.revision)
    tokenizer = load_tokenizer(resolved.path)
    dtype = best_dtype(job.model.dtype, accelerator.device)
    train_set = [e for ex in train_raw for e in _encode(tokenizer, ex, job.training.max_seq_len)]
    val_set = [e for ex in val_raw for e in _encode(tokenizer, ex, job.training.max_seq_len)]
    stats = _encoding_stats(train_set, val_set)
    train_set = [e for e in train_set if e.n_labels]  # an answer cut off entirely leaves nothing to learn
    val_set = [e for e in val_set if e.n_labels]
    rows = make_rows(train_set, job.training.max_seq_len, job.training.packing)
    val_rows = make_rows(val_set, job.training.max_seq_len, job.training.packing)
    stats["rows"] = len(rows)
    stats["padding_share"] = 1 - stats["train_tokens"] / max(1, len(rows) * job.training.max_seq_len)
    if stats["truncated"]:
        say(f"[yellow]{stats['truncated']} example(s) longer than training.max_seq_len="
            f"{job.training.max_seq_len} were truncated ({stats['dropped']} lost every answer token and were dropped)[/]")

    torch.manual_seed(job.training.seed)
    random.seed(job.training.seed)
    model = load_model(resolved.path, dtype, accelerator.device, job.model.trust_remote_code)
    model.config.use_cache = False
    model = apply_adapter(model, AdapterConfig(**job.adapter.model_dump()))
    set_attention(model, PACKED_ATTENTION)  # each packed example attends only to itself, at its own cost
    if job.training.compile:
        compile_blocks(model)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())

    if is_main:
        write_atomic(run_dir / "job.yaml", dump_job(job))
        manifest = {
            "name": job.name, "technique": job.technique, "run_dir": str(run_dir),
            "model": {"source": job.model.base, "kind": resolved.kind, "path": resolved.path,
                      "hub_id": resolved.hub_id, "dtype": str(dtype).removeprefix("torch.")},
            "data": {"train": [_file_entry(p) for p in job.data.train],
                     "validation": [_file_entry(p) for p in job.data.validation],
                     "prepared": str(run_dir / "data") if job.data.prepare else None},
            "encoding": stats, "seed": job.training.seed,
            "adapter": {"kind": job.adapter.kind, "trainable_parameters": n_trainable, "total_parameters": n_total,
                        "trainable": trainable_names(model) if job.adapter.kind != "lora" else None},
            "processes": accelerator.num_processes, "versions": versions(), "hardware": hardware_summary(),
        }
        write_atomic(run_dir / "manifest.json", json.dumps(manifest, indent=1))
        say(f"[bold]{job.name}[/]: {len(train_set)} train / {len(val_set)} validation examples in {len(rows)} rows "
            f"({stats['padding_share']:.0%} padding), {job.adapter.kind} training {n_trainable:,} of {n_total:,} "
            f"parameters in {str(dtype).removeprefix('torch.')} on {accelerator.num_processes} process(es)")
        say(f"run folder: {run_dir}")

    # 4. Train.
    settings = TrainSettings(
        **job.training.model_dump(exclude={"max_seq_len", "packing", "threads", "compile", "val_generate",
                                           "val_generate_tokens"}),
        bf16_autocast=dtype == torch.bfloat16,
    )
    score_samples = (_sample_scorer(tokenizer, val_raw, job.training.val_generate, job.training.val_generate_tokens,
                                    bf16=dtype == torch.bfloat16)
                     if job.training.val_generate and val_raw else None)
    summary = train(model, train_set, rows, val_set, val_rows, settings, run_dir, accelerator,
                    tokenizer.pad_token_id, resume=resume, show_progress=show_progress, score_samples=score_samples,
                    trackers=trackers)

    # 5. Save the result where serving and evaluation expect it, with how much each layer changed.
    set_attention(model, "sdpa")  # the saved model runs anywhere, without Tailor
    if is_main:
        changes = layer_change(accelerator.unwrap_model(model), resolved.path)
        write_atomic(run_dir / "layer_change.json", json.dumps(changes, indent=1))
        MetricsLog(run_dir / "metrics.jsonl", trackers=trackers).write(metrics_row(changes, summary["steps"]))
        if changes["blocks"]:
            most = max(changes["blocks"], key=lambda b: b["relative_change"])
            say(f"weights changed most in block {most['block']} ({len(changes['blocks'])} blocks trained; "
                f"‖ΔW‖/‖W‖ {most['relative_change']:.4f}; every block in layer_change.json and report.html)")
        _save_result(accelerator.unwrap_model(model), tokenizer, run_dir, job.adapter.kind)
        write_atomic(run_dir / "summary.json", json.dumps(summary, indent=1))
        write_report(run_dir)  # the curves now; the evaluation adds its part
        (run_dir / "DONE").write_text("", encoding="utf-8")
        say("[green]done[/]"
            + (f": train loss {summary['final_train_loss']:.4f}" if summary["final_train_loss"] is not None else "")
            + (f", validation loss {summary['final_val_loss']:.4f}" if summary["final_val_loss"] is not None else "")
            + (f", {summary['tokens_per_s_median']:.0f} tokens/s" if summary["tokens_per_s_median"] else "")
            + f" → {run_dir}")

    # 6. Evaluate against the base, where there is test data (tailor eval RUN does it any time).
    evaluation = _evaluate(run_dir, job, say) if is_main and job.eval.enabled else None
    for tracker in trackers:
        if evaluation:
            tracker.log_final(eval_numbers(evaluation), summary["steps"])
        tracker.close()
    accelerator.wait_for_everyone()
    return run_dir


def _trackers(job: Job, run_dir: Path) -> list:
    from tailor.track.runs import flatten

    uri = job.output.mlflow_uri or f"sqlite:///{Path(job.output.dir).resolve() / 'mlflow.db'}"
    return open_trackers(job.tracking, run_dir, job.name, flatten(job.model_dump(mode="json")), uri)


def _sample_scorer(tokenizer, val_raw: list, n: int, max_new_tokens: int, bf16: bool):
    """model -> generation metrics on the first n validation conversations (greedy answers to all
    but their last turn, scored against it), prefixed val_."""
    from tailor.evaluate.metrics import text_scores
    from tailor.evaluate.run import answered
    from tailor.models.generate import answer

    samples = answered(val_raw)[:n]
    prompts, references = [t["prompt"] for t in samples], [t["reference"] for t in samples]

    def score(model) -> dict:
        set_attention(model, "sdpa")  # generation has no packed rows
        device = next(model.parameters()).device.type
        try:  # as in training: a bf16 base with fp32 adapter weights needs autocast
            with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                replies = answer(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
        finally:
            set_attention(model, PACKED_ATTENTION)
        return {f"val_{k}": v for k, v in text_scores(replies, references).items()}

    return score


def _evaluate(run_dir: Path, job: Job, say) -> dict | None:
    from tailor.evaluate.report import gate_lines
    from tailor.evaluate.run import evaluate

    try:
        summary = evaluate(run_dir, spec=job.eval, say=say)
    except DataError as exc:
        say(f"[yellow]evaluation skipped: {exc}[/]")
        return None
    for line in gate_lines(summary):
        say(line, highlight=False, markup=False)
    return summary


def _read_data(job: Job) -> tuple[list, list]:
    """Train and validation records. Validation: data.validation, else the validation split of
    prepared folders in data.train, else a seeded share of train."""
    train_raw = read_many(job.data.train)
    if job.data.validation:
        val_raw = read_many(job.data.validation, split="validation")
    else:
        val_raw = [ex for folder in prepared_folders(job.data.train) for ex in read_many([folder], split="validation")]
    if not val_raw and job.data.validation_fraction > 0 and len(train_raw) >= 10:
        train_raw, val_raw = _hold_out(train_raw, job.data.validation_fraction, job.training.seed)
    _only_conversations(train_raw + val_raw)
    return train_raw, val_raw


def _prepared_data(job: Job, run_dir: Path, accelerator, say) -> tuple[list, list]:
    """data.prepare: prepare data.train into RUN/data once (a resumed run reuses it), then read its splits."""
    from tailor.data.prepare import prepare
    from tailor.data.store import is_prepared, read_prepared

    folder = run_dir / "data"
    if accelerator.is_main_process and not is_prepared(folder):
        say(f"preparing {len(job.data.train)} input(s) → {folder}")
        prepare(job.data.train, folder, model=job.model.base, config=job.data, say=say)
    accelerator.wait_for_everyone()
    train_raw, val_raw = read_prepared(folder, "train"), read_prepared(folder, "validation")
    if job.data.validation:
        val_raw = read_many(job.data.validation, split="validation")
    _only_conversations(train_raw + val_raw)
    return train_raw, val_raw


def _only_conversations(examples: list) -> None:
    """Conversations (loss on the answers) and plain text (loss on every token: continued
    pre-training on the domain's documents) train here; preference pairs need a preference loss."""
    other = [ex for ex in examples if ex.kind == "preference"]
    if other:
        where = ", ".join(f"{ex.meta.get('source')}:{ex.meta.get('line')}" for ex in other[:5])
        raise DataError([f"technique 'task' trains on conversations and plain text; {len(other)} record(s) are "
                         f"preference pairs (chosen/rejected), e.g. {where}. Remove them, or train on their "
                         "chosen answers by converting them to conversations."])


def _encode(tokenizer, ex, max_len: int) -> list:
    """A record as the examples training sees: one per conversation, one per window of a document."""
    if ex.kind == "text":
        return encode_text(tokenizer, ex.text, max_len)
    return [encode_chat(tokenizer, ex.messages, max_len)]


def _hold_out(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(examples) * fraction))
    held = set(order[:n_val])
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


def _run_dir(job: Job, resume: bool, accelerator) -> Path:
    """Rank 0 picks (or creates) the folder; the others are told which."""
    chosen = [None]
    if accelerator.is_main_process:
        if resume:
            latest = latest_run_dir(job.output.dir, job.name)
            if latest is None:
                raise ResumeError(f"--resume: no earlier run of job '{job.name}' in {job.output.dir}/{job.name}; "
                                  "run without --resume to start one")
            _check_same_job(latest, job)
            chosen[0] = str(latest)
        else:
            chosen[0] = str(new_run_dir(job.output.dir, job.name))
    if accelerator.num_processes > 1:
        torch.distributed.broadcast_object_list(chosen, src=0)
    return Path(chosen[0])


def _check_same_job(run_dir: Path, job: Job) -> None:
    import yaml

    before = yaml.safe_load((run_dir / "job.yaml").read_text(encoding="utf-8")) if (run_dir / "job.yaml").exists() else None
    if before is None:
        return
    now = yaml.safe_load(dump_job(job))
    changed = [f"{sec}.{k}" for sec, vals in now.items() if isinstance(vals, dict) and sec not in AFTER_TRAINING
               for k, v in vals.items() if before.get(sec, {}).get(k) != v and k not in SPEED_ONLY]
    changed += [k for k, v in now.items() if not isinstance(v, dict) and before.get(k) != v and k not in AFTER_TRAINING]
    if changed:
        raise ResumeError(f"--resume: {run_dir} was started with a different job ({', '.join(changed)} changed); "
                          "restore those values to resume, or run without --resume to start a new run")


def _file_entry(src) -> dict:
    path = src if isinstance(src, str) else src.path
    return {"path": path, "sha256": path_sha256(path)}


def _encoding_stats(train_set, val_set) -> dict:
    return {
        "train_examples": len(train_set), "validation_examples": len(val_set),
        "truncated": sum(e.truncated for e in train_set + val_set),
        "dropped": sum(not e.n_labels for e in train_set + val_set),
        "train_tokens": sum(len(e) for e in train_set),
        "train_label_tokens": sum(e.n_labels for e in train_set),
    }


def _save_result(model, tokenizer, run_dir: Path, kind: str) -> None:
    """adapter/ (PEFT format) for LoRA, model/ (a full transformers folder) otherwise."""
    name = "adapter" if kind == "lora" else "model"
    tmp = run_dir / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(run_dir / name, ignore_errors=True)
    os.replace(tmp, run_dir / name)
