"""Duplicates: exact (after normalization) and near (MinHash LSH over word n-grams).

Near-duplicates are clustered greedily in input order: a record joins the cluster of the first
kept record it resembles, or starts its own. Only cluster representatives enter the LSH index, so
the index grows with the number of distinct records, not with the input.
"""

from __future__ import annotations

import functools
import hashlib
import re

import numpy as np

from tailor.data.clean import normalized

_WORD = re.compile(r"\w+")
MINHASH_SEED = 1
SCHEME = "affine32"
SIGNATURE_BATCH = 256  # 32-bit hash values: half the memory of the legacy scheme


def exact_key(texts: list[str]) -> str:
    return hashlib.blake2b("\x00".join(normalized(t) for t in texts).encode(), digest_size=16).hexdigest()


def shingles(text: str, n: int) -> list[bytes]:
    words = _WORD.findall(text.casefold())
    if len(words) <= n:
        return [" ".join(words).encode()]
    return [" ".join(words[i:i + n]).encode() for i in range(len(words) - n + 1)]


def signatures(texts: list[str], ngram: int, num_perm: int) -> np.ndarray:
    """MinHash signatures, one uint32 row per text, for a whole batch at once.

    Each shingle is hashed once (xxh64); each of the `num_perm` hash functions is a multiply-shift
    hash of that value, h(x) = (a·x + b) >> 32 with odd 64-bit a (wrapping arithmetic), a standard
    universal family. Done as one matrix operation per batch it is about 5× faster than building a
    datasketch MinHash per record; datasketch's LSH indexes the result as it would its own.
    """
    if len(texts) > SIGNATURE_BATCH:  # bound the shingles × permutations matrix
        return np.concatenate([signatures(texts[i:i + SIGNATURE_BATCH], ngram, num_perm)
                               for i in range(0, len(texts), SIGNATURE_BATCH)])
    import xxhash

    a, b = _permutations(num_perm)
    hashed, ends = [], []
    for text in texts:
        hashed.extend(xxhash.xxh64_intdigest(s) for s in shingles(text, ngram))
        ends.append(len(hashed))
    if not texts:
        return np.zeros((0, num_perm), np.uint32)
    x = np.fromiter(hashed, dtype=np.uint64, count=len(hashed))
    values = ((x[:, None] * a[None, :] + b[None, :]) >> np.uint64(32)).astype(np.uint32)
    starts = np.array([0] + ends[:-1])
    return np.minimum.reduceat(values, starts, axis=0)


@functools.lru_cache(maxsize=4)
def _permutations(num_perm: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(MINHASH_SEED)
    a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd
    b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
    return a, b


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
