"""The steps every recipe shares, each a plain function a recipe calls in its own order.

A recipe (task.py, multitask.py, …) reads the job and calls these in its own order. What it has
set up so far lives in one object, `Recipe`, which `start` returns and the shared steps read and
fill: the process group and its console, the run folder, the trackers, the resolved base model,
its tokenizer and the compute dtype. What differs between techniques stays in the recipe.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console

from tailor.data import DataError, read_many
from tailor.data.chat import prepared_folders
from tailor.errors import TailorError
from tailor.evaluate.report import write_report
from tailor.files import path_sha256
from tailor.models import ResolvedModel, best_dtype, load_model, load_model_4bit, load_tokenizer, resolve_model
from tailor.models.hardware import hardware_summary
from tailor.runs import AdapterInfo, DataInfo, FileInfo, Manifest, ModelInfo, Run, StartInfo, versions
from tailor.spec import Job, dump_job
from tailor.track.trackers import eval_numbers, open_trackers
from tailor.train.adapters import AdapterConfig, AdapterError, apply_adapter, load_lora_to_train, trainable_names
from tailor.train.attention import NAME as PACKED_ATTENTION
from tailor.train.attention import set_attention
from tailor.train.auto import AUTO
from tailor.train.compiled import compile_blocks
from tailor.train.distributed import Sharding, full_state
from tailor.train.encode import encode_chat, encode_text
from tailor.train.layer_change import layer_change, metrics_row
from tailor.train.loop import TrainSettings

# Settings that change how fast a run goes, not what it computes: a resume may change them.
SPEED_ONLY = {"threads", "compile", "gradient_checkpointing"}
# Sections read after the weights are saved: a resume may change them too.
AFTER_TRAINING = {"eval", "tracking"}


class ResumeError(TailorError, RuntimeError):
    """--resume where there is nothing to resume, or a run started with another job."""


@dataclass
class Recipe:
    """A recipe's state: set by `start`, then filled in by the shared steps as the recipe goes."""

    job: Job
    accelerator: Any
    say: Callable  # prints on the main process only
    console: Console
    run: Run | None = None  # once the data is read: data_and_folder
    start_from: Run | None = None  # an earlier stage, or the job's model.from_run
    trackers: list = field(default_factory=list)  # open_run_trackers
    resolved: ResolvedModel | None = None  # base_model
    tokenizer: Any = None
    dtype: torch.dtype | None = None
    chosen: list = field(default_factory=list)  # the `auto` settings resolved: auto_settings
    replayed: int = 0  # replayed general answers in the training data: with_replay

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def bf16(self) -> bool:
        return self.dtype == torch.bfloat16


def start(job: Job, console: Console | None) -> Recipe:
    """The process group, a print that only the main process does, and torch's threads."""
    from accelerate import Accelerator

    console = console or Console(stderr=True)
    if job.distributed.strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise TailorError("distributed.strategy deepspeed: DeepSpeed is not installed; pip install "
                          "\"tailor-llm[deepspeed]\", or use strategy fsdp (PyTorch's own)")
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    say = console.print if accelerator.is_main_process else (lambda *a, **k: None)
    torch.set_num_threads(job.training.threads or max(1, (os.cpu_count() or 1) // accelerator.num_processes))
    return Recipe(job, accelerator, say, console)


# --- the run folder -----------------------------------------------------------------------------


def run_folder(r: Recipe, resume: bool, fixed: Run | None = None) -> Run:
    """Rank 0 picks (or creates) the folder; the others are told which. `fixed`: a stage's folder
    inside a staged run, always the same."""
    job, chosen = r.job, [None]
    if r.is_main:
        if fixed is not None:
            fixed.path.mkdir(parents=True, exist_ok=True)
            if resume:
                check_same_job(fixed, job)
                check_same_processes(fixed, r.accelerator.num_processes)
            chosen[0] = str(fixed.path)
        elif resume:
            latest = Run.latest(job.output.dir, job.name)
            if latest is None:
                raise ResumeError(f"--resume: no earlier run of job '{job.name}' in {job.output.dir}/{job.name}; "
                                  "run without --resume to start one")
            check_same_job(latest, job)
            check_same_processes(latest, r.accelerator.num_processes)
            chosen[0] = str(latest.path)
        else:
            chosen[0] = str(Run.new(job.output.dir, job.name).path)
        Run(chosen[0]).lock()  # one writer: a second `tailor train --resume` of this run stops here
    if r.accelerator.num_processes > 1:
        torch.distributed.broadcast_object_list(chosen, src=0)
    r.run = Run(chosen[0])
    return r.run


def check_same_job(run: Run, job: Job) -> None:
    import yaml

    before = run.raw_job()
    if before is None:
        return
    now = yaml.safe_load(dump_job(job))
    changed = [f"{sec}.{k}" for sec, vals in now.items() if isinstance(vals, dict) and sec not in AFTER_TRAINING
               for k, v in vals.items() if (before.get(sec) or {}).get(k) != v and k not in SPEED_ONLY
               and v != AUTO]  # job.yaml holds what `auto` chose; the same data and model choose it again
    changed += [k for k, v in now.items() if not isinstance(v, dict) and before.get(k) != v and k not in AFTER_TRAINING]
    if changed:
        raise ResumeError(f"--resume: {run.path} was started with a different job ({', '.join(changed)} changed); "
                          "restore those values to resume, or run without --resume to start a new run")


def check_same_processes(run: Run, processes: int) -> None:
    """Which rows each step trains on, and each process's RNG and shards, follow the number of
    processes: a resume must have as many as the start had."""
    if not run.has_manifest or run.done:
        return
    before = run.manifest().processes
    if before and before != processes:
        raise ResumeError(f"--resume: {run.path} was trained on {before} process(es) and this launch has {processes}; "
                          f"relaunch with {before} (torchrun --nproc_per_node {before} … on one machine), or run "
                          "without --resume to start a new run")


def finished(r: Recipe) -> bool:
    """A run folder marked DONE has nothing left to train (a --resume of it, or a stage done before)."""
    if r.run.done:
        r.say(f"[green]{r.run.path} already finished[/]; nothing to resume.")
        return True
    return False


def open_run_trackers(r: Recipe, watch=None) -> None:
    """The job's trackers (TensorBoard, MLflow), on the main process. watch: one more, given by the
    caller (a sweep's trial, which reports each validation to its study and may stop the run)."""
    from tailor.track.runs import flatten

    job = r.job
    if r.is_main:
        uri = job.output.mlflow_uri or f"sqlite:///{Path(job.output.dir).resolve() / 'mlflow.db'}"
        r.trackers = open_trackers(job.tracking, r.run, job.name, flatten(job.model_dump(mode="json")), uri)
        if watch is not None:
            r.trackers.append(watch)


# --- data ---------------------------------------------------------------------------------------


def data_and_folder(r: Recipe, resume: bool, fixed: Run | None = None) -> tuple[list, list]:
    """(train records, validation records), and the run folder in r.run. The records are read and
    checked before any weights load; with data.prepare the raw data is prepared into the run
    folder first, so there the folder comes first."""
    if r.job.data.prepare:
        run_folder(r, resume, fixed)
        prepare_once(r)
        return splits(r.job, r.run)
    train_raw, val_raw = splits(r.job, None)
    run_folder(r, resume, fixed)
    return train_raw, val_raw


def splits(job: Job, run: Run | None) -> tuple[list, list]:
    """(train, validation) records of a run: its prepared RUN/data with data.prepare (validation:
    data.validation if given), else read_data."""
    if not job.data.prepare:
        return read_data(job)
    from tailor.data.store import read_prepared

    val_raw = (read_many(job.data.validation, split="validation") if job.data.validation
               else read_prepared(run.data_dir, "validation"))
    return read_prepared(run.data_dir, "train"), val_raw


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


def prepare_once(r: Recipe) -> None:
    """data.prepare: prepare data.train into RUN/data once (a resumed run reuses it)."""
    from tailor.data.prepare import prepare
    from tailor.data.store import is_prepared

    folder = r.run.data_dir
    if r.is_main and not is_prepared(folder):
        r.say(f"preparing {len(r.job.data.train)} input(s) → {folder}")
        # The names replaced, for the data's owner: beside the job's runs, in no run folder (the
        # values are personal data, and run folders get copied and shared).
        review = Path(r.job.output.dir) / r.job.name / "privacy-review.txt"
        result = prepare(r.job.data.train, folder, model=r.job.model.base, config=r.job.data, say=r.say,
                         review=review)
        if result.review:
            r.say(f"the values anonymization replaced, for you to review: {result.review} (personal data: do not "
                  "share it); delete the private people's lines, then name it in data.privacy.allow_from")
    r.accelerator.wait_for_everyone()


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


def base_model(r: Recipe) -> None:
    """The resolved base, its tokenizer and the compute dtype, into r."""
    r.resolved = resolve_model(r.job.model.base, r.job.model.revision)
    r.tokenizer = load_tokenizer(r.resolved.path)
    r.dtype = best_dtype(r.job.model.dtype, r.accelerator.device)


def model_to_train(r: Recipe, device=None):
    """The base model with the job's adapter, ready for packed training; continuing the adapter or
    weights of r.start_from (an earlier stage, or model.from_run) when there is one. device: where
    it loads (default: the process's accelerator)."""
    job, start_from = r.job, r.start_from
    device = device or r.accelerator.device
    torch.manual_seed(job.training.seed)
    random.seed(job.training.seed)
    cfg = AdapterConfig(**job.adapter.model_dump())
    if start_from is not None:
        _check_continuable(start_from, cfg.kind)
    # A LoRA stage continues its adapter on the base; the others continue the weights saved in model/.
    path = str(start_from.model_dir) if start_from is not None and not cfg.is_lora else r.resolved.path
    if cfg.kind == "qlora":
        model = load_model_4bit(path, r.dtype, device, job.model.trust_remote_code, cfg.double_quant)
    else:
        model = load_model(path, r.dtype, device, job.model.trust_remote_code)
    model.config.use_cache = False
    if job.training.gradient_checkpointing:
        # transformers' own, per decoder block; non-reentrant, so the frozen base's blocks need no
        # input that requires grad (PEFT's enable_input_require_grads) and packed rows pass through.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if start_from is not None and cfg.is_lora:
        model = load_lora_to_train(model, str(start_from.adapter_dir), cfg)
    else:
        model = apply_adapter(model, cfg)
        if start_from is not None:
            _load_saved_trainables(model, start_from.model_dir)  # exact: the load above cast them to `dtype`
    set_attention(model, PACKED_ATTENTION)  # each packed example attends only to itself, at its own cost
    if job.training.compile:
        compile_blocks(model)
    return model


def continued_from(job: Job, start_from: Run | None) -> Run | None:
    """What a run continues: an earlier stage (start_from), else the job's model.from_run (a
    deployed run that continual fine-tuning goes on from), checked to share the job's base."""
    if start_from is not None or not job.model.from_run:
        return start_from
    run = Run(job.model.from_run)
    if not run.has_manifest or not run.done:
        raise AdapterError(f"model.from_run {run.path}: not a finished run folder (no {Run.manifest_file.name} or "
                           f"{Run.done_file.name}); give runs/NAME/RUN-ID of a run that finished")
    source = run.manifest().model.source
    if source != job.model.base:
        raise AdapterError(f"model.from_run {run.path} trained {source}, but this job's model.base is "
                           f"{job.model.base}; set model.base: {source}")
    return run


def _check_continuable(start_from: Run, kind: str) -> None:
    folder = start_from.result_dir_for(kind)
    if not folder.is_dir():
        trained = "a LoRA adapter" if start_from.has_adapter else "full weights"
        raise AdapterError(f"{start_from.path} has no {folder.name}/ to continue (it trained {trained}); every "
                           "stage of a run trains the same adapter.kind")


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


def settings(r: Recipe) -> TrainSettings:
    d = r.job.distributed
    return TrainSettings(
        **r.job.training.model_dump(exclude={"max_seq_len", "packing", "threads", "val_generate",
                                             "val_generate_tokens", "replay", "gradient_checkpointing"}),
        bf16_autocast=r.bf16,
        sharding=Sharding(d.strategy, d.reshard_after_forward, d.cpu_offload, d.zero_stage, d.deepspeed_config),
    )


# --- settings left to Tailor, and forgetting protection ------------------------------------------

def auto_settings(r: Recipe, n_examples: int, n_rows: int) -> None:
    """Resolve the job's `auto` settings for the model actually trained and this data, into r.job
    (so the run's job.yaml says what ran) and r.chosen (the manifest says why); said on screen."""
    from tailor.train import auto

    if AUTO not in auto.values_of(r.job).values():
        return
    # The user's examples: the rules are of their data (replayed answers ride along, tailor/train/replay).
    choices = auto.choose(r.job, params=base_parameters(r.resolved.path), examples=n_examples - r.replayed,
                          rows=n_rows, device=r.accelerator.device.type, processes=r.accelerator.num_processes)
    for c in choices:
        r.say(f"auto {c.key} = {c.value:g}: {c.why}")
    r.job = auto.applied(r.job, choices)
    r.chosen = [c.as_dict() for c in choices]


def base_parameters(path: str) -> int:
    """The base model's parameter count from its config alone: built on the meta device, no weights read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def with_replay(r: Recipe, train_raw: list) -> list:
    """train_raw and, where training.replay is on, the base model's own answers to general prompts
    (tailor/train/replay): their share of the mix is replay.share. The answers are made once per
    base model, by the main process, and cached."""
    from tailor.train import replay

    spec = r.job.training.replay
    on = replay.is_on(spec.enabled, r.job.technique)
    if r.job.technique == "multitask" and on:
        if any(ex.task == replay.TASK for ex in train_raw):
            raise DataError([f"training.replay: the replayed answers are task {replay.TASK!r} in multitask "
                             "training, and your data has a task of that name; rename it, or set "
                             "training.replay.enabled: false"])
    n_task = sum(ex.kind == "chat" for ex in train_raw)
    prompts = replay.read_prompts(spec.prompts) if on else []
    n = replay.how_many(n_task, spec.share, len(prompts))
    if not n:
        return train_raw
    task_prompts = [m["content"] for ex in train_raw if ex.kind == "chat" for m in ex.messages if m["role"] == "user"]
    picked = replay.chosen(prompts, n, r.job.training.seed, like=task_prompts)
    dtype = str(r.dtype).removeprefix("torch.")

    def generate(missing: list[str]) -> list[str]:
        from tailor.models.generate import answer

        r.say(f"replay: the base model answers {len(missing)} general prompt(s) once (cached for later runs)")
        base = load_model(r.resolved.path, r.dtype, r.accelerator.device, r.job.model.trust_remote_code)
        try:
            return answer(base, r.tokenizer, [[{"role": "user", "content": p}] for p in missing],
                          max_new_tokens=spec.max_new_tokens, batch_size=16)
        finally:
            del base

    # The main process makes what the cache lacks; the others read the cache once it has.
    answered = replay.answers(picked, r.resolved.path, generate, spec.max_new_tokens, dtype) if r.is_main else None
    r.accelerator.wait_for_everyone()
    if answered is None:
        answered = replay.answers(picked, r.resolved.path, generate, spec.max_new_tokens, dtype)
    records = replay.records(answered, task=replay.TASK if r.job.technique == "multitask" else None)
    r.replayed = len(records)
    r.say(f"replay: {len(records)} of the base model's answers to general prompts join {n_task} training "
          f"conversations ({len(records) / (len(records) + n_task):.0%}; training.replay)"
          + (f"; {n - len(records)} empty answer(s) left out" if len(records) < n else ""))
    return train_raw + records


def record_start(r: Recipe, model, stats: dict, n_train: int, n_val: int, unit: str = "examples", **extra) -> None:
    """job.yaml and manifest.json (what this run was started with), and the plan in one line; by
    the main process. stats: the encoding numbers, with rows and padding_share."""
    if not r.is_main:
        return
    job, run, dtype = r.job, r.run, str(r.dtype).removeprefix("torch.")
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = parameter_count(model)
    run.write_job(job)
    run.write_manifest(Manifest(
        name=job.name, technique=job.technique, run_dir=str(run.path),
        model=ModelInfo(source=job.model.base, kind=r.resolved.kind, path=r.resolved.path, hub_id=r.resolved.hub_id,
                        dtype=dtype),
        data=DataInfo(train=[file_entry(p) for p in job.data.train],
                      validation=[file_entry(p) for p in job.data.validation],
                      prepared=str(run.data_dir) if job.data.prepare else None),
        encoding=stats, seed=job.training.seed,
        adapter=AdapterInfo(kind=job.adapter.kind, trainable_parameters=n_trainable, total_parameters=n_total,
                            trainable=trainable_names(model) if job.adapter.kind not in ("lora", "qlora") else None),
        start=StartInfo(from_=str(r.start_from.path) if r.start_from else None,
                        trainable_sha256=trainable_checksum(model)),
        processes=r.accelerator.num_processes, versions=versions(), hardware=hardware_summary(),
        **({"auto": r.chosen} if r.chosen else {}),
        **({"replay": {"examples": r.replayed, "share": job.training.replay.share}} if r.replayed else {}),
        **extra,
    ))
    r.say(f"[bold]{job.name}[/] ({job.technique}): {n_train} train / {n_val} validation {unit} in {stats['rows']} "
          f"rows ({stats['padding_share']:.0%} padding), {job.adapter.kind} training {n_trainable:,} of {n_total:,} "
          f"parameters in {dtype} on {r.accelerator.num_processes} process(es)"
          + (f" ({job.distributed.strategy})" if job.distributed.strategy != "ddp" else ""))
    r.say(f"run folder: {run.path}")


def parameter_count(model) -> int:
    """Every weight the model stands for: a 4-bit tensor (QLoRA) packs two weights per byte, and
    its quantization state knows the shape it was quantized from."""
    return sum(p.quant_state.shape.numel() if getattr(p, "quant_state", None) is not None else p.numel()
               for p in model.parameters())


def file_entry(src) -> FileInfo:
    path = src if isinstance(src, str) else src.path
    return FileInfo(path=path, sha256=path_sha256(path))


# --- the end of a run ---------------------------------------------------------------------------


def finish(r: Recipe, model, summary: dict) -> None:
    """Save the result where serving and evaluation expect it, with how much each layer changed,
    the summary and the report; then mark the run DONE."""
    set_attention(model, "sdpa")  # the saved model runs anywhere, without Tailor
    if r.job.distributed.strategy != "ddp":
        model = unsharded(r, model)
    if not r.is_main:
        return
    run = r.run
    model = r.accelerator.unwrap_model(model)
    changes = layer_change(model, r.resolved.path)
    run.write_layer_change(changes)
    run.metrics_log(trackers=r.trackers).write(metrics_row(changes, summary["steps"]))
    if changes["blocks"]:
        most = max(changes["blocks"], key=lambda b: b["relative_change"])
        r.say(f"weights changed most in block {most['block']} ({len(changes['blocks'])} blocks trained; "
              f"‖ΔW‖/‖W‖ {most['relative_change']:.4f}; every block in {Run.layer_change_file.name} and "
              f"{Run.report_file.name})")
    run.save_result(model, r.tokenizer, r.job.adapter.kind)
    summary = {**summary, "end": {"trainable_sha256": trainable_checksum(model)}}
    run.write_summary(summary)
    write_report(run)  # the curves now; the evaluation adds its part
    run.mark_done()
    r.say("[green]done[/]"
          + (f": train loss {summary['final_train_loss']:.4f}" if summary["final_train_loss"] is not None else "")
          + (f", validation loss {summary['final_val_loss']:.4f}" if summary["final_val_loss"] is not None else "")
          + (f", {summary['tokens_per_s_median']:.0f} tokens/s" if summary["tokens_per_s_median"] else "")
          + (f", peak memory {summary['peak_memory_mb']:,} MB per process" if summary.get("peak_memory_mb") else "")
          + f" → {run.path}")


def unsharded(r: Recipe, model):
    """A model trained sharded (FSDP, DeepSpeed) as one process would have it: the trained weights gathered on the main
    process and put into a fresh copy of the model on its CPU (the others get None). So the result
    folder, the layer change and the checksum are made exactly as for a one-process run."""
    trained = full_state(model, r.job.distributed.strategy)  # every process takes part in the gathering
    if not r.is_main:
        return None
    plain = model_to_train(r, device="cpu")
    set_attention(plain, "sdpa")
    missing = {n for n, p in plain.named_parameters() if p.requires_grad} - set(trained)
    if missing:
        raise RuntimeError(f"the gathered weights lack {sorted(missing)[:3]}: report this as a Tailor bug")
    plain.load_state_dict(trained, strict=False)
    return plain


def evaluate_and_close(r: Recipe, steps: int) -> dict | None:
    """Evaluate against the base where there is test data (tailor eval RUN does it any time), send
    the scores to the trackers, close them."""
    evaluation = evaluate(r.run, r.job, r.say) if r.is_main and r.job.eval.enabled else None
    for tracker in r.trackers:
        if evaluation:
            tracker.log_final(eval_numbers(evaluation), steps)
        tracker.close()
    r.accelerator.wait_for_everyone()
    return evaluation


def evaluate(run: Run, job: Job, say) -> dict | None:
    from tailor.evaluate.report import gate_lines
    from tailor.evaluate.run import evaluate as run_evaluation

    try:
        summary = run_evaluation(run, spec=job.eval, say=say)
    except DataError as exc:
        say(f"[yellow]evaluation skipped: {exc}[/]")
        return None
    for line in gate_lines(summary):
        say(line, highlight=False, markup=False)
    return summary


def sample_scorer(r: Recipe, val_raw: list):
    """model -> generation metrics on the first training.val_generate validation conversations
    (greedy answers to all but their last turn, scored against it), prefixed val_; None when
    val_generate is 0 or nothing is left."""
    return validation_scorer(r.tokenizer, val_raw, r.job.training.val_generate, r.job.training.val_generate_tokens,
                             r.bf16)


def validation_scorer(tokenizer, val_raw: list, n: int, max_new_tokens: int, bf16: bool):
    """sample_scorer's function for any model and tokenizer: a sweep scores the base model with it,
    exactly as training scores the model it trains."""
    from tailor.evaluate.metrics import text_scores
    from tailor.evaluate.run import answered
    from tailor.models.generate import answer

    samples = answered(val_raw)[:n] if n else []
    if not samples:
        return None
    prompts, references = [t["prompt"] for t in samples], [t["reference"] for t in samples]

    def score(model) -> dict:
        training_attention = set_attention(model, "sdpa")  # generation has no packed rows
        device = next(model.parameters()).device.type
        try:  # as in training: a bf16 base with fp32 adapter weights needs autocast
            with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                replies = answer(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
        finally:
            set_attention(model, training_attention)
        return {f"val_{k}": v for k, v in text_scores(replies, references).items()}

    return score
