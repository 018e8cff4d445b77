"""Replay: the model's own answers to general prompts, mixed into its training data.

Tuning a small model on a narrow task (one-word trivia answers, a shop's support voice) moves it
away from what it did well before: on a public trivia set, a 135M model answered 52 % of the
retention probe's general questions before and 16 % after. Training also on its *own* earlier
answers to general prompts (self-distillation) anchors the behaviour the task does not ask to
change, at the cost of a few more examples per epoch; it needs no outside data and no second
model in memory while training (a KL term towards the base would need both).

The answers are generated once per base model, prompt set and decoding settings, greedily, and
kept in Tailor's cache: a second run of the same base reads them. Only as many prompts as a run
uses are answered; a later run that needs more answers the rest.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
from collections import Counter
from importlib import resources
from pathlib import Path

from tailor.data.example import DataError, Example

VERSION = 1  # bump when the generation changes: cached answers are then made again
SOURCE = "replay"  # the meta["source"] of a replayed record
TASK = "general"  # a replayed record's task in multitask training
ON_BY_DEFAULT = ("task", "transfer")  # the techniques that replay unless training.replay.enabled says otherwise


def is_on(enabled: bool | None, technique: str) -> bool:
    """Whether training.replay applies: as `enabled` says, else by the technique."""
    return enabled if enabled is not None else technique in ON_BY_DEFAULT


def builtin_prompts() -> list[str]:
    return _lines(resources.files("tailor.train").joinpath("replay/general_prompts.txt").read_text(encoding="utf-8"))


def read_prompts(files: list[str]) -> list[str]:
    """Prompts from the user's files (one per line, '#' comments), or Tailor's own set."""
    if not files:
        return builtin_prompts()
    out = []
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise DataError([f"training.replay.prompts: {f}: no such file; give a text file with one general "
                             "prompt per line, or leave replay.prompts empty for Tailor's own set"])
        out += _lines(path.read_text(encoding="utf-8"))
    if not out:
        raise DataError([f"training.replay.prompts: {', '.join(files)} hold no prompts (one per line; '#' starts a "
                         "comment)"])
    return list(dict.fromkeys(out))


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def how_many(n_task: int, share: float, available: int) -> int:
    """Replayed records so that they are `share` of the mixed training data, at most `available`."""
    if share <= 0 or n_task <= 0:
        return 0
    return min(available, max(1, round(n_task * share / (1 - share))))


def chosen(prompts: list[str], n: int, seed: int, like: list[str] = ()) -> list[str]:
    """n prompts: those whose words are most like the task's prompts (`like`) first, the rest in a
    seeded order (the same seed and data replay the same prompts).

    Tuning overwrites the model's behaviour where the task's prompts lead it: on trivia questions,
    a short answer replaces the sentence it used to reason in, and general questions asked the same
    way get the same terse, often wrong, answer. The general prompts nearest to the task are where
    the old behaviour most needs reminding (while designing it on the trivia set: 2 points lost on
    the general questions with the nearest prompts, 4 with the same prompts drawn at random;
    docs/evaluation.md)."""
    order = list(prompts)
    random.Random(seed).shuffle(order)
    if like:
        task = _bag(" ".join(like))
        order.sort(key=lambda p: -_cosine(_bag(p), task))  # stable: the seeded order breaks ties
    return order[:n]


def _bag(text: str) -> Counter:
    return Counter(re.findall(r"[^\W\d_]+", text.lower()))


def _cosine(a: Counter, b: Counter) -> float:
    dot = sum(v * b[k] for k, v in a.items())
    norm = math.sqrt(sum(v * v for v in a.values()) * sum(v * v for v in b.values()))
    return dot / norm if norm else 0.0


def answers(prompts: list[str], model_path: str, generate, max_new_tokens: int, dtype: str) -> dict[str, str]:
    """{prompt: the base model's greedy answer}, from the cache where it has them; `generate`
    (a list of prompts -> their answers) makes the rest, and they are added to the cache."""
    path = _cache_file(model_path, max_new_tokens, dtype)
    known = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    missing = [p for p in prompts if p not in known]
    if missing:
        known.update(zip(missing, generate(missing)))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(known, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)
    return {p: known[p] for p in prompts}


def records(answered: dict[str, str], task: str | None = None) -> list[Example]:
    """Chat records of the answers worth learning from (an empty answer teaches silence)."""
    return [Example(messages=[{"role": "user", "content": p}, {"role": "assistant", "content": a}],
                    task=task, meta={"source": SOURCE, "line": i + 1})
            for i, (p, a) in enumerate(answered.items()) if a.strip()]


def _cache_file(model_path: str, max_new_tokens: int, dtype: str) -> Path:
    from tailor.models.embedded import cache_root

    folder = Path(model_path)
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file())
    key = hashlib.sha256(json.dumps({"model": files, "new_tokens": max_new_tokens, "dtype": dtype,
                                     "version": VERSION}).encode()).hexdigest()[:32]
    return cache_root().parent / "replay" / f"{key}.json"
