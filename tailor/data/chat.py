"""Reading training data for a run: any supported format, or a folder written by `tailor prepare`.

Training is strict where `tailor prepare` is forgiving: a bad record stops the run before any
weights load, listing every file:line problem, because a silently smaller dataset is a worse model
nobody asked for. To skip bad records instead, prepare the data first (their reasons go to
rejects.jsonl).
"""

from __future__ import annotations

from pathlib import Path

from tailor.data.example import DataError, Example


def read_chat_jsonl(path: str | Path) -> list[Example]:
    """Canonical chat JSONL; any bad line raises DataError listing each file:line problem."""
    return read_many([{"path": str(path), "format": "chat"}])


def read_many(sources: list, split: str = "train") -> list[Example]:
    """Read several inputs (paths, or {path, format, task, task_column, columns} / SourceSpec),
    reporting the problems of all of them together. A prepared folder contributes its `split`."""
    from tailor.data.formats import Reject, read_source
    from tailor.data.store import is_prepared, read_prepared

    examples, problems = [], []
    for src in sources:
        opts = source_options(src)
        if is_prepared(opts["path"]):
            examples.extend(read_prepared(opts["path"], split))
            continue
        try:
            before = len(examples)
            for item in read_source(**opts):
                if isinstance(item, Reject):
                    problems.append(str(item))
                else:
                    examples.append(item)
            if len(examples) == before and not problems:
                problems.append(f"{opts['path']}: no examples; the file is empty")
        except DataError as exc:
            problems.extend(exc.problems)
    if problems:
        raise DataError(problems)
    return examples


def prepared_folders(sources: list) -> list[str]:
    from tailor.data.store import is_prepared

    return [p for p in (source_options(s)["path"] for s in sources) if is_prepared(p)]


def source_options(src) -> dict:
    """read_source's arguments for a data source: a path, a dict or a SourceSpec."""
    if isinstance(src, (str, Path)):
        return {"path": str(src)}
    if isinstance(src, dict):
        return {k: v for k, v in src.items() if v is not None}
    d = src.model_dump()
    return {"path": d["path"], "format": d["format"], "task": d["task"], "columns": d["columns"] or None,
            "task_column": d["task_column"]}


def with_instructions(examples: list[Example], instructions: dict[str, str]) -> list[Example]:
    """Each task's instruction as the system prompt of its conversations and preference prompts
    that have none (multi-task training: one model tells the tasks apart by it)."""
    from dataclasses import replace

    out = []
    for ex in examples:
        prompt = instructions.get(ex.task or "")
        if prompt and ex.kind != "text" and not (ex.messages and ex.messages[0]["role"] == "system"):
            ex = replace(ex, messages=[{"role": "system", "content": prompt}] + ex.messages)
        out.append(ex)
    return out
