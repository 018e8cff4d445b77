import random

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from tailor.train.encode import IGNORE, Encoded
from tailor.train.packing import collate, epoch_order, make_rows, pack_best_fit


def test_best_fit_decreasing_places_every_example_once_within_the_limit():
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(500)]
    rows = pack_best_fit(lengths, 128)
    flat = sorted(i for row in rows for i in row)
    assert flat == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    # best fit leaves little room: within 3% of the lower bound on the number of rows
    assert len(rows) <= 1.03 * sum(lengths) / 128 + 1


def test_epoch_order_is_a_seeded_permutation():
    assert epoch_order(10, 1, 0) == epoch_order(10, 1, 0)
    assert epoch_order(10, 1, 0) != epoch_order(10, 1, 1)
    assert sorted(epoch_order(10, 1, 3)) == list(range(10))


def _examples(n, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(5, 30, (1,), generator=g))
        ids = torch.randint(0, vocab, (length,), generator=g).tolist()
        labels = [IGNORE] * (length // 2) + ids[length // 2:]
        out.append(Encoded(ids, labels))
    return out


def _token_losses(model, batch):
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    mask = batch["labels"] != IGNORE
    return F.cross_entropy(logits[mask].float(), batch["labels"][mask], reduction="none")


def test_packed_rows_give_each_token_the_loss_it_has_alone(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    examples = _examples(12, model.config.vocab_size)
    rows = make_rows(examples, 64, packing=True)
    assert any(len(r) > 1 for r in rows)
    with torch.no_grad():
        packed = _token_losses(model, collate(rows, examples, pad_id=0))
        # the same tokens, one example per row, in the same order as they appear in the packed rows
        alone = torch.cat([_token_losses(model, collate([[i]], examples, pad_id=0)) for row in rows for i in row])
    assert packed.shape == alone.shape
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_labels_are_shifted_inside_each_example_only():
    examples = [Encoded([1, 2, 3], [IGNORE, 2, 3]), Encoded([4, 5], [4, 5])]
    batch = collate([[0, 1]], examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    # position t predicts token t+1 of the same example; the last token of example 0 predicts nothing
    assert batch["labels"].tolist() == [[2, 3, IGNORE, 5, IGNORE]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]


def test_padding_carries_no_loss_and_restarts_positions():
    examples = [Encoded([1, 2, 3, 4], [1, 2, 3, 4]), Encoded([5, 6], [5, 6])]
    batch = collate([[0], [1]], examples, pad_id=9)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4], [5, 6, 9, 9]]
    assert batch["labels"][1].tolist() == [6, IGNORE, IGNORE, IGNORE]
    assert batch["position_ids"][1].tolist() == [0, 1, 0, 1]
