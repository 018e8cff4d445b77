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


def test_per_example_attention_equals_the_masked_packed_attention(tiny_model_dir):
    from tailor.train.attention import NAME, set_attention
    from tailor.train.loss import CausalLMLoss

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    examples = _examples(12, model.config.vocab_size, seed=3)
    batch = collate(make_rows(examples, 64, packing=True), examples, pad_id=0)
    with torch.no_grad():
        masked = _token_losses(model, batch)  # transformers' block-diagonal mask from the position ids
        set_attention(model, NAME)
        hidden = model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                             segments=batch["segments"]).last_hidden_state
        logits = model.lm_head(hidden)
        mask = batch["labels"] != IGNORE
        per_example = F.cross_entropy(logits[mask].float(), batch["labels"][mask], reduction="none")
        loss_sum, _, count = CausalLMLoss(model)(**batch)
    torch.testing.assert_close(per_example, masked, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_sum / count, masked.mean(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs the example boundaries"):
        model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)


@pytest.mark.parametrize("compiled", [False, True])
def test_chunked_head_loss_equals_the_plain_loss_with_gradients(compiled):
    """The head's loss with its gradient computed in the forward pass, chunk by chunk (eager, or the
    softmax gradient compiled as training.compile does), against autograd through the plain loss."""
    from tailor.train.loss import head_loss

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(37, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    plain = F.cross_entropy(head(hidden), targets, reduction="sum")
    g_plain = torch.autograd.grad(plain, (hidden, head.weight))
    chunked, correct = head_loss(head, hidden, targets, chunk=8, compiled=compiled)  # 5 chunks, the last one short
    g_chunked = torch.autograd.grad(chunked, (hidden, head.weight))
    torch.testing.assert_close(chunked, plain)
    for a, b in zip(g_chunked, g_plain):
        torch.testing.assert_close(a, b)
    assert correct == (head(hidden).argmax(-1) == targets).sum()


def test_bf16_training_step_stays_close_to_float32(tiny_model_dir):
    """The bf16 path (bf16 frozen weights, autocast, per-example attention) gives the fp32 loss and
    gradients within bf16 tolerance."""
    from tailor.train.adapters import AdapterConfig, apply_adapter
    from tailor.train.attention import NAME, set_attention
    from tailor.train.loss import CausalLMLoss

    examples = _examples(8, 259, seed=5)
    batch = collate(make_rows(examples, 64, packing=True), examples, pad_id=0)
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype)
        model = apply_adapter(model, AdapterConfig(kind="lora", rank=4, dropout=0.0))
        set_attention(model, NAME)
        # LoRA B starts at zero; give it values so the adapter's gradients are not trivially equal
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn_like(p) * 0.1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss_sum, _, count = CausalLMLoss(model)(**batch)
        loss = loss_sum / count
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
        results.append((loss.item(), grads))
    (l32, g32), (l16, g16) = results
    assert abs(l16 - l32) / l32 < 1e-2
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0) > 0.99


def test_cpu_and_gpu_attention_paths_agree():
    from tailor.train.attention import _causal_attention, _fused_causal_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 6, 13, 8), torch.randn(1, 2, 13, 8), torch.randn(1, 2, 13, 8)
    torch.testing.assert_close(_causal_attention(q, k, v, None), _fused_causal_attention(q, k, v, None),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_attention_gives_the_plain_attention_and_its_gradients(dtype):
    """The hand-written backward (probabilities recomputed from the log-sum-exp) against autograd
    through the plain per-example operations: packed rows with examples from 1 token up, padding at
    the end of a row, grouped key/value heads."""
    from tailor.train.attention import compiled_packed_attention, packed_attention

    torch.manual_seed(0)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    segments = [[(0, 1), (1, 41), (41, 48)], [(0, 30)]]  # the second row: 18 positions of padding
    q, k, v = (torch.randn(2, h, 48, 8, dtype=dtype, requires_grad=True) for h in (6, 2, 2))
    grad_out = torch.randn(2, 48, 6, 8, dtype=dtype)
    results = []
    for attention in (packed_attention, compiled_packed_attention):
        out, _ = attention(None, q, k, v, None, scaling=0.3, segments=segments)
        results.append((out, *torch.autograd.grad(out, (q, k, v), grad_out)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, **tol)
