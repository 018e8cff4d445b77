"""`tailor eval RUN`: the tuned model against its base, on the same prompts with the same decoding.

Reads top to bottom: the run's job (its eval section), the test conversations, the two models,
then for each model the loss on the reference answers, generated answers and their scores, and
the general-skills probe; then the gate. Everything lands in RUN/eval/ (written under a temporary
name, then renamed):

    summary.json    base and tuned scores, gains, retention, the gate's verdict and reasons
    examples.jsonl  per test conversation: the last question, reference, base and tuned answers
    retention.jsonl per probe question: both models' replies and whether each was right

and RUN/report.html is rewritten with them.

With a LoRA adapter the base is the same model with the adapter switched off: one copy in memory.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from tailor.data import DataError, read_many
from tailor.data.chat import prepared_folders, with_instructions
from tailor.data.store import is_prepared
from tailor.evaluate.gate import verdict
from tailor.evaluate.metrics import rouge_l, text_scores
from tailor.evaluate.probe import base_retention, retention
from tailor.evaluate.report import write_report
from tailor.models.generate import answer, load_base, load_run
from tailor.models.load import resolve_model
from tailor.runs import Run
from tailor.spec import EvalSpec, Job
from tailor.train.loss import answer_loss


def evaluate(run: Run | str | Path, data: list | None = None, spec: EvalSpec | None = None, say=print) -> dict:
    run = Run(run)
    started = time.perf_counter()
    job = run.job()
    spec = spec or job.eval

    # 1. The test conversations: each ends with the answer the model should give.
    sources, tests = _test_data(run, job, data if data is not None else spec.data)
    tests = tests[:spec.max_examples]
    say(f"evaluating {run.id} on {len(tests)} test conversation(s) from {', '.join(sources)}")

    # 2. The tuned model, and its base (the same weights with the adapter off, when there is one).
    from peft import PeftModel

    tuned_model, tokenizer = load_run(run)
    base_model = None if isinstance(tuned_model, PeftModel) else load_base(job.model.base)[0]
    bf16 = next(tuned_model.parameters()).dtype == torch.bfloat16

    # 3. Both models, the same way.
    results, outputs, probes = {}, {}, {}
    for name in ("base", "tuned"):
        with _as(name, tuned_model, base_model) as model:
            scored = answer_loss(model, tokenizer, [t["messages"] for t in tests], job.training.max_seq_len, bf16=bf16)
            outputs[name] = answer(model, tokenizer, [t["prompt"] for t in tests], max_new_tokens=spec.max_new_tokens,
                                   batch_size=spec.batch_size)
            results[name] = {"loss": scored.mean, "perplexity": math.exp(scored.mean) if scored.tokens else None,
                             "token_accuracy": scored.token_accuracy,
                             **text_scores(outputs[name], [t["reference"] for t in tests]),
                             **preferred_style(outputs[name], tests)}
            if spec.retention and name == "base":
                probes[name] = base_retention(model, tokenizer, resolve_model(job.model.base).path,
                                              batch_size=max(spec.batch_size, 40), bf16=bf16)
            elif spec.retention:
                probes[name] = retention(model, tokenizer, batch_size=max(spec.batch_size, 40), bf16=bf16)
        say(f"  {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in results[name].items() if v is not None))

    # 4. Per task (several tasks), retention, the gate, and the files.
    by_task = _task_scores(tests, outputs)
    kept = _retention_summary(probes) if spec.retention else None
    gate = verdict(results["base"], results["tuned"], kept, spec.gate)
    if not gate["passed"]:
        step = next_try(run, gate)
        if step is not None:
            gate["next"] = step.as_dict()
    summary = {
        "run": str(run.path), "data": {"sources": sources, "examples": len(tests)},
        "decoding": {"greedy": True, "max_new_tokens": spec.max_new_tokens},
        "base": results["base"], "tuned": results["tuned"],
        "gain": {k: results["tuned"][k] - results["base"][k] for k in results["tuned"]
                 if results["tuned"][k] is not None and results["base"][k] is not None},
        "retention": kept, "gate": gate, "seconds": round(time.perf_counter() - started, 1),
    }
    if by_task:
        summary["tasks"] = by_task
    examples = _examples(tests, outputs)
    if spec.judge:
        summary["judge"] = _judged(spec.judge, examples, say)
    run.write_eval(summary, examples, _retention_rows(probes) if probes else None)
    write_report(run)
    return summary


def next_try(run: Run, gate: dict, start_lr: float | None = None):
    """The ladder's next settings for a run whose gate failed (tailor/evaluate/ladder.py)."""
    from tailor.evaluate.ladder import next_step

    manifest = run.manifest() if run.has_manifest else None
    examples = None
    if manifest is not None and manifest.encoding:
        examples = manifest.encoding.get("train_examples", 0) - ((manifest.replay or {}).get("examples") or 0)
    summary = run.summary() or {}
    return next_step(gate, run.raw_job() or {}, summary.get("steps"), examples, start_lr)


def preferred_style(replies: list[str], tests: list[dict]) -> dict:
    """For preference pairs: the share of replies closer (ROUGE-L) to the chosen answer than to the
    rejected one — how often the model answers in the preferred way."""
    pairs = [(r, t) for r, t in zip(replies, tests) if "rejected" in t]
    if not pairs:
        return {}
    chosen = rouge_l([r for r, _ in pairs], [t["reference"] for _, t in pairs])
    rejected = rouge_l([r for r, _ in pairs], [t["rejected"] for _, t in pairs])
    return {"preferred_style": sum(c > r for c, r in zip(chosen, rejected)) / len(pairs)}


def _task_scores(tests: list[dict], outputs: dict) -> dict | None:
    """Base and tuned text scores of each task, when the test data has several."""
    tasks = sorted({t["task"] for t in tests if t["task"]})
    if len(tasks) < 2:
        return None
    out = {}
    for task in tasks:
        idx = [i for i, t in enumerate(tests) if t["task"] == task]
        refs = [tests[i]["reference"] for i in idx]
        out[task] = {"examples": len(idx), **{name: text_scores([outputs[name][i] for i in idx], refs)
                                              for name in outputs}}
    return out


def _judged(spec, examples: list[dict], say) -> dict:
    """The judge's scores, or why there are none: a judge that fails never costs the evaluation."""
    from tailor.evaluate.judge import Judge, JudgeError, judge_answers

    try:
        judge = Judge(spec.endpoint, spec.model, spec.criteria, spec.api_key_env)
        try:
            result = judge_answers(judge, examples[:spec.max_examples])
        finally:
            judge.close()
    except JudgeError as exc:
        say(f"judge skipped: {exc}")
        return {"error": str(exc)}
    say(f"  judge ({result['note']}): " + ", ".join(
        f"{c} {result['base'][c] or 0:.2f} → {result['tuned'][c] or 0:.2f}" for c in spec.criteria))
    return result


def _test_data(run: Run, job: Job, data: list) -> tuple[list[str], list[dict]]:
    """(where from, [{"id", "messages" (with the answer), "reference"}]) of the test conversations."""
    if data:
        sources, examples = [str(getattr(d, "path", d)) for d in data], read_many(data, split="test")
    elif run.staged:  # a staged run: the test data of the stage whose result it kept
        last = Run(run.manifest().result_of)
        return _test_data(last, last.job(), data)
    elif is_prepared(run.data_dir):
        sources, examples = [str(run.data_dir)], read_many([str(run.data_dir)], split="test")
    else:
        sources = prepared_folders(job.data.train)
        examples = read_many(sources, split="test") if sources else []
    tests = answered(with_instructions(examples, job.multitask.instructions))
    if not tests:
        raise DataError([f"{run.path}: no test conversations to evaluate on "
                         f"({', '.join(sources) or 'no prepared data'}); "
                         "prepare the data with a test split (tailor prepare … or data.prepare: true), or pass "
                         "--data FILE_OR_PREPARED_FOLDER"])
    return sources, tests


def answered(examples: list) -> list[dict]:
    """The conversations that end with an answer, each as {"id", "task", "messages", "prompt" (every
    turn but the answer), "reference" (the answer)}: what a model is asked, and what it is scored
    against. A preference pair counts as its chosen conversation and adds "rejected"."""
    tests = []
    for ex in examples:
        messages = ex.messages + ex.chosen if ex.kind == "preference" else ex.messages
        if ex.kind == "text" or not messages or messages[-1]["role"] != "assistant":
            continue
        test = {"id": ex.meta.get("id") or f"{ex.meta.get('source')}:{ex.meta.get('line')}", "task": ex.task,
                "messages": messages, "prompt": messages[:-1], "reference": messages[-1]["content"]}
        if ex.kind == "preference":
            test["rejected"] = ex.rejected[-1]["content"]
        tests.append(test)
    return tests


@contextmanager
def _as(name: str, tuned, base):
    """`with _as("base", tuned, base) as model:` the model to score under that name."""
    if name == "tuned":
        yield tuned
    elif base is not None:
        yield base
    else:
        with tuned.disable_adapter():
            yield tuned


def _retention_summary(probes: dict) -> dict:
    base, tuned = ({k: v for k, v in probes[n].items() if k != "answers"} for n in ("base", "tuned"))
    return {"base": base, "tuned": tuned, "questions": len(probes["base"]["answers"]),
            "qa_drop": base["qa_accuracy"] - tuned["qa_accuracy"],
            "perplexity_increase": tuned["text_perplexity"] / base["text_perplexity"] - 1}


def _examples(tests: list[dict], outputs: dict) -> list[dict]:
    refs = [t["reference"] for t in tests]
    scores = {n: rouge_l(outputs[n], refs) for n in outputs}
    return [{"id": t["id"], "question": next((m["content"] for m in reversed(t["prompt"]) if m["role"] == "user"), ""),
             "reference": t["reference"], "base": outputs["base"][i], "tuned": outputs["tuned"][i],
             "rouge_l_base": scores["base"][i], "rouge_l_tuned": scores["tuned"][i]}
            for i, t in enumerate(tests)]


def _retention_rows(probes: dict) -> list[dict]:
    return [{"id": b["id"], "base": b["reply"], "base_correct": b["correct"], "tuned": t["reply"],
             "tuned_correct": t["correct"]} for b, t in zip(probes["base"]["answers"], probes["tuned"]["answers"])]
