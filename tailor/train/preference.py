"""Preference optimisation on chosen/rejected pairs: DPO, IPO and ORPO as one objective module.

A pair is two examples, prompt + chosen answer and prompt + rejected answer, laid side by side in
one packed row (several pairs per row), so one forward pass scores both. The losses compare the
log-probabilities the model gives each answer with those of a reference model. The reference is
the model as the preference phase starts (the base, or the demonstrations stage's result): its
log-probabilities are computed once before training and carried with the examples, so no second
model stays in memory and no second forward pass runs per step, whatever the adapter kind.

The formulas are the published ones (Rafailov et al. 2023 for DPO, Azar et al. 2023 for IPO, Hong
et al. 2024 for ORPO), written as TRL's DPOTrainer and ORPOTrainer compute them; TRL ships them
only as trainer methods, so they are restated here in a few lines.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tailor.train.attention import example_bounds
from tailor.train.encode import IGNORE, Encoded, encode_chat
from tailor.train.loss import CHUNK, causal_lm_parts, chunk_starts
from tailor.train.packing import collate, pack_best_fit

LOSSES = ("dpo", "ipo", "orpo")


def encode_pairs(tokenizer, examples: list, max_len: int) -> tuple[list[Encoded], int]:
    """[chosen₀, rejected₀, chosen₁, rejected₁, …] and how many pairs were dropped because
    truncation left one of the answers with no token."""
    out, dropped = [], 0
    for ex in examples:
        chosen = encode_chat(tokenizer, ex.messages + ex.chosen, max_len)
        rejected = encode_chat(tokenizer, ex.messages + ex.rejected, max_len)
        if chosen.n_labels and rejected.n_labels:
            out += [chosen, rejected]
        else:
            dropped += 1
    return out, dropped


def pair_rows(pairs: list[Encoded], max_len: int, packing: bool) -> list[list[int]]:
    """Rows of whole pairs (a pair never splits), packed by best fit. A pair longer than max_len
    gets a row of its own."""
    lengths = [len(pairs[2 * k]) + len(pairs[2 * k + 1]) for k in range(len(pairs) // 2)]
    groups = pack_best_fit(lengths, max_len) if packing else [[k] for k in range(len(lengths))]
    return [[i for k in group for i in (2 * k, 2 * k + 1)] for group in groups]


def _chunk_logps(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(head(hidden).float(), targets, reduction="none")


def token_logprobs(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = CHUNK,
                   even: bool = False) -> torch.Tensor:
    """log p(target) at each of the n positions of hidden [n, d], the vocabulary-wide logits made
    chunk by chunk and recomputed in the backward pass (as in loss.head_loss; even: loss.chunk_starts)."""
    parts = []
    for i in chunk_starts(hidden.shape[0], chunk, even, hidden.device):
        h, t = hidden[i:i + chunk], targets[i:i + chunk]
        parts.append(checkpoint(_chunk_logps, head, h, t, use_reentrant=False) if torch.is_grad_enabled()
                     else _chunk_logps(head, h, t))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def sequence_logprobs(model: nn.Module, input_ids, labels, position_ids, segments,
                      even: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the label tokens' log-probabilities, number of label tokens) of every example in the
    batch, in row order. even: see loss.chunk_starts."""
    backbone, head = causal_lm_parts(model)
    hidden = backbone(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                      segments=example_bounds(segments)).last_hidden_state
    owner = torch.full(labels.shape, -1, dtype=torch.long, device=labels.device)
    n = 0
    for b, row in enumerate(segments):
        for start, end in row:
            owner[b, start:end] = n
            n += 1
    mask = labels != IGNORE
    logps = token_logprobs(head, hidden[mask], labels[mask], even=even)
    ids = owner[mask]
    sums = torch.zeros(n, dtype=torch.float32, device=labels.device).index_add(0, ids, logps)
    counts = torch.zeros(n, dtype=torch.float32, device=labels.device).index_add(
        0, ids, torch.ones_like(logps))
    return sums, counts


class PreferenceLoss(nn.Module):
    """forward(...) -> (sum of pair losses, sums of stat_names over pairs, number of pairs)."""

    stat_names = ("preference_accuracy", "reward_margin", "chosen_reward", "rejected_reward")
    perplexity = False
    even_head_calls = False  # set by DeepSpeed ZeRO-3: see loss.chunk_starts

    def __init__(self, model: nn.Module, loss: str = "dpo", beta: float = 0.1, sft_weight: float = 0.0):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"preference.loss: unknown loss {loss!r}; use one of {', '.join(LOSSES)}")
        self.model, self.loss, self.beta, self.sft_weight = model, loss, beta, sft_weight

    def forward(self, input_ids, labels, position_ids, segments, ref_logps=None, weight: float = 1.0):
        sums, counts = sequence_logprobs(self.model, input_ids, labels, position_ids, segments, self.even_head_calls)
        losses, chosen_reward, rejected_reward = pair_losses(sums, counts, ref_logps, self.loss, self.beta)
        if self.sft_weight and self.loss != "orpo":  # orpo has its own language-model term
            losses = losses - self.sft_weight * sums[0::2] / counts[0::2]
        margin = (chosen_reward - rejected_reward).detach()
        stats = torch.stack([(margin > 0).float().sum(), margin.sum(), chosen_reward.detach().sum(),
                             rejected_reward.detach().sum()])
        pairs = torch.tensor(float(losses.shape[0]), device=losses.device)
        return losses.sum() * weight, stats, pairs


def pair_losses(sums: torch.Tensor, counts: torch.Tensor, ref_logps: torch.Tensor | None, loss: str, beta: float):
    """Per pair: (loss, chosen reward, rejected reward). Examples alternate chosen, rejected."""
    c, r = sums[0::2], sums[1::2]
    if loss == "orpo":
        mc, mr = c / counts[0::2], r / counts[1::2]  # mean log-probability per answer token
        log_odds = (mc - _log1mexp(mc)) - (mr - _log1mexp(mr))
        return -mc - beta * F.logsigmoid(log_odds), beta * mc.detach(), beta * mr.detach()
    if ref_logps is None:
        raise ValueError(f"preference.loss {loss} compares with a reference model: the examples carry no ref_logp")
    ref = ref_logps.to(sums)
    chosen_ratio, rejected_ratio = c - ref[0::2], r - ref[1::2]
    if loss == "dpo":
        losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    else:  # ipo: on per-token averages, a squared distance to a fixed margin that cannot run away
        h = chosen_ratio / counts[0::2] - rejected_ratio / counts[1::2]
        losses = (h - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable."""
    return torch.log(-torch.expm1(x.clamp(max=-1e-6)))


@torch.no_grad()
def reference_logprobs(model: nn.Module, examples: list[Encoded], rows: list[list[int]], pad_id: int,
                       batch_size: int, bf16: bool) -> list[float]:
    """The model's log-probability of every example's labels, as the preference phase starts."""
    device = next(model.parameters()).device
    out = [0.0] * len(examples)
    was_training = model.training
    model.eval()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for a in range(0, len(rows), batch_size):
            chunk = rows[a:a + batch_size]
            batch = collate(chunk, examples, pad_id)
            batch.pop("ref_logps", None)
            sums, _ = sequence_logprobs(model, batch["input_ids"].to(device), batch["labels"].to(device),
                                        batch["position_ids"].to(device), batch["segments"])
            for i, value in zip((i for row in chunk for i in row), sums.tolist()):
                out[i] = value
    model.train(was_training)
    return out
