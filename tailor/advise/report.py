"""The advice as Markdown (advice.md), JSON (advice.json) and a starter job file (job.yaml)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tailor.advise import Advice
from tailor.advise.answers import USE_CASES
from tailor.advise.choose import TECHNIQUES, way_of
from tailor.advise.estimate import GB, fmt_duration
from tailor.models.catalog import size_label
from tailor.models.local import fmt_gb

SHOWN_MODELS, SHOWN_EXCLUDED = 5, 6


def money(usd: float, hourly: float) -> str:
    return "your own machine" if hourly == 0 else f"${usd:,.2f}"


def markdown(adv: Advice) -> str:
    a, v, d, hw = adv.answers, adv.verdict, adv.data, adv.hardware
    out = [f"# Fine-tuning advice: {v.headline}", ""]
    if a.goal:
        out += [f"Goal: {a.goal}", ""]
    out += [f"Use case: {USE_CASES[a.use_case]}. Stage: {a.stage}. Languages: {', '.join(a.languages)}. "
            f"Expertise: {a.expertise}. Hardware: {devices_label(adv)}."
            + (f" Budget: ${a.budget_usd:,.0f}." if a.budget_usd is not None else "")
            + (f" Deadline: {a.deadline_hours:g} h." if a.deadline_hours is not None else ""), ""]

    out += ["## Should you fine-tune?", "", f"**{v.decision}**", ""]
    for side, title in (("for", "For"), ("against", "Against")):
        reasons = [r for r in v.reasons if r.side == side]
        if reasons:
            out += [f"{title}:", ""] + [f"- **{r.case}**{' (decides it)' if r.blocking else ''}: {r.text}"
                                        for r in reasons] + [""]
    if v.instead and v.decision != "fine-tune":
        out += ["Instead, for now:", ""] + [f"- {x}" for x in v.instead] + [""]
    if v.would_change:
        out += ["What would change this answer:", ""] + [f"- {x}" for x in v.would_change] + [""]

    out += ["## Your data", "", _data_line(adv), ""]
    for key in ("sufficient", "relevant", "privacy"):
        if d.card_verdicts.get(key):
            out += [f"- {d.card_verdicts[key]}"]
    out += [""] if d.card_verdicts else []

    out += ["## Base models", "", "| # | model | size | weights | licence | context | memory per device | "
            "training time | cost | why |", "|---|---|---|---|---|---|---|---|---|---|"]
    eligible = [c for c in adv.candidates if c.eligible]
    for i, c in enumerate(eligible[:SHOWN_MODELS], 1):
        m, e = c.model, c.plan
        out.append(f"| {i} | {m.name} (`{m.hub_id}`) | {size_label(m.params)} | {c.weights} | {m.license} | "
                   f"{m.context_length:,} | {e.memory.total / GB:.1f} GB ({way_of(e)}) | {fmt_duration(e.seconds)} | "
                   f"{money(e.usd, hw.usd_per_hour)} | {'; '.join(c.why[:1])} |")
    if not eligible:
        out.append("| – | none fits | | | | | | | | |")
    out += _offline_lines(adv)
    excluded = [c for c in adv.candidates if not c.eligible]
    if excluded:
        out += ["", f"Not recommended ({len(excluded)} of {len(adv.candidates)}), for example:", ""]
        shown = _spread(excluded, SHOWN_EXCLUDED)
        out += [f"- {c.model.name}: {'; '.join(c.excluded)}" for c in shown]
    out += ["", "`tailor models list` shows the whole catalog; `tailor models show NAME` one model.", ""]
    if adv.top is None:
        return "\n".join(out)

    top, t = adv.top, adv.technique
    out += [f"Why {top.model.name} first: " + "; ".join(top.why) + ".", ""]
    name, tradeoff = TECHNIQUES[t.name]
    out += ["## Technique", "", f"**{t.name}** ({name}): {t.why}.", "", f"Trade-off: {tradeoff}.", ""]
    out += [f"Also possible: {x}." for x in t.alternatives] + [""]

    out += ["## Starting hyperparameters", "", "| job key | value | why |", "|---|---|---|"]
    out += [f"| `{s.key}` | {s.value} | {s.why} |" for s in adv.settings] + [""]

    out += [f"## Memory, time and money ({top.model.name}, {adv.lora_epochs():g} epochs over "
            f"{d.train_tokens:,} tokens, {devices_label(adv)})", "",
            "Each method as it is and, where that does not fit, the first way of it that does (gradient "
            "checkpointing" + (", then sharding across the devices, then CPU offload" if a.compute.devices > 1 else "")
            + f"). The starter job runs {way_of(top.plan)}.",
            "", "| method | how | trains | memory per device | fits | training time | cost |",
            "|---|---|---|---|---|---|---|"]
    for e in adv.methods:
        mem = e.memory.as_gb()
        note = f" ({'; '.join(e.notes)})" if e.notes else ""
        rows = f"{e.workload.micro_batch} row{'s' if e.workload.micro_batch > 1 else ''} per micro-step"
        out.append(f"| {e.method} | {', '.join(filter(None, [e.setup, rows]))} | {e.trainable:,} | {mem['total']} GB "
                   f"(weights {mem['weights']}, gradients {mem['gradients']}, optimizer {mem['optimizer']}, "
                   f"activations {mem['activations']}) | {'yes' if e.fits else 'no'} | {fmt_duration(e.seconds)} | "
                   f"{money(e.usd, hw.usd_per_hour)}{note} |")
    out += ["", _assumptions(adv), ""]
    if adv.run_time:
        r = adv.run_time
        parts = ", ".join(f"{k} {fmt_duration(s)}" for k, s in r.parts().items() if s >= 0.5)
        out += [f"The starter job end to end: about {fmt_duration(r.total_s)} ({parts})"
                + (f"; the first evaluation on a machine adds {fmt_duration(r.first_time_s)} for the base model's "
                   "general-skills probe" if r.first_time_s >= 1 else "") + ".", ""]
    out += ["## Next", "", "```", launch_command(a), "```", ""]
    if a.compute.nodes > 1:
        out += [_on_each_machine(a), ""]
    out += ["job.yaml (beside this file) holds the model, technique and settings above; every key is described by "
            "`tailor spec`."]
    return "\n".join(out)


def devices_label(adv: Advice) -> str:
    c = adv.answers.compute
    return (f"{c.nodes} machines x " if c.nodes > 1 else "") + f"{c.count} x {adv.hardware.label}"


def launch_command(a, job: str = "job.yaml") -> str:
    """What starts the job on the answers' devices: one process per device (torchrun), on each machine."""
    c = a.compute
    if c.devices == 1:
        return f"tailor train {job}"
    if c.nodes == 1:
        return f"torchrun --nproc_per_node {c.count} -m tailor train {job}"
    return (f"torchrun --nnodes {c.nodes} --nproc_per_node {c.count} --rdzv-backend c10d --rdzv-endpoint HOST:29500 "
            f"-m tailor train {job}")


def _on_each_machine(a) -> str:
    return (f"Run it on each of the {a.compute.nodes} machines, with the job file and the data at the same paths; "
            "HOST is the first machine's address, its port 29500 open to the others.")


def _offline_lines(adv: Advice) -> list[str]:
    """Offline, what a download would bring: the ranking above holds only models already here."""
    if not adv.offline:
        return []
    line = f"{adv.offline[0].upper()}{adv.offline[1:]}: only models already here are recommended."
    c = adv.with_network
    if c is not None:
        role = "the first choice" if adv.with_network_first else "the next choice"
        line += (f" With network access, {c.model.name} ({size_label(c.model.params)}) would be {role}: a download "
                 f"of ≈ {fmt_gb(c.download_gb)}, then {fmt_duration(c.plan.seconds)} of training "
                 f"({way_of(c.plan)}) on {adv.hardware.label}. Get it where there is network with "
                 f"`hf download {c.model.hub_id}` and copy ~/.cache/huggingface/hub here (or its folder: "
                 "--model PATH).")
    return ["", line]


def _data_line(adv: Advice) -> str:
    d = adv.data
    where = f"from {d.source}" if d.source != "counts" else "from the counts you gave"
    tasks = f", {d.n_tasks} tasks" if d.n_tasks > 1 else ""
    prefs = f", {d.preference_pairs:,} preference pairs" if d.preference_pairs else ""
    ppl = (f"; the base model's perplexity on a sample of the answers: {d.base_perplexity:.1f}"
           if d.base_perplexity else "")
    return (f"{d.examples:,} training / {d.validation_examples:,} validation / {d.test_examples:,} test examples "
            f"{where}{tasks}{prefs}; {d.train_tokens:,} training tokens per epoch, {d.mean_tokens:.0f} per example on "
            f"average, 99 % within {d.p99_tokens:,}{ppl}.")


def _assumptions(adv: Advice) -> str:
    hw = adv.hardware
    if hw.kind == "cpu":
        basis = (f"measured on this machine ({hw.calibrated[:10]}: {hw.peak_tflops:.2f} TFLOP/s peak, "
                 f"{hw.util('lora'):.0%} of it in LoRA training)" if hw.calibrated else
                 "a guess for this CPU: run `tailor advise --calibrate` (about a minute) to measure it")
        qlora = {True: "QLoRA runs here with bitsandbytes' AVX-512 kernels, at the speed the estimate gives LoRA "
                       "(measured on a Zen 4: 0.92-0.97x LoRA's tokens/s, bench/scale.py)",
                 False: "this CPU has no AVX-512: QLoRA's 4-bit kernels (bitsandbytes) take a slow path here",
                 None: "QLoRA runs on a CPU with bitsandbytes, fast where the CPU has AVX-512"}[hw.avx512]
        return f"Time is {basis}. {qlora}."
    return (f"Time assumes {hw.util('lora'):.0%} of the {hw.peak_tflops:g} TFLOP/s peak for LoRA "
            f"({hw.util('full'):.0%} full, {hw.util('qlora'):.0%} QLoRA), "
            "typical for PyTorch fine-tuning, not measured"
            + ("; the devices at 90 % efficiency together (their communication mostly overlaps the computation)"
               if adv.answers.compute.devices > 1 else "")
            + f"; cost ${hw.usd_per_hour:.2f} per GPU-hour (override: --price {hw.name}=USD).")


def _spread(items: list, n: int) -> list:
    """n items spread over the list (the excluded are sorted by size: show small and large ones)."""
    if len(items) <= n:
        return items
    step = (len(items) - 1) / (n - 1)
    return [items[round(i * step)] for i in range(n)]


def write(adv: Advice, out: Path) -> dict[str, Path]:
    """advice.md, advice.json and (when a model fits) job.yaml and space.yaml (a sweep's search space
    around the advised settings) in `out`, each written whole or not at all."""
    from tailor.files import write_atomic
    from tailor.sweep.space import around, space_yaml

    out.mkdir(parents=True, exist_ok=True)
    files = {"advice.md": out / "advice.md", "advice.json": out / "advice.json"}
    write_atomic(files["advice.md"], markdown(adv) + "\n")
    write_atomic(files["advice.json"], json.dumps(as_dict(adv), indent=1))
    if adv.job is not None:
        files["job.yaml"] = out / "job.yaml"
        header = ("# Written by tailor advise: the advised model, technique and starting settings (advice.md says "
                  "why).\n# Settings set to auto are chosen at the start of training for the model actually trained.\n"
                  f"# Check data.train, then: {launch_command(adv.answers, str(files['job.yaml']))}\n")
        if adv.answers.compute.nodes > 1:
            header += f"# {_on_each_machine(adv.answers)}\n"
        job = _paths_from(adv.job, out)
        write_atomic(files["job.yaml"], header + yaml.safe_dump(job, sort_keys=False))
        space = around({s.key: s.value for s in adv.settings})
        if space:
            files["space.yaml"] = out / "space.yaml"
            write_atomic(files["space.yaml"], "# Written by tailor advise: a search space around the advised settings "
                         "(docs/sweeps.md).\n# Search it: tailor sweep " + str(files["job.yaml"]) + " --space "
                         + str(files["space.yaml"]) + "\n" + space_yaml(space))
    return files


def _paths_from(job: dict, out: Path) -> dict:
    """The job with its data paths relative to `out`, where job.yaml is: a job's paths are read
    relative to the job file, and the advisor was given them relative to the working directory."""
    import copy
    import os

    def moved(p):
        if not isinstance(p, str) or Path(p).is_absolute():
            return p
        return os.path.relpath(Path(p).resolve(), out.resolve())

    job = copy.deepcopy(job)
    job["data"]["train"] = [moved(p) for p in job["data"]["train"]]
    if "transfer" in job:
        job["transfer"]["domain_text"] = [moved(p) for p in job["transfer"]["domain_text"]]
    for stage in job.get("stages", []):
        stage["data"]["train"] = [moved(p) for p in stage["data"]["train"]]
    return job


def as_dict(adv: Advice) -> dict:
    v = adv.verdict
    return {
        "decision": v.decision, "headline": v.headline,
        "reasons": [{"side": r.side, "case": r.case, "text": r.text, "blocking": r.blocking} for r in v.reasons],
        "instead": v.instead, "would_change": v.would_change,
        "answers": adv.answers.model_dump(), "hardware": adv.hardware.model_dump(),
        "models": [{"name": c.model.name, "hub_id": c.model.hub_id, "eligible": c.eligible, "why": c.why,
                    "excluded": c.excluded, "local": c.local, "where": c.here.path if c.here else None,
                    "download_gb": round(c.download_gb, 2), "plan": c.plan.as_dict()} for c in adv.candidates],
        "offline": adv.offline,
        "with_network": {"name": adv.with_network.model.name, "first": adv.with_network_first}
        if adv.with_network else None,
        "technique": {"name": adv.technique.name, "why": adv.technique.why},
        "hyperparameters": [{"key": s.key, "value": s.value, "why": s.why} for s in adv.settings],
        "methods": [e.as_dict() for e in adv.methods],
        "run_seconds": {**{k: round(s, 1) for k, s in adv.run_time.parts().items()},
                        "total": round(adv.run_time.total_s, 1)} if adv.run_time else None,
        "job": adv.job,
        "launch": launch_command(adv.answers) if adv.job else None,
    }
