#!/usr/bin/env python
"""How good are the advisor's estimates? Train three configurations on this machine and print
predicted against measured time and peak memory.

  lora-135m   LoRA r16 on the embedded SmolLM2-135M, with validation and the full evaluation
              (test answers, base and tuned, and the general-skills probe)
  full-135m   full fine-tuning of the same model (float32 weights, AdamW states), no evaluation
  lora-360m   LoRA r16 on a SmolLM2-360M-shaped model (random weights: speed and memory do not
              depend on them), no evaluation
  qlora-135m  QLoRA r16 on the embedded model (its block linears in 4-bit NF4), no evaluation
  lora-gc-135m  LoRA r16 on the embedded model with gradient checkpointing, no evaluation

Each runs `tailor train`'s task recipe in its own process (so peak memory is its own). The
prediction is made first, the way `tailor advise` makes it: the model's shape from the catalog,
the data's size counted in the chat template (as `tailor prepare`'s card counts it), this
machine's calibration (measured now if there is none). Measured: the training steps' time (the
sum of step times the loop logs), the whole run's wall time, and peak resident memory. Targets:
time within ±30 %, memory within ±25 %. The last line is machine-readable.

    python bench/advise_accuracy.py
    python bench/advise_accuracy.py --configs full-135m --examples 64
    python bench/advise_accuracy.py --configs qlora-135m,lora-gc-135m
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from chat_data import make_examples  # noqa: E402

CONFIGS = {
    "lora-135m": {"model": "smollm2-135m-instruct",
                  "adapter": {"kind": "lora", "rank": 16, "alpha": 32, "dropout": 0.0}, "eval": True},
    "full-135m": {"model": "smollm2-135m-instruct", "adapter": {"kind": "full"}, "eval": False},
    "lora-360m": {"model": "smollm2-360m-instruct",
                  "adapter": {"kind": "lora", "rank": 16, "alpha": 32, "dropout": 0.0}, "eval": False},
    "qlora-135m": {"model": "smollm2-135m-instruct",
                   "adapter": {"kind": "qlora", "rank": 16, "alpha": 32, "dropout": 0.0}, "eval": False},
    "lora-gc-135m": {"model": "smollm2-135m-instruct",
                     "adapter": {"kind": "lora", "rank": 16, "alpha": 32, "dropout": 0.0}, "eval": False,
                     "training": {"gradient_checkpointing": True}},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--examples", type=int, default=120, help="training examples (plus 12 validation, 12 test)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def model_base(name: str, workdir: Path) -> str:
    """The embedded model, or a random-weight folder of a catalog model's shape with its tokenizer."""
    if name == "smollm2-135m-instruct":
        return "embedded:smollm2-135m-instruct"
    folder = workdir / name
    if not (folder / "config.json").exists():
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        from tailor.models import load_tokenizer, resolve_model
        from tailor.models.catalog import find_model

        m = find_model(name)
        config = LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
                             num_hidden_layers=m.layers, num_attention_heads=m.attention_heads,
                             num_key_value_heads=m.kv_heads, tie_word_embeddings=m.tied_embeddings,
                             max_position_embeddings=m.context_length, bos_token_id=1, eos_token_id=2, pad_token_id=2)
        torch.manual_seed(0)
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
        load_tokenizer(resolve_model("embedded:smollm2-135m-instruct").path).save_pretrained(folder)
    return str(folder)


def job_dict(args, name: str, workdir: Path) -> dict:
    c = CONFIGS[name]
    return {
        "name": name, "model": {"base": model_base(c["model"], workdir)},
        "data": {"train": [str(workdir / "train.jsonl")], "validation": [str(workdir / "validation.jsonl")]},
        "adapter": c["adapter"],
        "training": {"learning_rate": 1e-4 if c["adapter"]["kind"] == "full" else 5e-4, "epochs": args.epochs,
                     "batch_size": args.batch, "max_seq_len": args.max_len, "log_every": 1, "save_every": 0,
                     "val_generate": 4 if c["eval"] else 0, "val_generate_tokens": 32, **c.get("training", {})},
        "eval": {"enabled": c["eval"], "data": [str(workdir / "test.jsonl")], "max_examples": 12,
                 "max_new_tokens": 64},
        "output": {"dir": str(workdir / "runs")},
    }


def write_data(args, workdir: Path) -> dict[str, list]:
    splits = {"train": make_examples(args.examples, seed=0), "validation": make_examples(12, seed=1),
              "test": make_examples(12, seed=2)}
    for split, rows in splits.items():
        (workdir / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return splits


def profile_of(splits: dict[str, list]):
    """The data's size as tailor prepare's card counts it: each conversation in the chat template."""
    from tailor.advise.profile import DataProfile
    from tailor.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model("embedded:smollm2-135m-instruct").path)

    def lengths(rows):
        rendered = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows]
        return [len(ids) for ids in tokenizer(rendered, add_special_tokens=False)["input_ids"]]

    train, val = lengths(splits["train"]), lengths(splits["validation"])
    return DataProfile(examples=len(train), train_tokens=sum(train), mean_tokens=sum(train) / len(train),
                       p99_tokens=max(train), validation_examples=len(val), validation_tokens=sum(val),
                       test_examples=len(splits["test"]))


def predict(args, name: str, workdir: Path, profile, hw) -> dict:
    from tailor.advise.estimate import GB, Arch
    from tailor.advise.runtime import job_time
    from tailor.models.catalog import find_model
    from tailor.spec import Job

    job = Job.model_validate(job_dict(args, name, workdir))
    t = job_time(job, profile, Arch.of(find_model(CONFIGS[name]["model"])), hw)
    return {"train_s": t.training.seconds, "total_s": t.total_s, "memory_mb": t.training.memory.total / GB * 1024,
            "steps": t.training.steps, "first_time_s": t.first_time_s}


def run_child(args) -> None:
    """One configuration, in this process: print RESULT {json}."""
    from transformers.utils import logging as hf_logging

    from tailor.advise.calibrate import PeakRSS
    from tailor.runs import Run
    from tailor.spec import Job
    from tailor.techniques import task

    hf_logging.set_verbosity_error()
    workdir = Path(args.workdir)
    job = Job.model_validate(job_dict(args, args.child, workdir))
    with PeakRSS() as rss:
        start = time.time()
        run = Run(task.run(job, show_progress=False))
        wall = time.time() - start
    samples = [(t, gb * 1024) for t, gb in rss.samples]  # MB
    rows = [r for r in run.metrics() if r["type"] == "train"]
    steps_s = sum(r["tokens"] / r["tokens_per_s"] for r in rows)
    # Training ends where the result is saved (adapter/ or model/); evaluation follows.
    train_end = min(f.stat().st_mtime for f in run.result.iterdir())
    train_peak = max(rss for t, rss in samples if t <= train_end)
    after = [rss for t, rss in samples if t > train_end] or [0.0]
    print("RESULT " + json.dumps({"train_s": steps_s, "total_s": wall, "steps": len(rows),
                                  "memory_mb": train_peak, "eval_memory_mb": max(after),
                                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)


def measure(args, name: str, workdir: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--workdir", str(workdir), "--examples", str(args.examples),
           "--epochs", str(args.epochs), "--max-len", str(args.max_len), "--batch", str(args.batch)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def ratio_line(label: str, predicted: float, measured: float, unit: str, target: float) -> str:
    r = predicted / measured
    ok = "ok" if abs(r - 1) <= target else "OUT OF TARGET"
    return f"  {label:<22} predicted {predicted:9.1f} {unit:<3} measured {measured:9.1f} {unit:<3} ratio {r:5.2f}  {ok}"


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child:
        return run_child(args)
    import torch

    from tailor.advise.calibrate import calibrate, load_calibration, local_hardware

    names = [n for n in args.configs.split(",") if n]
    if unknown := set(names) - set(CONFIGS):
        sys.exit(f"--configs: unknown {sorted(unknown)}; choose from {', '.join(CONFIGS)}")
    if load_calibration(torch.get_num_threads()) is None:
        calibrate(say=lambda s: print("# " + s))
    hw = local_hardware()
    print(f"# {hw.label}: peak {hw.peak_tflops:.3f} TFLOP/s, utilisation {hw.utilisation}, calibrated {hw.calibrated}")
    print(f"# {args.examples} training examples, {args.epochs} epoch(s), rows of {args.max_len} tokens, "
          f"batch {args.batch}; threads {os.environ.get('OMP_NUM_THREADS') or torch.get_num_threads()}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        profile = profile_of(write_data(args, workdir))
        for name in names:
            predicted = predict(args, name, workdir, profile, hw)
            measured = measure(args, name, workdir)
            results[name] = {"predicted": predicted, "measured": measured}
            print(f"\n{name}: {measured['steps']} steps (predicted {predicted['steps']})", flush=True)
            print(ratio_line("training steps", predicted["train_s"], measured["train_s"], "s", 0.30))
            print(ratio_line("whole run", predicted["total_s"], measured["total_s"], "s", 0.30))
            print(ratio_line("peak memory, training", predicted["memory_mb"], measured["memory_mb"], "MB", 0.25))
            if measured["eval_memory_mb"]:
                print(f"  after training (saving, evaluation): {measured['eval_memory_mb']:.0f} MB; "
                      f"process peak {measured['peak_mb']:.0f} MB")
    print(" ".join(f"{n}:time={r['predicted']['train_s'] / r['measured']['train_s']:.2f},"
                   f"run={r['predicted']['total_s'] / r['measured']['total_s']:.2f},"
                   f"memory={r['predicted']['memory_mb'] / r['measured']['memory_mb']:.2f}"
                   for n, r in results.items()))
    return results


if __name__ == "__main__":
    main()
