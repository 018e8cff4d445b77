"""Canonical chat JSONL: one {"messages": [{"role", "content"}, ...]} object per line."""

from __future__ import annotations

import json
from pathlib import Path

from tailor.data.example import DataError, Example, check_messages


def read_chat_jsonl(path: str | Path) -> list[Example]:
    """Read and check every line; any bad line raises DataError listing each file:line problem."""
    path = Path(path)
    if not path.is_file():
        raise DataError([f"{path}: file not found; check data.train / data.validation in the job file"])
    examples, problems = [], []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                problems.append(f"{where}: not UTF-8 ({exc.reason} at byte {exc.start}); re-save the file as UTF-8")
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})")
                continue
            if not isinstance(record, dict) or "messages" not in record:
                problems.append(f"{where}: expected an object with a 'messages' list, "
                                f"like {{\"messages\": [{{\"role\": \"user\", \"content\": \"…\"}}, …]}}")
                continue
            problem = check_messages(record["messages"])
            if problem:
                problems.append(f"{where}: {problem}")
                continue
            examples.append(Example(messages=record["messages"], task=record.get("task"),
                                    meta={"source": str(path), "line": lineno}))
    if problems:
        raise DataError(problems)
    if not examples:
        raise DataError([f"{path}: no examples; the file is empty"])
    return examples


def read_many(paths: list[str]) -> list[Example]:
    """Read several files, reporting the problems of all of them together."""
    examples, problems = [], []
    for p in paths:
        try:
            examples.extend(read_chat_jsonl(p))
        except DataError as exc:
            problems.extend(exc.problems)
    if problems:
        raise DataError(problems)
    return examples
