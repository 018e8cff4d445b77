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
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface

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
    gqa = query.shape[1] != key.shape[1]
    # On CPU the fused kernel's backward is slow for short sequences (measured at 150 tokens: 1.0 ms
    # forward + 5.5 ms backward, against 1.9 + 2.1 ms for the plain matmul-softmax path).
    # GPUs keep their fused kernels.
    backends = [SDPBackend.MATH] if query.device.type == "cpu" else list(SDPBackend)
    with sdpa_kernel(backends):
        parts = [F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e],
                                                is_causal=True, scale=scaling, enable_gqa=gqa)
                 for s, e in row]
    tail = query.shape[2] - (row[-1][1] if row else 0)
    if tail:
        parts.append(query.new_zeros(1, query.shape[1], tail, query.shape[3]))
    return torch.cat(parts, dim=2)


AttentionInterface.register(NAME, packed_attention)


def set_attention(model, name: str) -> None:
    """Switch the attention implementation of a (possibly PEFT-wrapped) model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(name)
