"""Train/validation/test splits that cannot leak.

Records that share a prompt, or that belong to one near-duplicate cluster, form a group; a group
goes to one split as a whole. Groups are ordered by a seeded hash of their content, so the split
depends on the data and the seed, not on the order of the input files.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

SPLITS = ("train", "validation", "test")


class Groups:
    """Union-find over record indices."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def group_records(prompt_keys: list[str | None], clusters: list[int | None]) -> list[int]:
    """Group id per record: same prompt key, or same near-duplicate cluster (the representative's index)."""
    groups = Groups(len(prompt_keys))
    first_with_prompt: dict[str, int] = {}
    for i, key in enumerate(prompt_keys):
        if key:
            groups.union(i, first_with_prompt.setdefault(key, i))
    for i, rep in enumerate(clusters):
        if rep is not None:
            groups.union(i, rep)
    return [groups.find(i) for i in range(len(prompt_keys))]


def assign_splits(group_of: list[int], strata: list[str | None], content_keys: list[str],
                  validation: float, test: float, seed: int) -> list[str]:
    """Split name per record. `validation`/`test` are shares (< 1) or record counts (≥ 1); with
    counts, each stratum gets its proportional part."""
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(group_of):
        members[g].append(i)
    by_stratum: dict[str | None, list[int]] = defaultdict(list)
    for g, idx in members.items():
        by_stratum[strata[idx[0]]].append(g)  # a group spanning tasks follows its first record's task

    n = len(group_of)
    out = ["train"] * n
    for stratum, groups in by_stratum.items():
        size = sum(len(members[g]) for g in groups)
        targets = {"test": _target(test, size, n), "validation": _target(validation, size, n)}
        ranked = sorted(groups, key=lambda g: _rank(seed, min(content_keys[i] for i in members[g])))
        filled = {"test": 0, "validation": 0}
        for g in ranked:
            k = len(members[g])
            for split in ("test", "validation"):
                if filled[split] + k <= targets[split] and size - filled["test"] - filled["validation"] - k >= 1:
                    filled[split] += k
                    for i in members[g]:
                        out[i] = split
                    break
    return out


def _target(amount: float, stratum_size: int, total: int) -> int:
    if amount >= 1:  # an absolute count, shared among strata in proportion to their size
        return round(amount * stratum_size / total)
    return round(amount * stratum_size)


def _rank(seed: int, key: str) -> str:
    return hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).hexdigest()


def shared_prompts(splits: list[str], prompt_keys: list[str | None]) -> int:
    """Prompts that appear in more than one split (the leakage check; zero by construction)."""
    where: dict[str, set[str]] = defaultdict(set)
    for split, key in zip(splits, prompt_keys):
        if key:
            where[key].add(split)
    return sum(len(s) > 1 for s in where.values())
