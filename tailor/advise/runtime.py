"""How long a job file will take, end to end: loading, training, validation, checkpoints, evaluation.

Training is tailor.advise.estimate's FLOP and memory-traffic model; the rest is counted from the
job the way the recipes run it (tailor/techniques/, tailor/evaluate/): how many validations the
loop makes, how many answers evaluation generates and how long each generated token takes (a
decoding step is bound by per-layer overhead and weight reads, not FLOPs, so it is scaled from the
calibrated probe by layers and bytes). Early stopping can only make a run shorter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

from tailor.advise.estimate import (
    Arch,
    Estimate,
    Hardware,
    RunSize,
    Workload,
    elementwise_per_block,
    estimate,
    forward_flops_per_token,
)
from tailor.advise.profile import DataProfile

ANSWER_SHARE = 0.8  # generated answers stop at their end-of-turn token: ~80 % of max_new_tokens on average
RETENTION_QUESTIONS, RETENTION_TOKENS, RETENTION_BATCH = 120, 24, 40  # tailor/evaluate/probe.py
DISK_GBS = 0.5  # checkpoint and model writes
PROBE_LAYERS, PROBE_PARAMS = 30, 134_515_008  # the calibration probe's model (SmolLM2-135M shape)
PREPARE_RECORDS_PER_S = 300  # tailor prepare with name detection (bench/prepare_throughput.py, NER on)
# Tailor's decoding loop (stop strings, per-row bookkeeping, cache merges) takes ~1.7x the bare
# forward pass the calibration times: 66 ms a token serving one client against 35-40 ms
# (bench/serve_throughput.py, on the machine the calibration was written on).
ENGINE_FACTOR = 1.7
EVAL_FIXED_S = 5.0  # scoring, the per-layer change summary, report.html


@dataclass(frozen=True)
class JobTime:
    training: Estimate
    prepare_s: float
    load_s: float
    validation_s: float
    checkpoints_s: float
    evaluation_s: float
    first_time_s: float  # the base model's retention probe, cached after the first run on a machine

    @property
    def total_s(self) -> float:
        return (self.prepare_s + self.load_s + self.training.seconds + self.validation_s + self.checkpoints_s
                + self.evaluation_s)

    def parts(self) -> dict[str, float]:
        return {"prepare": self.prepare_s, "load": self.load_s, "train": self.training.seconds,
                "validation": self.validation_s, "checkpoints": self.checkpoints_s, "evaluation": self.evaluation_s}


def workload_of(job, profile: DataProfile, method: str | None = None) -> Workload:
    """The job's adapter, training shape and distributed strategy as the estimator's Workload."""
    a, t, d = job.adapter, job.training, job.distributed
    return Workload(method=method or a.kind, seq_len=t.max_seq_len, micro_batch=t.batch_size, lora_rank=a.rank,
                    lora_dropout=a.dropout, lora_top_blocks=a.lora_top_blocks, train_top_blocks=a.train_top_blocks,
                    train_head=a.train_head, checkpointing=t.gradient_checkpointing,
                    strategy=d.strategy, zero_stage=d.zero_stage, cpu_offload=d.cpu_offload,
                    double_quant=a.double_quant, label_fraction=profile.label_fraction,
                    example_tokens=min(profile.mean_tokens, t.max_seq_len))


def decode_step_s(arch: Arch, hw: Hardware, batch: int) -> float:
    """Seconds per generated token for `batch` answers at once."""
    n = arch.params
    if hw.kind == "cpu" and hw.decode_step_s:
        one, sixteen = hw.decode_step_s["1"], hw.decode_step_s["16"]
        per_row = max(0.0, (sixteen - one) / 15)
        fixed = one - per_row
        return fixed * max(arch.layers / PROBE_LAYERS, n / PROBE_PARAMS) + per_row * batch * n / PROBE_PARAMS
    weights = n * 2 / (hw.bandwidth_gbs * 1e9 * 0.6)
    return max(weights, arch.layers * 3e-4) + batch * 2 * n / (hw.peak_tflops * 1e12 * 0.3)


def forward_s(arch: Arch, w: Workload, tokens: float, hw: Hardware) -> float:
    """A no-grad forward pass over `tokens` (validation loss, perplexity, prompt prefill); element-wise
    work of a forward pass is a third of a training step's."""
    elementwise = elementwise_per_block(arch) * arch.layers / 3 * hw.elementwise_ns * 1e-9
    return tokens * (forward_flops_per_token(arch, w) / (hw.peak_tflops * 1e12 * hw.util(w.method)) + elementwise)


def generate_s(arch: Arch, hw: Hardware, answers: int, new_tokens: int, batch: int, prompt_tokens: float,
               w: Workload) -> float:
    if answers <= 0:
        return 0.0
    batches = math.ceil(answers / batch)
    per_batch = min(batch, answers)
    steps = batches * new_tokens * ANSWER_SHARE
    return steps * decode_step_s(arch, hw, per_batch) * ENGINE_FACTOR + forward_s(arch, w, answers * prompt_tokens, hw)


def with_auto(job, profile: DataProfile, arch: Arch, hw: Hardware, devices: int = 1):
    """The job with its `auto` settings as training will choose them for this model and data
    (tailor/train/auto.py); rows are estimated from the tokens."""
    from tailor.train import auto

    if auto.AUTO not in auto.values_of(job).values():
        return job
    rows = max(1, math.ceil(profile.train_tokens / (job.training.max_seq_len * 0.95)))
    return auto.applied(job, auto.choose(job, params=arch.params, examples=profile.examples, rows=rows,
                                         device="cpu" if hw.kind == "cpu" else "cuda", processes=devices))


# The base model's greedy answers to the replay prompts end at about 60 % of replay.max_new_tokens
# (SmolLM2-135M on 121 of them: 58 of 96 tokens); a prompt with its chat template is about 30 tokens.
REPLAY_ANSWER_SHARE, REPLAY_PROMPT_TOKENS = 0.6, 30


def replayed(job, profile: DataProfile) -> int:
    """How many replayed answers the job's training adds (tailor/techniques/common.py with_replay)."""
    from tailor.train import replay

    spec = job.training.replay
    if not replay.is_on(spec.enabled, job.technique):
        return 0
    available = len(replay.read_prompts(spec.prompts)) if spec.prompts and all(
        Path(p).is_file() for p in spec.prompts) else len(replay.builtin_prompts())
    return replay.how_many(profile.examples, spec.share, available)


def job_time(job, profile: DataProfile, arch: Arch, hw: Hardware, devices: int = 1,
             method: str | None = None) -> JobTime:
    job = with_auto(job, profile, arch, hw, devices)
    t, e = job.training, job.eval
    w = workload_of(job, profile, method)
    n_replay = replayed(job, profile)
    if n_replay:  # the replayed answers train beside the data (tailor/train/replay)
        extra = n_replay * (REPLAY_PROMPT_TOKENS + REPLAY_ANSWER_SHARE * t.replay.max_new_tokens)
        profile = replace(profile, train_tokens=int(profile.train_tokens + extra))
    size = RunSize(train_tokens=profile.train_tokens, epochs=t.epochs, grad_accum=t.grad_accum)
    training = estimate(arch, w, size, hw, devices)
    if t.max_steps:
        training = replace(training, steps=t.max_steps, seconds=training.seconds * t.max_steps / max(1, training.steps),
                           usd=training.usd * t.max_steps / max(1, training.steps))
    steps = training.steps
    steps_per_epoch = max(1, math.ceil(steps / t.epochs))
    validations = 0
    if profile.validation_tokens:
        marks = {steps} | set(range(steps_per_epoch, steps + 1, steps_per_epoch))
        if t.eval_every:
            marks |= set(range(t.eval_every, steps + 1, t.eval_every))
        validations = len(marks)
    prompt = profile.mean_tokens * (1 - profile.label_fraction)
    one_validation = forward_s(arch, w, profile.validation_tokens, hw) + generate_s(
        arch, hw, min(t.val_generate, profile.validation_examples), t.val_generate_tokens, t.val_generate, prompt, w)
    saves = len({steps} | (set(range(t.save_every, steps + 1, t.save_every)) if t.save_every else set()))
    state_bytes = 12 * training.trainable  # float32 weights + AdamW's two states
    if w.strategy != "ddp":  # sharded: each process writes its own share of them, at once
        state_bytes /= devices
    weights_bytes = arch.params * 2
    checkpoints = (saves * state_bytes / (DISK_GBS * 1e9)
                   + (weights_bytes if w.method not in ("lora", "qlora") else 0) / (DISK_GBS * 1e9))
    evaluation = first_time = 0.0
    if e.enabled:
        tests = min(e.max_examples, profile.test_examples)
        one_model = generate_s(arch, hw, tests, e.max_new_tokens, e.batch_size, prompt, w)
        retention = 0.0
        if e.retention:
            retention = generate_s(arch, hw, RETENTION_QUESTIONS, RETENTION_TOKENS, RETENTION_BATCH, 40, w)
        evaluation = 2 * one_model + retention + 2 * _load_s(arch, hw) + EVAL_FIXED_S
        first_time = retention
    if n_replay:  # the base model answers the general prompts once per machine; later runs read them
        first_time += generate_s(arch, hw, n_replay, t.replay.max_new_tokens, 16, REPLAY_PROMPT_TOKENS, w)
    prepare = profile.raw_records / PREPARE_RECORDS_PER_S + 2 if job.data.prepare else 0.0
    return JobTime(training, prepare, _load_s(arch, hw), validations * one_validation, checkpoints, evaluation,
                   first_time)


def _load_s(arch: Arch, hw: Hardware) -> float:
    """Reading the weights from the local cache and building the model."""
    return 2.0 + arch.params * 2 / 1e9
