#!/usr/bin/env python
"""Load test of `tailor serve`: many concurrent official `openai` clients, some of them rude.

Starts `tailor serve` in its own process on 127.0.0.1 (a free port, a fresh feedback store) and
sends it --requests requests from --clients threads, each with its own `openai.OpenAI` client, until
all are sent or --duration seconds have passed. Of the requests, drawn with a fixed seed:
  - a tenth are bad (a seed over 2**63, no messages, an unknown parameter, temperature 7, a
    max_tokens over the limit, an unknown model): each must get an OpenAI-shaped 4xx;
  - a tenth hang up early (a stream closed after its first chunk, or a plain request whose client
    times out): the server must drop them;
  - the rest ask for an answer, half of them streamed, and rate every answer they get
    (POST /v1/feedback; a third of the ratings carry a correction).
Prints requests/s, latency percentiles of the answered requests, outcomes and errors by kind,
feedback rows sent and stored (counted in the store afterwards), and the server's resident memory
after a warm-up and after the load. Exits 1 when any request got a 5xx or an error it should not,
a feedback row is missing, the server logged a traceback, or memory grew by more than
--max-growth-mb.

    python bench/serve_load.py                          # embedded model, 64 clients, 640 requests
    python bench/serve_load.py --data corpus            # prompts from the public ChatterBot corpus
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chat_data import corpus_examples, make_examples  # noqa: E402

BAD_BODIES = {  # name → what is added to a good request; every one must be refused with a 4xx
    "seed over 2**63": {"seed": 2**70},
    "no messages": {"messages": []},
    "unknown parameter": {"logit_bias": {"1": 5}},
    "temperature 7": {"temperature": 7},
    "max_tokens over the limit": {"max_tokens": 10**6},
    "unknown model": {"model": "no-such-model"},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded:smollm2-135m-instruct", help="the base model to serve")
    p.add_argument("--data", choices=["support", "corpus"], default="support",
                   help="prompts: generated support questions, or first turns of the ChatterBot corpus")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--requests", type=int, default=640, help="at most this many requests in all")
    p.add_argument("--duration", type=float, default=600, help="no new request after this many seconds")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens each answer may have")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--hang-up-after", type=float, default=0.5,
                   help="seconds a plain request that hangs up waits for its answer")
    p.add_argument("--max-growth-mb", type=float, default=250,
                   help="the most the server's resident memory may grow between warm-up and the end")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# --- the server --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, db: str, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "tailor", "serve", "--base", args.model, "--port", str(port), "--db", db,
               "--max-tokens", str(max(args.max_tokens, 64)), "--max-batch", str(args.max_batch)]
    log = log_path.open("w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.time() + 300
    while time.time() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server stopped (exit {server.returncode}):\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.kill()
    raise SystemExit("the server did not answer /health within 300 s")


def resident_mb(pid: int) -> float | None:
    """The process's resident memory (Linux /proc), or None where there is no /proc."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# --- the clients -------------------------------------------------------------------------------------


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    outcomes: Counter = field(default_factory=Counter)  # what happened, by kind
    wrong: list = field(default_factory=list)  # what should not have happened, with details
    latencies: list = field(default_factory=list)  # answered requests, seconds
    first_token: list = field(default_factory=list)  # streamed answers: seconds to the first text
    feedback_sent: int = 0

    def add(self, outcome: str, problem: str | None = None) -> None:
        with self.lock:
            self.outcomes[outcome] += 1
            if problem:
                self.wrong.append(problem)


def plan(args, prompts: list[str]) -> list[tuple[str, str, object]]:
    """(behaviour, prompt, detail) per request, drawn with the seed."""
    rng = random.Random(args.seed)
    out = []
    for i in range(args.requests):
        draw = rng.random()
        prompt = prompts[i % len(prompts)]
        if draw < 0.1:
            out.append(("bad", prompt, rng.choice(sorted(BAD_BODIES))))
        elif draw < 0.2:
            out.append(("hang-up", prompt, rng.choice(["stream", "plain"])))
        else:
            out.append(("ask", prompt, rng.random() < 0.5))  # detail: streamed or not
    return out


def one_request(client, http, url: str, args, tally: Tally, behaviour: str, prompt: str, detail, rng) -> None:
    import openai

    body = {"model": "base", "messages": [{"role": "user", "content": prompt}], "max_tokens": args.max_tokens,
            "temperature": 0.7, "seed": rng.randrange(2**63)}
    if behaviour == "bad":
        body.update(BAD_BODIES[detail])
        try:
            client.chat.completions.create(**body)
            tally.add("bad: answered", f"{detail}: answered with 200")
        except openai.APIStatusError as exc:
            shaped = isinstance(exc.body, dict) and {"message", "type", "param", "code"} <= set(exc.body)
            ok = 400 <= exc.status_code < 500 and shaped
            tally.add(f"bad: {exc.status_code}", None if ok else f"{detail}: {exc.status_code} {exc.body!r}")
        return
    if behaviour == "hang-up":
        try:
            if detail == "stream":
                stream = client.chat.completions.create(**body, stream=True)
                next(iter(stream))
                stream.close()  # the connection closes with the answer unfinished
            else:
                client.with_options(timeout=args.hang_up_after).chat.completions.create(**body)
            tally.add("hung up")
        except openai.APITimeoutError:
            tally.add("hung up")
        except openai.APIStatusError as exc:
            tally.add(f"hang-up: {exc.status_code}", f"hang-up {detail}: {exc.status_code}"
                      if exc.status_code >= 500 and exc.status_code not in (503,) else None)
        return
    started = time.perf_counter()
    try:
        if detail:  # streamed
            text, completion_id, first = [], None, None
            for chunk in client.chat.completions.create(**body, stream=True):
                completion_id = chunk.id
                if chunk.choices and chunk.choices[0].delta.content:
                    first = first or time.perf_counter() - started
                    text.append(chunk.choices[0].delta.content)
            answer = "".join(text)
        else:
            reply = client.chat.completions.create(**body)
            completion_id, answer, first = reply.id, reply.choices[0].message.content, None
    except openai.APIStatusError as exc:
        # 503 (queue full) and 504 (deadline) are the server protecting itself: counted, not wrong
        tally.add(f"ask: {exc.status_code}", None if exc.status_code in (503, 504) else
                  f"ask: {exc.status_code} {exc.body!r}")
        return
    except openai.APIError as exc:
        tally.add(f"ask: {type(exc).__name__}", f"ask: {type(exc).__name__}: {exc}")
        return
    elapsed = time.perf_counter() - started
    with tally.lock:
        tally.latencies.append(elapsed)
        if first is not None:
            tally.first_token.append(first)
    tally.add("answered (stream)" if detail else "answered")
    rating = {"completion_id": completion_id, "rating": rng.choice(["up", "down", 1, 5])}
    if rng.random() < 1 / 3:
        rating["correction"] = answer.upper() or "a better answer"
    reply = http.post(f"{url}/v1/feedback", json=rating, timeout=120)
    if reply.status_code == 200:
        with tally.lock:
            tally.feedback_sent += 1
    else:
        tally.add(f"feedback: {reply.status_code}", f"feedback: {reply.status_code} {reply.text[:200]}")


def run_clients(args, url: str, requests: list, tally: Tally) -> float:
    import httpx
    import openai

    queue = list(enumerate(requests))
    take = threading.Lock()
    deadline = time.time() + args.duration

    def client_loop(c: int) -> None:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
        rng = random.Random(args.seed * 1000 + c)
        with httpx.Client() as http:
            while time.time() < deadline:
                with take:
                    if not queue:
                        return
                    _, (behaviour, prompt, detail) = queue.pop(0)
                one_request(client, http, url, args, tally, behaviour, prompt, detail, rng)

    started = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        list(pool.map(client_loop, range(args.clients)))
    return time.perf_counter() - started


# --- the report --------------------------------------------------------------------------------------


def stored_feedback(db_path: Path) -> int:
    with sqlite3.connect(db_path) as connection:
        return connection.execute("SELECT COUNT(*) FROM feedback").fetchone()[0]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def prompts_for(args) -> list[str]:
    if args.data == "corpus":
        train, _ = corpus_examples(min(args.requests, 600), 0, seed=args.seed)
        return [e["messages"][0]["content"] for e in train]
    return [e["messages"][0]["content"] for e in make_examples(min(args.requests, 600), seed=args.seed)]


def main(argv=None) -> None:
    args = parse_args(argv)
    import httpx

    work = Path(tempfile.mkdtemp(prefix="tailor-serve-load-"))
    db_path, log_path = work / "feedback.db", work / "server.log"
    server, url = start_server(args, f"sqlite:///{db_path}", log_path)
    try:
        warm = Tally()  # one of each kind, so the memory "before" holds what any request loads
        for streamed in (False, True):
            one_request(_client(url), httpx.Client(), url, args, warm, "ask", "Hello!", streamed, random.Random(1))
        time.sleep(1)
        before = resident_mb(server.pid)
        tally = Tally()
        requests = plan(args, prompts_for(args))
        elapsed = run_clients(args, url, requests, tally)
        time.sleep(2)  # background store writes land
        after = resident_mb(server.pid)
        health = httpx.get(f"{url}/health", timeout=30).status_code
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    stored = stored_feedback(db_path) - warm.feedback_sent
    log_text = log_path.read_text(errors="replace")
    problems = list(tally.wrong) + list(warm.wrong)
    if health != 200:
        problems.append(f"/health answered {health} after the load")
    if "Traceback" in log_text:
        problems.append(f"the server logged a traceback (see {log_path})")
    if stored != tally.feedback_sent:
        problems.append(f"feedback: {tally.feedback_sent} sent, {stored} stored")
    growth = None if before is None or after is None else after - before
    if growth is not None and growth > args.max_growth_mb:
        problems.append(f"memory grew by {growth:.0f} MB (bound {args.max_growth_mb:.0f} MB)")

    sent = sum(tally.outcomes.values())
    answered = tally.outcomes["answered"] + tally.outcomes["answered (stream)"]
    print(f"model {args.model}, data {args.data}, {args.clients} clients, {sent} requests in {elapsed:.1f} s, "
          f"{args.max_tokens} tokens per answer at most, CPU {_cpu_name()}")
    print("outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(tally.outcomes.items())))
    print(f"latency of answered requests: p50 {percentile(tally.latencies, 50):.2f} s, "
          f"p95 {percentile(tally.latencies, 95):.2f} s, p99 {percentile(tally.latencies, 99):.2f} s; "
          f"first streamed text p50 {percentile(tally.first_token, 50):.2f} s")
    print(f"server memory: {_mb(before)} after warm-up, {_mb(after)} after the load "
          f"(bound: +{args.max_growth_mb:.0f} MB)")
    for problem in problems[:20]:
        print(f"PROBLEM: {problem}")
    print(f"requests/s={sent / elapsed:.2f} answered/s={answered / elapsed:.2f} "
          f"p50={percentile(tally.latencies, 50):.2f} p95={percentile(tally.latencies, 95):.2f} "
          f"p99={percentile(tally.latencies, 99):.2f} errors={len(problems)} "
          f"feedback_sent={tally.feedback_sent} feedback_stored={stored} "
          f"rss_before_mb={_mb(before, '')} rss_after_mb={_mb(after, '')}")
    if problems:
        sys.exit(1)


def _client(url: str):
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)


def _mb(value: float | None, unit: str = " MB") -> str:
    return "n/a" if value is None else f"{value:.0f}{unit}"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} × {os.cpu_count()}"
    except OSError:
        pass
    return f"{os.cpu_count()} cores"


if __name__ == "__main__":
    main()
