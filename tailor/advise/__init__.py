"""Step 0 and steps 2-3: should you fine-tune, which base model, which technique, and what it will cost.

advise(answers) reads the data (profiled through tailor prepare, or counts), measures or looks up
the hardware, ranks the catalog's models, picks the technique and starting hyperparameters,
estimates memory, time and money for full fine-tuning, LoRA and QLoRA (each the way it fits the
devices: gradient checkpointing, sharding, a 4-bit base), and decides whether fine-tuning is worth
it at all. tailor/advise/report.py writes it as Markdown and a starter job that fits.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from tailor.advise.answers import Answers
from tailor.advise.choose import (
    Candidate,
    Setting,
    TechniqueChoice,
    choose_technique,
    epochs_for,
    fit,
    hyperparameters,
    lora_rank,
    lora_workload,
    rank_models,
    seq_len_for,
    ways,
)
from tailor.advise.decide import Feasibility, Verdict, decide
from tailor.advise.estimate import Arch, Estimate, Hardware, RunSize, hardware_table
from tailor.advise.profile import DataProfile, from_counts, from_path
from tailor.advise.runtime import JobTime, job_time
from tailor.models.catalog import load_catalog
from tailor.models.local import LocalModels, find_local, offline_reason
from tailor.spec import EMBEDDED_DEFAULT

EMBEDDED_NAMES = {"smollm2-135m-instruct": "embedded:smollm2-135m-instruct"}


@dataclass
class Advice:
    answers: Answers
    data: DataProfile
    hardware: Hardware
    verdict: Verdict
    candidates: list[Candidate]
    technique: TechniqueChoice
    settings: list[Setting]
    methods: list[Estimate]  # full, LoRA, QLoRA for the first model: each as it is, and the way it fits
    job: dict | None  # the starter job file, as a dict
    run_time: JobTime | None  # the starter job end to end on the chosen hardware
    # Offline: the best model a download would bring, and whether it would then be the first choice.
    with_network: Candidate | None = None
    with_network_first: bool = False
    offline: str | None = None  # why the machine that trains cannot download (None: it can)

    def lora_epochs(self) -> float:
        return epochs_for(self.data)

    @property
    def top(self) -> Candidate | None:
        return first_eligible(self.candidates)


def first_eligible(candidates: list[Candidate]) -> Candidate | None:
    """The recommended model: the first of the ranking, if anything passed (rank_models sorts the
    eligible first)."""
    return candidates[0] if candidates and candidates[0].eligible else None


def pick_hardware(a: Answers, table: dict[str, Hardware] | None = None) -> Hardware:
    if a.compute.target == "local":
        from tailor.advise.calibrate import local_hardware

        return local_hardware()
    table = table or hardware_table()
    if a.compute.target not in table:
        from tailor.spec import SpecError

        raise SpecError("answers", [f"compute.target: unknown hardware {a.compute.target!r}; use 'local' or one of "
                                    f"{', '.join(table)}"])
    return table[a.compute.target]


def profile_data(a: Answers, out: Path, say=print) -> DataProfile:
    if a.data.path:
        return from_path(a.data.path, EMBEDDED_DEFAULT, out, say)
    return from_counts(a.data.examples or 0, a.data.tokens_per_example, preference_pairs=a.data.preference_pairs,
                       tasks=a.data.tasks, languages=a.languages, domain_text_tokens=a.data.domain_text_tokens)


def local_models(a: Answers, catalog=None) -> LocalModels:
    """The catalog models this machine has (found, or folders the answers name), and whether the
    machine that trains can download: as the answers say, else checked when it is this one (a
    rented GPU downloads for itself)."""
    catalog = catalog or load_catalog()
    if a.offline is not None:
        offline = "the machine that trains is offline (you said so)" if a.offline else None
    elif a.compute.target == "local":
        cause = offline_reason()
        offline = f"this machine is offline ({cause})" if cause else None
    else:
        offline = None
    return LocalModels(find_local(catalog, a.local_models), offline)


def advise(a: Answers, data: DataProfile, hw: Hardware, catalog=None, local: LocalModels | None = None) -> Advice:
    catalog = catalog or load_catalog()
    local = local or local_models(a, catalog)
    epochs = epochs_for(data)
    candidates = rank_models(a, data, hw, catalog, epochs, local)
    top = first_eligible(candidates)
    with_network, first = None, False
    if local.offline:
        online = rank_models(a, data, hw, catalog, epochs, replace(local, offline=None))
        with_network = next((c for c in online if c.eligible and not c.local), None)
        first = with_network is not None and with_network is online[0]
    # Time and money are judged on the cheapest model of the size the use case calls for: a budget
    # that only pays for a smaller one is too small.
    in_band = [c for c in candidates if c.in_band and c.meets_needs]
    cheapest = min(in_band, key=lambda c: c.plan.seconds) if in_band else top
    feasible = Feasibility(top.model.name if top else None, cheapest.plan.seconds if cheapest else None,
                           cheapest.plan.usd if cheapest else None, hw.label,
                           cheapest.model.name if cheapest else None, local.offline)
    verdict = decide(a, data, feasible)
    technique = choose_technique(a, data)
    if top is None:
        return Advice(a, data, hw, verdict, candidates, technique, [], [], None, None, with_network, first,
                      local.offline)
    settings = hyperparameters(a, data, top.model, hw, technique.name, top.tried)
    arch = Arch.of(top.model)
    job = starter_job(a, data, top.model, technique.name, settings)
    if top.here and top.here.kind == "folder":
        job["model"]["base"] = top.here.path  # the folder the answers name: the job loads it from there
    from tailor.spec import Job

    run = job_time(Job.model_validate(job), data, arch, hw, a.compute.devices)
    methods = method_table(a, data, top.model, hw, epochs)
    return Advice(a, data, hw, verdict, candidates, technique, settings, methods, job, run, with_network, first,
                  local.offline)


def method_table(a: Answers, data: DataProfile, model, hw: Hardware, epochs: float) -> list[Estimate]:
    """Full fine-tuning, LoRA and QLoRA of the first model on the answers' devices: each as it is
    (one row per micro-step, when it does not fit), then the first way of it that fits (or the last
    tried)."""
    w = lora_workload(a, data, hw, seq_len_for(data, model.context_length), lora_rank(a, data, model.params))
    size = RunSize(train_tokens=max(1, data.train_tokens), epochs=epochs)
    out = []
    for method in ("full", "lora", "qlora"):
        tried = fit(Arch.of(model), w, size, hw, a.compute.devices, ways(method, a.compute.devices))
        out += tried[:1] + tried[-1:] if len(tried) > 1 else tried
    return out


def starter_job(a: Answers, data: DataProfile, model, technique: str, settings: list[Setting]) -> dict:
    """A job file that runs the advice: the chosen model, technique and settings, the data (the
    prepared folder when the advisor prepared or was given one: its splits are used as they are)."""
    prepared = data.source.endswith("card.json")
    train = str(Path(data.source).parent) if prepared else (a.data.path or "data/train.jsonl")
    job: dict = {"name": "advised", "technique": technique,
                 "model": {"base": EMBEDDED_NAMES.get(model.name, model.hub_id)},
                 "data": {"train": [train], "prepare": not prepared},
                 "eval": {"gate": {"metric": "rouge_l", "min_gain": 0.02, "max_retention_drop": 0.10}}}
    for s in settings:
        section, key = s.key.split(".")
        job.setdefault(section, {})[key] = "auto" if s.auto else s.value
    if technique == "transfer" and data.domain_text_tokens:
        # The documents found in the data (they stay in the task's data too), or where yours are: edit.
        job["transfer"] = {"domain_text": documents_in(a.data.path) or ["data/documents.txt"]}
    if technique == "sequential":
        # One stage per task, in order, each on its own file (the advisor knows how many, not which).
        job["stages"] = [{"name": f"task{i + 1}", "technique": "task",
                          "data": {"train": [f"data/task{i + 1}.jsonl"], "prepare": True}}
                         for i in range(max(2, data.n_tasks))]
    return job


def documents_in(path: str | None) -> list[str]:
    """The plain-text files (.txt, .md) in the data the advisor profiled: the documents a transfer
    job reads first. Text records inside JSONL files are not listed; neither is a prepared folder."""
    from tailor.data.formats import data_files

    if not path or (Path(path) / "card.json").exists() or not Path(path).exists():
        return []
    return [str(f) for f, kind in data_files(Path(path)) if kind == "text"]


__all__ = ["Advice", "Answers", "advise", "local_models", "pick_hardware", "profile_data", "starter_job"]
