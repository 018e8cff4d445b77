"""What the advisor knows about the data: from a data card (tailor prepare's card.json), from a folder
or files it prepares first, or from counts a user gives when the data is not at hand yet."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class DataProfile:
    examples: int  # training records (conversations, or preference pairs)
    train_tokens: int  # per epoch, in the base model's chat template
    mean_tokens: float = 256.0
    p99_tokens: int = 512
    validation_examples: int = 0
    validation_tokens: int = 0
    test_examples: int = 0
    raw_records: int = 0  # records read before cleaning (what preparing reads)
    preference_pairs: int = 0
    tasks: dict[str, int] = field(default_factory=dict)
    languages: dict[str, int] = field(default_factory=dict)
    domain_text_tokens: int = 0  # unlabelled documents (manuals, policies) for transfer learning
    label_fraction: float = 0.5  # share of tokens that are answers
    base_perplexity: float | None = None  # the base model on a sample of the answers
    distinctive_share: float | None = None  # share of words far more frequent here than in general English
    card_verdicts: dict[str, str] = field(default_factory=dict)
    source: str = "counts"  # where this came from: a card path, or "counts"

    @property
    def n_tasks(self) -> int:
        return len([t for t in self.tasks if t != "(none)"]) or 1


def from_card(card: dict, source: str) -> DataProfile:
    splits = card["splits"]
    train, val, test = splits["train"], splits.get("validation", {}), splits.get("test", {})
    kinds = card.get("kinds", {})
    perplexity = card.get("perplexity") or {}
    return DataProfile(
        examples=train["records"], train_tokens=card["training_tokens_per_epoch"],
        mean_tokens=card["tokens"].get("mean", 256.0), p99_tokens=int(card["tokens"].get("p99", 512)),
        validation_examples=val.get("records", 0), validation_tokens=val.get("tokens", 0),
        test_examples=test.get("records", 0), raw_records=card["counts"]["read"],
        preference_pairs=kinds.get("preference", 0) + kinds.get("openai_preference", 0),
        tasks=card.get("tasks", {}), languages=card.get("languages", {}),
        domain_text_tokens=0 if not kinds.get("text") else int(card["training_tokens_per_epoch"] * kinds["text"]
                                                                / max(1, sum(kinds.values()))),
        base_perplexity=perplexity.get("perplexity"),
        distinctive_share=(card.get("relevance") or {}).get("distinctive_share"),
        card_verdicts=card.get("verdict", {}), source=source)


def from_counts(examples: int, tokens_per_example: float = 256.0, validation: float = 0.1, test: float = 0.1,
                preference_pairs: int = 0, tasks: int = 1, languages: list[str] | None = None,
                domain_text_tokens: int = 0) -> DataProfile:
    """A profile from numbers alone, split the way tailor prepare splits by default."""
    n_val, n_test = round(examples * validation), round(examples * test)
    n_train = max(0, examples - n_val - n_test)
    return DataProfile(
        examples=n_train, train_tokens=int(n_train * tokens_per_example), mean_tokens=tokens_per_example,
        p99_tokens=int(tokens_per_example * 2.5), validation_examples=n_val,
        validation_tokens=int(n_val * tokens_per_example), test_examples=n_test, raw_records=examples,
        preference_pairs=preference_pairs,
        tasks={f"task{i + 1}": examples // tasks for i in range(tasks)} if tasks > 1 else {"(none)": examples},
        languages={lang: examples for lang in (languages or ["en"])}, domain_text_tokens=domain_text_tokens)


def from_path(path: str | Path, model: str, out: Path, say=print) -> DataProfile:
    """A prepared folder (its card.json), a card.json itself, or raw data files, which are prepared
    into `out`/prepared with the default settings first (cleaning, duplicates, personal data)."""
    path = Path(path)
    if path.is_file() and path.name == "card.json":
        return from_card(json.loads(path.read_text(encoding="utf-8")), str(path))
    if path.is_dir() and (path / "card.json").is_file():
        return from_card(json.loads((path / "card.json").read_text(encoding="utf-8")), str(path / "card.json"))
    if not path.exists():
        from tailor.data import DataError

        raise DataError([f"{path}: no such file or folder; give a data file, a folder of them, or a prepared "
                         "folder (tailor prepare --out DIR)"])
    from tailor.data.prepare import prepare

    target = out / "prepared"
    say(f"profiling {path} with tailor prepare (→ {target})")
    prepared = prepare([str(path)], target, model=model, say=say)
    return from_card(prepared.card, str(target / "card.json"))
