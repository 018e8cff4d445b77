#!/usr/bin/env python
"""Served tokens/s: `tailor serve` with 1 client and with 8 concurrent clients, against the peer
everyone starts with — transformers' generate answering one request at a time.

The server runs in this process on 127.0.0.1 (uvicorn in a thread), and clients send real HTTP
requests (httpx, one thread each): greedy chat completions of the same prompts, up to
--max-tokens each. Tokens are the completion tokens the server reports in `usage`; the peer's are
counted the same way (up to its end-of-turn token). Prints tokens/s and the ratios.

    python bench/serve_throughput.py                      # embedded model, 16 requests, 64 tokens
    python bench/serve_throughput.py --run runs/quickstart/RUN-ID
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chat_data import make_examples  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded:smollm2-135m-instruct", help="base model to serve (without --run)")
    p.add_argument("--run", default=None, help="a finished run folder to serve instead")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--clients", type=int, default=8, help="concurrent clients of the loaded measurement")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--dtype", default="auto")
    return p.parse_args(argv)


def peer_tokens_per_second(model, tokenizer, conversations, max_tokens: int) -> float:
    """transformers' generate, one request after the other, greedy: how a plain script serves."""
    import torch

    from tailor.models.decode import stop_token_ids

    ends = stop_token_ids(model, tokenizer)
    tokens, start = 0, time.perf_counter()
    with torch.no_grad():
        for messages in conversations:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)
            out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=sorted(ends),
                                 pad_token_id=tokenizer.pad_token_id)[0, ids["input_ids"].shape[1]:].tolist()
            tokens += next((i for i, t in enumerate(out) if t in ends), len(out))
    return tokens / (time.perf_counter() - start)


def served_tokens_per_second(url: str, model: str, conversations, clients: int, max_tokens: int) -> float:
    import httpx

    def ask(messages) -> int:
        reply = httpx.post(f"{url}/v1/chat/completions", timeout=600, json={
            "model": model, "messages": messages, "temperature": 0, "max_tokens": max_tokens})
        reply.raise_for_status()
        return reply.json()["usage"]["completion_tokens"]

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(ask, conversations))
    return tokens / (time.perf_counter() - start)


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch
    from transformers.utils import logging as hf_logging

    from tailor.models.generate import load_base, load_run
    from tailor.serve.server import InThread, ServeSettings, build

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    conversations = [e["messages"][:1] for e in make_examples(args.requests, seed=5)]
    settings = ServeSettings(runs=[f"bench={args.run}"] if args.run else [], base=None if args.run else args.model,
                             dtype=args.dtype, max_batch=args.clients, db="sqlite:///:memory:")
    name = "bench" if args.run else args.model
    print(f"# {args.requests} chat requests, greedy, up to {args.max_tokens} tokens each; {args.threads} threads; "
          f"model {args.run or args.model}")

    app, _, batcher = build(settings, say=lambda m: None)

    def peer_run() -> float:
        model, tokenizer = load_run(args.run, args.dtype) if args.run else load_base(args.model, args.dtype)
        peer_tokens_per_second(model, tokenizer, conversations[:1], 4)  # warm-up
        return peer_tokens_per_second(model, tokenizer, conversations, args.max_tokens)

    # On the thread that decodes for the server: each thread running torch gets its own OpenMP
    # team, and a second one would slow whichever runs second (tailor/serve/batcher.py).
    peer = batcher.call(peer_run)
    with InThread(app, batcher) as live:
        served_tokens_per_second(live.url, name, conversations[:1], 1, 4)  # warm-up
        one = served_tokens_per_second(live.url, name, conversations, 1, args.max_tokens)
        many = served_tokens_per_second(live.url, name, conversations, args.clients, args.max_tokens)

    print("| | tokens/s | × peer |")
    print("|---|---:|---:|")
    print(f"| peer: transformers generate, one request at a time | {peer:.1f} | 1.00 |")
    print(f"| tailor serve, 1 client | {one:.1f} | {one / peer:.2f} |")
    print(f"| tailor serve, {args.clients} concurrent clients | {many:.1f} | {many / peer:.2f} |")
    print(f"{args.clients} clients / 1 client: {many / one:.2f}×")


if __name__ == "__main__":
    main()
