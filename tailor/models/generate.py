"""Greedy answers from a base model or a finished run, through the model's chat template."""

from __future__ import annotations

from pathlib import Path

from tailor.models.decode import Engine, Request, Sampling
from tailor.models.hardware import best_dtype, default_device
from tailor.models.load import load_model, load_tokenizer, resolve_model
from tailor.runs import Run


def load_run(run: Run | str | Path, dtype: str = "auto"):
    """(model, tokenizer) of a finished run: the base with its adapter, or the full model it saved."""
    run = Run(run)
    device = default_device()
    torch_dtype = best_dtype(dtype, device)
    result = run.require_result()
    if result == run.model_dir:
        return load_model(str(result), torch_dtype, device), load_tokenizer(str(result))
    from peft import PeftModel

    base = resolve_model(run.manifest().model.source)
    # The adapter in the compute dtype too: training ran its matmuls in bf16 under autocast, and
    # fp32 adapter weights on a bf16 base cast every activation back and forth (25 % slower).
    model = PeftModel.from_pretrained(load_model(base.path, torch_dtype, device), str(result),
                                      autocast_adapter_dtype=False)
    return model, load_tokenizer(str(result))


def load_base(source: str, dtype: str = "auto", revision: str | None = None, trust_remote_code: bool = False):
    device = default_device()
    resolved = resolve_model(source, revision)
    return (load_model(resolved.path, best_dtype(dtype, device), device, trust_remote_code),
            load_tokenizer(resolved.path))


def answer(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 128,
           batch_size: int | None = None) -> list[str]:
    """Greedy answers to several conversations, batch_size at a time (None: all at once), through
    the decoding loop the server uses (tailor/models/decode.py)."""
    engine = Engine(model, tokenizer)
    size = batch_size or max(1, len(conversations))
    replies = []
    for i in range(0, len(conversations), size):
        batch = [Request(engine.chat_prompt(c), Sampling(max_tokens=max_new_tokens, temperature=0.0))
                 for c in conversations[i:i + size]]
        engine.run(batch)
        replies += [r.text.strip() for r in batch]
    return replies
