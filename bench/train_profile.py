#!/usr/bin/env python
"""Where a training step's time goes: one profile of Tailor's engine, per class of operation.

The same workload as bench/train_throughput.py's Tailor variant (the embedded model, LoRA r16 on
every linear projection, packed rows of 512 tokens, 2 rows a step, bf16 autocast), built from the
engine's own pieces: the model as a recipe prepares it (tailor.techniques.common.model_to_train's
steps), the objective, the optimizer. After warm-up steps, `torch.profiler` records a few steps and
this prints the self time of every operation summed per class:

  matmul       matrix products of the projections and the head (forward and backward)
  attention    everything attention computes (its matmuls included), forward, recompute, backward
  element-wise norms, activations, rotary, LoRA adds, reductions, the loss's softmax …
  casts        dtype conversions and copies
  optimizer    AdamW and gradient clipping
  framework    the rest of the step's wall time: Python, autograd's bookkeeping, allocation

    python bench/train_profile.py                     # 3 profiled steps after 3 warm-up steps
    python bench/train_profile.py --compile --top 25  # with training.compile; the 25 costliest ops
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chat_data import make_examples  # noqa: E402

from tailor.train.attention import PROFILE_RANGE as ATTENTION_RANGE  # noqa: E402

CLASSES = ("matmul", "attention", "element-wise", "casts", "optimizer", "framework")
MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation", "aten::matmul",
          "aten::linear", "mkldnn::_linear_pointwise"}
COMPILED = "## Call CompiledFxGraph"  # torch.compile's fused kernels (norms, SiLU·mul) run inside it
CASTS = {"aten::_to_copy", "aten::copy_", "aten::to", "aten::clone", "aten::contiguous"}
OPTIMIZER_RANGE = "tailor::optimizer"
# Attention's operators (with training.compile, tailor::packed_attention and its backward) and the
# backward nodes of the plain attention's operations (its range covers the forward only).
ATTENTION_OPS = "tailor::packed_attention"
ATTENTION_BACKWARD = ("BmmBackward", "SoftmaxBackward", "MaskedFillBackward", "CatBackward",
                      "ScaledDotProductFlashAttention", "ScaledDotProductEfficientAttention")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded:smollm2-135m-instruct")
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--rows", type=int, default=2, help="packed rows per step")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="profiled steps")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--compile", action="store_true", help="as training.compile: true")
    p.add_argument("--top", type=int, default=15, help="also list the costliest operations")
    return p.parse_args(argv)


def build(args):
    """model, objective, optimizer and the step batches, as the task recipe prepares them."""
    import torch

    from tailor.models import load_model, load_tokenizer, resolve_model
    from tailor.train.adapters import AdapterConfig, apply_adapter
    from tailor.train.attention import NAME, set_attention
    from tailor.train.compiled import compile_blocks
    from tailor.train.encode import encode_chat
    from tailor.train.loss import CausalLMLoss
    from tailor.train.packing import collate, epoch_order, make_rows

    path = resolve_model(args.model).path
    tokenizer = load_tokenizer(path)
    torch.manual_seed(0)
    model = load_model(path, torch.bfloat16)
    model.config.use_cache = False
    model = apply_adapter(model, AdapterConfig(kind="lora", rank=16, alpha=32, dropout=0.0))
    set_attention(model, NAME)
    if args.compile:
        compile_blocks(model)
    model.train()
    encoded = [encode_chat(tokenizer, e["messages"], args.max_len) for e in make_examples(160, seed=0)]
    rows = make_rows(encoded, args.max_len, packing=True)
    # The profiled steps are always the same rows, the first of the engine's shuffled epoch order (best-fit
    # decreasing leaves the longest examples in the first rows), and the warm-up steps repeat them: so two
    # profiles, before and after a change, measure the same work.
    order = epoch_order(len(rows), seed=0, epoch=0)
    batches = [collate([rows[r] for r in order[i * args.rows:(i + 1) * args.rows]], encoded, tokenizer.pad_token_id)
               for i in range(args.steps)]
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    return CausalLMLoss(model, compiled=args.compile), trainable, optimizer, batches


def step(objective, trainable, optimizer, batch) -> int:
    import torch

    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_sum, _, labels = objective(**batch)
    (loss_sum / labels).backward()
    with torch.profiler.record_function(OPTIMIZER_RANGE):
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return sum(e - s for row in batch["segments"] for s, e in row)  # real tokens: the examples, not the padding


def classify(events) -> dict[str, float]:
    """Self time (s) per class over the profiled events (the framework class is filled in by the caller)."""
    totals: dict[str, float] = defaultdict(float)
    for e in events:
        if e.device_type.name != "CPU" or not e.name.startswith(("aten::", "mkldnn::", COMPILED, ATTENTION_OPS)):
            continue
        cls = _class_of(e)
        totals[cls] += e.self_cpu_time_total / 1e6
    return totals


def _ancestors(e):
    p = e.cpu_parent
    while p is not None:
        yield p.name
        p = p.cpu_parent


def _class_of(e) -> str:
    names = list(_ancestors(e))
    if any(n == OPTIMIZER_RANGE for n in names) or any("Optimizer.step" in n for n in names):
        return "optimizer"
    if e.name.startswith(ATTENTION_OPS) or any(n == ATTENTION_RANGE or n.startswith(ATTENTION_OPS) for n in names):
        return "attention"
    node = next((n for n in names if n.startswith("autograd::engine::evaluate_function:")), "")
    if any(k in node for k in ATTENTION_BACKWARD):
        return "attention"
    if e.name.startswith(COMPILED):
        return "element-wise"
    if e.name in MATMUL:
        return "matmul"
    if e.name in CASTS:
        return "casts"
    return "element-wise"


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(args.threads)
    objective, trainable, optimizer, batches = build(args)
    for i in range(args.warmup):
        step(objective, trainable, optimizer, batches[i % len(batches)])
    tokens = 0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for b in batches:
            tokens += step(objective, trainable, optimizer, b)
        wall = time.perf_counter() - start
    events = [e for e in prof.events()]
    totals = classify(events)
    totals["framework"] = max(0.0, wall - sum(totals.values()))
    per_step = {k: totals.get(k, 0.0) / args.steps for k in CLASSES}
    print(f"# {args.steps} profiled steps of {args.rows} packed rows (max {args.max_len} tokens), "
          f"{tokens / args.steps:.0f} real tokens a step; {args.threads} threads; "
          f"training.compile {'on' if args.compile else 'off'}")
    print(f"{'class':14s}{'s / step':>10s}{'share':>8s}")
    for k in CLASSES:
        print(f"{k:14s}{per_step[k]:10.3f}{per_step[k] / (wall / args.steps):8.0%}")
    print(f"{'total':14s}{wall / args.steps:10.3f}{'':>8s}  ({tokens / wall:.0f} tokens/s under the profiler)")
    if args.top:
        print()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
