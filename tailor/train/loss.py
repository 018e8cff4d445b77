"""The training objective as a module, so DDP can wrap it.

The head and the cross-entropy run only at positions that carry a label: an answer is a fraction
of a row, and the full vocabulary-wide logits for every token would cost more time and memory
than the rest of the step's output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tailor.train.encode import IGNORE


def causal_lm_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(backbone, head) of a causal LM, through a PEFT wrapper if there is one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


class CausalLMLoss(nn.Module):
    """forward(...) -> (sum of token losses, number of correct argmax tokens, number of label tokens)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels, position_ids, weight: float = 1.0):
        backbone, head = causal_lm_parts(self.model)
        hidden = backbone(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        mask = labels != IGNORE
        targets = labels[mask]
        logits = head(hidden[mask]).float()
        loss_sum = F.cross_entropy(logits, targets, reduction="sum")
        correct = (logits.detach().argmax(-1) == targets).sum()
        # weight 0 turns a filler batch (a rank with no rows left in the last step) into a no-op
        # that still takes part in DDP's gradient all-reduce.
        return loss_sum * weight, correct, mask.sum()
