#!/usr/bin/env python
"""Names: precision and recall of PERSON spans on a labelled set, with and without the check of
names in short texts (tailor/data/privacy/names.py), split into short texts (five words or fewer)
and sentences.

The set, tests/data/names_labelled.jsonl, holds sentences and short answers with invented private
people's names (lower case too), public figures (labelled as names: a detector cannot know who is
public) and words NER takes for names (colours, titles, brands, one-word answers); a short answer
may carry the question it answers ("context"), read as the turn before it. A found span counts
as right where it overlaps a labelled name; a labelled name counts as found where a found span
overlaps it. "before" is the finder's output as NER gives it (check_names=False), "after" the
Anonymizer's. The intervals are a seeded bootstrap over the texts (95 %).

    python bench/names_precision.py
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tailor.data.privacy.names import SHORT_TEXT_WORDS as SHORT_WORDS  # noqa: E402

LABELLED = Path(__file__).resolve().parents[1] / "tests" / "data" / "names_labelled.jsonl"


def load(path: Path = LABELLED) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def gold_spans(item: dict) -> list[tuple[int, int]]:
    text = item["text"]
    return sorted({m.span() for name in item["names"]
                   for m in re.finditer(rf"(?<!\w){re.escape(name)}(?!\w)", text)})


def found_spans(anonymizer, items: list[dict], check_names: bool) -> list[list[tuple[int, int]]]:
    records = [[item["context"], item["text"]] if "context" in item else [item["text"]] for item in items]
    found = anonymizer.find_records(records, check_names=check_names)
    return [[(s.start, s.end) for s in spans[-1] if s.entity == "PERSON"] for spans in found]


def tally(gold: list[tuple[int, int]], found: list[tuple[int, int]]) -> tuple[int, int, int, int]:
    """(found spans that overlap a name, found spans, names overlapped by a found span, names)."""
    def hits(a, b):
        return sum(any(s < f and t < e for t, f in b) for s, e in a)

    return hits(found, gold), len(found), hits(gold, found), len(gold)


def scores(rows: list[tuple[int, int, int, int]]) -> tuple[float, float]:
    right, found, caught, names = (sum(col) for col in zip(*rows)) if rows else (0, 0, 0, 0)
    return (right / found if found else 1.0), (caught / names if names else 1.0)


def measure(anonymizer, items: list[dict], check_names: bool) -> dict[tuple[str, str], list]:
    """One tally per text, under (group, kind) for every group it is in (short or sentences, and
    all) and every kind (all, and its own: private, public, not a name)."""
    out: dict[tuple[str, str], list] = {}
    for item, found in zip(items, found_spans(anonymizer, items, check_names)):
        row = tally(gold_spans(item), found)
        for group in ("short" if len(item["text"].split()) <= SHORT_WORDS else "sentences", "all"):
            for kind in ("all", item["kind"]):
                out.setdefault((group, kind), []).append(row)
    return out


def intervals(rows, rng: random.Random, rounds: int) -> list[tuple[float, float]]:
    """95 % bootstrap intervals of (precision, recall), resampling the texts."""
    if not rounds or not rows:
        return [(float("nan"), float("nan"))] * 2
    draws = [scores(rng.choices(rows, k=len(rows))) for _ in range(rounds)]
    out = []
    for k in (0, 1):
        values = sorted(d[k] for d in draws)
        out.append((values[int(0.025 * rounds)], values[int(0.975 * rounds) - 1]))
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=LABELLED)
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap rounds for the intervals (0: none)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from tailor.data.privacy import Anonymizer

    items = load(args.data)
    anonymizer = Anonymizer(entities=["PERSON"])
    results = {when: measure(anonymizer, items, check) for when, check in (("before", False), ("after", True))}
    short = sum(len(i["text"].split()) <= SHORT_WORDS for i in items)
    print(f"# {len(items)} labelled texts ({args.data.name}): {short} short (≤ {SHORT_WORDS} words), "
          f"{len(items) - short} sentences; {sum(len(gold_spans(i)) for i in items)} names; "
          f"bootstrap {args.bootstrap} rounds, seed {args.seed}")
    print(f"{'':10s} {'':28s} {'before':>6s} {'after':>6s}  95 % interval")
    summary = {}
    for group in ("short", "sentences", "all"):
        lines = [("precision", "all", 0), ("recall", "all", 1), ("recall, private names", "private", 1),
                 ("recall, public figures", "public", 1)]
        bounds = {kind: intervals(results["after"].get((group, kind), []), random.Random(args.seed), args.bootstrap)
                  for kind in ("all", "private", "public")}
        for label, kind, k in lines:
            before = scores(results["before"].get((group, kind), []))[k]
            after = scores(results["after"].get((group, kind), []))[k]
            lo, hi = bounds[kind][k]
            print(f"{group:10s} {label:28s} {before:6.3f} {after:6.3f}  [{lo:.2f}, {hi:.2f}]")
            if kind == "all":
                summary[f"{group}_{label}"], summary[f"{group}_{label}_before"] = after, before
    print(" ".join(f"{k}={v:.3f}" for k, v in summary.items() if not k.endswith("_before") and not k.startswith("all")))
    return summary


if __name__ == "__main__":
    main()
