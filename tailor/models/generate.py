"""Greedy answers from a base model or a finished run, through the model's chat template."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tailor.models.hardware import best_dtype, default_device
from tailor.models.load import load_model, load_tokenizer, resolve_model


def load_run(run_dir: str | Path, dtype: str = "auto"):
    """(model, tokenizer) of a finished run: the base with its adapter, or the full model it saved."""
    run_dir = Path(run_dir)
    device = default_device()
    torch_dtype = best_dtype(dtype, device)
    if (run_dir / "model").is_dir():
        return load_model(str(run_dir / "model"), torch_dtype, device), load_tokenizer(str(run_dir / "model"))
    if not (run_dir / "adapter").is_dir():
        raise FileNotFoundError(f"{run_dir}: no adapter/ or model/ folder; is this a finished run folder "
                                f"(runs/NAME/RUN-ID)? Unfinished runs continue with `tailor train JOB --resume`")
    from peft import PeftModel

    manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    base = resolve_model(manifest["model"]["source"])
    model = PeftModel.from_pretrained(load_model(base.path, torch_dtype, device), str(run_dir / "adapter"))
    return model, load_tokenizer(str(run_dir / "adapter"))


def load_base(source: str, dtype: str = "auto"):
    device = default_device()
    resolved = resolve_model(source)
    return load_model(resolved.path, best_dtype(dtype, device), device), load_tokenizer(resolved.path)


def answer(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 128,
           batch_size: int | None = None) -> list[str]:
    """Greedy answers to several conversations, batch_size at a time (None: all at once)."""
    size = batch_size or max(1, len(conversations))
    return [reply for i in range(0, len(conversations), size)
            for reply in _answer_batch(model, tokenizer, conversations[i:i + size], max_new_tokens)]


@torch.no_grad()
def _answer_batch(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int) -> list[str]:
    """Greedy answers to one batch (left-padded: one pass per token for all of them)."""
    model.eval()
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    finally:
        tokenizer.padding_side = side
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    new = out[:, batch["input_ids"].shape[1]:]
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]
