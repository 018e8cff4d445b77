"""An Ollama Modelfile for an exported GGUF: the run's chat template as Ollama's Go TEMPLATE, its
default system prompt as SYSTEM, and every token that ends an answer as a `PARAMETER stop`.

Jinja cannot be translated to Go in general, so this does not try: it knows one family of templates,
ChatML (`<|im_start|>role\n…<|im_end|>`: SmolLM2, Qwen2/2.5/3, and Tailor's default), and proves a
template belongs to it by rendering it on probe conversations and comparing with what the Go
TEMPLATE renders (`chatml`). Another template is refused with an error naming it and showing where
it differs: a Modelfile that formats prompts differently from training would quietly answer worse.
"""

from __future__ import annotations

from typing import Sequence

from tailor.serve.to_gguf import GGUFExportError

# ChatML in Ollama's Go template language. Ollama puts system messages, and SYSTEM when the
# conversation has none, into .Messages; a last assistant message is a prefill and stays open.
OLLAMA_CHATML = """{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
<|im_start|>{{ .Role }}
{{ .Content }}
{{- if or (ne .Role "assistant") (not $last) }}<|im_end|>
{{ end }}
{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant
{{ end }}
{{- end }}"""


def ollama_modelfile(chat_template: str, stop_tokens: Sequence[str] = (), system: str | None = None, *,
                     gguf_file: str = "model.gguf", template_name: str = "chat template") -> str:
    """An Ollama Modelfile for a ChatML chat template (SmolLM2's, Qwen2.5's, Qwen3's without
    thinking, Tailor's default). The Jinja is not translated: it is rendered on probe conversations
    and must give exactly what the Go TEMPLATE gives, else GGUFExportError names the template. A
    default system prompt that the Jinja inserts becomes SYSTEM (`system` overrides it)."""
    default = _chatml_default_system(chat_template, template_name)
    system = default if system is None else system
    stops = list(dict.fromkeys([*stop_tokens, "<|im_end|>", "<|im_start|>"]))
    if any('"' in s for s in stops) or '"""' in (system or ""):
        raise GGUFExportError(f"{template_name}: a stop token or the default system prompt contains a quote, which a "
                              "Modelfile's PARAMETER/SYSTEM line cannot hold; the GGUF file is fine, write its "
                              "Modelfile by hand (docs/deploy.md shows one)")
    lines = [f"FROM ./{gguf_file}", f'TEMPLATE """{OLLAMA_CHATML}"""']
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"


def chatml(messages: list[dict], system: str | None) -> str:
    """What OLLAMA_CHATML renders (with Ollama adding SYSTEM when no system message is given)."""
    if system and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system}, *messages]
    out = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    if messages and messages[-1]["role"] == "assistant":
        return out[:-len("<|im_end|>\n")]
    return out + "<|im_start|>assistant\n"


PROBES = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
    [{"role": "user", "content": "One?"}, {"role": "assistant", "content": "Two."},
     {"role": "user", "content": "Three?"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "A\nB"}, {"role": "assistant", "content": "C"},
     {"role": "user", "content": "D"}],
]


def _chatml_default_system(chat_template: str, template_name: str) -> str | None:
    from transformers.utils.chat_template_utils import render_jinja_template

    def render(messages):
        try:
            return render_jinja_template([messages], chat_template=chat_template, add_generation_prompt=True,
                                         bos_token="", eos_token="<|im_end|>")[0][0]
        except Exception as error:  # raise_exception() in the template, a missing variable...
            raise GGUFExportError(f"{template_name}: rendering it failed ({error})") from None

    first = render(PROBES[0])
    head = "<|im_start|>system\n"
    default = first[len(head):first.index("<|im_end|>")] if first.startswith(head) and "<|im_end|>" in first else None
    for messages in PROBES:
        got, want = render(messages), chatml(messages, default)
        if got != want:
            at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            raise GGUFExportError(
                f"{template_name} is not ChatML (<|im_start|>role\\n...<|im_end|>), so it has no Ollama TEMPLATE "
                f"here; for {[m['role'] for m in messages]} it renders {got[max(0, at - 20):at + 40]!r} where ChatML "
                f"has {want[max(0, at - 20):at + 40]!r}. Template begins {chat_template[:80]!r}")
    return default
