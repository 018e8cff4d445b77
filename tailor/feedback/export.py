"""Feedback into training data that `tailor prepare` and `tailor train` read.

- supervised.jsonl: OpenAI chat records. A corrected answer becomes the conversation with the
  correction as the assistant's turn; an answer rated good (score ≥ min_score) as it was.
- preferences.jsonl: prompt / chosen / rejected pairs. A correction is preferred to the answer it
  corrects; for one prompt asked more than once, an answer rated good is preferred to one rated
  bad (score ≤ max_bad).

Text completions (/v1/completions) export as prompt/completion records. Each completion counts
once: its latest correction and its latest rating.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tailor.feedback.store import FeedbackStore
from tailor.files import write_atomic


@dataclass
class Exported:
    supervised: Path
    preferences: Path
    n_supervised: int
    n_pairs: int
    n_completions: int  # completions with feedback that were read


def latest_per_completion(rows: list[dict]) -> list[dict]:
    """One entry per completion: its prompt and answer, the latest correction and rating (rows come newest first)."""
    merged: dict[str, dict] = {}
    for row in rows:
        entry = merged.setdefault(row["completion_id"], {**row, "correction": None, "score": None})
        if entry["correction"] is None and row["correction"]:
            entry["correction"] = row["correction"]
        if entry["score"] is None and row["score"] is not None:
            entry["score"] = row["score"]
    return list(merged.values())


def supervised_records(entries: list[dict], min_score: float = 0.75) -> list[dict]:
    out = []
    for e in entries:
        answer = e["correction"] or (e["answer"] if e["score"] is not None and e["score"] >= min_score else None)
        if answer:
            out.append(_record(e, answer))
    return out


def preference_pairs(entries: list[dict], min_score: float = 0.75, max_bad: float = 0.25) -> list[dict]:
    pairs = [_pair(e["prompt"], e["correction"], e["answer"]) for e in entries
             if e["correction"] and e["correction"].strip() != e["answer"].strip()]
    by_prompt: dict[str, list[dict]] = {}
    for e in entries:
        if e["score"] is not None:
            by_prompt.setdefault(json.dumps(e["prompt"], sort_keys=True), []).append(e)
    for group in by_prompt.values():
        good = [e["answer"] for e in group if e["score"] >= min_score]
        bad = [e["answer"] for e in group if e["score"] <= max_bad]
        pairs += [_pair(group[0]["prompt"], g, b) for g in dict.fromkeys(good) for b in dict.fromkeys(bad)
                  if g.strip() != b.strip()]
    return pairs


def export(store: FeedbackStore, out_dir: str | Path, model: str | None = None, min_score: float = 0.75,
           max_bad: float = 0.25) -> Exported:
    entries = latest_per_completion(store.rows(model=model))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    supervised = supervised_records(entries, min_score)
    pairs = preference_pairs(entries, min_score, max_bad)
    _write_jsonl(out_dir / "supervised.jsonl", supervised)
    _write_jsonl(out_dir / "preferences.jsonl", pairs)
    return Exported(out_dir / "supervised.jsonl", out_dir / "preferences.jsonl", len(supervised), len(pairs),
                    len(entries))


def _record(entry: dict, answer: str) -> dict:
    if entry["kind"] == "chat":
        return {"messages": entry["prompt"] + [{"role": "assistant", "content": answer}],
                "meta": {"completion_id": entry["completion_id"], "model": entry["model"]}}
    return {"prompt": entry["prompt"], "completion": answer}


def _pair(prompt, chosen: str, rejected: str) -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _write_jsonl(path: Path, records: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
