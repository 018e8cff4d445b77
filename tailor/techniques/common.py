"""The steps every recipe shares, each a plain function a recipe calls in its own order.

A recipe (task.py, multitask.py, …) reads the job and calls these with explicit arguments: the
process group, the run folder, the data, the model with its adapter, the manifest, and the end of
a run (save, layer change, report, evaluation). What differs between techniques stays in the recipe.
"""

from __future__ import annotations

import hashlib
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
from tailor.train.adapters import AdapterConfig, AdapterError, apply_adapter, trainable_names
from tailor.train.attention import NAME as PACKED_ATTENTION
from tailor.train.attention import set_attention
from tailor.train.compiled import compile_blocks
from tailor.train.encode import encode_chat, encode_text
from tailor.train.layer_change import layer_change, metrics_row
from tailor.train.loop import TrainSettings
from tailor.train.rundir import MetricsLog, latest_run_dir, new_run_dir, path_sha256, read_json, versions, write_atomic

# Settings that change how fast a run goes, not what it computes: a resume may change them.
SPEED_ONLY = {"threads", "compile"}
# Sections read after the weights are saved: a resume may change them too.
AFTER_TRAINING = {"eval", "tracking"}


class ResumeError(RuntimeError):
    pass


def start(job: Job, console: Console | None):
    """(accelerator, say): the process group, and a print that only the main process does."""
    from accelerate import Accelerator

    console = console or Console(stderr=True)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    say = console.print if accelerator.is_main_process else (lambda *a, **k: None)
    torch.set_num_threads(job.training.threads or max(1, (os.cpu_count() or 1) // accelerator.num_processes))
    return accelerator, say


# --- the run folder -----------------------------------------------------------------------------


def run_folder(job: Job, resume: bool, accelerator, fixed: Path | None = None) -> Path:
    """Rank 0 picks (or creates) the folder; the others are told which. `fixed`: a stage's folder
    inside a staged run, always the same."""
    chosen = [None]
    if accelerator.is_main_process:
        if fixed is not None:
            fixed.mkdir(parents=True, exist_ok=True)
            if resume:
                check_same_job(fixed, job)
            chosen[0] = str(fixed)
        elif resume:
            latest = latest_run_dir(job.output.dir, job.name)
            if latest is None:
                raise ResumeError(f"--resume: no earlier run of job '{job.name}' in {job.output.dir}/{job.name}; "
                                  "run without --resume to start one")
            check_same_job(latest, job)
            chosen[0] = str(latest)
        else:
            chosen[0] = str(new_run_dir(job.output.dir, job.name))
    if accelerator.num_processes > 1:
        torch.distributed.broadcast_object_list(chosen, src=0)
    return Path(chosen[0])


def check_same_job(run_dir: Path, job: Job) -> None:
    import yaml

    before = yaml.safe_load((run_dir / "job.yaml").read_text(encoding="utf-8")) if (run_dir / "job.yaml").exists() else None
    if before is None:
        return
    now = yaml.safe_load(dump_job(job))
    changed = [f"{sec}.{k}" for sec, vals in now.items() if isinstance(vals, dict) and sec not in AFTER_TRAINING
               for k, v in vals.items() if (before.get(sec) or {}).get(k) != v and k not in SPEED_ONLY]
    changed += [k for k, v in now.items() if not isinstance(v, dict) and before.get(k) != v and k not in AFTER_TRAINING]
    if changed:
        raise ResumeError(f"--resume: {run_dir} was started with a different job ({', '.join(changed)} changed); "
                          "restore those values to resume, or run without --resume to start a new run")


def finished(run_dir: Path, say) -> bool:
    """A run folder marked DONE has nothing left to train (a --resume of it, or a stage done before)."""
    if (run_dir / "DONE").exists():
        say(f"[green]{run_dir} already finished[/]; nothing to resume.")
        return True
    return False


def open_run_trackers(job: Job, run_dir: Path) -> list:
    from tailor.track.runs import flatten

    uri = job.output.mlflow_uri or f"sqlite:///{Path(job.output.dir).resolve() / 'mlflow.db'}"
    return open_trackers(job.tracking, run_dir, job.name, flatten(job.model_dump(mode="json")), uri)


# --- data ---------------------------------------------------------------------------------------


def data_and_folder(job: Job, resume: bool, accelerator, say, fixed: Path | None = None) -> tuple[Path, list, list]:
    """(run folder, train records, validation records). The records are read and checked before
    any weights load; with data.prepare the raw data is prepared into the run folder first, so
    there the folder comes first."""
    if job.data.prepare:
        run_dir = run_folder(job, resume, accelerator, fixed)
        prepare_once(job, run_dir, accelerator, say)
        return (run_dir, *splits(job, run_dir))
    train_raw, val_raw = splits(job, None)
    return run_folder(job, resume, accelerator, fixed), train_raw, val_raw


def splits(job: Job, run_dir: Path | None) -> tuple[list, list]:
    """(train, validation) records of a run: its prepared RUN/data with data.prepare (validation:
    data.validation if given), else read_data."""
    if not job.data.prepare:
        return read_data(job)
    from tailor.data.store import read_prepared

    folder = run_dir / "data"
    val_raw = (read_many(job.data.validation, split="validation") if job.data.validation
               else read_prepared(folder, "validation"))
    return read_prepared(folder, "train"), val_raw


def read_data(job: Job) -> tuple[list, list]:
    """Train and validation records. Validation: data.validation, else the validation split of
    prepared folders in data.train, else a seeded share of train."""
    train_raw = read_many(job.data.train)
    if job.data.validation:
        val_raw = read_many(job.data.validation, split="validation")
    else:
        val_raw = [ex for folder in prepared_folders(job.data.train) for ex in read_many([folder], split="validation")]
    if not val_raw and job.data.validation_fraction > 0 and len(train_raw) >= 10:
        train_raw, val_raw = hold_out(train_raw, job.data.validation_fraction, job.training.seed)
    return train_raw, val_raw


def prepare_once(job: Job, run_dir: Path, accelerator, say) -> None:
    """data.prepare: prepare data.train into RUN/data once (a resumed run reuses it)."""
    from tailor.data.prepare import prepare
    from tailor.data.store import is_prepared

    folder = run_dir / "data"
    if accelerator.is_main_process and not is_prepared(folder):
        say(f"preparing {len(job.data.train)} input(s) → {folder}")
        prepare(job.data.train, folder, model=job.model.base, config=job.data, say=say)
    accelerator.wait_for_everyone()


def only_kinds(examples: list, kinds: set[str], technique: str, fix: str) -> None:
    """Stop before training when records are of a kind this technique cannot learn from."""
    other = [ex for ex in examples if ex.kind not in kinds]
    if other:
        where = ", ".join(f"{ex.meta.get('source')}:{ex.meta.get('line')}" for ex in other[:5])
        raise DataError([f"technique '{technique}' trains on {' and '.join(sorted(kinds))} records; {len(other)} "
                         f"record(s) are {other[0].kind}, e.g. {where}. {fix}"])


def demonstrations(examples: list, with_chosen: bool) -> list:
    """The records a demonstrations stage learns from: conversations and text as they are, and
    preference pairs as the conversations of their chosen answers (with_chosen) or not at all."""
    from dataclasses import replace

    return [replace(ex, messages=ex.messages + ex.chosen, chosen=None, rejected=None) if ex.kind == "preference"
            else ex for ex in examples if with_chosen or ex.kind != "preference"]


def hold_out(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(examples) * fraction))
    held = set(order[:n_val])
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


def encode(tokenizer, ex, max_len: int) -> list:
    """A record as the examples training sees: one per conversation, one per window of a document."""
    if ex.kind == "text":
        return encode_text(tokenizer, ex.text, max_len)
    return [encode_chat(tokenizer, ex.messages, max_len)]


def encoding_stats(train_set, val_set) -> dict:
    return {
        "train_examples": len(train_set), "validation_examples": len(val_set),
        "truncated": sum(e.truncated for e in train_set + val_set),
        "dropped": sum(not e.n_labels for e in train_set + val_set),
        "train_tokens": sum(len(e) for e in train_set),
        "train_label_tokens": sum(e.n_labels for e in train_set),
    }


def say_truncated(stats: dict, max_len: int, say) -> None:
    if stats["truncated"]:
        say(f"[yellow]{stats['truncated']} example(s) longer than training.max_seq_len={max_len} were truncated "
            f"({stats['dropped']} lost every answer token and were dropped)[/]")


# --- the model ----------------------------------------------------------------------------------


def base_model(job: Job, accelerator):
    """(resolved base, tokenizer, compute dtype)."""
    resolved = resolve_model(job.model.base, job.model.revision)
    return resolved, load_tokenizer(resolved.path), best_dtype(job.model.dtype, accelerator.device)


def model_to_train(job: Job, resolved, dtype, device, start_from: Path | None = None):
    """The base model with the job's adapter, ready for packed training. start_from: a finished run
    folder (an earlier stage) whose adapter or weights this run continues from."""
    torch.manual_seed(job.training.seed)
    random.seed(job.training.seed)
    cfg = AdapterConfig(**job.adapter.model_dump())
    if start_from is not None:
        _check_continuable(start_from, cfg.kind)
    # A LoRA stage continues its adapter on the base; the others continue the weights saved in model/.
    path = str(start_from / "model") if start_from is not None and cfg.kind != "lora" else resolved.path
    model = load_model(path, dtype, device, job.model.trust_remote_code)
    model.config.use_cache = False
    if start_from is not None and cfg.kind == "lora":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(start_from / "adapter"), is_trainable=True)
        model = apply_adapter(model, cfg, continued=True)
    else:
        model = apply_adapter(model, cfg)
        if start_from is not None:
            _load_saved_trainables(model, start_from / "model")  # exact: the load above cast them to `dtype`
    set_attention(model, PACKED_ATTENTION)  # each packed example attends only to itself, at its own cost
    if job.training.compile:
        compile_blocks(model)
    return model


def continued_from(job: Job, start_from: Path | None) -> Path | None:
    """What a run continues: an earlier stage (start_from), else the job's model.from_run (a
    deployed run that continual fine-tuning goes on from), checked to share the job's base."""
    if start_from is not None or not job.model.from_run:
        return start_from
    run = Path(job.model.from_run)
    manifest = read_json(run / "manifest.json")
    if manifest is None or not (run / "DONE").exists():
        raise AdapterError(f"model.from_run {run}: not a finished run folder (no manifest.json or DONE); give "
                           f"runs/NAME/RUN-ID of a run that finished")
    if manifest["model"]["source"] != job.model.base:
        raise AdapterError(f"model.from_run {run} trained {manifest['model']['source']}, but this job's model.base is "
                           f"{job.model.base}; set model.base: {manifest['model']['source']}")
    return run


def _check_continuable(start_from: Path, kind: str) -> None:
    folder = "adapter" if kind == "lora" else "model"
    if not (start_from / folder).is_dir():
        raise AdapterError(f"{start_from} has no {folder}/ to continue (it trained {_kind_of(start_from)}); every "
                           "stage of a run trains the same adapter.kind")


def _kind_of(run_dir: Path) -> str:
    return "a LoRA adapter" if (run_dir / "adapter").is_dir() else "full weights"


def _load_saved_trainables(model, folder: Path) -> None:
    from safetensors.torch import load_file

    params = dict(model.named_parameters())
    with torch.no_grad():
        for file in sorted(folder.glob("*.safetensors")):
            for name, tensor in load_file(str(file)).items():
                if name in params and params[name].requires_grad:
                    params[name].copy_(tensor)


def trainable_checksum(model) -> str:
    """sha256 of the trainable weights (names and float32 values): a stage that continues another
    starts with exactly the weights that stage ended with."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda item: item[0]):
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def settings(job: Job, dtype) -> TrainSettings:
    return TrainSettings(
        **job.training.model_dump(exclude={"max_seq_len", "packing", "threads", "compile", "val_generate",
                                           "val_generate_tokens"}),
        bf16_autocast=dtype == torch.bfloat16,
    )


def record_start(job: Job, run_dir: Path, resolved, dtype, model, accelerator, stats: dict, say, n_train: int,
                 n_val: int, start_from: Path | None = None, unit: str = "examples", **extra) -> None:
    """job.yaml and manifest.json (what this run was started with), and the plan in one line; by
    the main process. stats: the encoding numbers, with rows and padding_share."""
    if not accelerator.is_main_process:
        return
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    write_atomic(run_dir / "job.yaml", dump_job(job))
    manifest = {
        "name": job.name, "technique": job.technique, "run_dir": str(run_dir),
        "model": {"source": job.model.base, "kind": resolved.kind, "path": resolved.path,
                  "hub_id": resolved.hub_id, "dtype": str(dtype).removeprefix("torch.")},
        "data": {"train": [file_entry(p) for p in job.data.train],
                 "validation": [file_entry(p) for p in job.data.validation],
                 "prepared": str(run_dir / "data") if job.data.prepare else None},
        "encoding": stats, "seed": job.training.seed,
        "adapter": {"kind": job.adapter.kind, "trainable_parameters": n_trainable, "total_parameters": n_total,
                    "trainable": trainable_names(model) if job.adapter.kind != "lora" else None},
        "start": {"from": str(start_from) if start_from else None, "trainable_sha256": trainable_checksum(model)},
        "processes": accelerator.num_processes, "versions": versions(), "hardware": hardware_summary(),
        **extra,
    }
    write_atomic(run_dir / "manifest.json", json.dumps(manifest, indent=1))
    say(f"[bold]{job.name}[/] ({job.technique}): {n_train} train / {n_val} validation {unit} in {stats['rows']} rows "
        f"({stats['padding_share']:.0%} padding), {job.adapter.kind} training {n_trainable:,} of {n_total:,} "
        f"parameters in {str(dtype).removeprefix('torch.')} on {accelerator.num_processes} process(es)")
    say(f"run folder: {run_dir}")


def file_entry(src) -> dict:
    path = src if isinstance(src, str) else src.path
    return {"path": path, "sha256": path_sha256(path)}


# --- the end of a run ---------------------------------------------------------------------------


def finish(model, tokenizer, job: Job, run_dir: Path, resolved, summary: dict, trackers, accelerator, say) -> None:
    """Save the result where serving and evaluation expect it, with how much each layer changed,
    the summary and the report; then mark the run DONE."""
    set_attention(model, "sdpa")  # the saved model runs anywhere, without Tailor
    if not accelerator.is_main_process:
        return
    model = accelerator.unwrap_model(model)
    changes = layer_change(model, resolved.path)
    write_atomic(run_dir / "layer_change.json", json.dumps(changes, indent=1))
    MetricsLog(run_dir / "metrics.jsonl", trackers=trackers).write(metrics_row(changes, summary["steps"]))
    if changes["blocks"]:
        most = max(changes["blocks"], key=lambda b: b["relative_change"])
        say(f"weights changed most in block {most['block']} ({len(changes['blocks'])} blocks trained; "
            f"‖ΔW‖/‖W‖ {most['relative_change']:.4f}; every block in layer_change.json and report.html)")
    save_result(model, tokenizer, run_dir, job.adapter.kind)
    summary = {**summary, "end": {"trainable_sha256": trainable_checksum(model)}}
    write_atomic(run_dir / "summary.json", json.dumps(summary, indent=1))
    write_report(run_dir)  # the curves now; the evaluation adds its part
    (run_dir / "DONE").write_text("", encoding="utf-8")
    say("[green]done[/]"
        + (f": train loss {summary['final_train_loss']:.4f}" if summary["final_train_loss"] is not None else "")
        + (f", validation loss {summary['final_val_loss']:.4f}" if summary["final_val_loss"] is not None else "")
        + (f", {summary['tokens_per_s_median']:.0f} tokens/s" if summary["tokens_per_s_median"] else "")
        + f" → {run_dir}")


def save_result(model, tokenizer, run_dir: Path, kind: str) -> None:
    """adapter/ (PEFT format) for LoRA, model/ (a full transformers folder) otherwise."""
    name = "adapter" if kind == "lora" else "model"
    tmp = run_dir / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(run_dir / name, ignore_errors=True)
    os.replace(tmp, run_dir / name)


def evaluate_and_close(job: Job, run_dir: Path, trackers, steps: int, accelerator, say) -> dict | None:
    """Evaluate against the base where there is test data (tailor eval RUN does it any time), send
    the scores to the trackers, close them."""
    evaluation = evaluate(run_dir, job, say) if accelerator.is_main_process and job.eval.enabled else None
    for tracker in trackers:
        if evaluation:
            tracker.log_final(eval_numbers(evaluation), steps)
        tracker.close()
    accelerator.wait_for_everyone()
    return evaluation


def evaluate(run_dir: Path, job: Job, say) -> dict | None:
    from tailor.evaluate.report import gate_lines
    from tailor.evaluate.run import evaluate as run_evaluation

    try:
        summary = run_evaluation(run_dir, spec=job.eval, say=say)
    except DataError as exc:
        say(f"[yellow]evaluation skipped: {exc}[/]")
        return None
    for line in gate_lines(summary):
        say(line, highlight=False, markup=False)
    return summary


def sample_scorer(tokenizer, val_raw: list, n: int, max_new_tokens: int, bf16: bool):
    """model -> generation metrics on the first n validation conversations (greedy answers to all
    but their last turn, scored against it), prefixed val_; None when n is 0 or nothing is left."""
    from tailor.evaluate.metrics import text_scores
    from tailor.evaluate.run import answered
    from tailor.models.generate import answer

    samples = answered(val_raw)[:n] if n else []
    if not samples:
        return None
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
