"""Attention for packed rows that computes each example on its own.

With a block-diagonal mask, a fused attention kernel still visits every query-key block of the
row: for a 512-token row holding four 128-token examples that is four times the work the
examples need (and on a CPU attention is a quarter of a training step). Running causal attention
per example skips the blocks that are masked anyway. The result is the same as the masked
attention; tests compare the two token by token.

It plugs into transformers through its documented AttentionInterface. Because the name is not a
mask implementation transformers knows, it builds no 4-D mask at all, which saves that work too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface

from tailor.train.adapters import base_of

NAME = "tailor_packed"


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     segments=None, **kwargs):
    """query [batch, heads, seq, dim]; key, value [batch, kv_heads, seq, dim]; segments: for each row,
    the (start, end) of every example in it. Positions after the last example are padding: zeros."""
    if segments is None:
        raise ValueError(f"attention '{NAME}' needs the example boundaries (segments=) of each packed row")
    rows = []
    for b, row in enumerate(segments):
        args = (query[b:b + 1], key[b:b + 1], value[b:b + 1], row, scaling)
        if torch.is_grad_enabled():
            # Keep only q, k, v and recompute the scores in the backward pass, as fused kernels do:
            # the score matrices of a step are a few hundred MB, their recomputation ~3% of its time.
            rows.append(checkpoint(_row_attention, *args, use_reentrant=False))
        else:
            rows.append(_row_attention(*args))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


def _row_attention(query, key, value, row: list[tuple[int, int]], scaling):
    attend = _causal_attention if query.device.type == "cpu" else _fused_causal_attention
    parts = [attend(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], scaling) for s, e in row]
    tail = query.shape[2] - (row[-1][1] if row else 0)
    if tail:
        parts.append(query.new_zeros(1, query.shape[1], tail, query.shape[3]))
    return torch.cat(parts, dim=2)


def _causal_attention(q, k, v, scaling):
    """Causal attention of one example, q [1, heads, L, d], k and v [1, kv_heads, L, d].

    Plain matmul-softmax-matmul: on CPU, for examples of a few hundred tokens, it beats the fused
    kernel (whose backward is slow there: 150 tokens took 1.0 ms forward + 5.5 ms backward against
    1.9 + 2.1 ms) and SDPA's own math path (which spends ~5% of a step checking its mask).
    Query heads that share a key/value head are stacked, so k and v are never copied per head.
    """
    _, heads, length, dim = q.shape
    groups = heads // k.shape[1]
    scale = scaling if scaling is not None else dim ** -0.5
    qg = q.reshape(1, k.shape[1], groups * length, dim)  # head h = kv_head * groups + j
    scores = (qg @ k.transpose(-1, -2)).view(1, k.shape[1], groups, length, length) * scale
    future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
    probs = torch.softmax(scores.masked_fill(future, float("-inf")).float(), dim=-1).to(v.dtype)
    out = probs.view(1, k.shape[1], groups * length, length) @ v
    return out.view(1, heads, length, dim)


def _fused_causal_attention(q, k, v, scaling):
    """The same through PyTorch's fused kernels, for GPUs, where they are fastest."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=q.shape[1] != k.shape[1])


AttentionInterface.register(NAME, packed_attention)


def set_attention(model, name: str) -> None:
    """Switch the attention implementation of a (possibly PEFT-wrapped) model."""
    base_of(model).set_attn_implementation(name)
