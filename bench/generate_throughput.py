#!/usr/bin/env python
"""Generation throughput: greedy answers to 8 prompts, one at a time vs batched, float32 vs bf16.

Counts generated tokens up to and including each answer's end-of-turn token, and prints tokens/s
for the four combinations with their ratios to one-at-a-time float32. The serving issue uses the
findings (batching and dtype of the default engine).

    python bench/generate_throughput.py                  # embedded model, 8 prompts, 64 new tokens
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chat_data import make_examples  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded:smollm2-135m-instruct")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="timed repeats per combination (median kept)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    return p.parse_args(argv)


def generated_tokens(rows, eos_id: int) -> int:
    total = 0
    for row in rows.tolist():
        total += row.index(eos_id) + 1 if eos_id in row else len(row)
    return total


def timed_generate(model, tokenizer, prompts: list[str], batched: bool, max_new_tokens: int) -> tuple[int, float]:
    import torch

    groups = [prompts] if batched else [[p] for p in prompts]
    tokens, start = 0, time.perf_counter()
    with torch.no_grad():
        for group in groups:
            batch = tokenizer(group, return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            tokens += generated_tokens(out[:, batch["input_ids"].shape[1]:], tokenizer.eos_token_id)
    return tokens, time.perf_counter() - start


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch
    from transformers.utils import logging as hf_logging

    from tailor.models import load_model, load_tokenizer, resolve_model

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    path = resolve_model(args.model).path
    tokenizer = load_tokenizer(path)
    tokenizer.padding_side = "left"
    conversations = [e["messages"][:1] for e in make_examples(args.prompts, seed=2)]
    prompts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    print(f"# {args.prompts} prompts, up to {args.max_new_tokens} new tokens, greedy, {args.threads} threads; "
          f"model {args.model}")

    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = load_model(path, dtype).eval()
        timed_generate(model, tokenizer, prompts[:1], False, 4)  # warm-up
        for batched in (False, True):
            runs = [timed_generate(model, tokenizer, prompts, batched, args.max_new_tokens)
                    for _ in range(args.repeats)]
            tps = statistics.median(t / s for t, s in runs)
            name = f"{'batched' if batched else 'one at a time'}, {str(dtype).removeprefix('torch.')}"
            results[name] = tps
        del model
    base = results["one at a time, float32"]
    print(f"\n{'mode':28s}{'tokens/s':>10s}{'× one-at-a-time fp32':>24s}")
    for name, tps in results.items():
        print(f"{name:28s}{tps:10.1f}{tps / base:24.2f}")
    print(" ".join(f"{k.replace(', ', '_').replace(' ', '-')}={v:.1f}" for k, v in results.items()))


if __name__ == "__main__":
    main()
