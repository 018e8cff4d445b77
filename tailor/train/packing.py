"""Rows, batches and tensors.

A row is a list of examples laid end to end. With packing, whole examples are packed into rows of
at most max_len tokens by best-fit decreasing (few rows, almost no padding). Position ids restart
at 0 for every example; with no attention mask and no cache, transformers turns those restarts
into a block-diagonal causal mask, so examples in a row never see each other. Without packing a
row is one example.
"""

from __future__ import annotations

import bisect
import random

import torch

from tailor.train.encode import IGNORE, Encoded


def pack_best_fit(lengths: list[int], max_len: int) -> list[list[int]]:
    """Indices grouped into rows whose lengths sum to at most max_len (best-fit decreasing)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, row index), sorted: the best fit is a bisect away
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, r = free.pop(k)
            rows[r].append(i)
            space -= n
        else:
            rows.append([i])
            r, space = len(rows) - 1, max_len - n
        if space > 0:
            bisect.insort(free, (space, r))
    return rows


def make_rows(examples: list[Encoded], max_len: int, packing: bool) -> list[list[int]]:
    if packing:
        return pack_best_fit([len(e) for e in examples], max_len)
    return [[i] for i in range(len(examples))]


def epoch_order(n_rows: int, seed: int, epoch: int) -> list[int]:
    """The row order of one epoch: a fixed function of (seed, epoch), so a resumed run replays it."""
    order = list(range(n_rows))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def collate(rows: list[list[int]], examples: list[Encoded], pad_id: int) -> dict:
    """input_ids, labels (already shifted: labels[t] is the target for position t) and position_ids,
    padded on the right to the longest row of the batch; and segments, the (start, end) of each
    example in each row, for attention that runs per example. Examples that carry a reference
    log-probability (preference pairs) add ref_logps, one per segment in row order."""
    width = max(sum(len(examples[i]) for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    segments = []
    for b, row in enumerate(rows):
        t = 0
        segments.append([])
        for i in row:
            ex = examples[i]
            n = len(ex)
            ids[b, t:t + n] = torch.tensor(ex.input_ids)
            # Shift inside the example: the last token of one example never predicts the next one's first.
            labels[b, t:t + n - 1] = torch.tensor(ex.labels[1:])
            pos[b, t:t + n] = torch.arange(n)
            segments[b].append((t, t + n))
            t += n
        # Padding gets its own restarting positions: it is a segment of its own, seen by nothing.
        pos[b, t:] = torch.arange(width - t)
    batch = {"input_ids": ids, "labels": labels, "position_ids": pos, "segments": segments}
    if examples[rows[0][0]].ref_logp is not None:
        batch["ref_logps"] = torch.tensor([examples[i].ref_logp for row in rows for i in row], dtype=torch.float64)
    return batch
