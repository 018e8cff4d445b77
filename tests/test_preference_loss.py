"""The preference losses against values worked out by hand, and golden losses of a seeded behavioral run.

Three pairs (log-probabilities are sums over the answer's tokens; "/n" is the answer's token count):

    pair   policy chosen   policy rejected   reference chosen   reference rejected
    A      -3.0 / 2        -5.0 / 4          -4.0               -5.5
    B      -6.5 / 3        -2.0 / 1          -5.0               -3.0
    C      -0.5 / 1        -4.5 / 3          -2.5               -2.5

A and B share a packed row, C has a row of its own (padded), so the segments' bookkeeping is on the path.
"""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from tailor.runs import Run
from tailor.spec import load_job
from tailor.techniques import run as run_technique
from tailor.train.encode import IGNORE
from tailor.train.preference import PreferenceLoss

# the answers' token log-probabilities, row by row: [chosen, rejected] of each pair in turn
ROWS = [[[-1.0, -2.0], [-1.25, -1.25, -1.25, -1.25],  # A: sums -3.0, -5.0
         [-2.0, -2.5, -2.0], [-2.0]],  # B: sums -6.5, -2.0
        [[-0.5], [-1.5, -1.5, -1.5]]]  # C: sums -0.5, -4.5
REF = [-4.0, -5.5, -5.0, -3.0, -2.5, -2.5]


class _Head(nn.Module):
    def forward(self, v):
        return torch.cat([v, torch.log(-torch.expm1(v))], dim=-1)  # softmax: [e^v, 1 - e^v]


class FixedLogprobs(nn.Module):
    """A causal LM stand-in whose log-probability of token 0 at each position is a value set in advance:
    the backbone returns the values as one-wide hidden states and the head turns v into the logits
    [v, log(1 - e^v)]."""

    def __init__(self, values: torch.Tensor):
        super().__init__()
        self.values, self.head = values, _Head()

    def get_decoder(self):
        return self

    def get_output_embeddings(self):
        return self.head

    def forward(self, **inputs):
        return SimpleNamespace(last_hidden_state=self.values[..., None])


def objective(loss: str, beta: float, sft_weight: float = 0.0, rows=ROWS, ref=REF):
    """PreferenceLoss on rows of answers, each after one prompt position, and the batch to call it with."""
    width = max(sum(len(a) + 1 for a in row) for row in rows)
    values = torch.full((len(rows), width), -1.0)
    labels = torch.full((len(rows), width), IGNORE)
    segments = []
    for b, row in enumerate(rows):
        start, spans = 0, []
        for answer in row:
            end = start + 1 + len(answer)
            values[b, start + 1:end] = torch.tensor(answer)
            labels[b, start + 1:end] = 0
            spans.append((start, end))
            start = end
        segments.append(spans)
    batch = {"input_ids": torch.zeros_like(labels), "labels": labels,
             "position_ids": torch.arange(width).expand(len(rows), width), "segments": segments,
             "ref_logps": torch.tensor(ref)}
    return PreferenceLoss(FixedLogprobs(values), loss, beta, sft_weight), batch


def log_sigmoid(x: float) -> float:
    return math.log(1 / (1 + math.exp(-x)))


def check(loss: str, beta: float, sft_weight: float, expected_loss: float, expected_stats: list[float]):
    module, batch = objective(loss, beta, sft_weight)
    total, stats, pairs = module(**batch)
    assert pairs.item() == 3
    assert total.item() == pytest.approx(expected_loss, rel=1e-6)
    assert stats.tolist() == pytest.approx(expected_stats, rel=1e-6, abs=1e-7)


# DPO and IPO's rewards: beta x (policy - reference) of each answer; stats are sums over the pairs:
# [pairs with chosen reward > rejected reward, margins, chosen rewards, rejected rewards]
# (margins A 0.05, B -0.25, C 0.4: A and C count as right)
REFERENCE_STATS = [2.0,
                   0.1 * ((-3.0 + 4.0) - (-5.0 + 5.5)) + 0.1 * ((-6.5 + 5.0) - (-2.0 + 3.0))
                   + 0.1 * ((-0.5 + 2.5) - (-4.5 + 2.5)),
                   0.1 * (-3.0 + 4.0) + 0.1 * (-6.5 + 5.0) + 0.1 * (-0.5 + 2.5),
                   0.1 * (-5.0 + 5.5) + 0.1 * (-2.0 + 3.0) + 0.1 * (-4.5 + 2.5)]


def test_dpo_by_hand():
    # -log sigmoid(beta x (chosen log-ratio - rejected log-ratio)), summed over the pairs
    expected = (-log_sigmoid(0.1 * ((-3.0 + 4.0) - (-5.0 + 5.5)))
                - log_sigmoid(0.1 * ((-6.5 + 5.0) - (-2.0 + 3.0)))
                - log_sigmoid(0.1 * ((-0.5 + 2.5) - (-4.5 + 2.5))))
    check("dpo", 0.1, 0.0, expected, REFERENCE_STATS)


def test_dpo_with_the_chosen_answers_language_model_loss_by_hand():
    # plus sft_weight x the chosen answer's mean token loss (RPO); the rewards do not change
    expected = (-log_sigmoid(0.1 * ((-3.0 + 4.0) - (-5.0 + 5.5))) + 0.5 * 3.0 / 2
                - log_sigmoid(0.1 * ((-6.5 + 5.0) - (-2.0 + 3.0))) + 0.5 * 6.5 / 3
                - log_sigmoid(0.1 * ((-0.5 + 2.5) - (-4.5 + 2.5))) + 0.5 * 0.5 / 1)
    check("dpo", 0.1, 0.5, expected, REFERENCE_STATS)


def test_ipo_by_hand():
    # (chosen log-ratio / its tokens - rejected log-ratio / its tokens - 1 / (2 beta))², summed over the pairs
    expected = (((-3.0 + 4.0) / 2 - (-5.0 + 5.5) / 4 - 1 / (2 * 0.1)) ** 2
                + ((-6.5 + 5.0) / 3 - (-2.0 + 3.0) / 1 - 1 / (2 * 0.1)) ** 2
                + ((-0.5 + 2.5) / 1 - (-4.5 + 2.5) / 3 - 1 / (2 * 0.1)) ** 2)
    check("ipo", 0.1, 0.0, expected, REFERENCE_STATS)


def test_ipo_with_the_chosen_answers_language_model_loss_by_hand():
    expected = (((-3.0 + 4.0) / 2 - (-5.0 + 5.5) / 4 - 1 / (2 * 0.1)) ** 2 + 2.0 * 3.0 / 2
                + ((-6.5 + 5.0) / 3 - (-2.0 + 3.0) / 1 - 1 / (2 * 0.1)) ** 2 + 2.0 * 6.5 / 3
                + ((-0.5 + 2.5) / 1 - (-4.5 + 2.5) / 3 - 1 / (2 * 0.1)) ** 2 + 2.0 * 0.5 / 1)
    check("ipo", 0.1, 2.0, expected, REFERENCE_STATS)


def test_orpo_by_hand():
    # on mean token log-probabilities m: -m_chosen - beta x log sigmoid(log odds(m_chosen) - log odds(m_rejected)),
    # log odds(m) = m - log(1 - e^m); no reference, and sft_weight does not apply (the -m_chosen is ORPO's own)
    def log_odds(m):
        return m - math.log(1 - math.exp(m))

    expected = (3.0 / 2 - 0.25 * log_sigmoid(log_odds(-3.0 / 2) - log_odds(-5.0 / 4))
                + 6.5 / 3 - 0.25 * log_sigmoid(log_odds(-6.5 / 3) - log_odds(-2.0 / 1))
                + 0.5 / 1 - 0.25 * log_sigmoid(log_odds(-0.5 / 1) - log_odds(-4.5 / 3)))
    # rewards: beta x the mean token log-probabilities (margins A -0.0625, B -0.042, C 0.25: only C is right)
    stats = [1.0,
             0.25 * ((-3.0 / 2 + 5.0 / 4) + (-6.5 / 3 + 2.0 / 1) + (-0.5 / 1 + 4.5 / 3)),
             0.25 * (-3.0 / 2 - 6.5 / 3 - 0.5 / 1),
             0.25 * (-5.0 / 4 - 2.0 / 1 - 4.5 / 3)]
    module, batch = objective("orpo", 0.25, sft_weight=1.0)
    batch["ref_logps"] = None
    total, got, pairs = module(**batch)
    assert pairs.item() == 3
    assert total.item() == pytest.approx(expected, rel=1e-6)
    assert got.tolist() == pytest.approx(stats, rel=1e-6, abs=1e-7)


def test_the_weight_scales_the_loss_not_the_stats():
    module, batch = objective("dpo", 0.1)
    total, stats, _ = module(**batch, weight=0.25)
    expected = (-log_sigmoid(0.1 * ((-3.0 + 4.0) - (-5.0 + 5.5)))
                - log_sigmoid(0.1 * ((-6.5 + 5.0) - (-2.0 + 3.0)))
                - log_sigmoid(0.1 * ((-0.5 + 2.5) - (-4.5 + 2.5))))
    assert total.item() == pytest.approx(0.25 * expected, rel=1e-6)
    assert stats.tolist() == pytest.approx(REFERENCE_STATS, rel=1e-6, abs=1e-7)


def test_a_tie_does_not_count_as_preferred():
    module, batch = objective("dpo", 0.1, rows=[[[-1.0], [-1.0]]], ref=[-2.0, -2.0])
    total, stats, _ = module(**batch)
    assert total.item() == pytest.approx(math.log(2), rel=1e-6)
    assert stats.tolist() == pytest.approx([0.0, 0.0, 0.1 * (-1.0 + 2.0), 0.1 * (-1.0 + 2.0)], rel=1e-6)


# --- golden losses of a seeded behavioral run ---------------------------------------------------


# Pinned on torch 2.13 / transformers 5.24, CPU, float32. A change here means the engine's numbers
# changed: find out why before re-pinning.
GOLDEN = {"demonstrations": [5.576171349, 5.494538193, 5.404416726],
          "preferences": [6.067390442, 6.038314819, 6.041784286]}


def test_golden_losses_of_a_seeded_behavioral_run(make_job, pairs_file):
    path = make_job("behave-golden", technique="behavioral", data={"train": [str(pairs_file)]},
                    training={"max_steps": 3}, sequential={"max_regression": None})
    run_dir = run_technique(load_job(path, []), show_progress=False)
    rows = Run(run_dir).metrics()
    losses = {stage: [r["loss"] for r in rows if r["type"] == "train" and r["stage"] == stage] for stage in GOLDEN}
    for stage, golden in GOLDEN.items():
        assert losses[stage] == pytest.approx(golden, rel=1e-4), stage
