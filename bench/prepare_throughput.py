#!/usr/bin/env python
"""Data preparation throughput: records/s of `tailor prepare` on generated support chats.

The records are seeded, support-desk-like conversations with realistic mess: about 15 % exact
duplicates (some differing only in case and spacing), 10 % near duplicates (a word changed or
added), a few broken records. Timed: the whole `prepare` call with anonymization off and no
perplexity sample (read → Arrow, clean and measure in worker processes, exact and near-duplicate
removal, split, write, card), once with one worker process and once with the default (up to 2),
in the same run. Printed: the rate of cleaning + exact + near-duplicate removal (the stages the
target names, from the card's per-stage wall times) and of the whole call. Anonymization has its
own benchmark: bench/anonymize_throughput.py.

    python bench/prepare_throughput.py                  # 100,000 records
    python bench/prepare_throughput.py --records 20000
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

PRODUCTS = ["Ember", "Beacon", "Halo", "Lantern", "Glimmer", "Spark", "Flare", "Aurora"]
PROBLEMS = ["won't turn on", "flickers at night", "keeps disconnecting from wifi", "is too dim",
            "makes a buzzing sound", "shows a red light", "doesn't pair with the app", "turns off by itself",
            "changes colour randomly"]
STEPS = ["unplug it for ten seconds", "hold the halo button for three seconds", "update the Halo app",
         "move the lamp closer to the router", "check that the bulb is screwed in firmly",
         "reset it from the settings menu", "try another socket", "switch the app to the 2.4 GHz network",
         "turn off power saving mode"]
CLOSINGS = ["If that doesn't help, the Lantern Desk will book a free swap.", "Let us know how it goes!",
            "Your warranty covers this for two years.", "We can send a replacement part within three days."]


def support_chat(rng: random.Random) -> dict:
    product, problem = rng.choice(PRODUCTS), rng.choice(PROBLEMS)
    steps = rng.sample(STEPS, rng.randint(1, 4))
    order = rng.randint(10000, 99999)
    user = (f"Hi, my {product} {problem} since "
            f"{rng.choice(['yesterday', 'last week', 'this morning', 'the update'])}. Order {order}.")
    answer = (f"Sorry to hear your {product} {problem}! First, " + ", then ".join(steps) + ". "
              + rng.choice(CLOSINGS) + f" Reference {rng.randint(1000, 9999)}.")
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def make_records(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines: list[str] = []
    originals: list[dict] = []
    while len(lines) < n:
        roll = rng.random()
        if originals and roll < 0.10:  # exact duplicate
            lines.append(json.dumps(rng.choice(originals)))
        elif originals and roll < 0.15:  # the same, louder and with stray spaces
            rec = json.loads(json.dumps(rng.choice(originals)))
            rec["messages"][0]["content"] = "  " + rec["messages"][0]["content"].upper()
            lines.append(json.dumps(rec))
        elif originals and roll < 0.25:  # near duplicate: one word added at the end
            rec = json.loads(json.dumps(rng.choice(originals)))
            rec["messages"][1]["content"] += " Thanks!"
            lines.append(json.dumps(rec))
        elif roll < 0.252:
            lines.append('{"messages": [{"role": "user", "content": "broken')
        else:
            originals.append(support_chat(rng))
            lines.append(json.dumps(originals[-1]))
    return lines[:n]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=100_000)
    p.add_argument("--model", default="embedded:smollm2-135m-instruct", help="whose tokenizer measures lengths")
    args = p.parse_args(argv)

    from tailor.data.prepare import prepare

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "support.jsonl"
        path.write_text("\n".join(make_records(args.records)) + "\n", encoding="utf-8")
        print(f"# {args.records:,} generated support chats; anonymization off (see bench/anonymize_throughput.py)",
              flush=True)
        warm = Path(tmp) / "warm.jsonl"  # imports and the tokenizer load once, outside the timings
        warm.write_text("\n".join(make_records(50, seed=1)) + "\n", encoding="utf-8")
        prepare([warm], Path(tmp) / "warm", model=args.model, num_proc=1, say=lambda m: None,
                privacy={"enabled": False}, card={"perplexity_sample": 0, "html": False})
        rates, core = {}, {}
        for label, num_proc in (("1 process", 1), ("2 processes", 2)):
            started = time.perf_counter()
            result = prepare([path], Path(tmp) / f"out{num_proc}", model=args.model, num_proc=num_proc,
                             say=lambda m: None, privacy={"enabled": False},
                             card={"perplexity_sample": 0, "html": False})
            seconds = time.perf_counter() - started
            rates[num_proc] = args.records / seconds
            c, d, st = result.card["counts"], result.card["duplicates"], result.card["seconds"]
            core[num_proc] = args.records / (st["clean"] + st["deduplicate"])
            print(f"  {label:12s} clean + exact + near duplicates {core[num_proc]:8,.0f} records/s; whole prepare "
                  f"{rates[num_proc]:7,.0f} records/s ({seconds:.1f} s: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in st.items()) + ")", flush=True)
            print(f"  {'':12s} kept {c['kept']:,}, removed {d['exact']:,} exact + {d['near']:,} near duplicates, "
                  f"rejected {c['rejected']:,}; counts add up: {c['adds_up']}", flush=True)
    print(f"clean_dedup_records_per_s={core[2]:.0f} prepare_records_per_s={rates[2]:.0f} "
          f"clean_dedup_one_process={core[1]:.0f} processes/one={core[2] / core[1]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
