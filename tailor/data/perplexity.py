"""How well the base model already predicts the data's answers: a stage of `tailor prepare` whose
number the data card reports (and the advisor reads). Low perplexity means the model already
answers like this data, and prompting may be enough; high means fine-tuning has something to teach.
It is the one stage of prepare that loads the model (data.card.perplexity_sample: 0 skips it)."""

from __future__ import annotations

import math

from tailor.data.store import column, from_row


def answer_perplexity(ds, train_idx: list[int], model: str, sample: int) -> dict | None:
    """The base model's perplexity on the answers of the first `sample` training conversations, or
    None when there are none (or sample is 0)."""
    kinds = column(ds, "kind")
    chats = [i for i in train_idx if kinds[i] == "chat"][:sample] if sample else []
    if not chats:
        return None
    import torch

    from tailor.models import best_dtype, load_model, load_tokenizer, resolve_model
    from tailor.train.loss import answer_loss

    path = resolve_model(model).path
    tokenizer = load_tokenizer(path)
    dtype = best_dtype("auto")
    conversations = [from_row(ds[i]).messages for i in chats]
    scored = answer_loss(load_model(path, dtype), tokenizer, conversations, 1024, bf16=dtype == torch.bfloat16)
    if not scored.tokens:
        return None
    loss = scored.mean
    return {"records": scored.examples, "answer_tokens": scored.tokens, "loss": round(loss, 4),
            "perplexity": round(math.exp(loss), 2)}
