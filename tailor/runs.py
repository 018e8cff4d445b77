"""The run folder, `runs/<name>/<run-id>/`: the API between training, evaluation, serving,
tracking and whatever reads runs next. `Run` owns its layout: every file's name is declared once,
below, with what it holds, and every reader and writer goes through it. docs/runs.md's table is
generated from the same declarations (`tailor runs layout`), and a test checks it.

A run folder is complete when DONE exists; until then `tailor train JOB --resume` continues it.
Nothing here loads a model: the result folders are written by `save_result` and read by
tailor.models.generate.load_run.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tailor.errors import TailorError
from tailor.files import building, read_json, read_jsonl, take_lock, write_atomic, write_json, write_jsonl


class RunError(TailorError):
    """A folder that is not a run, or not a finished one, where one is needed."""


class RunNotFound(RunError, LookupError):
    """A run reference (folder, NAME/RUN-ID, RUN-ID, NAME) that names no run."""


class RunLocked(RunError):
    """A run folder another live process is writing."""


# Run folder -> (pid, descriptor of its open lock file) of the locks this process holds.
_LOCKS: dict[Path, tuple[int, int]] = {}


# --- the manifest: what a run was started with ----------------------------------------------------


class _Record(BaseModel):
    # A manifest written by another version of Tailor may hold keys this one does not know: they
    # are kept, and written back as they were.
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class ModelInfo(_Record):
    source: str  # the job's model.base
    kind: str  # embedded | gguf | local | hub
    path: str  # the local folder it was loaded from
    hub_id: str | None = None
    dtype: str  # the compute dtype, e.g. bfloat16


class FileInfo(_Record):
    path: str
    sha256: str  # of the file, or of a folder's files in order (tailor.files.path_sha256)


class DataInfo(_Record):
    train: list[FileInfo] = []
    validation: list[FileInfo] = []
    prepared: str | None = None  # with data.prepare: the run's data/ folder


class AdapterInfo(_Record):
    kind: str  # lora | freeze | full
    trainable_parameters: int
    total_parameters: int
    trainable: list[str] | None = None  # names of the trained weights (freeze, full)


class StartInfo(_Record):
    from_: str | None = Field(None, alias="from")  # the run or stage folder this one continued
    trainable_sha256: str  # of the trainable weights before the first step


class Manifest(_Record):
    """manifest.json. Written once a run's model is built (and again by a staged run, for the
    stage it kept); `exclude_unset` on writing keeps the file to what was set."""

    name: str
    technique: str
    run_dir: str
    model: ModelInfo
    data: DataInfo = DataInfo()
    encoding: dict = {}  # examples, rows, tokens, truncated, padding share
    seed: int | None = None
    adapter: AdapterInfo | None = None
    start: StartInfo | None = None
    processes: int = 1
    versions: dict = {}
    hardware: dict = {}
    tasks: dict | None = None  # multitask: each task's rows, probability and instruction
    preference: dict | None = None  # preference stages: the loss and its settings
    stages: list[str] | None = None  # a staged run: its stage folders
    result_of: str | None = None  # a staged run: the stage folder whose result it holds
    auto: list[dict] | None = None  # the `auto` settings this run chose: key, value, why
    replay: dict | None = None  # forgetting protection: replayed examples and their share

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", by_alias=True, exclude_unset=True), indent=1)


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("tailor-llm", "torch", "transformers", "peft", "accelerate"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


# --- the layout ---------------------------------------------------------------------------------


class _Entry:
    """One file or folder of a run folder: `run.manifest_file` is `run.path / "manifest.json"`.
    Declared once on Run, with what it holds; Run.layout() lists them for the docs."""

    def __init__(self, name: str, holds: str):
        self.name, self.holds = name, holds

    def __get__(self, run, owner=None):
        return self if run is None else run.path / self.name


@dataclass(frozen=True)
class Run:
    path: Path

    def __init__(self, path: str | Path | Run):
        object.__setattr__(self, "path", Path(path))

    def __fspath__(self) -> str:  # a Run is a path: Run(run), open(run / …) and load_run(run) all take it
        return str(self.path)

    # In the order a run writes them.
    lock_file = _Entry(".train.lock", "locked (flock) by the process writing the run, so that no second one "
                                      "writes it at once; holds that process's id. The lock ends with the process, "
                                      "a killed one too")
    job_file = _Entry("job.yaml", "the resolved job, every default filled in")
    data_dir = _Entry("data/", "with `data.prepare: true`: the prepared dataset (splits, card, rejects)")
    stages_dir = _Entry("stages/", "a staged run: one complete run folder per stage, `N-NAME/`")
    reference_file = _Entry("reference_logps.json", "a preference stage: the starting model's log-probability of "
                                                    "every answer, computed once, so a resume uses the same ones")
    manifest_file = _Entry("manifest.json", "what the run started with: model, data hashes, encoding, seed, "
                                            "adapter, start checksum, versions, hardware (a staged run: of the "
                                            "stage kept, with `stages` and `result_of`)")
    metrics_file = _Entry("metrics.jsonl", "one row per logging step (`train`), per validation (`eval`), and "
                                           "the layer change at the end")
    checkpoints_dir = _Entry("checkpoints/", "`step-NNNNNNN/`: trainable weights, optimizer, scheduler, RNG "
                                             "states (the first two as shards in `sharded/` under FSDP, "
                                             "`deepspeed/` under DeepSpeed) and `checksums.json`, each file's "
                                             "hash and size, written last; `best.json` names the best with early "
                                             "stopping")
    deepspeed_file = _Entry("deepspeed.json", "with `distributed.strategy: deepspeed`: the DeepSpeed config the run "
                            "used (Tailor's, from the section, or yours with the job's batch sizes and precision)")
    tensorboard_dir = _Entry("tensorboard/", "with `tracking: [tensorboard]`: the event files")
    mlflow_id_file = _Entry("mlflow_run_id", "with `tracking: [mlflow]`: the MLflow run this run logs to")
    layer_change_file = _Entry("layer_change.json", "how much each block's weights changed (‖ΔW‖/‖W‖)")
    adapter_dir = _Entry("adapter/", "the result of a LoRA or QLoRA run: a PEFT adapter with the tokenizer")
    model_dir = _Entry("model/", "the result of a freeze or full run: a transformers model folder")
    summary_file = _Entry("summary.json", "how training went: steps, final losses, speed, early stopping, the "
                                          "trainable weights' checksum at the end")
    stages_file = _Entry("stages.json", "a staged run: each stage's validation losses after it trained, and the "
                                        "regressions the gate found")
    report_file = _Entry("report.html", "curves, layer change, base vs tuned, sample answers; opens offline")
    eval_dir = _Entry("eval/", "`tailor eval`: the files below, replaced as one")
    eval_summary_file = _Entry("eval/summary.json", "base and tuned scores, gains, retention, the gate's verdict")
    eval_examples_file = _Entry("eval/examples.jsonl", "per test conversation: question, reference, base and "
                                                       "tuned answers")
    retention_file = _Entry("eval/retention.jsonl", "per general-skills question: both models' replies")
    done_file = _Entry("DONE", "written last: the run is complete; without it, `--resume` continues it")
    quickstart_file = _Entry("quickstart.md", "`tailor quickstart`: base and tuned answers side by side")
    export_dir = _Entry("export/", "`tailor export`'s default output: a merged model folder and parity.json")
    gguf_dir = _Entry("gguf/", "`tailor export --format gguf`: NAME-QUANT.gguf per quantization, the Ollama "
                               "Modelfile and gguf-parity-QUANT.json")

    @classmethod
    def layout(cls) -> list[tuple[str, str]]:
        """(name, what it holds) of every file and folder a run may have, in the order above."""
        return [(e.name, e.holds) for e in vars(cls).values() if isinstance(e, _Entry)]

    @classmethod
    def layout_markdown(cls) -> str:
        rows = "".join(f"| `{name}` | {holds} |\n" for name, holds in cls.layout())
        return "| file | what it holds |\n|---|---|\n" + rows

    # --- finding runs -------------------------------------------------------------------------

    @property
    def exists(self) -> bool:
        """A run folder is one with a job.yaml."""
        return self.job_file.is_file()

    @property
    def name(self) -> str:
        return self.path.parent.name

    @property
    def id(self) -> str:
        return self.path.name

    @classmethod
    def new(cls, output_dir: str | Path, name: str) -> Run:
        """A fresh folder output_dir/NAME/YYYYmmdd-HHMMSS (with -2, -3… when taken)."""
        root = Path(output_dir) / name
        root.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path, n = root / stamp, 1
        while path.exists():
            n += 1
            path = root / f"{stamp}-{n}"
        path.mkdir()
        return cls(path)

    @classmethod
    def latest(cls, output_dir: str | Path, name: str) -> Run | None:
        """The job's most recently written run folder."""
        root = Path(output_dir) / name
        if not root.is_dir():
            return None
        return max((r for r in map(cls, root.iterdir()) if r.exists), key=lambda r: r.path.stat().st_mtime,
                   default=None)

    @classmethod
    def find(cls, output_dir: str | Path) -> list[Run]:
        """Every run under output_dir/NAME/, by run id then name."""
        root = Path(output_dir)
        if not root.is_dir():
            return []
        runs = [cls(p) for p in root.glob("*/*")]
        return sorted((r for r in runs if r.exists), key=lambda r: (r.id, r.name))

    @classmethod
    def resolve(cls, ref: str | Path, output_dir: str | Path) -> Run:
        """A run given as a folder, NAME/RUN-ID under output_dir, or a RUN-ID or NAME (its latest run)."""
        for candidate in (cls(ref), cls(Path(output_dir) / ref)):
            if candidate.exists:
                return candidate
        runs = cls.find(output_dir)
        matches = [r for r in runs if r.id == str(ref)] or [r for r in runs if r.name == str(ref)][-1:]
        if len(matches) == 1:
            return matches[0]
        known = ", ".join(f"{r.name}/{r.id}" for r in runs[-5:]) or "none"
        raise RunNotFound(f"no run '{ref}' (as a folder, or under {output_dir}); "
                          + ("it names several runs, give NAME/RUN-ID" if matches else f"recent runs: {known}"))

    def stage(self, index: int, name: str) -> Run:
        """The folder of stage `index` (0-based) of a staged run."""
        return Run(self.stages_dir / f"{index + 1}-{name}")

    # --- the job and the manifest ---------------------------------------------------------------

    def raw_job(self) -> dict | None:
        """job.yaml as written, or None before a run has written it."""
        import yaml

        return yaml.safe_load(self.job_file.read_text(encoding="utf-8")) or {} if self.job_file.is_file() else None

    def job(self):
        """The run's job (tailor.spec.Job), as this version of Tailor reads it."""
        from tailor.spec import parse_job

        raw = self.raw_job()
        if raw is None:
            raise RunError(f"{self.path}: no {Run.job_file.name}; is this a run folder (runs/NAME/RUN-ID)?")
        return parse_job(raw, str(self.job_file))

    def write_job(self, job) -> None:
        from tailor.spec import dump_job

        write_atomic(self.job_file, dump_job(job))

    @property
    def has_manifest(self) -> bool:
        return self.manifest_file.is_file()

    def manifest(self) -> Manifest:
        data = read_json(self.manifest_file)
        if data is None:
            raise RunError(f"{self.path}: no {Run.manifest_file.name}; give a run folder that `tailor train` wrote "
                           "(runs/NAME/RUN-ID)")
        try:
            return Manifest.model_validate(data)
        except ValidationError as exc:
            where = ".".join(map(str, exc.errors()[0]["loc"]))
            raise RunError(f"{self.manifest_file}: {where}: {exc.errors()[0]['msg']}; the file was changed by hand or "
                           "by another program: train the run again") from None

    def write_manifest(self, manifest: Manifest) -> None:
        write_atomic(self.manifest_file, manifest.to_json())

    # --- what training writes -----------------------------------------------------------------

    def metrics(self) -> list[dict]:
        return read_jsonl(self.metrics_file)

    def write_metrics(self, rows: list[dict]) -> None:
        write_jsonl(self.metrics_file, rows)

    def metrics_log(self, enabled: bool = True, trackers=()) -> MetricsLog:
        return MetricsLog(self.metrics_file, enabled, trackers)

    def summary(self) -> dict | None:
        return read_json(self.summary_file)

    def write_summary(self, summary: dict) -> None:
        write_json(self.summary_file, summary)

    def layer_change(self) -> dict | None:
        return read_json(self.layer_change_file)

    def write_layer_change(self, changes: dict) -> None:
        write_json(self.layer_change_file, changes)

    def stages_record(self) -> dict | None:
        return read_json(self.stages_file)

    def write_stages_record(self, record: dict) -> None:
        write_json(self.stages_file, record)

    @property
    def staged(self) -> bool:
        return self.stages_file.is_file()

    @property
    def done(self) -> bool:
        return self.done_file.exists()

    def mark_done(self) -> None:
        self.done_file.write_text("", encoding="utf-8")
        self.unlock()  # nothing is left to train: a --resume of it only says so

    # --- one writer at a time -------------------------------------------------------------------

    def lock(self) -> None:
        """Hold RUN/.train.lock until the run is done or this process ends (the system lets go of a
        killed process's lock, so a stale one never blocks). A run another live process holds
        raises RunLocked, naming that process; taking a lock this process holds does nothing."""
        key = self.path.resolve()
        if _LOCKS.get(key, (None,))[0] == os.getpid():
            return
        fd, holder = take_lock(self.lock_file)
        if fd is None:
            raise RunLocked(f"{self.path}: run {self.name}/{self.id} is being written by another process (pid "
                            f"{holder}); wait for it to finish or stop it, then `tailor train JOB --resume` continues "
                            "the run")
        _LOCKS[key] = (os.getpid(), fd)

    def unlock(self) -> None:
        pid, fd = _LOCKS.get(self.path.resolve(), (None, None))
        if pid == os.getpid():
            del _LOCKS[self.path.resolve()]
            os.close(fd)  # closing the descriptor ends the flock

    # --- the result -----------------------------------------------------------------------------

    def result_dir_for(self, kind: str) -> Path:
        """Where a run of adapter.kind `kind` keeps its result: adapter/ for LoRA and QLoRA, model/ otherwise."""
        return self.adapter_dir if kind in ("lora", "qlora") else self.model_dir

    @property
    def result(self) -> Path | None:
        """The result folder the run has (adapter/ or model/), or None before training ends."""
        return next((d for d in (self.adapter_dir, self.model_dir) if d.is_dir()), None)

    @property
    def has_adapter(self) -> bool:
        return self.adapter_dir.is_dir()

    def require_result(self) -> Path:
        result = self.result
        if result is None:
            raise RunError(f"{self.path}: no adapter/ or model/ folder; is this a finished run folder "
                           "(runs/NAME/RUN-ID)? Unfinished runs continue with `tailor train JOB --resume`")
        return result

    def save_result(self, model, tokenizer, kind: str) -> Path:
        """adapter/ (PEFT format) for LoRA, model/ (a full transformers folder) otherwise."""
        final = self.result_dir_for(kind)
        with building(final) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        return final

    def remove_weights(self) -> int:
        """Delete the run's weights (result, checkpoints, a merged export, GGUF files) and keep its record (job,
        metrics, evaluation, report): a sweep keeps only its best trial's. Returns the bytes freed."""
        freed = 0
        for folder in (self.adapter_dir, self.model_dir, self.checkpoints_dir, self.export_dir, self.gguf_dir):
            if folder.is_dir():
                freed += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
                shutil.rmtree(folder)
        return freed

    def copy_result_of(self, other: Run) -> None:
        """Another run's result (a staged run keeps its last good stage's) and its layer change."""
        source = other.require_result()
        with building(self.path / source.name) as tmp:
            shutil.copytree(source, tmp)
        if other.layer_change_file.exists():
            shutil.copyfile(other.layer_change_file, self.layer_change_file)

    # --- what evaluation writes -----------------------------------------------------------------

    def eval_summary(self) -> dict | None:
        return read_json(self.eval_summary_file)

    def eval_examples(self) -> list[dict]:
        return read_jsonl(self.eval_examples_file)

    def write_eval(self, summary: dict, examples: list[dict], retention: list[dict] | None) -> None:
        """eval/ as one: built under a temporary name, then put in place of the old one."""
        with building(self.eval_dir) as tmp:
            tmp.mkdir()

            def inside(path: Path) -> Path:  # the same name under the temporary folder
                return tmp / path.relative_to(self.eval_dir)

            write_json(inside(self.eval_summary_file), summary, ensure_ascii=False)
            write_jsonl(inside(self.eval_examples_file), examples, ensure_ascii=False)
            if retention is not None:
                write_jsonl(inside(self.retention_file), retention, ensure_ascii=False)

    def gate_failed(self) -> bool:
        summary = self.eval_summary()
        return summary is not None and not summary["gate"]["passed"]

    def write_report(self, html: str) -> Path:
        write_atomic(self.report_file, html)
        return self.report_file


class MetricsLog:
    """metrics.jsonl: appended and flushed row by row, so a live reader (or a crash) sees every row.
    Each row also goes to the trackers (TensorBoard, MLflow: tailor.track.trackers) given."""

    def __init__(self, path: Path, enabled: bool = True, trackers=()):
        self.path = path
        self.enabled = enabled
        self.trackers = list(trackers) if enabled else []

    def truncate_after(self, step: int) -> None:
        """On resume: drop rows written after the checkpoint; the resumed run writes them again."""
        if not self.enabled or not self.path.exists():
            return
        write_jsonl(self.path, [r for r in read_jsonl(self.path) if r.get("step", 0) <= step])

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        for tracker in self.trackers:
            tracker.log(row)

