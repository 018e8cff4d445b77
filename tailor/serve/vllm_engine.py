"""`tailor serve --engine vllm`: vLLM decodes on the GPU; Tailor keeps the API, the model names,
the feedback store and the metrics.

vLLM serves several LoRA adapters over one copy of the base (multi-LoRA) and schedules requests
itself (continuous batching, paged attention); the batcher hands it every waiting request at
once. vLLM's offline `LLM.generate` returns whole answers, so with this engine a streamed
response arrives in one piece when its batch is done. It is imported only when asked for: vLLM
needs a CUDA GPU and is not a dependency of Tailor.
"""

from __future__ import annotations

from types import SimpleNamespace

from tailor.models.decode import Request, chat_prompt_ids, stop_token_ids
from tailor.models.load import load_tokenizer
from tailor.serve.models import ModelError


class VllmEngine:
    """The Engine interface the batcher and ModelSet use (run, add_adapter, chat_prompt,
    text_prompt, tokenizer, context), over vllm.LLM."""

    def __init__(self, path: str, dtype: str = "auto", max_loras: int = 8, max_lora_rank: int = 64):
        try:
            from vllm import LLM
        except ImportError:
            raise ModelError("--engine vllm needs vLLM on a machine with a CUDA GPU: pip install vllm "
                               "(or serve with the default --engine transformers)") from None
        self.llm = LLM(model=path, dtype={"float32": "float32", "bfloat16": "bfloat16"}.get(dtype, "auto"),
                       enable_lora=True, max_loras=max_loras, max_lora_rank=max_lora_rank)
        self.tokenizer = load_tokenizer(path)  # the same chat template as training and the transformers engine
        self.context = self.llm.llm_engine.model_config.max_model_len
        self.eos_ids = stop_token_ids(SimpleNamespace(generation_config=_generation_config(path)), self.tokenizer)
        self._lora: dict[str, object] = {}
        self.on_step = None  # the batcher's metrics hook; vLLM's steps happen inside generate

    @property
    def adapters(self) -> set[str]:
        return set(self._lora)

    def add_adapter(self, name: str, folder: str) -> None:
        from vllm.lora.request import LoRARequest

        if name in self._lora:
            raise ValueError(f"an adapter named {name} is already loaded")
        self._lora[name] = LoRARequest(name, len(self._lora) + 1, folder)

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        return chat_prompt_ids(self.tokenizer, messages)

    def text_prompt(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    def run(self, requests: list[Request], more=None, max_batch: int | None = None) -> None:
        """One vllm generate call for the batch (vLLM schedules inside it; requests that arrive
        meanwhile wait for the next call: `more` is not used)."""
        from vllm import SamplingParams

        params = [SamplingParams(max_tokens=r.sampling.max_tokens, temperature=r.sampling.temperature,
                                 top_p=r.sampling.top_p, seed=r.sampling.seed, stop=list(r.sampling.stop) or None,
                                 stop_token_ids=sorted(self.eos_ids)) for r in requests]
        outputs = self.llm.generate([{"prompt_token_ids": r.prompt_ids} for r in requests], params,
                                    lora_request=[self._lora.get(r.adapter) if r.adapter else None for r in requests],
                                    use_tqdm=False)
        for r, out in zip(requests, outputs):
            best = out.outputs[0]
            r.token_ids = [t for t in best.token_ids if t not in self.eos_ids]
            r.text, r.finish_reason = best.text, (best.finish_reason if best.finish_reason in ("stop", "length")
                                                  else "stop")
            if r.on_text is not None and r.text:
                r.on_text(r.text)
            if r.on_done is not None:
                r.on_done(r)


def _generation_config(path: str):
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:  # the folder has none: the tokenizer's end of sequence alone
        return None
