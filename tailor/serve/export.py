"""`tailor export RUN`: a standalone model folder (the adapter merged into the base) that plain
transformers and vLLM load as is, and a parity check that it answers exactly as the run does.

What goes wrong most often when people export a fine-tuned chat model is not the weights: it is
the chat template (missing, or another model's) and the end of sequence (the end-of-turn token not
listed, so the model rambles past its answer). So the folder carries the tokenizer with its chat
template and a generation config whose eos_token_id lists every token that ends an answer, and
the parity check generates greedily from the same prompts three ways:

  adapter  the run as training left it: base + PEFT adapter, transformers' generate
  merged   the exported folder loaded fresh with AutoModelForCausalLM/AutoTokenizer, using only
           what is in the folder (its chat template, its generation config)
  server   Tailor's serving engine (`tailor serve`) on base + adapter

and compares the token ids. All three run in float32 so that only real differences show. The
folder is float32 by default, so the merged model is the adapter's arithmetic exactly. Saved in
bfloat16 (half the size) it holds base + LoRA rounded to bfloat16, and where two tokens are
nearly tied the merged model may pick the other one: on the quickstart's run, 1 of 8 prompts
differed from token 24 of 48 on.

A QLoRA run trained its adapter beside a 4-bit base; the merged folder (like serving) puts it on
the full-precision base. The check also generates with the base in 4-bit, as trained, and reports
how many answer tokens agree with the adapter's (`quantized`): what the 4-bit rounding changes,
not an export error.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tailor.errors import TailorError
from tailor.files import building, write_json
from tailor.models.decode import Engine, Request, Sampling, stop_token_ids
from tailor.models.generate import load_run
from tailor.models.load import resolve_model
from tailor.runs import Run

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FALLBACK_PROMPTS = ["Hello! What can you help me with?", "Summarize what you do in one sentence.",
                    "What should I do if my order arrives damaged?", "Write a short, friendly greeting."]


class ExportError(TailorError, ValueError):
    pass


def export_run(run_dir: str | Path, out: str | Path | None = None, dtype: str = "float32", say=print) -> Path:
    """Write the merged model folder (default RUN/export) and return it."""
    run = Run(Path(run_dir).resolve())
    manifest = run.manifest()
    out = Path(out) if out else run.export_dir
    model, tokenizer = _merged(run)
    target = _dtype(dtype, manifest.model.source)
    with building(out) as tmp:
        model.to(target).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        end_ids = answer_end_ids(model, tokenizer)
        config = model.generation_config
        config.eos_token_id = end_ids[0] if len(end_ids) == 1 else end_ids
        config.pad_token_id = tokenizer.pad_token_id
        config.save_pretrained(tmp)
        (tmp / "tailor_export.json").write_text(json.dumps({
            "run": str(run.path), "base": manifest.model.source, "dtype": str(target).removeprefix("torch."),
            "adapter_kind": "lora" if run.has_adapter else manifest.adapter.kind if manifest.adapter else None,
            "eos_token_id": end_ids}, indent=1), encoding="utf-8")
    say(f"exported {run.id} → {out} ({str(target).removeprefix('torch.')}; stops at token(s) "
        f"{', '.join(f'{i} {tokenizer.convert_ids_to_tokens(i)!r}' for i in end_ids)})")
    return out


def answer_end_ids(model, tokenizer) -> list[int]:
    """Every token that ends an answer: eos, and the token the chat template puts after an
    assistant's turn (ChatML's <|im_end|>, Llama 3's <|eot_id|>, Gemma's <end_of_turn>)."""
    ids = sorted(stop_token_ids(model, tokenizer))
    marker = "PARITYMARKER"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
                                         tokenize=False)
    after = text[text.index(marker) + len(marker):]
    following = tokenizer(after, add_special_tokens=False)["input_ids"]
    if following and following[0] in tokenizer.all_special_ids and following[0] not in ids:
        ids.append(following[0])
    return ids


def parity(run_dir: str | Path, folder: str | Path, prompts: list[list[dict]] | None = None,
           max_new_tokens: int = 48) -> dict:
    """Greedy answers of adapter, merged folder and serving engine, token for token (see the module doc)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, folder = Run(Path(run_dir).resolve()), Path(folder)
    prompts = prompts or run_prompts(run)
    adapter, tokenizer = _merged(run, merge=False)
    end_ids = answer_end_ids(adapter, tokenizer)
    rounded = json.loads((folder / "tailor_export.json").read_text(encoding="utf-8"))["dtype"] != "float32"
    merged = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    merged_tokenizer = AutoTokenizer.from_pretrained(str(folder))
    engine = Engine(adapter, tokenizer)
    engine.eos_ids = set(end_ids)  # as `tailor serve` reads them: the run's tokenizer and its base's config
    quantized = _quantized_run(run)

    results, agreement = [], []
    for messages in prompts:
        ids = engine.chat_prompt(messages)
        merged_ids = merged_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                          return_dict=True)["input_ids"]
        answers = {"adapter": _generate(adapter, ids, end_ids, tokenizer.pad_token_id, max_new_tokens),
                   # plain transformers, nothing but the folder: its template and generation config
                   "merged": _generate(merged, merged_ids, None, None, max_new_tokens)}
        request = Request(ids, Sampling(max_tokens=max_new_tokens, temperature=0.0))
        engine.run([request])
        answers["server"] = request.token_ids
        results.append(_compare(messages, ids, merged_ids, answers, tokenizer, rounded))
        if quantized is not None:
            trained = _generate(quantized, ids, end_ids, tokenizer.pad_token_id, max_new_tokens)
            agreement.append((token_agreement(trained, answers["adapter"]), same_until(trained, answers["adapter"])))
            results[-1].update(quantized_tokens=len(trained), quantized_agreement=agreement[-1][0],
                               quantized_same_until=agreement[-1][1],
                               quantized_answer=tokenizer.decode(trained, skip_special_tokens=True))
    mismatched = [r for r in results if not r["agree"]]
    return {"prompts": len(results), "agree": len(results) - len(mismatched), "max_new_tokens": max_new_tokens,
            **({"quantized": {"token_agreement": sum(a for a, _ in agreement) / len(agreement),
                              "same_until_mean": sum(n for _, n in agreement) / len(agreement),
                              "same_answers": sum(a == 1.0 for a, _ in agreement)}} if agreement else {}),
            "results": results}


def same_until(a: list[int], b: list[int]) -> int:
    """How many tokens two greedy answers share before they first differ."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def token_agreement(a: list[int], b: list[int]) -> float:
    """Share of positions where two greedy answers hold the same token, over the longer answer
    (1.0: the same answer; an answer that ends early disagrees at every position after its end)."""
    longest = max(len(a), len(b))
    return sum(x == y for x, y in zip(a, b)) / longest if longest else 1.0


def _quantized_run(run: Run):
    """A QLoRA run as it trained: its base in 4-bit NF4 and its adapter (float32 compute), or None
    for other runs. The merged folder holds base + adapter in full precision, which is not the
    4-bit model the adapter learned beside: the parity check says how far apart their answers are."""
    from peft import PeftModel

    from tailor.models import default_device, load_model_4bit

    manifest = run.manifest()
    if manifest.adapter is None or manifest.adapter.kind != "qlora":
        return None
    job = run.job()
    base = resolve_model(manifest.model.source)
    model = load_model_4bit(base.path, torch.float32, default_device(), double_quant=job.adapter.double_quant,
                            training=False)
    return PeftModel.from_pretrained(model, str(run.adapter_dir)).eval()


def parity_lines(result: dict) -> list[str]:
    """What a parity check found, as `tailor export` and the studio say it."""
    lines = [f"parity: {result['agree']}/{result['prompts']} prompts give the same greedy tokens from the adapter, "
             f"the merged folder (plain transformers) and the server ({result['max_new_tokens']} new tokens each)"]
    lines += [f"  MISMATCH {r['prompt'][:60]!r}: {problem}" for r in result["results"] for problem in r["problems"]]
    if "quantized" in result:
        q = result["quantized"]
        lines.append(f"QLoRA: the run as trained (base in 4-bit) and the full-precision adapter give the same first "
                     f"{q['same_until_mean']:.1f} answer tokens on average and agree on {q['token_agreement']:.0%} "
                     f"of all ({q['same_answers']}/{result['prompts']} answers identical); the merged folder and the "
                     "server are full precision (each answer of both in parity.json)")
    return lines


def write_parity(folder: Path, result: dict) -> Path:
    """parity.json beside the exported model: what the check compared and found."""
    path = Path(folder) / "parity.json"
    write_json(path, result, ensure_ascii=False)
    return path


def run_prompts(run: Run, n: int = 8) -> list[list[dict]]:
    """The first n questions of the run's evaluation, else a few general ones."""
    questions = [q for q in (e.get("question") for e in run.eval_examples()[:n]) if q]
    return [[{"role": "user", "content": q}] for q in questions or FALLBACK_PROMPTS]


def read_prompts(path: str | Path) -> list[list[dict]]:
    """Parity prompts from a JSONL file: {"messages": [...]} (the last assistant turn, if any, is
    dropped) or {"prompt": "..."} per line."""
    prompts = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            messages = record["messages"] if "messages" in record else [{"role": "user", "content": record["prompt"]}]
        except (ValueError, KeyError, TypeError):
            raise ExportError(f"{path}:{number}: expected a JSON object with 'messages' or 'prompt'") from None
        while messages and messages[-1].get("role") == "assistant":
            messages = messages[:-1]
        if not messages:
            raise ExportError(f"{path}:{number}: no prompt turns before the answer")
        prompts.append(messages)
    if not prompts:
        raise ExportError(f"{path}: no prompts in the file")
    return prompts


def _compare(messages, ids, merged_ids, answers: dict, tokenizer, rounded: bool) -> dict:
    reference = answers["adapter"]
    problems = []
    if list(merged_ids) != list(ids):
        problems.append("the exported chat template renders this conversation differently from the run's")
    for name in ("merged", "server"):
        got = answers[name]
        if got != reference:
            at = same_until(got, reference)
            why = ("it did not stop where the adapter did: an end-of-sequence mismatch" if got[:at] == reference[:at]
                   and len(got) != len(reference) and at == min(len(got), len(reference)) else "another token")
            problems.append(f"{name} differs from adapter at answer token {at}: {why}"
                            + (" (bfloat16/float16 weights round base + LoRA: a near tie can flip; --dtype float32 "
                               "keeps the adapter's arithmetic)"
                               if name == "merged" and rounded and why == "another token" else ""))
    return {"prompt": messages[-1]["content"], "agree": not problems, "problems": problems,
            "answer": tokenizer.decode(reference, skip_special_tokens=True),
            **{f"{k}_tokens": len(v) for k, v in answers.items()},
            **({f"{k}_answer": tokenizer.decode(v, skip_special_tokens=True) for k, v in answers.items()}
               if problems else {})}


@torch.no_grad()
def _generate(model, ids: list[int], eos: list[int] | None, pad: int | None, max_new_tokens: int) -> list[int]:
    """Greedy new tokens, without the one that ended the answer (eos None: the model's generation config)."""
    prompt = torch.tensor([ids], device=model.device)
    extra = {} if eos is None else {"eos_token_id": eos, "pad_token_id": pad}
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                         do_sample=False, num_beams=1, **extra)[0, len(ids):].tolist()
    ends = set(eos if eos is not None else _as_list(model.generation_config.eos_token_id))
    cut = next((i for i, t in enumerate(out) if t in ends), len(out))
    return out[:cut]


def _as_list(value) -> list[int]:
    return [] if value is None else [value] if isinstance(value, int) else list(value)


def _merged(run: Run, merge: bool = True):
    """(model in float32, tokenizer) of the run: its adapter merged into the base (merge=False:
    left as a PEFT adapter), or its full weights."""
    model, tokenizer = load_run(run, "float32")
    if merge and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model.eval(), tokenizer


def _dtype(requested: str, base_source: str) -> torch.dtype:
    if requested != "auto":
        if requested not in DTYPES:
            raise ExportError(f"--dtype {requested}: use auto, {', '.join(DTYPES)}")
        return DTYPES[requested]
    base = resolve_model(base_source)
    config = json.loads((Path(base.path) / "config.json").read_text(encoding="utf-8"))
    return DTYPES.get(config.get("dtype") or config.get("torch_dtype") or "float32", torch.float32)
