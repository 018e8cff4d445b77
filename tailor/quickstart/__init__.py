"""`tailor quickstart`: every step of a fine-tuning job on the bundled example, in a few minutes.

Each step of Tailor adds its part here, so `make demo` shows the whole chain on a fresh machine.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tailor.files import write_atomic

HERE = Path(__file__).parent
JOB = HERE / "job.yaml"
HELD_OUT = HERE / "data" / "held_out.jsonl"
TECHNIQUES = ("task", "transfer", "multitask", "sequential", "behavioral")


def job_path(technique: str) -> Path:
    """The bundled job of a technique: job.yaml for task, techniques/NAME.yaml for the others."""
    return JOB if technique == "task" else HERE / "techniques" / f"{technique}.yaml"


def held_out_questions() -> list[str]:
    return [json.loads(line)["question"] for line in HELD_OUT.read_text(encoding="utf-8").splitlines() if line.strip()]


def run_quickstart(out_dir: Path, steps: int | None, out: Console, err: Console, technique: str = "task",
                   sweep: bool = False) -> Path:
    from tailor.data.card import summary_lines
    from tailor.data.prepare import prepare
    from tailor.evaluate.report import gate_lines, summary_table
    from tailor.evaluate.run import evaluate
    from tailor.models import resolve_model
    from tailor.models.generate import answer, load_run
    from tailor.runs import Run
    from tailor.spec import load_job
    from tailor.techniques import run as run_technique

    overrides = [f"output.dir={out_dir.resolve()}"] + ([f"training.max_steps={steps}"] if steps else [])
    job = load_job(job_path(technique), overrides)
    started = time.perf_counter()

    out.rule("[bold]0 · Decide: is fine-tuning worth it here?")
    estimated, profile = advise_demo(job, out_dir.resolve() / "advice", out, err)

    out.rule("[bold]1 · Load the base model")
    t = time.perf_counter()
    resolved = resolve_model(job.model.base)
    out.print(f"{job.model.base} → {resolved.path} ({time.perf_counter() - t:.1f} s; converted from GGUF once, "
              "then loaded from this cache)")

    out.rule("[bold]2 · Prepare the data")
    job_started = time.perf_counter()
    datas = [("prepared", job.data)] + [(f"prepared-{st.name}", st.data) for st in job.stages if st.data is not None]
    inputs = [str(getattr(src, "path", src)) for _, data in datas for src in data.train]
    out.print("Raw data of Lumen Lane Lamps' support desk: " + ", ".join(Path(i).name for i in inputs)
              + f" (in {Path(inputs[0]).parent})")
    out.print("Their voice: every answer opens with 'Hello, bright spark!' and signs off "
              "'Keep glowing! — Wick, Lumen Lane', and uses the shop's own words "
              "(Glow Pass, Glowpoints, the Wick check). "
              "Like real logs they hold duplicates, customers' personal data and broken lines.")
    t = time.perf_counter()
    # Prepared once here (the job's data, or each stage's), then trained on its train split and
    # validated on its validation split.
    for name, data in datas:
        if not data.prepare:
            continue
        folder = out_dir.resolve() / name
        prepared = prepare(data.train, folder, model=job.model.base, config=data,
                           say=lambda m: err.print(m, highlight=False, markup=False))
        for line in summary_lines(prepared.card):
            out.print(line, highlight=False, markup=False)
        out.print(f"→ {prepared.out}: card.md, card.html, rejects.jsonl, pii_audit.jsonl "
                  f"({time.perf_counter() - t:.0f} s)")
        data.train, data.prepare = [str(prepared.out)], False
        t = time.perf_counter()
    job.eval.enabled = False  # step 5 evaluates, with its own heading

    out.rule(f"[bold]3 · Fine-tune ({TITLES[technique]})")
    out.print(_INTRO[technique])
    run = Run(run_technique(job, console=err))
    run_dir = run.path
    for line in _technique_lines(run):
        out.print(line, highlight=False, markup=False)

    out.rule("[bold]4 · Base vs tuned on held-out questions")
    model, tokenizer = load_run(run)
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
    write_atomic(run.quickstart_file, "\n".join(lines))

    out.rule("[bold]5 · Evaluate: tuned vs base on the test split, and general skills kept")
    summary = evaluate(run, spec=job.eval, say=lambda m: err.print(m, highlight=False, markup=False))
    out.print(summary_table(summary))
    for line in gate_lines(summary):
        out.print(line, highlight=False, markup=False)
    out.print(f"→ {run.eval_dir}: {run.eval_summary_file.name}, {run.eval_examples_file.name} (every test answer, "
              f"base and tuned), {run.retention_file.name} ({summary['seconds']:.0f} s)")
    for line in _task_lines(summary):
        out.print(line, highlight=False, markup=False)
    out.print(f"Steps 2-5 took {time.perf_counter() - job_started:.0f} s; the advisor estimated "
              f"{estimated:.0f} s in step 0.", highlight=False)
    out.print(f"Report with the curves, base vs tuned and sample answers (opens offline): {run.report_file}")

    out.rule("[bold]6 · Scale: a 4-bit base, and bigger models on GPUs")
    scale_demo(job, run, profile, steps, out, err)

    out.rule("[bold]7 · Serve it: an OpenAI-compatible API that collects feedback")
    serve_demo(run_dir, job.name, out_dir.resolve() / "feedback.db", out)
    gguf_demo(run_dir, out)

    out.rule("[bold]8 · All of it in a browser: Tailor Studio")
    studio_demo(out_dir / "studio", out)
    if sweep:
        out.rule("[bold]9 · Find the settings: a short sweep")
        sweep_demo(job, out_dir.resolve() / "sweep", steps, out)
    out.print(f"Done in {time.perf_counter() - started:.0f} s. Run folder: {run_dir}")
    out.print(f"Ask it yourself: tailor chat --run {run_dir} \"How do I pair my Ember?\"")
    return run_dir


ANSWERS = HERE / "answers.yaml"


def advise_demo(job, out_dir: Path, out: Console, err: Console) -> float:
    """The advisor on the bundled example: its verdict, the models it ranks first, and what this
    quickstart's own job will take on this machine (seconds, for the comparison after step 5)."""
    import torch

    from tailor.advise import advise, pick_hardware
    from tailor.advise.answers import load_answers
    from tailor.advise.calibrate import calibrate, load_calibration
    from tailor.advise.estimate import GB, Arch, fmt_duration
    from tailor.advise.profile import from_path
    from tailor.advise.report import write
    from tailor.advise.runtime import generate_s, job_time, workload_of
    from tailor.models.catalog import find_model

    def say(m):
        err.print(m, highlight=False, markup=False)

    if load_calibration(torch.get_num_threads()) is None:
        out.print("Measuring this machine once, so that time estimates are measured, not guessed:")
        calibrate(say=lambda m: out.print(m, highlight=False, markup=False))
    a = load_answers(ANSWERS)
    data = from_path(a.data.path, job.model.base, out_dir, say)
    adv = advise(a, data, pick_hardware(a))
    files = write(adv, out_dir)
    out.print(f"Use case: {a.use_case} ({a.goal}) · {data.examples} training examples · stage {a.stage} · "
              f"training within {a.deadline_hours * 60:.0f} min on {adv.hardware.label}", highlight=False)
    out.print(f"[bold]{adv.verdict.headline}[/]", highlight=False)
    for r in adv.verdict.reasons:
        out.print(f"  {'+' if r.side == 'for' else '-'} {r.case}: {r.text}", highlight=False, markup=False)
    for i, c in enumerate([c for c in adv.candidates if c.eligible][:3], 1):
        out.print(f"  model {i}: {c.model.name} ({'; '.join(c.why[:2])})", highlight=False, markup=False)
    out.print(f"  technique: {adv.technique.name} ({adv.technique.why})", highlight=False, markup=False)
    arch = Arch.of(find_model("smollm2-135m-instruct"))
    this_job = job.model_copy(deep=True)
    this_job.eval.enabled = True
    estimate = job_time(this_job, data, arch, adv.hardware)
    w = workload_of(this_job, data)  # step 4: three held-out questions, base and tuned
    side_by_side = 2 * generate_s(arch, adv.hardware, 3, 120, 3, data.mean_tokens / 2, w)
    seconds = estimate.total_s + side_by_side
    out.print(f"This quickstart trains the embedded {arch.name} (it works offline): the advisor expects "
              f"{fmt_duration(seconds)} for steps 2-5 (training {fmt_duration(estimate.training.seconds)}, "
              f"{estimate.training.memory.total / GB:.1f} GB).", highlight=False, markup=False)
    out.print(f"→ {files['advice.md']} (the full advice), {files.get('job.yaml', '')} (a starter job)",
              highlight=False, markup=False)
    return seconds, data


QLORA_STEPS = 10


def qlora_demo(job, lora_run, steps: int | None, out: Console, err: Console) -> None:
    """The same job with the base in 4-bit (QLoRA) for a few steps, read beside step 3's LoRA run."""
    from tailor.runs import Run
    from tailor.techniques import run as run_technique

    q = job.model_copy(deep=True)
    q.name, q.adapter.kind = f"{job.name}-qlora", "qlora"
    q.training.max_steps = min(steps or QLORA_STEPS, QLORA_STEPS)
    q.training.val_generate, q.training.early_stopping_patience = 0, 0
    out.print(f"QLoRA: the same job with the base's linear layers in 4-bit NF4 (adapter.kind: qlora), "
              f"{q.training.max_steps} steps:", highlight=False)
    q_run = Run(run_technique(q, console=err))
    at = q_run.summary()["steps"]
    for name, r in (("LoRA ", lora_run), ("QLoRA", q_run)):
        s = r.summary()
        loss = next((row["loss"] for row in reversed(r.metrics()) if row.get("type") == "train" and row["step"] <= at),
                    None)
        out.print(f"  {name} weights {s['weights_mb']:.0f} MB, peak memory {s['peak_memory_mb']:,} MB, "
                  f"{s['tokens_per_s_median'] or 0:.0f} tokens/s, train loss at step {at}: "
                  + (f"{loss:.3f}" if loss is not None else "-") + f" → {r.path}", highlight=False, markup=False)
    out.print("  On a model this small the activations, not the weights, fill the memory, and 4-bit rounding costs "
              "it more than it costs a large one: QLoRA is for models that do not fit with LoRA (docs/scaling.md).",
              highlight=False, markup=False)


def scale_demo(job, lora_run, profile, steps: int | None, out: Console, err: Console) -> None:
    """The same job with the base in 4-bit (QLoRA) beside step 3's LoRA run (a job that trains in
    stages only says so); then what the advisor would run for this data on GPUs it does not have
    here: one L4, and a full fine-tune on 4 A100s, with the command that launches it."""
    from tailor.advise import advise, pick_hardware
    from tailor.advise.answers import load_answers
    from tailor.advise.choose import way_of
    from tailor.advise.estimate import GB, fmt_duration
    from tailor.advise.report import launch_command
    from tailor.techniques import watchable

    if watchable(job):
        qlora_demo(job, lora_run, steps, out, err)
    else:  # every stage again in 4-bit would take as long as step 3 and show nothing new
        out.print(f"QLoRA (adapter.kind: qlora) trains every stage of a {job.technique} job with the base in 4-bit; "
                  "`tailor quickstart` shows it beside LoRA on the single-run job.", highlight=False)

    a = load_answers(ANSWERS)
    for target, count, method in (("l4", 1, "auto"), ("a100-80gb", 4, "full")):
        asked = a.model_copy(update={"compute": a.compute.model_copy(update={"target": target, "count": count}),
                                     "method": method, "deadline_hours": None})
        hw = pick_hardware(asked)
        top = advise(asked, profile, hw).top
        if top is None:
            continue
        plan = top.plan
        out.print(f"On {count} x {hw.label}{' (full fine-tuning)' if method == 'full' else ''}: "
                  f"{top.model.name}, {way_of(plan)}, {plan.memory.total / GB:.1f} GB per device, "
                  f"training {fmt_duration(plan.seconds)}:", highlight=False, markup=False)
        out.print(f"  {launch_command(asked)}", highlight=False, markup=False, soft_wrap=True)  # copyable: one line


def gguf_demo(run_dir: Path, out: Console) -> None:
    """The run as one GGUF file (q8_0) with an Ollama Modelfile: llama.cpp, Ollama, LM Studio."""
    from tailor.serve.to_gguf import export_gguf

    gguf_file = export_gguf(run_dir, "q8_0", say=lambda m: None)
    out.print(f"Elsewhere: {gguf_file} ({gguf_file.stat().st_size / 2 ** 20:.0f} MB, q8_0) and its Modelfile run in "
              f"llama.cpp, LM Studio and Ollama (ollama create quickstart -f {gguf_file.parent / 'Modelfile'}). "
              f"tailor export {run_dir} --format gguf --quant q8_0 also reads it back against the run (weights, "
              "answers, perplexity; about a minute): docs/deploy.md", highlight=False)


def serve_demo(run_dir: Path, name: str, db: Path, out: Console) -> None:
    """Serve the run on a free local port for one streamed question and a thumbs-up, then say how
    to serve it for real."""
    import httpx

    from tailor.serve.server import InThread, ServeSettings, build

    t = time.perf_counter()
    app, _, batcher = build(ServeSettings(runs=[f"{name}={run_dir}"], db=f"sqlite:///{db}"), say=lambda m: None)
    question = held_out_questions()[0]
    with InThread(app, batcher) as live:
        out.print(f"{name} and its base on {live.url}/v1 ({time.perf_counter() - t:.1f} s to load). "
                  f"A streamed request: {question}", highlight=False, markup=False)
        body = {"model": name, "messages": [{"role": "user", "content": question}], "temperature": 0,
                "max_tokens": 120, "stream": True}
        completion_id = None
        with httpx.stream("POST", f"{live.url}/v1/chat/completions", json=body, timeout=300) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line.removeprefix("data: "))
                    completion_id = chunk["id"]
                    if chunk["choices"]:
                        out.print(chunk["choices"][0]["delta"].get("content") or "", end="", highlight=False,
                                  markup=False, style="green")
        out.print()
        stored = httpx.post(f"{live.url}/v1/feedback", json={"completion_id": completion_id, "rating": "up"},
                            timeout=60).json()
        out.print(f"POST /v1/feedback {{\"completion_id\": \"{completion_id}\", \"rating\": \"up\"}} → feedback "
                  f"#{stored['id']} stored in {db}", highlight=False, markup=False)
        # Decoded in a batch, this seed would fail every request beside it: it is refused on arrival.
        refused = httpx.post(f"{live.url}/v1/chat/completions", json={**body, "stream": False, "seed": 2**70},
                             timeout=60)
        out.print(f"A request the model cannot take is refused alone, before it reaches a batch: seed 2**70 → "
                  f"{refused.status_code} {refused.json()['error']['message']}", highlight=False, markup=False)
    out.print("Serve it yourself, and ask it with curl or any OpenAI client (docs/deploy.md):", highlight=False)
    out.print(f"  tailor serve {name}={run_dir}", highlight=False, markup=False)
    request = json.dumps({"model": name, "messages": [{"role": "user", "content": "How do I pair my Ember?"}]})
    out.print(f"  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' -d '{request}'",
              highlight=False, markup=False, soft_wrap=True)
    out.print(f"Then: tailor feedback stats; tailor feedback export --out feedback/ (new training data); "
              f"tailor export {run_dir} (a merged model folder for transformers or vLLM)",
              highlight=False, markup=False)


TITLES = {"task": "task-specific, LoRA", "transfer": "transfer: domain text, then the task, top blocks only",
          "multitask": "multi-task: support answers and routing", "sequential": "sequential: three gated stages",
          "behavioral": "behavioral: demonstrations, then preference pairs (DPO)"}
_INTRO = {
    "task": "LoRA on every block, on the prepared support conversations.",
    "transfer": "Only the top 10 of 30 blocks get adapters. They first read the shop's handbook (plain text, loss on "
                "every token), then learn the support conversations.",
    "multitask": "Two tasks in one adapter: answering customers, and routing a message to its department (one word). "
                 "Each step draws its rows task by task, p ∝ size^(1/2), and validation reports each task.",
    "sequential": "Handbook, then support conversations, then routing; each stage starts from the adapter the one "
                  "before ended with. After each, every earlier stage's validation loss is measured again.",
    "behavioral": "First the support conversations (demonstrations), then 72 pairs that give the same facts in Wick's "
                  "voice (chosen) and in a flat corporate voice (rejected).",
}


def _technique_lines(run) -> list[str]:
    """What the technique did, from the run folder: stages and their gate, tasks drawn, rewards."""
    summary = run.summary()
    lines = []
    replayed = run.manifest().replay if run.has_manifest else None
    if replayed:
        lines.append(f"forgetting protection: {replayed['examples']} of the base model's own answers to general "
                     f"prompts were trained on beside the shop's conversations ({replayed['share']:.0%} of the mix; "
                     "training.replay)")
    if run.staged:
        for s in run.stages_record()["stages"]:
            losses = ", ".join(f"{n} {v:.3f}" for n, v in s["losses"].items() if v is not None)
            flag = ("; REGRESSION: " + ", ".join(f"{r['stage']} {r['rise']:+.0%}" for r in s["regressions"])
                    if s["regressions"] else "")
            lines.append(f"after stage {s['name']}: validation loss {losses}{flag}")
        if summary.get("stopped_at_stage"):
            lines.append(f"the gate stopped the run at stage {summary['stopped_at_stage']}; its result is the stage "
                         f"before (stages/{summary['result_of']})")
    final = summary.get("final_val") or {}
    if "val_preference_accuracy" in final:
        lines.append(f"held-out pairs after the preference stage: chosen preferred in "
                     f"{final['val_preference_accuracy']:.0%}, reward margin {final['val_reward_margin']:+.3f}")
    tasks = sorted(k.split("/", 1)[1] for k in final if k.startswith("val_loss/"))
    if tasks:
        lines.append("validation loss by task: " + ", ".join(f"{t} {final[f'val_loss/{t}']:.3f}" for t in tasks))
    return lines


def _task_lines(summary: dict) -> list[str]:
    """Multi-task evaluations: each task's base → tuned scores."""
    lines = []
    for task, v in (summary.get("tasks") or {}).items():
        keys = [k for k in ("rouge_l", "label_accuracy", "macro_f1") if v["tuned"].get(k) is not None]
        lines.append(f"task {task} ({v['examples']} test examples): " + ", ".join(
            f"{k} {v['base'][k]:.3f} → {v['tuned'][k]:.3f}" for k in keys))
    return lines


SWEEP_TRIALS = 4
SWEEP_STEPS = 16
SWEEP_SPACE = {"training.learning_rate": {"log_uniform": [3.0e-4, 3.0e-3]},
               "adapter.rank": {"categorical": [8, 16, 32]}}


def sweep_demo(job, folder: Path, steps: int | None, out) -> None:
    """`tailor quickstart --sweep`: a few short trials of the quickstart job on its prepared data,
    the learning rate and LoRA rank searched, the best kept (docs/sweeps.md)."""
    from tailor.spec import dump_job
    from tailor.sweep.space import space_yaml
    from tailor.sweep.study import sweep

    folder.mkdir(parents=True, exist_ok=True)
    short = job.model_copy(deep=True)
    short.training.max_steps = min(steps or SWEEP_STEPS, SWEEP_STEPS)
    short.eval.enabled = True
    short.eval.max_examples = 6
    short.output.dir = str(folder / "runs")
    job_file, space_file = folder / "job.yaml", folder / "space.yaml"
    write_atomic(job_file, dump_job(short))
    write_atomic(space_file, space_yaml(SWEEP_SPACE))
    out.print(f"{SWEEP_TRIALS} trials of {short.training.max_steps} steps: the learning rate and the LoRA rank "
              "searched by Optuna (TPE), each trial a run folder, hopeless ones pruned at a validation; ranked by "
              "the validation ROUGE-L gain, a trial that forgets general questions below every one that does not.",
              highlight=False)
    result = sweep(job_file, space_file, folder / "study", trials=SWEEP_TRIALS, say=lambda m, **k: out.print(
        m, highlight=False, soft_wrap=True))
    out.print(f"A longer one: tailor sweep {job_file} --space {space_file} --trials 12 --out "
              f"{folder / 'study'} (it goes on from these {result['trials']}); docs/sweeps.md", highlight=False)


def studio_demo(workspace: Path, out) -> None:
    """Start the studio on a workspace for a moment, read its home page, and say how to open it."""
    import httpx

    from tailor.serve.server import InThread
    from tailor.studio.server import build

    started = time.perf_counter()
    studio, app = build(workspace)
    try:
        with InThread(app) as live:
            home = httpx.get(live.url + "/", timeout=30)
    finally:
        studio.queue.stop()
    out.print(f"The studio answered on {live.url}/ ({home.status_code}, {time.perf_counter() - started:.1f} s): "
              "upload and prepare data, ask the advisor, edit and queue jobs, watch the curves, chat with a run "
              "and its base, rate answers, train on the ratings. Trainings are processes of their own: closing "
              "the page or the studio stops none of them.", highlight=False)
    out.print(f"Open it yourself: tailor studio --workspace {workspace}   (then http://127.0.0.1:7860; "
              "docs/studio.md)", highlight=False)
