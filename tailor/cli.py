"""The `tailor` command: one subcommand per step of a fine-tuning job."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from tailor.errors import TailorError

err = Console(stderr=True, soft_wrap=True)  # error messages stay whole lines, greppable
out = Console()


class _Commands(TyperGroup):
    """Every command runs inside this: an expected failure (TailorError) is its message and exit
    status, never a traceback; anything else is a bug and keeps its traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except TailorError as exc:
            err.print(f"[red]error:[/] {escape(str(exc))}", highlight=False)
            raise typer.Exit(exc.exit_code) from None


app = typer.Typer(cls=_Commands, add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  help="Tailor: fit a pre-trained LLM to one business — its task, its jargon, its voice.")


def _print_out(line: str) -> None:
    out.print(escape(line), highlight=False, soft_wrap=True)


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # PEFT still calls a transformers method that transformers 5 renamed; nothing for users to act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def _fail(exc: Exception, code: int = 2) -> None:
    err.print(f"[red]error:[/] {escape(str(exc))}", highlight=False)
    raise typer.Exit(code)


@app.command()
def prepare(
    inputs: list[Path] = typer.Argument(None, help="Files or folders: chat JSONL, Alpaca, ShareGPT, prompt/completion, "
                                        "preference pairs, CSV/TSV/Parquet, text, saved HF datasets."),
    out: Path = typer.Option(..., "--out", help="The prepared dataset folder to write; an earlier "
                            "prepared dataset there is replaced, any other non-empty folder is an error."),
    config: Optional[Path] = typer.Option(None, "--config", help="data.yaml (the keys of a job's data: section) "
                                          "or a job file."),
    model: Optional[str] = typer.Option(None, "--model", help="Base model whose tokenizer measures lengths "
                                        "[default: the job's model, or the embedded one]."),
    format_: str = typer.Option("auto", "--format", help="Record format of INPUTs; auto: detected per record."),
    task: Optional[str] = typer.Option(None, "--task", help="Task name for every record of INPUTs."),
    set_: list[str] = typer.Option([], "--set", help="Override an option: --set privacy.strategy=pseudonym"),
    num_proc: Optional[int] = typer.Option(None, "--num-proc", help="Worker processes for cleaning "
                                           "[default: up to 2]."),
    allow_from: list[Path] = typer.Option([], "--allow-from", help="A review file from an earlier run, edited: the "
                                          "values left in it are never replaced (added to privacy.allow). "
                                          "Repeatable."),
    review: Optional[Path] = typer.Option(None, "--review", help="Where to write the names anonymization replaced, "
                                          "for you to review (never inside OUT) [default: OUT.privacy-review.txt "
                                          "beside OUT]."),
):
    """Clean, de-duplicate, anonymize and split raw data into a prepared dataset folder with a data card."""
    from tailor.data.card import summary_lines
    from tailor.data.prepare import prepare as run_prepare
    from tailor.spec import EMBEDDED_DEFAULT, SourceSpec, load_data_config

    data, job_model = load_data_config(config, set_)
    try:
        sources = [SourceSpec(path=str(p), format=format_, task=task) for p in inputs or []]
    except ValueError as exc:
        _fail(ValueError(f"--format {format_}: {exc}"))
    data.privacy.allow_from = [*data.privacy.allow_from, *map(str, allow_from)]
    review = review or out.parent / f"{out.name}.privacy-review.txt"
    _quiet_libraries()
    result = run_prepare(sources, out, model=model or job_model or EMBEDDED_DEFAULT, config=data,
                         num_proc=num_proc, say=lambda m: err.print(escape(m), highlight=False), review=review)
    for line in summary_lines(result.card):
        _print_out(line)
    _print_out(f"→ {result.out} (card.md, card.html, rejects.jsonl)")
    if result.review:
        _print_out(f"→ {result.review}: the names replaced, for you only (do not share it); to keep the public "
                   f"ones, delete the private people's lines and prepare again with --allow-from {result.review}")


@app.command()
def train(
    job_file: Path = typer.Argument(..., help="The job YAML file (see examples/ and `tailor spec`)."),
    set_: list[str] = typer.Option([], "--set", help="Override a job key: --set training.learning_rate=1e-4"),
    resume: bool = typer.Option(False, "--resume", help="Continue the latest unfinished run of this job from its "
                                "last checkpoint."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No live progress bar "
                                     "(logs still go to metrics.jsonl)."),
    from_run: Optional[Path] = typer.Option(None, "--from-run", help="Continue from a finished (deployed) run's "
                                            "adapter or weights, on this job's data: continual fine-tuning "
                                            "(model.from_run)."),
    until_gate_passes: int = typer.Option(0, "--until-gate-passes", metavar="N", min=0,
                                          help="When the evaluation gate fails, train again with the next settings "
                                          "of the ladder (docs/evaluation.md), at most N more times; each attempt "
                                          "is its own run folder."),
):
    """Fine-tune a base model as the job file says; writes a run folder under output.dir/name/."""
    from tailor.runs import Run
    from tailor.spec import load_job
    from tailor.techniques import run as run_technique

    overrides = set_ + ([f"model.from_run={from_run.resolve()}"] if from_run else [])
    _quiet_libraries()
    attempts: list[tuple[Run, list[str]]] = []
    tried: list[str] = []
    while True:
        job = load_job(job_file, overrides + tried)
        run = Run(run_technique(job, resume=resume and not attempts, console=err, show_progress=not no_progress))
        attempts.append((run, list(tried)))
        if not run.gate_failed():
            break
        step = _next_rung(run, attempts[0][0])
        if len(attempts) > until_gate_passes or step is None:
            # Training worked, so the exit status stays 0; `tailor eval RUN` is the check that fails.
            err.print(f"[yellow]the evaluation gate failed[/] (eval.gate): the model is saved in {run.path}; "
                      f"see {run.eval_summary_file}. `tailor eval {run.path}` exits with status 1 on it."
                      + (f"\nnext try: tailor train {job_file} " + " ".join(
                          f"--set {o}" for o in _merged(overrides + tried, step.overrides()))
                         if step is not None else ""), highlight=False)
            break
        err.print(f"[yellow]gate failed[/]: {step.cause}. Attempt {len(attempts) + 1} of {until_gate_passes + 1}: "
                  f"{step.why}", highlight=False)
        tried = _merged(tried, step.overrides())
    if len(attempts) > 1:
        _print_attempts(attempts)


def _next_rung(run, first):
    from tailor.evaluate.run import next_try

    start_lr = ((first.raw_job() or {}).get("training") or {}).get("learning_rate")
    return next_try(run, run.eval_summary()["gate"], start_lr if isinstance(start_lr, (int, float)) else None)


def _merged(overrides: list[str], more: list[str]) -> list[str]:
    """`more` over `overrides`: a key set again takes the new value."""
    keys = {o.partition("=")[0] for o in more}
    return [o for o in overrides if o.partition("=")[0] not in keys] + more


def _print_attempts(attempts: list) -> None:
    table = Table(title="--until-gate-passes: the attempts")
    for col in ("#", "run", "settings", "gate"):
        table.add_column(col, overflow="fold")
    for i, (run, tried) in enumerate(attempts, 1):
        gate = (run.eval_summary() or {}).get("gate") or {}
        table.add_row(str(i), str(run.path), " ".join(tried) or "as the job says",
                      "passed" if gate.get("passed") else "[red]FAILED[/]")
    out.print(table)
    passed = [run for run, _ in attempts if ((run.eval_summary() or {}).get("gate") or {}).get("passed")]
    _print_out(f"passed: {passed[0].path}" if passed else "no attempt passed the gate")


@app.command(name="eval")
def eval_(
    run_dir: Path = typer.Argument(..., help="A finished run folder (runs/NAME/RUN-ID)."),
    data: list[Path] = typer.Option([], "--data", help="Test data: a prepared folder (its test split) or files "
                                    "[default: the run's prepared test split]."),
    set_: list[str] = typer.Option([], "--set", help="Override an eval key: --set eval.gate.min_gain=0.05"),
):
    """The tuned model against its base on the test split and a general-skills probe; exit status 1
    when the job's gate (eval.gate) fails."""
    from tailor.evaluate.report import gate_lines, summary_table
    from tailor.evaluate.run import evaluate
    from tailor.runs import Run
    from tailor.spec import load_job

    run = Run(run_dir)
    spec = load_job(run.job_file, set_).eval if run.exists else None
    _quiet_libraries()
    summary = evaluate(run, data=[str(p) for p in data] or None, spec=spec,
                       say=lambda m: err.print(escape(m), highlight=False))
    out.print(summary_table(summary))
    for line in gate_lines(summary):
        _print_out(line)
    files = ", ".join(f.relative_to(run.eval_dir).as_posix()
                      for f in (run.eval_summary_file, run.eval_examples_file, run.retention_file))
    _print_out(f"→ {run.eval_dir} ({files})")
    if not summary["gate"]["passed"]:
        raise typer.Exit(1)


@app.command()
def chat(
    prompt: str = typer.Argument(..., help="What to ask."),
    model: Optional[str] = typer.Option(None, "--model", help="A base model: embedded:NAME, hub id, folder "
                                        "or .gguf file."),
    run: Optional[Path] = typer.Option(None, "--run", help="A finished run folder (runs/NAME/RUN-ID)."),
    system: Optional[str] = typer.Option(None, "--system", help="An optional system message."),
    max_new_tokens: int = typer.Option(200, help="Longest answer in tokens."),
    dtype: str = typer.Option("auto", help="auto (bfloat16 where the hardware is fast at it), bfloat16 or float32."),
):
    """Print one greedy answer from a base model or a fine-tuned run, using the model's chat template."""
    from tailor.models.generate import answer, load_base, load_run
    from tailor.spec import EMBEDDED_DEFAULT

    if model and run:
        _fail(ValueError("give --model or --run, not both"))
    if dtype not in ("auto", "bfloat16", "float32"):
        _fail(ValueError(f"--dtype {dtype}: use auto, bfloat16 or float32"))
    _quiet_libraries()
    lm, tokenizer = load_run(run, dtype) if run else load_base(model or EMBEDDED_DEFAULT, dtype)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    out.print(answer(lm, tokenizer, [messages], max_new_tokens)[0], highlight=False, markup=False)


@app.command()
def advise(
    answers: Optional[Path] = typer.Option(None, "--answers", help="answers.yaml: the answers to every question "
                                           "(docs/advise.md); flags below override it. Without it or flags, asks."),
    out_dir: Path = typer.Option(Path("advice"), "--out", help="Folder for advice.md, advice.json and job.yaml."),
    use_case: Optional[str] = typer.Option(None, "--use-case", help="jargon, localization, voice, compliance, "
                                           "moderation, accuracy or general."),
    data: Optional[str] = typer.Option(None, "--data", help="Data files, a folder, or a prepared folder (profiled)."),
    examples: Optional[int] = typer.Option(None, "--examples", help="Without --data: how many examples you have."),
    languages: Optional[str] = typer.Option(None, "--languages", help="Comma-separated ISO codes, e.g. en,de."),
    gpu: Optional[str] = typer.Option(None, "--gpu", help="Target GPU (see --list-hardware) instead of this machine."),
    gpus: Optional[int] = typer.Option(None, "--gpus", help="How many of them (on each machine)."),
    nodes: Optional[int] = typer.Option(None, "--nodes", help="How many machines with --gpus each, launched "
                                        "together (torchrun)."),
    method: Optional[str] = typer.Option(None, "--method", help="What trains: auto (LoRA, QLoRA where LoRA does "
                                         "not fit), lora, qlora, full or freeze."),
    budget: Optional[float] = typer.Option(None, "--budget", help="Compute budget in US dollars."),
    deadline: Optional[float] = typer.Option(None, "--deadline", help="Hours the training may take at most."),
    expertise: Optional[str] = typer.Option(None, "--expertise", help="none, some or expert."),
    stage: Optional[str] = typer.Option(None, "--stage", help="exploration, market-test, pilot or production."),
    hardware: Optional[Path] = typer.Option(None, "--hardware", help="YAML of hardware entries or prices to add "
                                            "or override."),
    price: list[str] = typer.Option([], "--price", help="Price per device-hour: --price a100-80gb=1.4"),
    offline: Optional[bool] = typer.Option(None, "--offline/--online", help="--offline: recommend only models "
                                           "already here (no downloads); --online: downloads are possible "
                                           "[default: checked when training here]."),
    model: list[str] = typer.Option([], "--model", help="A model folder on this machine (config.json, "
                                    "*.safetensors): it counts as the catalog model of its shape, here. Repeatable."),
    calibrate_: bool = typer.Option(False, "--calibrate", help="Measure this machine first (about a minute); stored."),
    list_hardware: bool = typer.Option(False, "--list-hardware", help="Print the hardware table and exit."),
    ask: bool = typer.Option(False, "--ask", help="Ask the questions even when input is not a terminal "
                             "(piped answers)."),
):
    """Should you fine-tune, which base model, which technique and settings, and what it costs —
    before anything runs."""
    import sys

    from tailor.advise import advise as run_advice
    from tailor.advise import local_models, pick_hardware, profile_data
    from tailor.advise.answers import load_answers
    from tailor.advise.estimate import hardware_table, with_overrides
    from tailor.advise.report import markdown, write

    _quiet_libraries()
    try:
        prices = {k: float(v) for k, v in (p.split("=", 1) for p in price)}
        table = with_overrides(hardware_table(), hardware, prices)
    except (ValueError, KeyError, OSError) as exc:
        _fail(ValueError(f"--price/--hardware: {exc}; write --price NAME=USD_PER_HOUR"))
    if list_hardware:
        _print_hardware(table)
        return
    if calibrate_:
        from tailor.advise.calibrate import calibrate

        calibrate(say=lambda line: err.print(escape(line), highlight=False))
    flags = {"use_case": use_case, "data.path": data, "data.examples": examples, "compute.target": gpu,
             "compute.count": gpus, "compute.nodes": nodes, "method": method, "budget_usd": budget,
             "deadline_hours": deadline, "expertise": expertise,
             "stage": stage, "languages": languages.split(",") if languages else None, "offline": offline,
             "local_models": model or None}
    flags = {k: v for k, v in flags.items() if v is not None}
    if answers is None and not flags and calibrate_:
        return
    if answers is None and not flags:
        if not (ask or sys.stdin.isatty()):
            _fail(ValueError("no answers: give --answers answers.yaml or flags (tailor advise --help), "
                             "or run it in a terminal to be asked"))
        flags = _ask_advice_questions()
    a = load_answers(answers, flags)
    hw = pick_hardware(a, table)
    here = local_models(a)  # before profiling: a bad --model folder fails fast
    err.print("models here: " + (", ".join(f"{name} ({f.label})" for name, f in here.found.items()) or "none")
              + (f"; {here.offline}" if here.offline else ""), highlight=False)
    adv = run_advice(a, profile_data(a, out_dir, say=lambda line: err.print(escape(str(line)), highlight=False)), hw,
                     local=here)
    files = write(adv, out_dir)
    from rich.markdown import Markdown

    out.print(Markdown(markdown(adv)))
    err.print("wrote " + ", ".join(str(p) for p in files.values()), highlight=False)


def _ask_advice_questions() -> dict:
    """The advisor's questions, one at a time, in a terminal."""
    from tailor.advise.answers import STAGES, USE_CASES

    def choose(question: str, options: dict[str, str], default: str) -> str:
        out.print(f"\n[bold]{question}[/]")
        for key, text in options.items():
            out.print(f"  [cyan]{key}[/]: {escape(text)}")
        while (value := typer.prompt("answer", default=default).strip()) not in options:
            out.print(f"[red]{escape(value)}[/]: choose one of {', '.join(options)}")
        return value

    a: dict = {"use_case": choose("What is the model for?", USE_CASES, "voice")}
    path = typer.prompt("\nYour data: a file or folder (empty: give a count instead)", default="", show_default=False)
    if path:
        a["data.path"] = path
    else:
        a["data.examples"] = typer.prompt("How many examples (conversations) do you have?", type=int)
    a["languages"] = typer.prompt("Languages (comma-separated ISO codes)", default="en").split(",")
    target = typer.prompt("Train on: 'local' (this machine) or a GPU (t4, l4, a10g, rtx-4090, l40s, a100-40gb, "
                          "a100-80gb, h100-80gb, h200, b200)", default="local")
    a["compute.target"] = target
    if target != "local":
        a["compute.count"] = typer.prompt("How many GPUs?", default=1, type=int)
    budget = typer.prompt("Budget in US dollars (empty: none)", default="", show_default=False)
    if budget:
        a["budget_usd"] = float(budget)
    deadline = typer.prompt("Hours the training may take (empty: no limit)", default="", show_default=False)
    if deadline:
        a["deadline_hours"] = float(deadline)
    a["expertise"] = choose("Machine-learning expertise in your team?", {"none": "nobody", "some": "some experience",
                                                                        "expert": "ML engineers"}, "some")
    a["stage"] = choose("Project stage?", STAGES, "production")
    return a


def _print_hardware(table) -> None:
    t = Table(title="hardware (prices: per device-hour; override with --price NAME=USD or --hardware FILE)")
    for col in ("name", "device", "memory", "peak bf16", "bandwidth", "price"):
        t.add_column(col)
    for hw in table.values():
        t.add_row(hw.name, hw.label, f"{hw.memory_gb:g} GB", f"{hw.peak_tflops:g} TFLOP/s",
                  f"{hw.bandwidth_gbs:g} GB/s", f"${hw.usd_per_hour:.2f}")
    out.print(t)


models_app = typer.Typer(no_args_is_help=True, help="The model catalog: open-weight base models and their facts.")
app.add_typer(models_app, name="models")


@models_app.command("list")
def models_list(family: Optional[str] = typer.Option(None, "--family", help="Only this family, e.g. Qwen3."),
                commercial: bool = typer.Option(False, "--commercial", help="Only licences that allow commercial use."),
                language: Optional[str] = typer.Option(None, "--language", help="Only models that list "
                                                       "this language.")):
    """Every model in the catalog: size, context, languages, licence."""
    from tailor.models.catalog import load_catalog, size_label

    models = [m for m in load_catalog() if (not family or m.family.casefold() == family.casefold())
              and (not commercial or m.commercial_use) and (not language or language in m.languages)]
    table = Table(title=f"{len(models)} models (tailor models show NAME for one)")
    for col in ("name", "family", "size", "layers", "context", "languages", "licence", "commercial"):
        table.add_column(col, overflow="fold")
    for m in models:
        table.add_row(m.name, m.family, size_label(m.params), str(m.layers), f"{m.context_length:,}",
                      ",".join(m.languages[:6]) + ("…" if len(m.languages) > 6 else ""), m.license,
                      "yes" if m.commercial_use else "[red]no[/]")
    out.print(table)


@models_app.command("show")
def models_show(name: str = typer.Argument(..., help="A catalog name (tailor models list) or hub id.")):
    """One model's facts, and what fine-tuning it takes on each GPU of the hardware table."""
    from tailor.advise.estimate import GB, USABLE_MEMORY, Arch, Workload, hardware_table, memory
    from tailor.models.catalog import find_model, size_label

    m = find_model(name)
    for key, value in m.model_dump().items():
        out.print(f"[bold]{key}[/]: {escape(str(value))}", highlight=False)
    arch = Arch.of(m)
    out.print(f"\nMemory to fine-tune {size_label(m.params)} (rows of 1,024 tokens, 1 per micro-step):")
    for method in ("full", "lora", "qlora"):
        need = memory(arch, Workload(method=method, seq_len=1024, micro_batch=1), "gpu").total / GB
        fits = [hw.name for hw in hardware_table().values() if need <= hw.memory_gb * USABLE_MEMORY]
        out.print(f"  {method:<6} {need:7.1f} GB   fits: {', '.join(fits) or 'no single GPU here'}", highlight=False)


runs_app = typer.Typer(no_args_is_help=True, help="The run folders: list them, show one, compare several.")
app.add_typer(runs_app, name="runs")
RUNS_DIR = typer.Option(Path("runs"), "--dir", help="The output directory that holds NAME/RUN-ID folders.")


@runs_app.command("list")
def runs_list(output_dir: Path = RUNS_DIR):
    """Every run under --dir: status, base model, losses, the evaluation's gain and gate."""
    from tailor.runs import Run
    from tailor.track.runs import format_value, load_run_record, measure

    runs = Run.find(output_dir)
    if not runs:
        _fail(FileNotFoundError(f"no runs under {output_dir}; train one with `tailor train JOB` "
                                f"or point --dir at the job's output.dir"), code=1)
    table = Table(title=f"runs under {output_dir}")
    for col in ("run", "status", "base model", "steps", "train loss", "val loss", "ROUGE-L gain", "gate"):
        table.add_column(col, overflow="fold")
    for run in runs:
        r = load_run_record(run)
        gate = measure(r, ("eval", "gate", "passed"))
        table.add_row(f"{r['name']}/{r['id']}", r["status"], str(measure(r, ("manifest", "model", "source")) or "–"),
                      *(format_value(measure(r, w)) for w in (("train", "steps"), ("train", "final_train_loss"),
                                                               ("train", "final_val_loss"),
                                                               ("eval", "gain", "rouge_l"))),
                      "–" if gate is None else ("passed" if gate else "[red]FAILED[/]"))
    out.print(table)


@runs_app.command("show")
def runs_show(run: str = typer.Argument(..., help="A run folder, NAME/RUN-ID, RUN-ID or NAME (its latest run)."),
              output_dir: Path = RUNS_DIR):
    """One run: where it is, what it trained, how it did."""
    from tailor.evaluate.report import gate_lines, summary_table
    from tailor.runs import Run
    from tailor.track.runs import MEASURES, flatten, format_value, load_run_record, measure

    found = Run.resolve(run, output_dir)
    r = load_run_record(found)
    m = r["manifest"]
    table = Table(title=f"{r['name']}/{r['id']} ({r['status']})", show_header=False)
    table.add_column("key")
    table.add_column("value", overflow="fold")
    table.add_row("folder", r["path"])
    table.add_row("base model", str(measure(m, ("model", "source")) or "–"))
    job = flatten(r["job"])
    for key in ("technique", "adapter.kind", "training.learning_rate", "training.epochs", "training.max_steps",
                "training.batch_size", "training.max_seq_len"):
        table.add_row(key, format_value(job.get(key)))
    for label, where in MEASURES:
        value = measure(r, where)
        if value is not None:
            table.add_row(label, format_value(value))
    out.print(table)
    if r["eval"]:
        out.print(summary_table(r["eval"]))
        for line in gate_lines(r["eval"]):
            _print_out(line)
    if found.report_file.exists():
        _print_out(f"report: {found.report_file}")


@runs_app.command("compare")
def runs_compare(runs: list[str] = typer.Argument(..., help="Two or more runs (folders, NAME/RUN-ID, RUN-ID or NAME)."),
                 output_dir: Path = RUNS_DIR):
    """Runs side by side: the job keys that differ, then every measure."""
    from tailor.runs import Run
    from tailor.track.runs import MEASURES, config_differences, format_value, load_run_record, measure

    if len(runs) < 2:
        _fail(ValueError("compare needs at least two runs"))
    records = [load_run_record(Run.resolve(ref, output_dir)) for ref in runs]
    names = [f"{r['name']}/{r['id']}" for r in records]
    diff = Table(title="job keys that differ")
    diff.add_column("key")
    for name in names:
        diff.add_column(name, overflow="fold")
    differences = config_differences(records)
    for key, values in differences:
        diff.add_row(key, *(format_value(v) for v in values))
    out.print(diff if differences else "The runs' jobs are identical.")
    table = Table(title="measures")
    table.add_column("measure")
    for name in names:
        table.add_column(name, justify="right")
    for label, where in MEASURES:
        values = [measure(r, where) for r in records]
        if any(v is not None for v in values):
            table.add_row(label, *(format_value(v) for v in values))
    out.print(table)


@runs_app.command("layout")
def runs_layout():
    """Every file and folder a run folder may hold, as the Markdown table of docs/runs.md."""
    from tailor.runs import Run

    print(Run.layout_markdown(), end="")


@app.command()
def spec(
    section: Optional[str] = typer.Argument(None, help="Only keys under this section, e.g. training."),
    markdown: bool = typer.Option(False, "--markdown", help="Print the Markdown table of docs/job-spec.md."),
):
    """Every key of the job file with its type, default and what it does."""
    from tailor.spec import describe_fields, spec_markdown

    if markdown:
        print(spec_markdown(), end="")
        return

    table = Table(show_lines=False)
    for col in ("key", "type", "default", "description"):
        table.add_column(col, overflow="fold")
    for key, type_name, default, doc in describe_fields():
        if section is None or key.startswith(section.rstrip(".") + ".") or key == section:
            table.add_row(key, type_name, default, doc)
    out.print(table)


@app.command()
def quickstart(
    out_dir: Path = typer.Option(Path("runs"), "--out", help="Where the run folder goes."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps (default: the bundled job's epochs)."),
    technique: str = typer.Option("task", "--technique", help="task, transfer, multitask, sequential or behavioral: "
                                  "the bundled example trained with that technique."),
    sweep_: bool = typer.Option(False, "--sweep", help="Add step 9: a short sweep of the learning rate and LoRA rank "
                                "(4 trials, a few minutes more)."),
):
    """The whole chain on the bundled example: prepare the data, train on the embedded model, show
    the base and tuned answers to held-out questions side by side, and evaluate."""
    from tailor.quickstart import TECHNIQUES, run_quickstart

    if technique not in TECHNIQUES:
        _fail(ValueError(f"--technique {technique}: unknown; use one of {', '.join(TECHNIQUES)}"))
    _quiet_libraries()
    run_quickstart(out_dir, steps, out, err, technique, sweep=sweep_)



@app.command()
def serve(
    runs: list[str] = typer.Argument(None, help="Finished run folders to serve (NAME=FOLDER to choose the model name) "
                                     "[default: none, the base model alone]."),
    base: Optional[str] = typer.Option(None, "--base", help="A base model to serve as well [default: the runs' base; "
                                       "without runs, the embedded model]."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; anything but loopback needs --api-key."),
    port: int = typer.Option(8000, "--port"),
    api_key: list[str] = typer.Option([], "--api-key", envvar="TAILOR_API_KEY",
                                      help="Accepted bearer key(s), repeatable or comma-separated; clients send "
                                      "`Authorization: Bearer KEY`."),
    db: str = typer.Option("sqlite:///runs/feedback.db", "--db", help="Feedback store: a SQLAlchemy URL."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bfloat16 where the hardware is fast at it), "
                              "bfloat16 or float32."),
    max_batch: int = typer.Option(8, "--max-batch", help="Most requests decoded together."),
    max_tokens: int = typer.Option(1024, "--max-tokens", help="Most tokens a request may ask for."),
    max_body: int = typer.Option(1 << 20, "--max-body", help="Largest request body in bytes."),
    max_waiting: int = typer.Option(256, "--max-waiting", min=1, help="Most requests waiting for a row; more get "
                                    "a 503 with Retry-After."),
    request_timeout: float = typer.Option(600.0, "--request-timeout", min=0.001, help="Seconds a request may take "
                                          "from arrival to its last token; later it is cancelled (504)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Torch threads [default: torch's choice]."),
    log_prompts: bool = typer.Option(False, "--log-prompts", help="Log prompts and answers, "
                                     "anonymized (see --privacy)."),
    privacy: Optional[Path] = typer.Option(None, "--privacy", help="data.yaml or job file whose privacy: section "
                                           "configures the anonymizer for --log-prompts."),
    engine: str = typer.Option("transformers", "--engine", help="transformers (CPU or GPU) or vllm "
                               "(GPU, when installed)."),
    admin_key: Optional[str] = typer.Option(None, "--admin-key", envvar="TAILOR_ADMIN_KEY",
                                            help="The key POST /v1/adapters needs, not an --api-key; "
                                            "without one the route is closed."),
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="The folder whose finished LoRA runs "
                                  "POST /v1/adapters may add, as NAME/RUN-ID."),
):
    """An OpenAI-compatible API over the base model and any number of runs, with feedback collection."""
    from tailor.serve.app import Limits
    from tailor.serve.server import ServeSettings, api_keys_from
    from tailor.serve.server import serve as run_server

    if dtype not in ("auto", "bfloat16", "float32"):
        _fail(ValueError(f"--dtype {dtype}: use auto, bfloat16 or float32"))
    settings = ServeSettings(runs=list(runs or []), base=base, host=host, port=port,
                             api_keys=api_keys_from(api_key), db=db, dtype=dtype, max_batch=max_batch, threads=threads,
                             limits=Limits(max_tokens=max_tokens, max_body_bytes=max_body, max_waiting=max_waiting,
                                           request_timeout=request_timeout), log_prompts=log_prompts,
                             privacy=str(privacy) if privacy else None, engine=engine, admin_key=admin_key,
                             runs_dir=str(runs_dir))
    _quiet_libraries()
    run_server(settings, say=lambda m: err.print(escape(m), highlight=False))


@app.command()
def studio(
    workspace: Path = typer.Option(Path("studio"), "--workspace", help="The folder that holds the studio's data, "
                                   "jobs, runs and queue (created when missing)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; anything but loopback needs --token."),
    port: int = typer.Option(7860, "--port"),
    token: Optional[str] = typer.Option(None, "--token", envvar="TAILOR_STUDIO_TOKEN",
                                        help="A secret the browser must present (the printed address carries it)."),
    max_running: int = typer.Option(1, "--max-running", help="Trainings run at once; more wait in the queue."),
    max_upload_mb: int = typer.Option(200, "--max-upload-mb", help="Largest file the Data page takes."),
):
    """Tailor Studio: the seven steps in a browser, with a training queue that outlives the page."""
    from tailor.studio.server import serve as run_studio

    run_studio(workspace, host, port, token, max_running, max_upload_mb, say=_print_out)


@app.command()
def sweep(
    job_file: Path = typer.Argument(..., help="The job YAML file whose settings are searched."),
    space: Path = typer.Option(..., "--space", help="space.yaml: job keys and their distributions (docs/sweeps.md); "
                               "tailor advise writes one around its starting point."),
    trials: int = typer.Option(12, "--trials", min=1, help="Trials to finish (pruned ones count)."),
    timeout: Optional[float] = typer.Option(None, "--timeout", metavar="HOURS", help="Start no trial after this "
                                            "many hours; the same command later goes on."),
    pruner: str = typer.Option("median", "--pruner", help="median, asha or none: stop hopeless trials at a "
                               "validation (never within their warm-up steps)."),
    keep: str = typer.Option("best", "--keep", help="best: delete every other trial's weights (their metrics and "
                             "reports stay); all: keep them."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="The sweep folder [default: output.dir/sweeps/NAME]; "
                                           "running the command again there resumes it."),
):
    """Search the settings (learning rate, epochs, LoRA rank, trained blocks …) for the best validation gain
    on the gate's metric without breaking its retention limits; writes best.yaml and sweep.html."""
    from tailor.sweep.study import sweep as run_sweep

    _quiet_libraries()
    result = run_sweep(job_file, space, out_dir, trials, timeout, pruner, keep,
                       say=lambda line, **kw: out.print(line, soft_wrap=True, **kw))
    if result["best"] is None and result["trials"] >= trials:
        raise typer.Exit(1)


@app.command(name="export")
def export_(
    run_dir: Path = typer.Argument(..., help="A finished run folder (runs/NAME/RUN-ID)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="The folder to write [default: RUN/export; with "
                                           "--format gguf RUN/gguf]."),
    dtype: str = typer.Option("float32", "--dtype", help="Weights dtype: float32 (answers exactly as the run does), "
                              "bfloat16 or float16 (half the size; a token near a tie may change), auto (the base's)."),
    check: bool = typer.Option(True, "--parity/--no-parity", help="Check that adapter, merged model and server "
                               "give the same greedy tokens."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Prompts for the parity check: JSONL of "
                                           "{messages} or {prompt} [default: the run's test questions]."),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", help="Tokens generated per prompt in the parity check."),
    format_: str = typer.Option("folder", "--format", help="folder: a merged transformers folder; gguf: one GGUF "
                                "file for llama.cpp, Ollama and LM Studio, and an Ollama Modelfile [in RUN/gguf]."),
    quant: str = typer.Option("f16", "--quant", help="--format gguf: f16, bf16, q8_0 (half of f16) or q4_0 (a "
                              "third; the embedding kept at q8_0)."),
):
    """A standalone merged model folder for transformers and vLLM, or a GGUF file and an Ollama Modelfile,
    checked token for token against the run."""
    from tailor.serve.export import export_run, parity, parity_lines, read_prompts, write_parity

    _quiet_libraries()
    if format_ not in ("folder", "gguf"):
        _fail(ValueError(f"--format {format_}: use folder or gguf"))
    if format_ == "gguf":
        _export_gguf(run_dir, out_dir, quant, check, read_prompts(prompts) if prompts else None, max_new_tokens)
        return
    folder = export_run(run_dir, out_dir, dtype, say=_print_out)
    if not check:
        return
    result = parity(run_dir, folder, read_prompts(prompts) if prompts else None, max_new_tokens)
    written = write_parity(folder, result)
    for line in parity_lines(result):
        _print_out(line)
    _print_out(f"→ {written}")
    if result["agree"] < result["prompts"]:
        raise typer.Exit(1)


def _export_gguf(run_dir: Path, out_dir: Optional[Path], quant: str, check: bool, prompts, max_new_tokens: int):
    from tailor.files import write_json
    from tailor.serve.to_gguf import export_gguf, gguf_parity, gguf_parity_lines

    gguf_file = export_gguf(run_dir, quant, out_dir, say=_print_out)
    if not check:
        return
    result = gguf_parity(run_dir, gguf_file, prompts, max_new_tokens)
    written = gguf_file.parent / f"gguf-parity-{quant}.json"
    write_json(written, result, ensure_ascii=False)
    for line in gguf_parity_lines(result):
        _print_out(line)
    _print_out(f"→ {written}")
    # The file must hold exactly the rounded weights and render the prompts as the run does; at
    # f16/bf16 its answers must also be the run's (q8_0 and q4_0 change some: reported, not failed).
    if not result["weights"]["exact"] or result["same_prompts"] < result["prompts"] or (
            quant in ("f16", "bf16") and result["agree"] < result["prompts"]):
        raise typer.Exit(1)


feedback_app = typer.Typer(no_args_is_help=True, help="What users said about served answers, and the data it makes.")
app.add_typer(feedback_app, name="feedback")
FEEDBACK_DB = typer.Option("sqlite:///runs/feedback.db", "--db", help="The feedback store `tailor serve` wrote to.")


@feedback_app.command("list")
def feedback_list(db: str = FEEDBACK_DB, model: Optional[str] = typer.Option(None, "--model"),
                  limit: int = typer.Option(20, "--limit")):
    """The newest feedback: rating, prompt, answer and correction."""
    import time

    from tailor.feedback.store import FeedbackStore

    table = Table(show_lines=True, expand=True)
    for column in ("when", "model", "rating", "prompt", "answer", "correction / comment"):
        table.add_column(column, overflow="fold")
    for r in FeedbackStore(db).rows(model=model, limit=limit):
        prompt = r["prompt"] if isinstance(r["prompt"], str) else r["prompt"][-1]["content"]
        note = " / ".join(x for x in (r["correction"], r["comment"]) if x)
        table.add_row(time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created"])), r["model"], r["rating"] or "–",
                      prompt, r["answer"], note or "–")
    out.print(table)


@feedback_app.command("stats")
def feedback_stats(db: str = FEEDBACK_DB):
    """Per model: completions served, feedback received, mean score (0 bad … 1 good), corrections."""
    from tailor.feedback.store import FeedbackStore

    table = Table()
    for column in ("model", "completions", "feedback", "mean score", "corrections"):
        table.add_column(column)
    for name, s in FeedbackStore(db).counts().items():
        table.add_row(name, str(s["completions"]), str(s["feedback"]),
                      "–" if s["mean_score"] is None else f"{s['mean_score']:.2f}", str(s["corrections"]))
    out.print(table)


@feedback_app.command("export")
def feedback_export(out_dir: Path = typer.Option(..., "--out", help="Folder for supervised.jsonl and "
                                                 "preferences.jsonl."),
                    db: str = FEEDBACK_DB,
                    model: Optional[str] = typer.Option(None, "--model", help="Only this served model."),
                    min_score: float = typer.Option(0.75, "--min-score", help="Answers rated at least this (0-1) are "
                                                    "kept as examples and preferred in pairs."),
                    max_bad: float = typer.Option(0.25, "--max-bad", help="Answers rated at most this are "
                                                  "rejected in pairs.")):
    """Corrections and well-rated answers → supervised.jsonl; (worse, better) answers → preferences.jsonl."""
    from tailor.feedback.export import export
    from tailor.feedback.store import FeedbackStore

    result = export(FeedbackStore(db), out_dir, model, min_score, max_bad)
    _print_out(f"{result.n_completions} rated or corrected completions → {result.n_supervised} supervised examples "
               f"({result.supervised}), {result.n_pairs} preference pairs ({result.preferences})")
    _print_out(f"next: tailor prepare {result.supervised} --out {out_dir / 'prepared'}, then "
               f"tailor train JOB --from-run RUN_DIR with data.train: [{out_dir / 'prepared'}]")
