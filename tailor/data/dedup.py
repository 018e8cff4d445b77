"""Duplicates: exact (after normalization) and near (MinHash LSH over word n-grams).

Near-duplicates are clustered greedily in input order: a record joins the cluster of the first
kept record it resembles, or starts its own. Only cluster representatives enter the LSH index, so
the index grows with the number of distinct records, not with the input.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

from tailor.data.clean import normalized

_WORD = re.compile(r"\w+")
MINHASH_SEED = 1
SCHEME = "affine32"  # 32-bit hash values: half the memory of the legacy scheme


def exact_key(texts: list[str]) -> str:
    return hashlib.blake2b("\x00".join(normalized(t) for t in texts).encode(), digest_size=16).hexdigest()


def shingles(text: str, n: int) -> list[bytes]:
    words = _WORD.findall(text.casefold())
    if len(words) <= n:
        return [" ".join(words).encode()]
    return [" ".join(words[i:i + n]).encode() for i in range(len(words) - n + 1)]


def signatures(texts: list[str], ngram: int, num_perm: int) -> np.ndarray:
    """MinHash signatures, one row per text (uint32; the permutations are datasketch's)."""
    import xxhash
    from datasketch import MinHash

    # xxhash instead of datasketch's default sha1: the same estimate, 4× faster to compute.
    hashes = MinHash.bulk([shingles(t, ngram) for t in texts], num_perm=num_perm, seed=MINHASH_SEED,
                          hashfunc=xxhash.xxh32_intdigest, scheme=SCHEME)
    return np.stack([h.hashvalues for h in hashes]).astype(np.uint32) if hashes else np.zeros((0, num_perm), np.uint32)


class NearDuplicates:
    """Greedy clustering of MinHash signatures: `add` returns the representative a record
    duplicates (its key), or None when the record is the first of a new cluster."""

    def __init__(self, threshold: float, num_perm: int):
        from datasketch import MinHashLSH

        self.threshold = threshold
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.kept: dict[int, np.ndarray] = {}

    def add(self, key: int, signature: np.ndarray) -> int | None:
        matches = self.similar(signature)
        if not matches:
            self.insert(key, signature)
            return None
        return max(matches, key=lambda c: np.mean(self.kept[c] == signature))

    def insert(self, key: int, signature: np.ndarray) -> None:
        self.lsh.insert(key, _lean(signature))
        self.kept[key] = signature

    def similar(self, signature: np.ndarray) -> list[int]:
        """Indexed records that `signature` resembles. LSH candidates are only probable matches;
        comparing the signatures confirms them."""
        return [c for c in self.lsh.query(_lean(signature)) if float(np.mean(self.kept[c] == signature)) >= self.threshold]


def _lean(signature: np.ndarray):
    from datasketch import LeanMinHash

    return LeanMinHash(seed=MINHASH_SEED, hashvalues=signature, scheme=SCHEME)
