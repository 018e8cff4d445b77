"""GGUF export on a tiny Llama with SmolLM2's tokenizer: a LoRA run written as GGUF and read back
by transformers gives the run's greedy tokens (f16) and exactly the rounded weights (f16, q8_0,
q4_0); the Ollama Modelfile's Go template renders what the chat template renders; an architecture
the writer does not know is refused by name."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tailor.runs import Run
from tailor.serve.modelfile import OLLAMA_CHATML, chatml, ollama_modelfile
from tailor.serve.to_gguf import GGUFExportError, export_gguf, gguf_parity, write_gguf


@pytest.fixture(scope="module")
def smol_tiny_dir(tmp_path_factory, embedded_path) -> Path:
    """A 2-block Llama with hidden size 64 and the embedded SmolLM2's tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("smol-tiny")
    tokenizer = AutoTokenizer.from_pretrained(str(embedded_path))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, smol_tiny_dir) -> Run:
    from tailor.spec import load_job
    from tailor.techniques import run as run_technique

    from conftest import make_conversations

    root = tmp_path_factory.mktemp("gguf-run")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in make_conversations(24)), encoding="utf-8")
    job = {"name": "tiny", "model": {"base": str(smol_tiny_dir), "dtype": "float32"},
           "data": {"train": [str(data)], "validation_fraction": 0.0},
           "adapter": {"kind": "lora", "rank": 4, "alpha": 8},
           "training": {"learning_rate": 2e-2, "max_steps": 6, "batch_size": 4, "max_seq_len": 256, "save_every": 0,
                        "threads": 1, "seed": 7, "replay": {"enabled": False}},
           "output": {"dir": str(root / "runs")}}
    (root / "job.yaml").write_text(yaml.safe_dump(job), encoding="utf-8")
    return Run(run_technique(load_job(root / "job.yaml"), show_progress=False))


PROMPTS = [[{"role": "user", "content": "lamp glow pass?"}],
           [{"role": "system", "content": "You answer for the shop."}, {"role": "user", "content": "reset my ember"}],
           [{"role": "user", "content": "order ship refund?"}]]


def test_a_lora_run_as_gguf_gives_the_runs_greedy_tokens(lora_run):
    gguf_file = export_gguf(lora_run, "f16", say=lambda m: None)
    assert gguf_file == lora_run.gguf_dir / "tiny-f16.gguf"
    result = gguf_parity(lora_run, gguf_file, PROMPTS, max_new_tokens=16)
    assert result["weights"]["exact"], result["weights"]
    assert result["same_prompts"] == 3 and result["agree"] == 3, result["results"]
    assert abs(result["perplexity"]["change"]) < 1e-3
    modelfile = (lora_run.gguf_dir / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./tiny-f16.gguf\n") and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in modelfile


def test_a_quantized_file_holds_exactly_the_rounded_weights(lora_run):
    # q4_0: blocks of 4-bit weights, the (tied) embedding kept at q8_0 and the norms at f32
    gguf_file = export_gguf(lora_run, "q4_0", say=lambda m: None)
    result = gguf_parity(lora_run, gguf_file, PROMPTS[:1], max_new_tokens=8)
    assert result["weights"]["exact"], result["weights"]
    assert result["weights"]["types"] == {"Q8_0": 1, "Q4_0": 14, "F32": 5}
    assert result["perplexity"]["gguf"] > 0 and result["same_prompts"] == 1
    f16 = lora_run.gguf_dir / "tiny-f16.gguf"
    f16 = f16 if f16.exists() else export_gguf(lora_run, "f16", say=lambda m: None)
    assert gguf_file.stat().st_size < f16.stat().st_size


def test_an_architecture_the_writer_does_not_know_is_named(tmp_path, smol_tiny_dir):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(GGUFExportError, match=r"GPT2LMHeadModel cannot be written as GGUF yet; supported: "
                                              r"LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        write_gguf(folder, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_a_template_that_is_not_chatml_is_refused_by_name():
    llama3 = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}"
              "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>"
              "\n\n{% endif %}")
    with pytest.raises(GGUFExportError, match=r"the chat template of RUN is not ChatML"):
        ollama_modelfile(llama3, ["<|eot_id|>"], template_name="the chat template of RUN")


# --- Go's text/template, the part of it OLLAMA_CHATML uses ---------------------------------------
# Ollama renders TEMPLATE with Go's text/template over {.Messages: [{Role, Content}], .System}, the
# SYSTEM line added as the first message when the conversation has none. This evaluates that subset
# (range with an index, variables, if, eq/ne/and/or/not/len/slice, the {{- -}} trims) as Go does.

_ACTION = re.compile(r"{{(-?)\s*(.*?)\s*(-?)}}", re.S)


def _go_render(template: str, data: dict) -> str:
    parts, pos = [], 0
    for m in _ACTION.finditer(template):
        parts.append(("text", template[pos:m.start()]))
        parts.append(("action", m.group(2), m.group(1) == "-", m.group(3) == "-"))
        pos = m.end()
    parts.append(("text", template[pos:]))
    for i, part in enumerate(parts):  # trims: whitespace next to a {{- or -}} goes
        if part[0] == "action":
            if part[2] and parts[i - 1][0] == "text":
                parts[i - 1] = ("text", parts[i - 1][1].rstrip())
            if part[3] and parts[i + 1][0] == "text":
                parts[i + 1] = ("text", parts[i + 1][1].lstrip())
    tree, rest = _parse(parts, 0)
    assert rest == len(parts)
    return _run(tree, {"$": data}, data)


def _parse(parts, i):
    nodes = []
    while i < len(parts):
        part = parts[i]
        if part[0] == "text":
            nodes.append(("text", part[1]))
            i += 1
            continue
        action = part[1]
        if action == "end":
            return nodes, i + 1
        head = action.split(None, 1)[0]
        if head in ("range", "if"):
            body, i = _parse(parts, i + 1)
            nodes.append((head, action[len(head):].strip(), body))
        else:
            nodes.append(("action", action))
            i += 1
    return nodes, i


def _run(nodes, scope, dot) -> str:
    out = ""
    for node in nodes:
        if node[0] == "text":
            out += node[1]
        elif node[0] == "if":
            if _truthy(_eval(_tokens(node[1]), scope, dot)):
                out += _run(node[2], scope, dot)
        elif node[0] == "range":
            names, expr = node[1].split(":=")
            index, item = [n.strip() for n in names.split(",")]
            for k, value in enumerate(_eval(_tokens(expr), scope, dot)):
                out += _run(node[2], {**scope, index: k, item: value}, value)
        elif ":=" in node[1]:
            name, expr = node[1].split(":=")
            scope[name.strip()] = _eval(_tokens(expr), scope, dot)
        else:
            out += str(_eval(_tokens(node[1]), scope, dot))
    return out


def _tokens(expr: str) -> list:
    return re.findall(r'\(|\)|"[^"]*"|[^\s()]+', expr)


def _eval(tokens: list, scope, dot):
    values, i = [], 0
    while i < len(tokens):
        t = tokens[i]
        if t == "(":
            depth, j = 1, i + 1
            while depth:
                depth += {"(": 1, ")": -1}.get(tokens[j], 0)
                j += 1
            values.append(_eval(tokens[i + 1:j - 1], scope, dot))
            i = j
            continue
        values.append(_atom(t, scope, dot))
        i += 1
    if callable(values[0]):
        return values[0](*values[1:])
    assert len(values) == 1, tokens
    return values[0]


FUNCS = {"eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "not": lambda a: not _truthy(a),
         "and": lambda a, b: b if _truthy(a) else a, "or": lambda a, b: a if _truthy(a) else b,
         "len": len, "slice": lambda x, i: x[i:]}


def _atom(t: str, scope, dot):
    if t in FUNCS:
        return FUNCS[t]
    if t.startswith('"'):
        return t[1:-1]
    if t.isdigit():
        return int(t)
    if t.startswith("$."):
        return scope["$"][t[2:]]
    if t.startswith("$"):
        return scope[t]
    if t.startswith("."):
        return dot[t[1:]]
    raise AssertionError(f"not in the subset: {t}")


def _truthy(v) -> bool:
    return bool(v)


def _ollama_prompt(messages: list[dict], system: str | None) -> str:
    if system and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system}, *messages]
    return _go_render(OLLAMA_CHATML, {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages],
                                      "System": system or ""})


def test_the_modelfile_template_renders_what_the_chat_template_renders(embedded_tokenizer):
    conversation = [{"role": "system", "content": "You answer for Lumen Lane."},
                    {"role": "user", "content": "How do I pair my Ember?"},
                    {"role": "assistant", "content": "Hold the button.\nThen open the app."},
                    {"role": "user", "content": "And the Beacon?"},
                    {"role": "assistant", "content": "The same way."},
                    {"role": "user", "content": "Thanks!"}]
    jinja = embedded_tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    modelfile = ollama_modelfile(embedded_tokenizer.chat_template, ["<|im_end|>"])
    system = re.search(r'SYSTEM """(.*?)"""', modelfile, re.S).group(1)
    assert f'TEMPLATE """{OLLAMA_CHATML}"""' in modelfile
    assert _ollama_prompt(conversation, system) == jinja == chatml(conversation, system)
    # Without a system message, Ollama's SYSTEM is the one SmolLM2's template inserts.
    short = conversation[1:2]
    assert _ollama_prompt(short, system) == embedded_tokenizer.apply_chat_template(
        short, tokenize=False, add_generation_prompt=True)
