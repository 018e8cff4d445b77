import pytest
from transformers import AutoTokenizer

from tailor.runs import Run
from tailor.train.encode import IGNORE, encode_chat

from conftest import manifest_of

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


# --- plain text: continued pre-training ------------------------------------------------------------


def test_text_windows_predict_every_token_once(tokenizer):
    from tailor.train.encode import encode_text

    text = "Lumen Lane lamps glow warm. " * 40
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    windows = encode_text(tokenizer, text, max_len=64)
    assert len(windows) > 1 and all(len(w) <= 64 for w in windows)
    # consecutive windows share one token; together they are the document, end-of-sequence included
    rebuilt = windows[0].input_ids + [t for w in windows[1:] for t in w.input_ids[1:]]
    assert rebuilt == ids
    predicted = [t for w in windows for t in w.labels if t != IGNORE]
    assert predicted == ids[1:]  # every token but the first, exactly once
    assert sum(w.n_labels for w in windows) == len(ids) - 1


def test_text_loss_equals_the_language_model_loss(tiny_model_dir, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    from tailor.train.encode import encode_text
    from tailor.train.loss import CausalLMLoss
    from tailor.train.packing import collate

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    window = encode_text(tokenizer, "The Wick check: hold the button for ten seconds.", max_len=512)[0]
    batch = collate([[0]], [window], tokenizer.pad_token_id)
    with torch.no_grad():
        loss_sum, _, count = CausalLMLoss(model)(batch["input_ids"], batch["labels"], batch["position_ids"])
        ids = torch.tensor([window.input_ids])
        reference = model(input_ids=ids, labels=ids).loss  # transformers shifts and averages itself
    assert int(count) == len(window) - 1
    assert float(loss_sum / count) == pytest.approx(float(reference), rel=1e-5)


def test_a_job_trains_on_plain_text(tmp_path, make_job):

    from tailor.spec import load_job
    from tailor.techniques import task

    manual = tmp_path / "manual.txt"
    manual.write_text("\n\n".join(f"Section {i}. The Ember lamp dims in steps of ten percent when the halo "
                                  f"button is held; release it at the level you like. " * 3 for i in range(12)),
                      encoding="utf-8")
    run_dir = task.run(load_job(make_job("cpt", data={"train": [str(manual)]}, training={"max_steps": 2})),
                       show_progress=False)
    encoding = manifest_of(run_dir)["encoding"]
    assert encoding["train_label_tokens"] == encoding["train_tokens"] - encoding["train_examples"]
    assert (Run(run_dir).adapter_dir).is_dir()
