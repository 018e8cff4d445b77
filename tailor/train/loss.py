"""The training objective as a module, so DDP can wrap it.

The head and the cross-entropy run only at positions that carry a label: an answer is a fraction
of a row. And they run in chunks, so the vocabulary-wide logits of every answer token at once
(for SmolLM2 49,152 floats per token, three copies between forward and backward) never exist:
the largest tensors of the step otherwise. In training each chunk's gradient is computed right
away, in the forward pass (softmax minus the one-hot target, times the head), and kept until the
backward pass asks for it: the logits are never computed twice, and nothing vocabulary-wide is
kept.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tailor.train.adapters import base_of
from tailor.train.attention import example_bounds
from tailor.train.encode import IGNORE
from tailor.train.precision import compute_dtype

CHUNK = 256  # label positions per head + cross-entropy chunk


def causal_lm_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(backbone, head) of a causal LM, through a PEFT wrapper if there is one."""
    base = base_of(model)
    return base.get_decoder(), base.get_output_embeddings()


def _chunk_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor):
    logits = head(hidden).float()
    return F.cross_entropy(logits, targets, reduction="sum"), (logits.detach().argmax(-1) == targets).sum()


def chunk_starts(n: int, chunk: int = CHUNK, even: bool = False, device: torch.device | str = "cpu") -> range:
    """Where each head + cross-entropy chunk over n label positions starts. even: every process
    runs as many chunks as the one with the most (the extra ones empty). Under DeepSpeed ZeRO-3
    each call of the head gathers its weight from all processes, so a process with fewer answer
    tokens than another would leave it waiting. device: where the process group reduces (NCCL: the GPU)."""
    chunks = math.ceil(n / chunk)
    if even and torch.distributed.is_initialized():
        agreed = torch.tensor([chunks], dtype=torch.long, device=device)
        torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MAX)
        chunks = int(agreed.item())
    return range(0, chunks * chunk, chunk)


def head_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = CHUNK, even: bool = False,
              compiled: bool = False):
    """Sum of token losses and number of argmax hits of `head` on hidden states [n, d]; even: see
    chunk_starts; compiled: the softmax and its gradient as a compiled kernel (training.compile)."""
    weight = getattr(head, "weight", None)
    if (torch.is_grad_enabled() and not even and isinstance(head, nn.Linear) and head.bias is None
            and (hidden.requires_grad or weight.requires_grad)):
        return _HeadLoss.apply(hidden, weight, targets, chunk, compiled)
    # Without gradients, or where each head call must stay a module call: DeepSpeed ZeRO-3 gathers
    # the head's weight in the module's hooks (even=True).
    loss_sum = hidden.new_zeros((), dtype=torch.float32)
    correct = torch.zeros((), dtype=torch.long, device=hidden.device)
    for i in chunk_starts(hidden.shape[0], chunk, even, hidden.device):
        h, t = hidden[i:i + chunk], targets[i:i + chunk]
        if torch.is_grad_enabled():
            part, hits = checkpoint(_chunk_loss, head, h, t, use_reentrant=False)
        else:
            part, hits = _chunk_loss(head, h, t)
        loss_sum = loss_sum + part
        correct = correct + hits
    return loss_sum, correct


class _HeadLoss(torch.autograd.Function):
    """forward(hidden [n, d], weight [V, d], targets [n], chunk) -> (sum of token losses, argmax hits),
    with the gradients computed chunk by chunk in the forward pass. The same numbers as the head and
    cross-entropy under autocast: bf16 logits, a float32 softmax, its gradient cast to bf16 for the
    products with the head and the hidden states."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, compiled: bool):
        softmax_grads = _compiled_softmax_grads() if compiled else _softmax_grads
        dtype = compute_dtype(hidden)
        w = weight.to(dtype)
        grad_hidden = torch.empty_like(hidden, dtype=dtype) if hidden.requires_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        hits = torch.zeros((), dtype=torch.long, device=hidden.device)
        for i in range(0, hidden.shape[0], chunk):
            h, t = hidden[i:i + chunk].to(dtype), targets[i:i + chunk]
            part, part_hits, grad_logits = softmax_grads(h @ w.t(), t)
            loss_sum += part
            hits += part_hits
            if grad_hidden is not None:
                grad_hidden[i:i + chunk] = grad_logits @ w
            if grad_weight is not None:
                grad_weight += (grad_logits.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        ctx.mark_non_differentiable(hits)
        return loss_sum, hits

    @staticmethod
    def backward(ctx, grad_loss, _grad_hits):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (None if grad_hidden is None else (grad_hidden * grad_loss).to(ctx.hidden_dtype),
                None if grad_weight is None else (grad_weight * grad_loss).to(ctx.weight_dtype), None, None, None)


def _softmax_grads(logits, targets):
    """(sum of the cross-entropy losses, argmax hits, d loss / d logits in the logits' dtype) of
    logits [n, V]: the softmax in float32, minus one at each target."""
    logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
    loss_sum = -logp.gather(1, targets[:, None]).sum()
    hits = (logp.argmax(-1) == targets).sum()
    grads = logp.exp()
    grads[torch.arange(len(targets), device=targets.device), targets] -= 1.0
    return loss_sum, hits, grads.to(logits.dtype)


@functools.cache
def _compiled_softmax_grads():
    """_softmax_grads as compiled kernels (with training.compile): the log-sum-exp, argmax and
    gradient fused into a few passes over the logits instead of six (40 -> 11 ms for 256 tokens of
    SmolLM2's 49,152-word vocabulary on the 2-core Zen 4)."""
    return torch.compile(_softmax_grads, dynamic=True)


class CausalLMLoss(nn.Module):
    """forward(...) -> (sum of token losses, number of correct argmax tokens, number of label tokens)."""

    stat_names = ("token_accuracy",)  # what the loop logs from the second value, per label token
    perplexity = True  # the mean loss is a language-model loss: exp of it means something
    even_head_calls = False  # set by DeepSpeed ZeRO-3 (tailor/train/distributed.py): see chunk_starts

    def __init__(self, model: nn.Module, compiled: bool = False):
        super().__init__()
        self.model = model
        self.compiled = compiled  # training.compile: the head's softmax gradient as a compiled kernel

    def forward(self, input_ids, labels, position_ids, segments=None, weight: float = 1.0):
        backbone, head = causal_lm_parts(self.model)
        # read by tailor.train.attention; as a tensor, so compiled blocks do not specialise on the lists
        extra = {"segments": example_bounds(segments)} if segments is not None else {}
        hidden = backbone(input_ids=input_ids, position_ids=position_ids, use_cache=False, **extra).last_hidden_state
        mask = labels != IGNORE
        loss_sum, correct = head_loss(head, hidden[mask], labels[mask], even=self.even_head_calls,
                                      compiled=self.compiled)
        # weight 0 turns a filler batch (a rank with no rows left in the last step) into a no-op
        # that still takes part in DDP's gradient all-reduce.
        return loss_sum * weight, correct, mask.sum()


class AnswerLoss(NamedTuple):
    loss_sum: float  # summed over answer tokens
    tokens: int  # answer tokens scored
    examples: int  # conversations with at least one answer token
    correct: int  # answer tokens the model's argmax predicts

    @property
    def mean(self) -> float:
        return self.loss_sum / self.tokens if self.tokens else float("nan")

    @property
    def token_accuracy(self) -> float:
        return self.correct / self.tokens if self.tokens else float("nan")


def answer_loss(model: nn.Module, tokenizer, conversations: list[list[dict]], max_len: int,
                bf16: bool = True) -> AnswerLoss:
    """`model`'s loss on the answers of conversations scored one at a time: held-out loss for
    benchmarks, perplexity for data cards and evaluation."""
    from tailor.train.encode import encode_chat

    encoded = [encode_chat(tokenizer, c, max_len) for c in conversations]
    return encoded_loss(model, encoded, tokenizer.pad_token_id, bf16=bf16)


def encoded_loss(model: nn.Module, encoded: list, pad_id: int, bf16: bool = True, batch_size: int = 1) -> AnswerLoss:
    """`model`'s loss on the labels of encoded examples, batch_size examples at a time (padded on
    the right, so each example's loss is the one it has alone); examples with no label are left out."""
    from tailor.train.packing import collate

    objective = CausalLMLoss(model).eval()
    encoded = [e for e in encoded if e.n_labels]
    device = _device(model)
    total, count, hits = 0.0, 0, 0
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for a in range(0, len(encoded), batch_size):
            b = collate([[i] for i in range(a, min(a + batch_size, len(encoded)))], encoded, pad_id)
            loss_sum, correct, n = objective(b["input_ids"].to(device), b["labels"].to(device),
                                             b["position_ids"].to(device))
            total += loss_sum.item()
            count += int(n.item())
            hits += int(correct.item())
    return AnswerLoss(total, count, len(encoded), hits)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def text_loss(model: nn.Module, tokenizer, text: str, max_len: int, bf16: bool = True) -> AnswerLoss:
    """`model`'s loss on every token of a plain text, read in windows of `max_len` tokens (each
    window's first token has no context and is not scored): perplexity on general prose."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    backbone, head = causal_lm_parts(model)
    total, count, hits = 0.0, 0, 0
    device = _device(model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for start in range(0, len(ids) - 1, max_len):
            window = torch.tensor([ids[start:start + max_len]], device=device)
            if window.shape[1] < 2:
                break
            hidden = backbone(input_ids=window, use_cache=False).last_hidden_state[0, :-1]
            loss_sum, correct = head_loss(head, hidden, window[0, 1:])
            total += loss_sum.item()
            count += window.shape[1] - 1
            hits += int(correct.item())
    return AnswerLoss(total, count, 1 if count else 0, hits)
