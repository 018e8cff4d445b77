"""Decoding: several requests advance together, one forward pass per token for all of them.

The one decoding loop of Tailor: the server answers with it, and evaluation, the quickstart and
`tailor chat` generate with it, so what was evaluated is what is served.

Each request has its own sampling settings (temperature, top_p, seed, stop strings, max_tokens)
and its own LoRA adapter: PEFT's mixed-adapter forward (`adapter_names=`) runs rows of different
adapters, and rows of the bare base ("__base__"), in one batch over one copy of the base weights.
Prompts are left-padded so every row's next token sits in the last column; a finished row leaves
the batch (its key/value cache rows are dropped), so long answers do not slow short ones down.

Greedy decoding here gives the same tokens as transformers' `generate` (the export's parity check
holds the two against each other).
"""

from __future__ import annotations

import inspect
import random
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch


@dataclass
class Sampling:
    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Request:
    """One completion to compute. The worker thread fills in the results and calls the callbacks."""

    prompt_ids: list[int]
    sampling: Sampling
    adapter: str | None = None  # a LoRA adapter loaded in the engine; None: the weights as loaded
    on_text: Callable[[str], None] | None = None  # each new piece of answer text, as soon as it is final
    on_done: Callable[["Request"], None] | None = None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # stop | length | cancelled | error
    error: BaseException | None = None
    cancelled: bool = False  # set by the caller (a client that went away): the row leaves the batch
    _emitted: int = 0
    _generator: torch.Generator | None = None


class Engine:
    """One set of weights (a base model, or a run's full weights) with its tokenizer and any number
    of LoRA adapters on top. Not thread-safe: the batcher calls it from one thread."""

    def __init__(self, model, tokenizer):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.adapters: set[str] = set()
        self.eos_ids = stop_token_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos_ids))
        self.context = getattr(model.config, "max_position_embeddings", None) or 2048
        # transformers renamed past_key_values to cache (5.2x); speak whichever this model takes.
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a PEFT wrapper
        self._cache_arg = "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"
        self.on_step: Callable[[int], None] | None = None  # rows decoded at each step (the server's metrics)
        self._current: str | None = "*"

    def add_adapter(self, name: str, folder: str) -> None:
        """Load a PEFT adapter folder under `name`; the base weights are shared, not copied."""
        from peft import PeftModel

        if name in self.adapters:
            raise ValueError(f"an adapter named {name} is already loaded")
        # autocast_adapter_dtype=False: the adapter in the base's dtype, as load_run has it
        if not self.adapters:
            self.model = PeftModel.from_pretrained(self.model, folder, adapter_name=name,
                                                   autocast_adapter_dtype=False).eval()
        else:
            self.model.load_adapter(folder, adapter_name=name, autocast_adapter_dtype=False)
            self.model.eval()
        self.adapters.add(name)
        self._switch("*")  # layers on, each row picks its adapter, until a batch of one kind switches

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        return chat_prompt_ids(self.tokenizer, messages)

    def text_prompt(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    @torch.no_grad()
    def run(self, requests: list[Request], more: Callable[[int], list[Request]] | None = None,
            max_batch: int | None = None) -> None:
        """Decode a batch to the end. Results and callbacks go to each request.

        more(k): up to k requests that arrived meanwhile; they join the running batch before the
        next token (continuous batching), so the row of a finished answer is used at once."""
        max_batch = max_batch or len(requests)
        active, state = list(requests), self._prefill(requests)
        while True:
            if more is not None and len(active) < max_batch and self._joinable(state.cache):
                joining = more(max_batch - len(active))
                if joining:
                    state = _merge(state, self._prefill(joining))
                    active += joining
            tokens = [self._pick(row_logits, r) for row_logits, r in zip(state.logits, active)]
            keep = [i for i, (r, t) in enumerate(zip(active, tokens)) if not self._advance(r, t)]
            if not keep:
                joining = more(max_batch) if more is not None else []
                if not joining:
                    return
                active, state = joining, self._prefill(joining)
                continue
            if len(keep) < len(active):
                index = torch.tensor(keep, device=state.mask.device)
                state.cache.batch_select_indices(index)
                state = _trimmed(state._replace(mask=state.mask[index], last=state.last[index]))
                active, tokens = [active[i] for i in keep], [tokens[i] for i in keep]
            mask = torch.cat([state.mask, state.mask.new_ones((len(active), 1))], dim=1)
            last = state.last + 1
            logits = self._forward(active, input_ids=torch.tensor(tokens, device=mask.device)[:, None],
                                   attention_mask=mask, position_ids=last[:, None],
                                   **{self._cache_arg: state.cache}).logits[:, -1].float()
            state = _Batch(state.cache, mask, last, logits)
            if self.on_step is not None:
                self.on_step(len(active))

    def _prefill(self, requests: list[Request]) -> "_Batch":
        """The prompts, left-padded into one batch, through the model: the cache, and each row's
        next-token logits. A request that has tokens already (its batch failed: the batcher runs
        it again alone) goes on after them, with its sampler where it was."""
        for r in requests:
            if r._generator is None:
                r._generator = torch.Generator().manual_seed(r.sampling.seed if r.sampling.seed is not None
                                                             else random.getrandbits(63))
        device = self.model.device
        rows = [r.prompt_ids + r.token_ids for r in requests]
        width = max(len(row) for row in rows)
        ids = torch.full((len(requests), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row):] = torch.tensor(row)
            mask[i, width - len(row):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        # Only the last position's logits. As an index tensor, not the int 1: the int slices a
        # strided view, and the output layer then copies its weight once per row (1 GB at 40 rows).
        last_only = torch.tensor([width - 1], device=device)
        out = self._forward(requests, input_ids=ids, attention_mask=mask, position_ids=positions,
                            logits_to_keep=last_only)
        return _Batch(getattr(out, self._cache_arg), mask, positions[:, -1], out.logits[:, -1].float())

    def _forward(self, requests: list[Request], **inputs):
        """One pass, each row through its own adapter. PEFT's mixed-adapter path only when the rows
        need it: a batch of one adapter, or of the base alone, takes the plain path (20 % faster)."""
        if not self.adapters:
            return self.model(**inputs, use_cache=True)
        names = {r.adapter for r in requests}
        self._switch(None if names == {None} else next(iter(names)) if len(names) == 1 else "*")
        if len(names) > 1:
            return self.model(**inputs, use_cache=True, adapter_names=[r.adapter or BASE_ADAPTER for r in requests])
        return self.model(**inputs, use_cache=True)

    def _switch(self, want: str | None) -> None:
        """Adapter layers on (one adapter, or "*": all, chosen per row) or off (None). Only on a
        change: PEFT walks every module to switch (8 ms for an adapter, 33 ms for its
        disable_adapter() context on SmolLM2-135M, as long as a token takes)."""
        if want == self._current:
            return
        lora = self.model.base_model
        if want is None:
            lora.disable_adapter_layers()
        else:
            if self._current is None:
                lora.enable_adapter_layers()
            if want != "*":
                self.model.set_adapter(want)
        self._current = want

    @staticmethod
    def _joinable(cache) -> bool:
        """Rows can join a running batch when every cache layer is a plain growing key/value pair
        (not a sliding window or a quantized cache)."""
        layers = getattr(cache, "layers", None)
        return bool(layers) and all(type(layer).__name__ == "DynamicLayer" for layer in layers)

    def _pick(self, logits: torch.Tensor, r: Request) -> int:
        s = r.sampling
        if s.temperature <= 1e-5:
            return int(logits.argmax())
        probs = torch.softmax(logits / s.temperature, dim=-1)
        if s.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # keep the smallest set of tokens whose probabilities reach top_p (always the first)
            drop = sorted_probs.cumsum(-1) - sorted_probs > s.top_p
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs.cpu(), 1, generator=r._generator))

    def _advance(self, r: Request, token: int) -> bool:
        """Add one token to a request; True when it is finished."""
        if r.cancelled:
            r.finish_reason = "cancelled"
        elif token in self.eos_ids:
            r.finish_reason = "stop"
        else:
            r.token_ids.append(token)
            r.text = self.tokenizer.decode(r.token_ids, skip_special_tokens=True)
            cut = first_stop(r.text, r.sampling.stop, r._emitted)
            if cut is not None:
                r.text, r.finish_reason = r.text[:cut], "stop"
            elif len(r.token_ids) >= r.sampling.max_tokens or len(r.prompt_ids) + len(r.token_ids) >= self.context:
                r.finish_reason = "length"
        final = r.text if r.finish_reason else r.text[:len(r.text) - holdback(r.text, r.sampling.stop)]
        if r.on_text is not None and len(final) > r._emitted:
            r.on_text(final[r._emitted:])
        r._emitted = max(r._emitted, len(final))
        if r.finish_reason is not None and r.on_done is not None:
            r.on_done(r)  # now, not when the batch ends: others may go on decoding for long
        return r.finish_reason is not None


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The token ids of a conversation with the assistant's turn opened, as training saw it."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def first_stop(text: str, stops: tuple[str, ...], emitted: int) -> int | None:
    """Where the earliest stop string starts, looking only where a new one could be."""
    longest = max((len(s) for s in stops), default=0)
    found = [i for s in stops if (i := text.find(s, max(0, emitted - longest))) >= 0]
    return min(found) if found else None


def holdback(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of `text` to hold back while streaming: a half-decoded
    character, or the start of what may become a stop string (which must never reach the client)."""
    n = 1 if text.endswith("\ufffd") else 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                n = max(n, k)
                break
    return n


def stop_token_ids(model, tokenizer) -> set[int]:
    """Every token that ends an answer: the tokenizer's end of sequence and the generation config's
    (chat models often list their end-of-turn token there)."""
    ids = set()
    for value in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return ids


class _Batch(NamedTuple):
    cache: object  # the model's key/value cache, a row per request
    mask: torch.Tensor  # [rows, length] attention mask, 0 on each row's left padding
    last: torch.Tensor  # [rows] the position of each row's last token
    logits: torch.Tensor  # [rows, vocab] next-token logits


def _merge(a: _Batch, b: _Batch) -> _Batch:
    """Two batches as one: the shorter one's cache and mask are left-padded (masked) to the longer's length."""
    length = max(a.mask.shape[1], b.mask.shape[1])
    for left, right in zip(a.cache.layers, b.cache.layers):
        left.keys = torch.cat([_pad_left(left.keys, length, 2), _pad_left(right.keys, length, 2)])
        left.values = torch.cat([_pad_left(left.values, length, 2), _pad_left(right.values, length, 2)])
    mask = torch.cat([_pad_left(a.mask, length, 1), _pad_left(b.mask, length, 1)])
    return _Batch(a.cache, mask, torch.cat([a.last, b.last]), torch.cat([a.logits, b.logits]))


def _trimmed(b: _Batch) -> _Batch:
    """Without the leading columns that are padding in every row: under constant load rows come
    and go while the batch runs on, and the cache would otherwise grow by a column per token."""
    start = int(b.mask.any(dim=0).int().argmax())
    if start == 0 or not Engine._joinable(b.cache):
        return b
    for layer in b.cache.layers:
        layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]
    return b._replace(mask=b.mask[:, start:])


def _pad_left(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)
