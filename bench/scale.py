#!/usr/bin/env python
"""What the ways to scale cost on this machine: QLoRA against LoRA, gradient checkpointing on and
off, FSDP2 against DDP on 2 processes. Same data, same steps, same global batch.

Each variant is `tailor train` in its own process (or two, under torchrun), so peak memory is its
own; every number is read back from the run folder's summary.json, as a user would read it:

    lora         LoRA r16 on the bf16 base (the reference)
    qlora        the same adapter on the base in 4-bit NF4 (bitsandbytes)
    lora-gc      LoRA with training.gradient_checkpointing
    qlora-gc     QLoRA with gradient checkpointing (what the advisor writes for a small GPU)
    ddp-lora     LoRA on 2 processes, each holding the whole model (batch 1 each)
    fsdp-lora    LoRA on 2 processes under FSDP2 (each holds half of every weight)
    ddp-full     full fine-tuning on 2 processes (weights, gradients, Adam states: all whole)
    fsdp-full    full fine-tuning on 2 processes under FSDP2
    zero3-full   full fine-tuning on 2 processes under DeepSpeed ZeRO-3

Data: --data shop (the quickstart's support logs, prepared once by `tailor prepare`) or corpus
(every English file of the public ChatterBot corpus: small talk, trivia, science, history…, data
no one here tuned on). The last line is machine-readable: ratios against the reference of each
pair, measured in this run.

    python bench/scale.py --data corpus
    python bench/scale.py --data shop --variants lora,qlora --steps 40
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chat_data import chatterbot_conversations  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "lora": ([], 1), "qlora": (["adapter.kind=qlora"], 1),
    "lora-gc": (["training.gradient_checkpointing=true"], 1),
    "qlora-gc": (["adapter.kind=qlora", "training.gradient_checkpointing=true"], 1),
    "ddp-lora": ([], 2), "fsdp-lora": (["distributed.strategy=fsdp"], 2),
    "ddp-full": (["adapter.kind=full", "training.learning_rate=5e-5"], 2),
    "fsdp-full": (["adapter.kind=full", "training.learning_rate=5e-5", "distributed.strategy=fsdp"], 2),
    "zero3-full": (["adapter.kind=full", "training.learning_rate=5e-5", "distributed.strategy=deepspeed"], 2),
}
PAIRS = [("qlora", "lora"), ("lora-gc", "lora"), ("qlora-gc", "lora"), ("fsdp-lora", "ddp-lora"),
         ("fsdp-full", "ddp-full"), ("zero3-full", "ddp-full")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=["shop", "corpus"], default="corpus")
    p.add_argument("--model", default="embedded:smollm2-135m-instruct")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--steps", type=int, default=30, help="optimizer steps of 2 rows each")
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    return p.parse_args(argv)


def corpus_file(folder: Path) -> Path:
    """Every conversation of the ChatterBot corpus's English files, as chat JSONL (first turn the
    question, the rest the answers in order)."""
    rows = [{"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": t}
                          for i, t in enumerate(turns[:len(turns) // 2 * 2])]}
            for turns in chatterbot_conversations()]
    path = folder / "corpus.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def shop_folder(folder: Path, model: str) -> Path:
    """The quickstart's raw support logs, prepared once (cleaned, de-duplicated, anonymized, split)."""
    out = folder / "shop-prepared"
    if not (out / "card.json").exists():
        quickstart = ROOT / "tailor" / "quickstart"
        subprocess.run([sys.executable, "-m", "tailor", "prepare", str(quickstart / "data" / "lumen_support.jsonl"),
                        "--config", str(quickstart / "job.yaml"), "--out", str(out), "--model", model],
                       check=True, capture_output=True, text=True)
    return out


def write_job(folder: Path, data: str, model: str, steps: int, max_len: int) -> Path:
    job = {
        "name": "scale", "model": {"base": model},
        "data": {"train": [data], "validation_fraction": 0.1},
        "adapter": {"kind": "lora", "rank": 16, "alpha": 32, "dropout": 0.0},
        "training": {"learning_rate": 5e-4, "max_steps": steps, "batch_size": 2, "max_seq_len": max_len,
                     "warmup_ratio": 0.1, "log_every": 5, "save_every": 0, "replay": {"enabled": False}},
        "eval": {"enabled": False},
        "output": {"dir": str(folder / "runs")},
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job), encoding="utf-8")
    return path


def run_variant(name: str, job: Path, folder: Path) -> dict:
    overrides, processes = VARIANTS[name]
    out = folder / "runs" / name
    sets = [*overrides, f"output.dir={out}"]
    if processes == 1:
        command = [sys.executable, "-m", "tailor", "train", str(job)]
        env = dict(os.environ)
    else:  # the same global batch: 1 row per process and step
        command = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node",
                   str(processes), "-m", "tailor", "train", str(job)]
        sets.append("training.batch_size=1")
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // processes))}
    for s in sets:
        command += ["--set", s]
    started = time.perf_counter()
    result = subprocess.run(command + ["--no-progress"], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
    run_dir = next(p for p in (out / "scale").iterdir() if p.is_dir())
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    return {"variant": name, "processes": processes, "seconds": time.perf_counter() - started,
            "peak_mb": summary["peak_memory_mb"], "weights_mb": summary["weights_mb"],
            "tokens_per_s": summary["tokens_per_s_median"],
            "val_loss": summary["final_val_loss"], "train_loss": summary["final_train_loss"]}


def cpu_name() -> str:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    for line in lscpu.splitlines():
        if line.startswith("Model name:"):
            extra = [f for f in ("amx_bf16", "avx512_bf16") if f in lscpu]
            return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores; {', '.join(extra) or 'no bf16 units'})"
    return "unknown CPU"


def main(argv=None) -> list[dict]:
    import tempfile

    args = parse_args(argv)
    folder = Path(args.out or tempfile.mkdtemp(prefix="tailor-scale-"))
    folder.mkdir(parents=True, exist_ok=True)
    data = str(shop_folder(folder, args.model) if args.data == "shop" else corpus_file(folder))
    job = write_job(folder, data, args.model, args.steps, args.max_len)
    print(f"{args.data} data, {args.steps} steps of 2 rows x {args.max_len} tokens, {args.model}; {cpu_name()}")
    rows = []
    for name in args.variants.split(","):
        rows.append(run_variant(name, job, folder))
        r = rows[-1]
        print(f"{name:10s} {r['processes']} proc  weights {r['weights_mb']:6.0f} MB  peak {r['peak_mb']:6,d} MB/proc  "
              f"{r['tokens_per_s']:7.1f} tok/s  "
              f"train {r['train_loss']:.4f}  val {r['val_loss']:.4f}  ({r['seconds']:.0f} s)", flush=True)
    by = {r["variant"]: r for r in rows}
    ratios = []
    for a, b in PAIRS:
        if a in by and b in by:
            ratios.append(f"{a}/{b}:weights={by[a]['weights_mb'] / by[b]['weights_mb']:.2f},"
                          f"memory={by[a]['peak_mb'] / by[b]['peak_mb']:.2f},"
                          f"speed={by[a]['tokens_per_s'] / by[b]['tokens_per_s']:.2f},"
                          f"val_loss={100 * (by[a]['val_loss'] / by[b]['val_loss'] - 1):+.1f}%")
    print(" ".join(ratios) or "no pairs measured")
    return rows


if __name__ == "__main__":
    main()
