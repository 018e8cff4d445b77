"""Attention for packed rows that computes each example on its own.

With a block-diagonal mask, a fused attention kernel still visits every query-key block of the
row: for a 512-token row holding four 128-token examples that is four times the work the
examples need (and on a CPU attention is a quarter of a training step). Running causal attention
per example skips the blocks that are masked anyway. The result is the same as the masked
attention; tests compare the two token by token.

It plugs into transformers through its documented AttentionInterface. Because the name is not a
mask implementation transformers knows, it builds no 4-D mask at all, which saves that work too.

Two forms are registered. NAME runs plain operations and recomputes each example's scores in the
backward pass. COMPILED_NAME (with training.compile) has its own backward, flash-attention style:
it keeps one log-sum-exp per query instead of the probabilities, and its element-wise work (mask,
softmax, the scores' gradient) runs in kernels torch.compile fuses, one pass each instead of five.
On the 2-core Zen 4 CPU a 500-token example took 2.4 + 3.4 ms forward + backward against 4.7 +
10.9 ms (bench/train_profile.py shows the share in a step).
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface

from tailor.train.adapters import base_of

NAME = "tailor_packed"
COMPILED_NAME = "tailor_packed_compiled"
PROFILE_RANGE = "tailor::attention"


def _registered(name: str, compiled: bool):
    """The attention function transformers calls under `name`: query [batch, heads, seq, dim]; key,
    value [batch, kv_heads, seq, dim]; segments: for each row, the (start, end) of every example in
    it (or example_bounds of them). Positions after the last example are padding: zeros. compiled:
    the CPU path with its own backward (see the module's docstring)."""

    def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, segments=None,
                  **kwargs):
        if segments is None:
            raise ValueError(f"attention '{name}' needs the example boundaries (segments=) of each packed row")
        with torch.profiler.record_function(PROFILE_RANGE):  # bench/train_profile.py counts attention by it
            return _packed_attention(query, key, value, segments, scaling, compiled)

    return attention


packed_attention = _registered(NAME, compiled=False)
compiled_packed_attention = _registered(COMPILED_NAME, compiled=True)


def _packed_attention(query, key, value, segments, scaling, compiled: bool):
    if compiled and query.device.type == "cpu":
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return packed_attention_op(query, key, value, example_bounds(segments), scale)[0], None
    if torch.is_tensor(segments):
        segments = _rows(segments, query.shape[0])
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


# The compiled form is a custom operator (forward and backward), so that torch.compile can compile a
# whole decoder block around it: to the compiler it is one opaque call whose outputs it knows the
# shapes of, and the examples' boundaries are a tensor, not Python lists it would specialise on.


@torch.library.custom_op("tailor::packed_attention", mutates_args=())
def packed_attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bounds: torch.Tensor,
                        scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of every example of packed rows: query [B, heads, T, d], key and value
    [B, kv_heads, T, d], bounds [examples, 3] (row, start, end) -> (output [B, T, heads, d], the
    layout the output projection reads, zeros at the padding; log-sum-exp [B, heads, T] float32).

    Its backward keeps q, k, v, the output and the log-sum-exp, and recomputes the probabilities
    from the scores. Query heads that share a key/value head are stacked, as in _causal_attention."""
    batch, heads, length, dim = query.shape
    kernels = _kernels()
    out = query.new_zeros(batch, length, heads, dim)
    lse = query.new_zeros(batch, heads, length, dtype=torch.float32)
    for b, s, e in bounds.tolist():
        qg, k, v = _example(query, key, value, b, s, e, scale)
        probs, example_lse = kernels.probs(torch.bmm(qg, k.transpose(1, 2)), e - s)
        lse[b, :, s:e] = example_lse[..., 0]
        out[b, s:e] = torch.bmm(probs, v).view(heads, e - s, dim).transpose(0, 1)
    return out, lse


@packed_attention_op.register_fake
def _(query, key, value, bounds, scale):
    batch, heads, length, dim = query.shape
    return query.new_empty(batch, length, heads, dim), query.new_empty(batch, heads, length, dtype=torch.float32)


@torch.library.custom_op("tailor::packed_attention_backward", mutates_args=())
def packed_attention_backward_op(grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 out: torch.Tensor, lse: torch.Tensor, bounds: torch.Tensor,
                                 scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    heads, dim = query.shape[1], query.shape[3]
    kernels = _kernels()
    grad_q, grad_k, grad_v = torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)
    for b, s, e in bounds.tolist():
        length = e - s
        qg, k, v = _example(query, key, value, b, s, e, scale)
        go = _stacked(grad_out[b, s:e].transpose(0, 1), k.shape[0])
        probs = kernels.probs_again(torch.bmm(qg, k.transpose(1, 2)), lse[b, :, s:e, None], length)
        grad_v[b, :, s:e] = torch.bmm(probs.transpose(1, 2), go)
        # d softmax: p * (dp - sum_j p_j dp_j), and sum_j p_j dp_j = <grad_out, out> per query row
        o = _stacked(out[b, s:e].transpose(0, 1), k.shape[0])
        row_dot = (go.float() * o.float()).sum(-1, keepdim=True)
        grad_scores = kernels.score_grads(probs, torch.bmm(go, v.transpose(1, 2)), row_dot)
        grad_q[b, :, s:e] = (torch.bmm(grad_scores, k) * scale).view(heads, length, dim)
        grad_k[b, :, s:e] = torch.bmm(grad_scores.transpose(1, 2), qg)
    return grad_q, grad_k, grad_v


@packed_attention_backward_op.register_fake
def _(grad_out, query, key, value, out, lse, bounds, scale):
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _save_for_backward(ctx, inputs, output):
    query, key, value, bounds, scale = inputs
    ctx.save_for_backward(query, key, value, *output, bounds)
    ctx.scale = scale


def _backward(ctx, grad_out, _grad_lse):
    query, key, value, out, lse, bounds = ctx.saved_tensors
    grads = packed_attention_backward_op(grad_out.contiguous(), query, key, value, out, lse, bounds, ctx.scale)
    return *grads, None, None


packed_attention_op.register_autograd(_backward, setup_context=_save_for_backward)


def example_bounds(segments) -> torch.Tensor:
    """Each packed example's (row, start, end), from collate's segments (lists per row): a tensor, as
    a compiled block needs them. A tensor passes through unchanged."""
    if torch.is_tensor(segments):
        return segments
    return torch.tensor([(b, s, e) for b, row in enumerate(segments) for s, e in row], dtype=torch.long).view(-1, 3)


def _rows(bounds, batch: int) -> list[list[tuple[int, int]]]:
    """example_bounds back to lists per row."""
    rows = [[] for _ in range(batch)]
    for b, s, e in bounds.tolist():
        rows[b].append((s, e))
    return rows


def _example(query, key, value, b: int, s: int, e: int, scale: float):
    """One example's scaled queries stacked per key/value head [kv_heads, groups * L, d]; its keys and
    values [kv_heads, L, d]."""
    k = key[b, :, s:e]
    return _stacked(query[b, :, s:e] * scale, k.shape[0]), k, value[b, :, s:e]


def _stacked(x, kv_heads: int):
    """[heads, L, d] -> [kv_heads, groups * L, d], head h = kv_head * groups + j."""
    return x.reshape(kv_heads, -1, x.shape[-1])


def _probs(scores, length: int):
    """Causal softmax of scores [kv_heads, groups * L, L] in float32: (probabilities, log-sum-exp)."""
    x = _masked(scores, length)
    lse = torch.logsumexp(x, -1, keepdim=True)
    return torch.exp(x - lse).to(scores.dtype).view(scores.shape), lse


def _probs_again(scores, lse, length: int):
    return torch.exp(_masked(scores, length) - lse).to(scores.dtype).view(scores.shape)


def _masked(scores, length: int):
    """scores as [heads, L, L] in float32, -inf where a key comes after its query (the mask from
    indices, so compiled kernels read no mask tensor)."""
    i = torch.arange(length, device=scores.device)
    return scores.view(-1, length, length).float().masked_fill(i[None, :] > i[:, None], float("-inf"))


def _score_grads(probs, grad_probs, row_dot):
    return (probs.float() * (grad_probs.float() - row_dot)).to(probs.dtype)


@functools.cache
def _kernels():
    """The element-wise parts of packed_attention_op, compiled once per process; dynamic, so one
    kernel serves every example length."""
    return SimpleNamespace(**{name: torch.compile(fn, dynamic=True) for name, fn in
                              (("probs", _probs), ("probs_again", _probs_again), ("score_grads", _score_grads))})


AttentionInterface.register(NAME, packed_attention)
AttentionInterface.register(COMPILED_NAME, compiled_packed_attention)


def set_attention(model, name: str) -> str:
    """Switch the attention implementation of a (possibly PEFT-wrapped) model; returns the one it had."""
    before = base_of(model).config._attn_implementation
    base_of(model).set_attn_implementation(name)
    return before
