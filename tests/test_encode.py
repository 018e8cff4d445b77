import pytest
from transformers import AutoTokenizer

from tailor.train.encode import IGNORE, encode_chat

CONV = [
    {"role": "system", "content": "Be kind."},
    {"role": "user", "content": "Where is my order?"},
    {"role": "assistant", "content": "On its way!"},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "Any time."},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def labelled_text(tokenizer, enc):
    """The labelled tokens decoded, one string per contiguous run."""
    runs, cur = [], []
    for tok, lab in zip(enc.input_ids, enc.labels):
        if lab != IGNORE:
            assert lab == tok
            cur.append(tok)
        elif cur:
            runs.append(tokenizer.decode(cur))
            cur = []
    if cur:
        runs.append(tokenizer.decode(cur))
    return runs


def test_loss_mask_covers_exactly_the_assistant_answers_and_their_end_of_turn(tokenizer):
    enc = encode_chat(tokenizer, CONV, max_len=1000)
    assert labelled_text(tokenizer, enc) == ["On its way!<|im_end|>", "Any time.<|im_end|>"]
    assert not enc.truncated


def test_weight_zero_turns_carry_no_loss(tokenizer):
    conv = [dict(m) for m in CONV]
    conv[2]["weight"] = 0
    assert labelled_text(tokenizer, encode_chat(tokenizer, conv, 1000)) == ["Any time.<|im_end|>"]


def test_default_system_prompt_of_the_template_carries_no_loss(tokenizer):
    enc = encode_chat(tokenizer, CONV[1:3], 1000)
    assert tokenizer.decode(enc.input_ids).startswith("<|im_start|>system\nYou are a tiny test model.")
    assert labelled_text(tokenizer, enc) == ["On its way!<|im_end|>"]


def test_truncation_is_flagged(tokenizer):
    full = encode_chat(tokenizer, CONV, 1000)
    cut = encode_chat(tokenizer, CONV, 40)
    assert cut.truncated and len(cut) == 40
    assert cut.input_ids == full.input_ids[:40]


@pytest.mark.integration
def test_smollm2_template_mask(embedded_tokenizer):
    enc = encode_chat(embedded_tokenizer, CONV[1:], 1000)
    assert labelled_text(embedded_tokenizer, enc) == ["On its way!<|im_end|>", "Any time.<|im_end|>"]
