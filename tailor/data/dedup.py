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
SIGNATURE_BATCH = 256
_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant (2^64 / golden ratio)  # 32-bit hash values: half the memory of the legacy scheme


def exact_key(texts: list[str]) -> str:
    return hashlib.blake2b("\x00".join(normalized(t) for t in texts).encode(), digest_size=16).hexdigest()


def shingle_hashes(text: str, n: int) -> np.ndarray:
    """64-bit hashes of the text's word n-grams: each word is hashed once (xxh64) and an n-gram's
    hash combines its words' hashes by position, so no n-gram string is ever built."""
    import xxhash

    words = np.fromiter((xxhash.xxh64_intdigest(w.encode()) for w in _WORD.findall(text.casefold())), dtype=np.uint64)
    if len(words) <= n:  # a short text is one shingle
        n = max(1, len(words))
        if not len(words):
            return np.zeros(1, np.uint64)
    count = len(words) - n + 1
    h = np.zeros(count, np.uint64)
    for k in range(n):  # h = Σ words[i + k] · M^(n-1-k): order matters, wrapping arithmetic
        h = h * _MIX + words[k:k + count]
    return h


def signatures(texts: list[str], ngram: int, num_perm: int) -> np.ndarray:
    """MinHash signatures, one uint32 row per text, for a whole batch at once.

    Each of the `num_perm` hash functions is a multiply-shift hash of a shingle's 64-bit hash,
    h(x) = (a·x + b) >> 32 with odd 64-bit a (wrapping arithmetic), a standard universal family.
    Done as one matrix operation per batch it is several times faster than building a datasketch
    MinHash per record; datasketch's LSH indexes the result as it would its own.
    """
    if len(texts) > SIGNATURE_BATCH:  # bound the shingles × permutations matrix
        return np.concatenate([signatures(texts[i:i + SIGNATURE_BATCH], ngram, num_perm)
                               for i in range(0, len(texts), SIGNATURE_BATCH)])
    if not texts:
        return np.zeros((0, num_perm), np.uint32)
    a, b = _permutations(num_perm)
    parts = [shingle_hashes(t, ngram) for t in texts]
    x = np.concatenate(parts)
    values = ((x[:, None] * a[None, :] + b[None, :]) >> np.uint64(32)).astype(np.uint32)
    starts = np.cumsum([0] + [len(p) for p in parts[:-1]])
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
        # Candidates are confirmed by comparing signatures, so a false candidate costs a comparison
        # while a missed one is a duplicate left in: tune the bands for recall. With 128
        # permutations and threshold 0.8, pairs at Jaccard 0.84 become candidates 99 % of the time
        # (63 % with datasketch's default, balanced weights).
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.05, 0.95))
        self.kept: dict[int, np.ndarray] = {}

    def add(self, key: int, signature: np.ndarray) -> int | None:
        lean = _lean(signature)
        matches = self._matches(lean, signature)
        if not matches:
            self.lsh.insert(key, lean)
            self.kept[key] = signature
            return None
        return max(matches, key=matches.get)

    def insert(self, key: int, signature: np.ndarray) -> None:
        self.lsh.insert(key, _lean(signature))
        self.kept[key] = signature

    def similar(self, signature: np.ndarray) -> list[int]:
        """Indexed records that `signature` resembles."""
        return list(self._matches(_lean(signature), signature))

    def _matches(self, lean, signature: np.ndarray) -> dict[int, float]:
        """{key: estimated similarity} of the LSH candidates that reach the threshold: candidates
        are only probable matches, comparing the signatures confirms them."""
        candidates = self.lsh.query(lean)
        if not candidates:
            return {}
        sims = (np.stack([self.kept[c] for c in candidates]) == signature).mean(axis=1)
        return {c: float(s) for c, s in zip(candidates, sims) if s >= self.threshold}


def _lean(signature: np.ndarray):
    from datasketch import LeanMinHash

    return LeanMinHash(seed=MINHASH_SEED, hashvalues=signature, scheme=SCHEME)
