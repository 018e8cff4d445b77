"""`tailor sweep JOB --space space.yaml`: try settings, keep the ones that serve the business.

Reads top to bottom: the job and its search space, the sweep folder (a killed sweep resumes from
it), the data prepared once for every trial, the base model's score on the validation split, the
Optuna study; then one trial after another, each an ordinary run folder under SWEEP/trials/; then
the best trial's job as best.yaml, the other trials' weights deleted (--keep best), and the report.

The objective is the job's gate, on validation data (the test split stays for the final check):
the gain of the gate's metric over the base model, measured on the validation conversations the
trial's training already answers (training.val_generate). A trial whose evaluation breaks a
retention limit of the gate (general questions, general-text perplexity) is ranked below every
trial that keeps them: its objective is its gain minus RETENTION_PENALTY, more than any gain.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from tailor.errors import TailorError
from tailor.files import file_sha256, read_json, take_lock, write_atomic, write_json
from tailor.runs import Run
from tailor.spec import Job, dump_job, load_job
from tailor.sweep.space import Param, read_space

# Gains of these metrics lie in [-1, 1]: minus 10, a trial that forgets ranks below every one that does not.
RETENTION_PENALTY = 10.0
# Measured on the validation rows at each validation (val_token_accuracy) or on generated answers.
VALIDATION_METRICS = ("rouge_l", "chrf", "bleu", "exact_match", "token_accuracy", "label_accuracy", "macro_f1")
GENERATED = {"rouge_l", "chrf", "bleu", "exact_match", "label_accuracy", "macro_f1"}
PRUNERS = ("median", "asha", "none")


class SweepError(TailorError, RuntimeError):
    """A sweep that cannot start or go on: names the folder or the setting, and the fix."""


@dataclass(frozen=True)
class SweepFolder:
    """Everything a sweep writes, in one folder."""

    path: Path

    @property
    def study_db(self) -> Path:  # Optuna's SQLite storage: every trial, its parameters and reports
        return self.path / "study.db"

    @property
    def state_file(self) -> Path:  # the job, the space, the metric and the base model's score
        return self.path / "sweep.json"

    @property
    def prepared_dir(self) -> Path:  # the job's data.prepare, done once for every trial
        return self.path / "prepared"

    @property
    def trials_dir(self) -> Path:  # one run folder per trial: trials/trial-NNN/RUN-ID
        return self.path / "trials"

    @property
    def best_job_file(self) -> Path:
        return self.path / "best.yaml"

    @property
    def report_file(self) -> Path:
        return self.path / "sweep.html"

    @property
    def lock_file(self) -> Path:
        return self.path / ".sweep.lock"

    @property
    def storage_url(self) -> str:
        return f"sqlite:///{self.study_db.resolve()}"

    def log_file(self, name: str) -> Path:
        return self.trials_dir / f"{name}.log"

    def run_of(self, name: str) -> Run | None:
        return Run.latest(self.trials_dir, name)


@dataclass
class Objective:
    """What a trial is scored on: validation `metric` (val_METRIC in metrics.jsonl) against the base."""

    metric: str
    base: float
    gate: object  # the job's GateSpec

    @property
    def key(self) -> str:
        return f"val_{self.metric}"

    def score(self, run: Run) -> dict:
        """The trial's numbers from its own run folder: summary.json (the kept model's validation,
        the best checkpoint's under early stopping) and eval/summary.json (retention)."""
        from tailor.evaluate.gate import verdict

        summary = run.summary() or {}
        final = summary.get("final_val") or {}
        if final.get(self.key) is None:
            raise SweepError(f"{run.path}: its validation has no {self.key} (is training.val_generate 0, or the "
                             "validation split empty?)")
        gain = final[self.key] - self.base
        evaluation = run.eval_summary()
        retention = (evaluation or {}).get("retention")
        limits = self.gate.model_copy(update={"min_gain": None})  # the retention checks alone
        kept = verdict({}, {}, retention, limits) if retention else None
        passed = kept["passed"] if kept else None  # None: not measured (eval off, or no retention)
        test_gain = ((evaluation or {}).get("gain") or {}).get(self.metric)
        return {"val": final[self.key], "gain": gain, "retention_passed": passed,
                "qa_drop": retention["qa_drop"] if retention else None,
                "perplexity_increase": retention["perplexity_increase"] if retention else None,
                "retention_reasons": kept["reasons"] if kept else [],
                "test_gain": test_gain, "steps": summary.get("steps"),
                "value": gain - (RETENTION_PENALTY if passed is False else 0.0)}


class Watch:
    """A tracker the trial's training gets: each validation's gain is reported to the study, and
    once the warm-up is over the pruner may stop the run (optuna.TrialPruned leaves the loop)."""

    def __init__(self, trial, objective: Objective, folder: SweepFolder, name: str):
        self.trial, self.objective, self.folder, self.name = trial, objective, folder, name
        self.reported: set[int] = set()
        self.grace: int | None = None

    def replay(self, rows: list[dict]) -> None:
        """A resumed trial's validations from before the interruption (its run writes them again
        identically, so they are reported once)."""
        for row in rows:
            self._report(row)

    def log(self, row: dict) -> None:
        import optuna

        step = self._report(row)
        if step is None or step <= self._grace(row):
            return
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step}: validation gain "
                                     f"{row[self.objective.key] - self.objective.base:+.3f}")

    def log_final(self, values: dict, step: int) -> None:
        pass

    def close(self) -> None:
        pass

    def _report(self, row: dict) -> int | None:
        if row.get("type") != "eval" or row.get(self.objective.key) is None or row["step"] in self.reported:
            return None
        self.reported.add(row["step"])
        self.trial.report(row[self.objective.key] - self.objective.base, row["step"])
        return row["step"]

    def _grace(self, row: dict) -> int:
        """The trial's warm-up steps: a run is never judged while its learning rate still climbs."""
        if self.grace is None:
            run = self.folder.run_of(self.name)
            training = (run.raw_job() or {}).get("training", {}) if run else {}
            per_epoch = row["step"] / row["epoch"] if row.get("epoch") else row["step"]
            epochs = training.get("epochs")
            total = training.get("max_steps") or math.ceil((epochs if isinstance(epochs, (int, float)) else 1)
                                                           * per_epoch)
            self.grace = int(training.get("warmup_ratio", 0.0) * total)
        return self.grace


def sweep(job_file: str | Path, space_file: str | Path, out: str | Path | None = None, trials: int = 12,
          timeout_hours: float | None = None, pruner: str = "median", keep: str = "best", say=print) -> dict:
    """Run (or resume) the sweep; returns {"folder", "best" (trial number or None), "trials" (finished)}."""
    import optuna

    # 1. The job and the space, checked before anything runs.
    job_file = Path(job_file).resolve()
    job = load_job(job_file)
    params = read_space(space_file, job_file)
    if pruner not in PRUNERS:
        raise SweepError(f"--pruner {pruner}: unknown; use one of {', '.join(PRUNERS)}")
    if keep not in ("best", "all"):
        raise SweepError(f"--keep {keep}: use best (the other trials' weights are deleted) or all")
    metric = job.eval.gate.metric
    if metric not in VALIDATION_METRICS:
        raise SweepError(f"eval.gate.metric {metric} is not measured on validation data; a sweep optimizes one of "
                         f"{', '.join(VALIDATION_METRICS)}: set eval.gate.metric")
    from tailor.techniques import watchable

    if pruner != "none" and not watchable(job):
        say(f"technique {job.technique} trains in stages, each validated from its step 1: trials run to the end "
            "(--pruner none)")
        pruner = "none"

    # 2. The sweep folder: a second sweep there waits for none, a different job or space is refused.
    folder = SweepFolder(Path(out or Path(job.output.dir) / "sweeps" / job.name).resolve())
    folder.trials_dir.mkdir(parents=True, exist_ok=True)
    _lock(folder)
    raw_space = yaml.safe_load(Path(space_file).read_text(encoding="utf-8"))
    state = _state(folder, job_file, raw_space)

    # 3. The data, prepared once (the job's data.prepare), and what every trial shares.
    shared = [f"output.dir={folder.trials_dir}"]
    if job.data.prepare:
        _prepare_once(job, folder, say)
        shared += [f"data.train={json.dumps([str(folder.prepared_dir)])}", "data.prepare=false"]
    if metric in GENERATED and not job.training.val_generate:
        shared.append("training.val_generate=8")
        say(f"eval.gate.metric {metric} is scored on generated answers: each validation answers 8 validation "
            "conversations (training.val_generate=8)")
    if not (job.eval.enabled and job.eval.retention) or (job.eval.gate.max_retention_drop is None
                                                           and job.eval.gate.max_perplexity_increase is None):
        say("[yellow]the job's evaluation checks no retention limit (eval.enabled, eval.retention, "
            "eval.gate.max_retention_drop): trials are ranked on the gain alone[/]")
    base_job = load_job(job_file, shared)

    # 4. The base model's score on the same validation answers, once.
    if "base" not in state:
        say(f"the base model answers the validation conversations once ({metric})")
        state["base"] = base_validation(base_job, metric)
        write_json(folder.state_file, state)
    objective = Objective(metric, state["base"], job.eval.gate)

    # 5. The study: resumed from study.db; a trial the last sweep left running continues its run.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="sweep", storage=folder.storage_url, direction="maximize",
                                load_if_exists=True, pruner=_pruner(pruner))
    study.sampler = _sampler(job, trials, len(study.trials))
    _resume_interrupted(study, folder, say)
    if not study.trials:
        start = {p.key: _job_value(job, p.key) for p in params}
        if all(p.holds(start[p.key]) for p in params):  # the job as written is trial 0: the yardstick
            study.enqueue_trial(start, user_attrs={"start": True})
    say(f"sweep of {job.name}: {trials} trials, TPE, pruner {pruner}"
        + (" (never within a trial's warm-up steps)" if pruner != "none" else "")
        + f"; objective: validation {metric} gain over the base ({objective.base:.3f})"
        + _limits_text(job.eval.gate) + f" → {folder.path}")
    for p in params:
        say(f"  {p.key}: {p.describe()}")

    # 6. Trials, one after another, until `trials` have finished or the time is up.
    started = time.monotonic()
    while _finished(study) < trials:
        if timeout_hours is not None and time.monotonic() - started > timeout_hours * 3600:
            say(f"--timeout {timeout_hours:g} h reached: {_finished(study)} of {trials} trials finished; "
                "run the same command again to go on")
            break
        trial = study.ask()
        values = {p.key: p.suggest(trial) for p in params}
        _one_trial(study, trial, values, params, objective, folder, job_file, shared, pruner != "none", say)
        _write_report(folder, study, objective, params)

    # 7. The best trial: its job as best.yaml, and (--keep best) only its weights kept.
    result = {"folder": folder.path, "best": None, "trials": _finished(study)}
    if result["trials"] >= trials:
        best = best_trial(study)
        if best is not None:
            result["best"] = best.number
            _write_best_job(folder, job_file, best, objective, params, say)
            if keep == "best":
                freed = sum(run.remove_weights() for t in study.trials if t.number != best.number
                            for run in [folder.run_of(t.user_attrs.get("name", ""))] if run is not None)
                say(f"--keep best: the weights of the other trials deleted ({freed / 2 ** 20:,.0f} MB); their "
                    "metrics, evaluations and reports stay")
        else:
            say("[red]no trial finished[/]: see the trials' logs in " + str(folder.trials_dir))
    _write_report(folder, study, objective, params)
    say(f"report: {folder.report_file}")
    return result


# --- the steps ------------------------------------------------------------------------------------


def _one_trial(study, trial, values: dict, params: list[Param], objective: Objective, folder: SweepFolder,
               job_file: Path, shared: list[str], prune: bool, say) -> None:
    """Train the trial's job as its own run folder, score it from that folder, tell the study."""
    import optuna
    from rich.console import Console

    from tailor.techniques import run as run_technique

    resumes = trial.user_attrs.get("resumes")
    name = trial.user_attrs.get("name") or f"trial-{trial.number:03d}"
    trial.set_user_attr("name", name)
    settings = [f"{key}={json.dumps(value)}" for key, value in values.items()]
    job = load_job(job_file, shared + settings + [f"name={name}"])
    earlier = folder.run_of(name) if resumes is not None else None
    watch = Watch(trial, objective, folder, name) if prune else None
    if watch and earlier is not None:
        watch.replay(earlier.metrics())
    label = (f"trial {trial.number}" + (" (the job as written)" if trial.user_attrs.get("start") else "")
             + (f" (continues trial {resumes})" if resumes is not None else "") + ": "
             + " · ".join(f"{_short(k)} {_fmt(v)}" for k, v in values.items()))
    t0 = time.perf_counter()
    with folder.log_file(name).open("a", encoding="utf-8") as log:
        console = Console(file=log, width=120, no_color=True)
        try:
            path = run_technique(job, resume=earlier is not None, console=console, show_progress=False, watch=watch)
        except optuna.TrialPruned as pruned:
            _release(folder, name)
            trial.set_user_attr("seconds", round(time.perf_counter() - t0, 1))
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            say(f"{label} → {pruned} ({time.perf_counter() - t0:.0f} s)", highlight=False, markup=False)
            return
        except Exception as exc:  # a failed trial is recorded and the sweep goes on; the first one stops it
            _release(folder, name)
            console.print_exception()
            trial.set_user_attr("error", str(exc)[:2000])
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            say(f"{label} → failed: {exc} (log: {folder.log_file(name)})", highlight=False, markup=False)
            if not any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials):
                raise
            return
    numbers = objective.score(Run(path))
    for key, value in numbers.items():
        trial.set_user_attr(key, value)
    trial.set_user_attr("seconds", round(time.perf_counter() - t0, 1))
    study.tell(trial, numbers["value"])
    say(f"{label} → {_result_text(numbers, objective)} ({time.perf_counter() - t0:.0f} s)",
        highlight=False, markup=False)


def base_validation(job: Job, metric: str) -> float:
    """The base model's val_METRIC on the job's validation split, computed as training computes the
    trained model's (the same conversations, greedy answers, dtype and autocast; for token accuracy
    the same answer tokens). A LoRA trial at step 0 is this model exactly."""
    import torch

    from tailor.data.chat import with_instructions
    from tailor.evaluate.run import answered
    from tailor.models.generate import load_base
    from tailor.techniques.common import read_data, validation_scorer
    from tailor.train.loss import answer_loss

    _, val_raw = read_data(job)
    if job.technique == "multitask":
        val_raw = with_instructions(val_raw, job.multitask.instructions)
    if not answered(val_raw):
        raise SweepError(f"{', '.join(map(str, job.data.train))}: no validation conversations to score trials on; "
                         "give data.validation, a prepared folder with a validation split, or "
                         "data.validation_fraction above 0")
    model, tokenizer = load_base(job.model.base, job.model.dtype, job.model.revision, job.model.trust_remote_code)
    model.eval()
    bf16 = next(model.parameters()).dtype == torch.bfloat16  # as training chooses it: best_dtype(model.dtype)
    if metric == "token_accuracy":
        return answer_loss(model, tokenizer, [t["messages"] for t in answered(val_raw)], job.training.max_seq_len,
                           bf16=bf16).token_accuracy
    score = validation_scorer(tokenizer, val_raw, job.training.val_generate, job.training.val_generate_tokens, bf16)
    return score(model)[f"val_{metric}"]


def _state(folder: SweepFolder, job_file: Path, space: dict) -> dict:
    """sweep.json: what this folder's sweep searches. Resuming with another job or space is refused."""
    state = read_json(folder.state_file)
    now = {"job": str(job_file), "job_sha256": file_sha256(job_file), "space": space}
    if state is None:
        write_json(folder.state_file, now)
        return now
    changed = [k for k in ("job", "job_sha256", "space") if state.get(k) != now[k]]
    if changed:
        what = "job file" if changed != ["space"] else "space"
        raise SweepError(f"{folder.path} holds a sweep of another {what} ({state.get('job')}, changed since); "
                         "give --out a new folder, or delete this one to start again")
    return state


def _lock(folder: SweepFolder) -> None:
    """One sweep per folder: a second `tailor sweep` there stops, naming the first one's process."""
    fd, holder = take_lock(folder.lock_file)
    if fd is None:
        raise SweepError(f"{folder.path}: another tailor sweep (pid {holder}) is running there; wait for it, or stop "
                         "it and run the command again to resume")
    _LOCKED.append(fd)  # held until this process ends


_LOCKED: list[int] = []


def _prepare_once(job: Job, folder: SweepFolder, say) -> None:
    from tailor.data.prepare import prepare
    from tailor.data.store import is_prepared

    if is_prepared(folder.prepared_dir):
        return
    say(f"preparing the job's data once for every trial → {folder.prepared_dir}")
    review = folder.path / "privacy-review.txt"  # the names replaced: for the data's owner, in no run folder
    prepare(job.data.train, folder.prepared_dir, model=job.model.base, config=job.data,
            say=lambda m: None, review=review)


def _sampler(job: Job, trials: int, done: int):
    """TPE, seeded from the job's seed and how many trials the study already has (`done`): a
    resumed sweep draws new settings instead of the ones its first start drew."""
    import optuna

    return optuna.samplers.TPESampler(seed=job.training.seed + done,
                                      n_startup_trials=max(3, min(10, trials // 3)))


def _pruner(name: str):
    """median: below the median of earlier trials at the same step, after two finished trials;
    asha: asynchronous successive halving, keeping the best third at each rung. Neither judges a
    trial within its warm-up steps (Watch)."""
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2)
    if name == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource="auto", reduction_factor=3)
    return optuna.pruners.NopPruner()


def _resume_interrupted(study, folder: SweepFolder, say) -> None:
    """Trials a killed sweep left RUNNING: each is closed as failed and asked again with the same
    settings, continuing its run folder from its last checkpoint."""
    import optuna

    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        if t.params:
            attrs = {"resumes": t.number, "name": t.user_attrs.get("name") or f"trial-{t.number:03d}",
                     **({"start": True} if t.user_attrs.get("start") else {})}
            study.enqueue_trial(t.params, user_attrs=attrs)
            say(f"trial {t.number} was interrupted: it continues from its last checkpoint")


def _finished(study) -> int:
    """Trials that count towards --trials: complete, pruned, and failed ones that were not
    interrupted (an interrupted trial is continued by another)."""
    import optuna

    resumed = {t.user_attrs.get("resumes") for t in study.trials}
    state = optuna.trial.TrialState
    return sum(t.state in (state.COMPLETE, state.PRUNED) or (t.state == state.FAIL and t.number not in resumed)
               for t in study.trials)


def best_trial(study):
    """The finished trial with the highest objective (the earliest among equals), or None."""
    import optuna

    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    return max(done, key=lambda t: (t.value, -t.number), default=None)


def _release(folder: SweepFolder, name: str) -> None:
    """A stopped trial's run lock: this process goes on to other trials."""
    run = folder.run_of(name)
    if run is not None:
        run.unlock()


def _write_best_job(folder: SweepFolder, job_file: Path, best, objective: Objective, params: list[Param],
                    say) -> None:
    """best.yaml: the sweep's job with the best trial's settings (its own data and output folder)."""
    settings = [f"{p.key}={json.dumps(best.params[p.key])}" for p in params]
    job = load_job(job_file, settings)
    head = (f"# The best of the sweep in {folder.path}: trial {best.number}, validation {objective.metric} "
            f"{best.user_attrs['val']:.3f} ({best.user_attrs['gain']:+.3f} over the base)"
            + (f", general questions {_points(-best.user_attrs['qa_drop'])}"
               if best.user_attrs.get("qa_drop") is not None else "")
            + f".\n# Its run: {folder.run_of(best.user_attrs['name']).path}\n"
            + "# " + ", ".join(s for s in settings) + f"\n# Train it: tailor train {folder.best_job_file}\n")
    write_atomic(folder.best_job_file, head + dump_job(job))
    passed = best.user_attrs.get("retention_passed")
    say(f"best: trial {best.number} ({_result_text(best.user_attrs, objective)})"
        + ("" if passed is not False else " — no trial kept the gate's retention limits; this one broke them least "
           "badly by gain") + f" → {folder.best_job_file}", highlight=False, markup=False)


def _write_report(folder: SweepFolder, study, objective: Objective, params: list[Param]) -> None:
    from tailor.sweep.report import sweep_html

    write_atomic(folder.report_file, sweep_html(study, objective, params, folder))


# --- words ----------------------------------------------------------------------------------------


def _job_value(job: Job, key: str):
    node = job
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _limits_text(gate) -> str:
    parts = ([f"general-question drop ≤ {gate.max_retention_drop:.2f}"] if gate.max_retention_drop is not None else [])
    parts += ([f"general-text perplexity rise ≤ {gate.max_perplexity_increase:+.0%}"]
              if gate.max_perplexity_increase is not None else [])
    return (", with " + " and ".join(parts) + " (a trial over them ranks below every trial within them)") if parts \
        else ""


def _result_text(numbers: dict, objective: Objective) -> str:
    text = f"val {objective.metric} {numbers['val']:.3f} ({numbers['gain']:+.3f})"
    if numbers.get("qa_drop") is not None:
        text += f" · general questions {_points(-numbers['qa_drop'])}"
    passed = numbers.get("retention_passed")
    return text + {True: " ✓", False: " ✗ over a retention limit", None: ""}[passed]


def _points(change: float) -> str:
    """A change of a share in percentage points, without a minus zero."""
    return f"{change * 100 + 0.0:+.1f} pts" if round(change * 100, 1) else "±0.0 pts"


def _short(key: str) -> str:
    return {"training.learning_rate": "lr"}.get(key, key.rsplit(".", 1)[-1])


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
