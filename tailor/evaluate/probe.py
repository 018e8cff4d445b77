"""The retention probe: does the tuned model still know what the base knew?

Shipped with Tailor and written for it: 120 short general questions in eight skills
(arithmetic, geography, science, language, everyday, history, units, reasoning) with their
accepted answers, and about 2,700 words of general prose. A model is scored on the share of
questions whose reply contains an accepted answer, and on its perplexity on the prose; the drop
from the base model to the tuned one is what fine-tuning cost in general skill.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from importlib import resources
from pathlib import Path

from tailor.evaluate.metrics import contains_answer
from tailor.models.generate import answer
from tailor.train.loss import text_loss

QUESTION_TOKENS = 24  # an accepted answer is one to three words; the reply may say a sentence first


def questions() -> list[dict]:
    text = resources.files("tailor.evaluate").joinpath("probe/general_qa.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def general_text() -> str:
    return resources.files("tailor.evaluate").joinpath("probe/general_text.txt").read_text(encoding="utf-8")


def retention(model, tokenizer, n_questions: int | None = None, batch_size: int = 16, max_len: int = 512,
              bf16: bool = True) -> dict:
    """{"qa_accuracy", "by_skill", "text_perplexity", "answers"} of one model on the probe."""
    qs = questions()[:n_questions] if n_questions else questions()
    replies = answer(model, tokenizer, [[{"role": "user", "content": q["question"]}] for q in qs],
                     max_new_tokens=QUESTION_TOKENS, batch_size=batch_size)
    right = [contains_answer(r, q["answers"]) for q, r in zip(qs, replies)]
    by_skill: dict[str, list[bool]] = {}
    for q, ok in zip(qs, right):
        by_skill.setdefault(q["skill"], []).append(ok)
    prose = text_loss(model, tokenizer, general_text(), max_len, bf16=bf16)
    return {"qa_accuracy": sum(right) / len(right) if right else 0.0,
            "by_skill": {k: sum(v) / len(v) for k, v in sorted(by_skill.items())},
            "text_perplexity": math.exp(prose.mean) if prose.tokens else float("nan"),
            "answers": [{"id": q["id"], "reply": r, "correct": ok} for q, r, ok in zip(qs, replies, right)]}


def base_retention(model, tokenizer, base_path: str, batch_size: int = 16, max_len: int = 512,
                   bf16: bool = True) -> dict:
    """retention() of an untouched base model, computed once per model, probe and settings and
    kept in the cache: every run of a base is compared with the same numbers, and each evaluation
    after the first skips half of the probe's work."""
    from tailor.models.embedded import cache_root

    key = hashlib.sha256(json.dumps({
        "model": _fingerprint(Path(base_path)), "questions": questions(), "text": general_text(),
        "batch_size": batch_size, "max_len": max_len, "bf16": bf16, "new_tokens": QUESTION_TOKENS,
        "version": 1,  # bump when the decoding or the scoring changes
    }, sort_keys=True).encode()).hexdigest()[:32]
    path = cache_root().parent / "base-retention" / f"{key}.json"
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    result = retention(model, tokenizer, batch_size=batch_size, max_len=max_len, bf16=bf16)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result), encoding="utf-8")
    os.replace(tmp, path)
    return result


def _fingerprint(folder: Path) -> list:
    """The model folder's files by name, size and modification time."""
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file())
