#!/usr/bin/env python
"""Training throughput, side by side: Tailor vs Hugging Face Trainer + PEFT vs TRL's SFTTrainer.

All three train the same LoRA (rank 16, alpha 32, no dropout, every linear projection) on the same
base model, the same seeded long-tailed chat examples in the same order, with the same learning
rate, schedule and maximum length, for one epoch. Each peer gets its best documented CPU settings:

  tailor   packed rows, attention per example, bf16, loss only at answer positions, training.compile
  trainer  Trainer + PEFT, bf16 autocast, group_by_length, padding to the longest in the batch
  trl      SFTTrainer, packing (best-fit decreasing, padding-free), bf16, completion-only loss

Each variant runs in its own process (so peak memory is its own), in alternating order across
passes. Printed per variant: real (non-padding) tokens/s, the median over steps after warm-up;
peak resident memory; the loss of the trained model on the same held-out examples, computed the
same way for all three (so a speed-up can never hide a different result). Then the ratios and the
machine's bf16 matmul rate measured in the same run. The last line is machine-readable.

    python bench/train_throughput.py                      # embedded model, 160 examples, 1 pass
    python bench/train_throughput.py --passes 3 --examples 400
    python bench/train_throughput.py --data corpus --examples 480   # data that is not the shop's

The last line's loss_delta is signed: Tailor's held-out loss minus the best peer's, over the best
peer's (negative: Tailor's model is the better one).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chat_data import corpus_examples, make_examples  # noqa: E402

VARIANTS = ("tailor", "trainer", "trl")
# Also measurable, not in the default comparison: Tailor with training.gradient_checkpointing.
EXTRA_VARIANTS = ("tailor-gc",)
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded:smollm2-135m-instruct", help="base model (as in a job file)")
    p.add_argument("--data", choices=["support", "corpus"], default="support",
                   help="support: seeded support conversations with long-tailed lengths (the shop's kind); "
                        "corpus: first exchanges of the public ChatterBot corpus (short, written by others)")
    p.add_argument("--examples", type=int, default=160, help="training examples (one epoch)")
    p.add_argument("--eval-examples", type=int, default=24, help="held-out examples for the final loss")
    p.add_argument("--passes", type=int, default=1, help="passes over all variants, in alternating order")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated subset of " + ",".join(VARIANTS + EXTRA_VARIANTS))
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--rows", type=int, default=2, help="packed rows per step (tailor, trl)")
    p.add_argument("--trainer-batch", type=int, default=6,
                   help="examples per step for Trainer (about as many as fit in --rows packed rows)")
    p.add_argument("--max-steps", type=int, default=None, help="stop each variant after this many steps")
    p.add_argument("--warmup-steps", type=int, default=2, help="steps left out of the tokens/s median")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads per variant")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="Tailor without training.compile (its one-time compile is left out of the tokens/s "
                        "median like every variant's warm-up steps, but counts in its wall time)")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant and print JSON
    return p.parse_args(argv)


# --- shared by all variants ----------------------------------------------------------------------


def base_path(model: str) -> str:
    from tailor.models import resolve_model

    return resolve_model(model).path


def heldout_loss(model, tokenizer, conversations, max_len) -> float:
    """Mean loss per answer token on held-out conversations, the same code for every variant."""
    from tailor.train.loss import answer_loss

    return answer_loss(model, tokenizer, [c["messages"] for c in conversations], max_len).mean


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median_after_warmup(values: list[float], warmup: int) -> float:
    kept = values[warmup:] or values
    return statistics.median(kept)


class StepClock:
    """Tokens/s per optimizer step for HF trainers: real tokens counted in the collator, time
    between consecutive step ends (so data collation counts, as it does in Tailor's loop)."""

    def __init__(self, collator, count):
        self.collator, self.count = collator, count
        self.batch_tokens: list[int] = []
        self.ends: list[float] = [time.perf_counter()]

    def __call__(self, features):
        batch = self.collator(features)
        self.batch_tokens.append(self.count(batch))
        return batch

    def callback(self):
        from transformers import TrainerCallback

        clock = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, *a, **k):
                clock.ends = [time.perf_counter()]
                clock.batch_tokens.clear()

            def on_step_end(self, *a, **k):
                clock.ends.append(time.perf_counter())

        return _Callback()

    def tokens_per_s(self) -> list[float]:
        steps = len(self.ends) - 1
        return [self.batch_tokens[i] / (self.ends[i + 1] - self.ends[i]) for i in range(steps)]


# --- the variants ----------------------------------------------------------------------------------


def run_tailor(args, train, held_out, workdir: Path, checkpointing: bool = False) -> dict:
    import yaml

    from tailor.models.generate import load_run
    from tailor.runs import Run
    from tailor.spec import load_job
    from tailor.techniques import task

    data = workdir / "train.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in train), encoding="utf-8")
    job = {
        "name": "bench", "model": {"base": args.model},
        "data": {"train": [str(data)], "validation_fraction": 0.0},
        "adapter": {"kind": "lora", "rank": LORA["r"], "alpha": LORA["lora_alpha"], "dropout": 0.0},
        "training": {"learning_rate": args.lr, "epochs": 1, "max_steps": args.max_steps, "batch_size": args.rows,
                     "max_seq_len": args.max_len, "scheduler": "cosine", "warmup_ratio": 0.0, "log_every": 1,
                     "save_every": 0, "threads": args.threads, "seed": 0, "compile": args.compile,
                     # The peers train on the same examples only: no replayed general answers.
                     "replay": {"enabled": False}, "gradient_checkpointing": checkpointing},
        "output": {"dir": str(workdir / "runs")},
    }
    (workdir / "job.yaml").write_text(yaml.safe_dump(job), encoding="utf-8")
    run = Run(task.run(load_job(workdir / "job.yaml"), show_progress=False))
    train_peak = peak_rss_mb()
    gc.collect()  # the trained model is garbage now; free it before loading the result for evaluation
    rows = [r for r in run.metrics() if r["type"] == "train"]
    adapter = run.manifest().adapter
    model, tokenizer = load_run(run)
    return {"tokens_per_s": median_after_warmup([r["tokens_per_s"] for r in rows], args.warmup_steps),
            "steps": len(rows), "tokens": sum(r["tokens"] for r in rows),
            "base_parameters": adapter.total_parameters - adapter.trainable_parameters,
            "train_peak_rss_mb": train_peak,
            "heldout_loss": heldout_loss(model, tokenizer, held_out, args.max_len)}


def _hf_common(args, workdir: Path) -> dict:
    return dict(output_dir=str(workdir / "out"), learning_rate=args.lr, num_train_epochs=1,
                max_steps=args.max_steps or -1, lr_scheduler_type="cosine", warmup_steps=0, bf16=True,
                use_cpu=True, logging_steps=1, save_strategy="no", report_to=[], seed=0, data_seed=0,
                dataloader_num_workers=0, disable_tqdm=True)


def run_trainer(args, train, held_out, workdir: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from tailor.models import load_model, load_tokenizer
    from tailor.train.encode import IGNORE, encode_chat

    path = base_path(args.model)
    tokenizer = load_tokenizer(path)
    model = get_peft_model(load_model(path, torch.bfloat16), LoraConfig(task_type="CAUSAL_LM", **LORA))
    encoded = [encode_chat(tokenizer, e["messages"], args.max_len) for e in train]
    dataset = Dataset.from_list([{"input_ids": e.input_ids, "labels": e.labels} for e in encoded])

    def pad_to_longest(features):
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), tokenizer.pad_token_id)
        labels = torch.full((len(features), width), IGNORE)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(f["input_ids"]), torch.tensor(f["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    clock = StepClock(pad_to_longest, lambda b: int(b["attention_mask"].sum()))
    targs = TrainingArguments(per_device_train_batch_size=args.trainer_batch, train_sampling_strategy="group_by_length",
                              remove_unused_columns=False, **_hf_common(args, workdir))
    trainer = Trainer(model=model, args=targs, train_dataset=dataset, data_collator=clock, callbacks=[clock.callback()])
    trainer.train()
    speeds = clock.tokens_per_s()
    return {"tokens_per_s": median_after_warmup(speeds, args.warmup_steps), "steps": len(speeds),
            "tokens": sum(clock.batch_tokens[:len(speeds)]),
            "heldout_loss": heldout_loss(model, tokenizer, held_out, args.max_len)}


def run_trl(args, train, held_out, workdir: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from tailor.models import load_model, load_tokenizer

    path = base_path(args.model)
    tokenizer = load_tokenizer(path)
    model = load_model(path, torch.bfloat16)
    # prompt/completion: TRL then computes the loss on the answer only, as Tailor and the Trainer variant do
    dataset = Dataset.from_list([{"prompt": e["messages"][:-1], "completion": e["messages"][-1:]} for e in train])
    config = SFTConfig(max_length=args.max_len, packing=True, packing_strategy="bfd",
                       per_device_train_batch_size=args.rows, **_hf_common(args, workdir))
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA))

    def real_tokens(batch) -> int:
        if "attention_mask" in batch:
            return int(batch["attention_mask"].sum())
        return int(batch["input_ids"].numel())  # padding-free: one row, no padding

    clock = StepClock(trainer.data_collator, real_tokens)
    trainer.data_collator = clock
    trainer.add_callback(clock.callback())
    trainer.train()
    speeds = clock.tokens_per_s()
    return {"tokens_per_s": median_after_warmup(speeds, args.warmup_steps), "steps": len(speeds),
            "tokens": sum(clock.batch_tokens[:len(speeds)]),
            "heldout_loss": heldout_loss(trainer.model, tokenizer, held_out, args.max_len)}


RUNNERS = {"tailor": run_tailor, "trainer": run_trainer, "trl": run_trl,
           "tailor-gc": lambda *a: run_tailor(*a, checkpointing=True)}


def run_variant(args) -> None:
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    if args.data == "corpus":
        train, held_out = corpus_examples(args.examples, args.eval_examples)
    else:
        train, held_out = make_examples(args.examples, seed=0), make_examples(args.eval_examples, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        result = RUNNERS[args.variant](args, train, held_out, Path(tmp))
    result |= {"variant": args.variant, "peak_rss_mb": peak_rss_mb(), "wall_s": time.perf_counter() - started}
    print("RESULT " + json.dumps(result), flush=True)


# --- the comparison --------------------------------------------------------------------------------


def matmul_tflops(threads: int, seconds: float = 2.0) -> float:
    """bf16 matrix products at the shapes of a 135M model's MLP (the advisor's calibration probe),
    with the training thread count."""
    import torch

    from tailor.advise.calibrate import matmul_tflops as measure

    torch.set_num_threads(threads)
    return measure(torch.bfloat16, seconds)


def run_child(args, variant: str) -> dict:
    cmd = [sys.executable, __file__, "--variant", variant] + [
        a for k, v in vars(args).items() if k not in ("variant", "passes", "variants", "compile") and v is not None
        for a in (f"--{k.replace('_', '-')}", str(v))] + ([] if args.compile else ["--no-compile"])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"{variant} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.variant:
        return run_variant(args)
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS + EXTRA_VARIANTS)
    if unknown:
        sys.exit(f"--variants: unknown {sorted(unknown)}; choose from {', '.join(VARIANTS + EXTRA_VARIANTS)}")
    print(f"# {args.examples} {args.data} examples, LoRA r16 all-linear, max length {args.max_len}, lr {args.lr}, "
          f"{args.threads} threads, {args.passes} pass(es); model {args.model}; "
          f"tailor {'with' if args.compile else 'without'} training.compile", flush=True)
    # The rate is measured before every pass and after the last, and the median taken: on a shared
    # machine one 2-second probe read anywhere from 0.78 to 0.93 TFLOP/s in the same hour.
    rates = [matmul_tflops(args.threads)]
    print(f"# bf16 matmul rate on this machine: {rates[0]:.2f} TFLOP/s", flush=True)

    results: dict[str, list[dict]] = {v: [] for v in variants}
    for p in range(args.passes):
        for v in (variants if p % 2 == 0 else variants[::-1]):  # alternate, so drift hits every variant
            r = run_child(args, v)
            results[v].append(r)
            print(f"  pass {p + 1} {v:8s} {r['tokens_per_s']:8.1f} tok/s  {r['peak_rss_mb']:7.0f} MB  "
                  f"held-out loss {r['heldout_loss']:.4f}  {r['steps']} steps  {r['wall_s']:.0f} s", flush=True)
        rates.append(matmul_tflops(args.threads))
    rate = statistics.median(rates)
    print(f"# bf16 matmul rate: {', '.join(f'{r:.2f}' for r in rates)} TFLOP/s before each pass and after the last; "
          f"median {rate:.2f}", flush=True)

    med = {v: {k: statistics.median(r[k] for r in rs) for k in ("tokens_per_s", "peak_rss_mb", "heldout_loss")}
           for v, rs in results.items()}
    print(f"\n{'variant':10s}{'tokens/s':>10s}{'peak MB':>10s}{'held-out loss':>15s}{'tailor ×':>10s}")
    for v, m in med.items():
        ratio = med["tailor"]["tokens_per_s"] / m["tokens_per_s"] if "tailor" in med else float("nan")
        print(f"{v:10s}{m['tokens_per_s']:10.1f}{m['peak_rss_mb']:10.0f}{m['heldout_loss']:15.4f}{ratio:10.2f}")
    if not {"tailor", "trainer", "trl"} <= set(med):
        return
    t, tr, trl = med["tailor"], med["trainer"], med["trl"]
    flops_per_token = 4 * results["tailor"][0]["base_parameters"]  # forward 2N + input gradients 2N (frozen base)
    utilisation = t["tokens_per_s"] * flops_per_token / (rate * 1e12)
    best = min(tr["heldout_loss"], trl["heldout_loss"])
    loss_delta = (t["heldout_loss"] - best) / best  # negative: Tailor's held-out loss is lower than the best peer's
    print(f"\n# Tailor uses {utilisation:.0%} of the measured bf16 matmul rate "
          f"({flops_per_token / 1e6:.0f} MFLOP per token)")
    print(f"tailor/trainer={t['tokens_per_s'] / tr['tokens_per_s']:.2f} "
          f"tailor/trl={t['tokens_per_s'] / trl['tokens_per_s']:.2f} "
          f"utilisation={utilisation:.0%} loss_delta={loss_delta:+.1%} "
          f"memory/trl={t['peak_rss_mb'] / trl['peak_rss_mb']:.2f}")


if __name__ == "__main__":
    main()
