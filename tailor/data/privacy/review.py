"""The owner's review of the names anonymization replaced, and the allow-list read back from it.

NER cannot know who is public: "Richard Nixon" in a trivia answer is replaced like a customer's
name. `tailor prepare` writes the values NER found (names, and places or organizations where
those types are on), most frequent first, to a file beside the prepared folder, never inside it
or a run folder: the values are the original personal data. The data's owner deletes the lines of
real private people, keeps the public names and the words that are no names, and prepares again
with `--allow-from FILE`: what is left is added to privacy.allow.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from tailor.data.privacy.entities import NER_ENTITIES
from tailor.errors import TailorError
from tailor.files import write_atomic

REVIEW_LINES = 500  # the most frequent values; a private name is rarely among them more than a few times

_POSSESSIVE = re.compile(r"['’]s$")


def review_key(entity: str, value: str) -> tuple[str, str] | None:
    """How a replaced value is counted for the review: NER types only, possessive and spacing
    dropped ("Anne Frank’s" counts as "Anne Frank", which the allow-list then covers)."""
    if entity not in NER_ENTITIES:
        return None
    value = _POSSESSIVE.sub("", " ".join(value.split()))
    return (entity, value) if value else None


def write_review(path: Path, values: Counter, data: str) -> None:
    """The most frequent of `values` ({(entity, value): count}) with a header saying what to do.
    Spellings that differ only in case are one line (the allow-list ignores case), under the most
    frequent spelling."""
    merged: Counter = Counter()
    spellings: dict[tuple[str, str], Counter] = {}
    for (entity, value), count in values.items():
        key = (entity, value.casefold())
        merged[key] += count
        spellings.setdefault(key, Counter())[value] += count
    top = sorted(((entity, spellings[(entity, folded)].most_common(1)[0][0]), count)
                 for (entity, folded), count in merged.items())
    top = sorted(top, key=lambda kv: -kv[1])[:REVIEW_LINES]  # stable: ties stay in alphabetical order
    rest = len(merged) - len(top)
    header = [
        f"# Names (and other NER findings) that `tailor prepare` replaced in {data}, most frequent first.",
        "# FOR THE DATA'S OWNER ONLY: these are original values from the data, personal data among them.",
        "# Do not share this file, commit it, or put it into a dataset or run folder.",
        "#",
        "# To keep public names (people in the news, authors, characters, brands) and words that are no names:",
        "#   1. delete the lines of real private people (customers, staff, anyone not public);",
        "#   2. keep the lines to keep in the data;",
        "#   3. prepare again with `tailor prepare ... --allow-from THIS_FILE`: the values left here are added",
        "#      to privacy.allow and stay as they are. Lines starting with # are ignored.",
        "# Or, for data that is all public knowledge, set privacy.ner: false (names are not looked for).",
        "#",
        "# count<TAB>type<TAB>value" + (f"   ({rest:,} rarer values not listed)" if rest else ""),
    ]
    lines = [f"{count}\t{entity}\t{value}" for (entity, value), count in top]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "\n".join(header + lines) + "\n")


def read_allow_file(path: Path) -> list[str]:
    """The values of a review file (or any file of one value per line); '#' lines are comments."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TailorError(f"{path}: no such file to allow values from (--allow-from, privacy.allow_from); pass the "
                          "review file `tailor prepare` wrote (OUT.privacy-review.txt beside the prepared folder, or "
                          "RUNS/NAME/privacy-review.txt for tailor train) after editing it") from None
    values = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        value = line.split("\t")[-1].strip()  # "count<TAB>type<TAB>value", or the value alone
        if value:
            values.append(value)
    return values
