"""Conversations to token ids with a loss mask that covers exactly the assistant answers, and
plain documents to windows with every token in the loss (continued pre-training).

We render the conversation with the model's own chat template and find each assistant answer by
rendering the conversation up to it: the text between "everything before, plus the generation
prompt" and "everything up to and including this answer" is the answer and its end-of-turn token.
Tokens inside that span get labels; system, user, template scaffolding and padding never do.
"""

from __future__ import annotations

from dataclasses import dataclass

from tailor.errors import TailorError

IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss; same length as input_ids (not yet shifted)
    truncated: bool = False
    # The reference model's log-probability of this example's labels (preference training only):
    # measured once before training, so no second model stays in memory.
    ref_logp: float | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_labels(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


class TemplateError(TailorError, ValueError):
    """A chat template that cannot mark the answers (the loss mask needs them)."""


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    clean = [{"role": m["role"], "content": m["content"]} for m in messages]
    return tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans of the assistant answers that carry loss."""
    full = _render(tokenizer, messages, False)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant" or not msg.get("weight", 1):
            continue
        start = len(_render(tokenizer, messages[:i], True))
        through = _render(tokenizer, messages[: i + 1], False)
        if not full.startswith(through) or start > len(through):
            raise TemplateError(
                "the chat template does not render conversations as growing prefixes, so answers "
                "cannot be located; use a model whose template does (ChatML, Llama 3, Qwen, SmolLM2)"
            )
        end = len(through)
        # The span ends with the end-of-turn token; trailing newlines after it are scaffolding.
        while end > start and through[end - 1].isspace():
            end -= 1
        spans.append((start, end))
    return full, spans


def encode_chat(tokenizer, messages: list[dict], max_len: int) -> Encoded:
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [IGNORE] * len(ids)
    for j, (a, b) in enumerate(enc["offset_mapping"]):
        if b > a and any(a < e and b > s for s, e in spans):
            labels[j] = ids[j]
    truncated = len(ids) > max_len
    return Encoded(ids[:max_len], labels[:max_len], truncated)


def encode_text(tokenizer, text: str, max_len: int) -> list[Encoded]:
    """A plain document as windows of at most max_len tokens, ending with the end-of-sequence token
    so the model learns where documents stop. Consecutive windows share one token: the last of one
    is the first of the next, whose label is IGNORE, so every token but the document's first is
    predicted exactly once and no prediction crosses a window."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    step = max(1, max_len - 1)
    windows = []
    for start in range(0, max(1, len(ids) - 1), step):
        chunk = ids[start:start + max_len]
        if len(chunk) < 2:
            break
        windows.append(Encoded(chunk, [IGNORE] + chunk[1:]))
    return windows
