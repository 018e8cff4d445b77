"""The prepared dataset on disk: one Hugging Face `datasets` folder (Arrow) per split, beside the
data card. `tailor train` reads it back with `read_prepared`."""

from __future__ import annotations

from pathlib import Path

from tailor.data.example import DataError, Example

SPLIT_NAMES = ("train", "validation", "test")


def features():
    from datasets import Features, List, Value

    message = {"role": Value("string"), "content": Value("string"), "weight": Value("int8"), "name": Value("string")}
    return Features({
        "id": Value("string"), "kind": Value("string"), "task": Value("string"),
        "messages": List(message), "chosen": List(message), "rejected": List(message), "text": Value("string"),
        "source": Value("string"), "line": Value("int64"),
    })


def record_id(source: str, line: int | None) -> str:
    return f"{source}:{line}" if line is not None else source


def to_row(ex: Example) -> dict:
    def msgs(messages):
        if messages is None:
            return None
        return [{"role": m["role"], "content": m["content"], "weight": m.get("weight"), "name": m.get("name")}
                for m in messages]

    source, line = str(ex.meta.get("source", "")), ex.meta.get("line")
    return {"id": record_id(source, line), "kind": ex.kind, "task": ex.task, "messages": msgs(ex.messages),
            "chosen": msgs(ex.chosen), "rejected": msgs(ex.rejected), "text": ex.text, "source": source, "line": line}


def from_row(row: dict) -> Example:
    def msgs(messages):
        if messages is None:
            return None
        return [{k: v for k, v in m.items() if v is not None} for m in messages]

    return Example(messages=msgs(row["messages"]) or [], task=row["task"], chosen=msgs(row["chosen"]),
                   rejected=msgs(row["rejected"]), text=row["text"],
                   meta={"source": row["source"], "line": row["line"], "id": row["id"]})


def column(ds, name: str) -> list:
    """A whole column as a Python list. (Indexing `ds[name]` element by element reads Arrow row by
    row, about 100× slower.)"""
    return ds.with_format("arrow")[name].to_pylist()


def is_prepared(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "card.json").is_file() and (path / "train").is_dir()


def read_prepared(folder: str | Path, split: str) -> list[Example]:
    """The records of one split of a folder written by `tailor prepare`."""
    from datasets import load_from_disk

    folder = Path(folder)
    if not is_prepared(folder):
        raise DataError([f"{folder}: not a prepared dataset folder (no card.json and train/); "
                         f"run `tailor prepare INPUT… --out {folder}` first"])
    if not (folder / split).is_dir() or _no_rows(folder / split):
        return []
    return [from_row(row) for row in load_from_disk(str(folder / split))]


def _no_rows(split: Path) -> bool:
    """An empty split (split.test: 0) is saved with no data files, and `datasets` cannot load that."""
    import json

    state = split / "state.json"
    return state.is_file() and not json.loads(state.read_text(encoding="utf-8")).get("_data_files")
