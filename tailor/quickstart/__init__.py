"""`tailor quickstart`: every step of a fine-tuning job on the bundled example, in a few minutes.

Each step of Tailor adds its part here, so `make demo` shows the whole chain on a fresh machine.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

HERE = Path(__file__).parent
JOB = HERE / "job.yaml"
HELD_OUT = HERE / "data" / "held_out.jsonl"


def held_out_questions() -> list[str]:
    return [json.loads(line)["question"] for line in HELD_OUT.read_text(encoding="utf-8").splitlines() if line.strip()]


def run_quickstart(out_dir: Path, steps: int | None, out: Console, err: Console) -> Path:
    from tailor.data.card import summary_lines
    from tailor.data.prepare import prepare
    from tailor.evaluate.report import gate_lines, summary_table
    from tailor.evaluate.run import evaluate
    from tailor.models import resolve_model
    from tailor.models.generate import answer, load_run
    from tailor.spec import load_job
    from tailor.techniques import task

    overrides = [f"output.dir={out_dir.resolve()}"] + ([f"training.max_steps={steps}"] if steps else [])
    job = load_job(JOB, overrides)
    started = time.perf_counter()

    out.rule("[bold]1 · Load the base model")
    t = time.perf_counter()
    resolved = resolve_model(job.model.base)
    out.print(f"{job.model.base} → {resolved.path} ({time.perf_counter() - t:.1f} s; converted from GGUF once, "
              "then loaded from this cache)")

    out.rule("[bold]2 · Prepare the data")
    out.print(f"Raw support logs of Lumen Lane Lamps: {job.data.train[0]}")
    out.print("Their voice: every answer opens with 'Hello, bright spark!' and signs off "
              "'Keep glowing! — Wick, Lumen Lane', and uses the shop's own words (Glow Pass, Glowpoints, the Wick check). "
              "Like real logs they hold duplicates, customers' personal data and broken lines.")
    t = time.perf_counter()
    prepared = prepare(job.data.train, out_dir.resolve() / "prepared", model=job.model.base, config=job.data,
                       say=lambda m: err.print(m, highlight=False, markup=False))
    for line in summary_lines(prepared.card):
        out.print(line, highlight=False, markup=False)
    out.print(f"→ {prepared.out}: card.md, card.html, rejects.jsonl, pii_audit.jsonl ({time.perf_counter() - t:.0f} s)")
    job.data.train, job.data.prepare = [str(prepared.out)], False  # train on its train split, validate on its validation split
    job.eval.enabled = False  # step 5 evaluates, with its own heading

    out.rule("[bold]3 · Fine-tune (LoRA)")
    run_dir = task.run(job, console=err)

    out.rule("[bold]4 · Base vs tuned on held-out questions")
    model, tokenizer = load_run(run_dir)
    questions = held_out_questions()
    conversations = [[{"role": "user", "content": q}] for q in questions]
    tuned = answer(model, tokenizer, conversations, max_new_tokens=120)
    with model.disable_adapter():  # the base model is the same weights with the adapter switched off
        base = answer(model, tokenizer, conversations, max_new_tokens=120)

    table = Table(show_lines=True, expand=True)
    table.add_column("question", ratio=2)
    table.add_column("base model", ratio=3)
    table.add_column("tuned model", ratio=3, style="green")
    for q, b, a in zip(questions, base, tuned):
        table.add_row(q, b, a)
    out.print(table)
    lines = ["# Quickstart: base vs tuned", ""]
    for q, b, a in zip(questions, base, tuned):
        lines += [f"## {q}", "", "**Base:**", "", b, "", "**Tuned:**", "", a, ""]
    (run_dir / "quickstart.md").write_text("\n".join(lines), encoding="utf-8")

    out.rule("[bold]5 · Evaluate: tuned vs base on the test split, and general skills kept")
    summary = evaluate(run_dir, spec=job.eval, say=lambda m: err.print(m, highlight=False, markup=False))
    out.print(summary_table(summary))
    for line in gate_lines(summary):
        out.print(line, highlight=False, markup=False)
    out.print(f"→ {run_dir / 'eval'}: summary.json, examples.jsonl (every test answer, base and tuned), "
              f"retention.jsonl ({summary['seconds']:.0f} s)")
    out.print(f"Report with the curves, base vs tuned and sample answers (opens offline): {run_dir / 'report.html'}")
    out.print(f"Done in {time.perf_counter() - started:.0f} s. Run folder: {run_dir}")
    out.print(f"Ask it yourself: tailor chat --run {run_dir} \"How do I pair my Ember?\"")
    return run_dir
