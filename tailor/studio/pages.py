"""The studio's routes, one group per step: home, data, jobs, queue and runs. Each does its work
through the library functions the CLI calls; this module only reads forms and renders pages."""

from __future__ import annotations

import functools
import json
import math
import re
import time
from pathlib import Path

import yaml
from fastapi import FastAPI, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse

from tailor.files import read_json, write_json
from tailor.runs import Run
from tailor.spec import EMBEDDED_DEFAULT, SpecError, describe_fields, parse_job
from tailor.studio.workspace import WorkspaceError

REJECTS_SHOWN = 200
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def add_routes(app: FastAPI, studio) -> None:  # studio: app.Studio (not imported: app imports us)
    ws = studio.workspace

    def back(url: str) -> RedirectResponse:
        return RedirectResponse(url, 303)

    # --- home -----------------------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse)
    def home(request: Request):
        from tailor.feedback.store import FeedbackStore

        feedback = FeedbackStore(ws.feedback_url).counts() if (ws.root / "feedback.db").exists() else {}
        return studio.render("home.html", request, ws=ws, data=ws.data_files(), prepared=ws.prepared_sets(),
                             jobs=ws.job_files(), queue=studio.queue.list(20), runs=[_run_row(r) for r in ws.runs()],
                             feedback=feedback)

    # --- data: upload, prepare, the card ----------------------------------------------------------

    @app.get("/data", response_class=HTMLResponse)
    def data_page(request: Request, error: str | None = None):
        return studio.render("data.html", request, data=ws.data_files(), prepared=ws.prepared_sets(), error=error,
                             max_mb=studio.max_upload_bytes // (1 << 20))

    @app.post("/data/upload")
    async def upload(request: Request, file: UploadFile):
        try:
            ws.save_upload(file.filename or "", file.file, studio.max_upload_bytes)
        except WorkspaceError as exc:
            return studio.render("data.html", request, data=ws.data_files(), prepared=ws.prepared_sets(),
                                 error=str(exc), max_mb=studio.max_upload_bytes // (1 << 20))
        return back("/data")

    @app.post("/data/prepare")
    def start_prepare(request: Request, files: list[str] = Form(...), name: str = Form(...),
                      strategy: str = Form("placeholder"), model: str = Form(EMBEDDED_DEFAULT),
                      allow: str = Form("")):
        from tailor.data.prepare import prepare

        try:
            inputs = [str(ws.data_file(f)) for f in files]
            out = ws.inside(ws.prepared_dir, ws.check_name(name, "dataset name"))
            if strategy not in ("placeholder", "mask", "pseudonym", "drop"):
                raise WorkspaceError(f"privacy strategy {strategy!r}: one of placeholder, mask, pseudonym, drop")
        except WorkspaceError as exc:
            return studio.render("data.html", request, data=ws.data_files(), prepared=ws.prepared_sets(),
                                 error=str(exc), max_mb=studio.max_upload_bytes // (1 << 20))
        # model: whose tokenizer counts the tokens and whose perplexity the card reports
        # allow: the business's own names (products, staff, its address), which are not personal data
        privacy = {"strategy": strategy, "allow": [a.strip() for a in allow.split(",") if a.strip()]}
        write_json(ws.prepared_settings_file(name), {"allow": privacy["allow"]})
        task = studio.tasks.start(f"prepare {name}", lambda t: prepare(
            inputs, out, model=model, config={"privacy": privacy}, say=t.say).out.name)
        return back(f"/tasks/{task.id}")

    @app.get("/data/{name}", response_class=HTMLResponse)
    def card_page(request: Request, name: str):
        folder = ws.prepared(name)
        card = json.loads((folder / "card.json").read_text(encoding="utf-8"))
        allow = (read_json(ws.prepared_settings_file(name)) or {}).get("allow", [])
        return studio.render("card.html", request, name=name, card=card, rejects=_rejects(folder, card, allow))

    @app.get("/data/{name}/card.html")
    def card_html(name: str):
        return FileResponse(ws.prepared(name) / "card.html")

    # --- short tasks (prepare, export): progress ---------------------------------------------------

    @app.get("/tasks/{task_id}", response_class=HTMLResponse)
    def task_page(request: Request, task_id: int):
        task = studio.tasks.get(task_id)
        if task is None:
            raise WorkspaceError(f"no task {task_id} (tasks are kept until the studio restarts)")
        return studio.render("task.html", request, task=task)

    @app.get("/tasks/{task_id}/events")
    def task_events(task_id: int):
        from tailor.studio.app import event_stream

        task, sent = studio.tasks.get(task_id), [0]
        if task is None:
            raise WorkspaceError(f"no task {task_id}")

        def events():
            new, sent[0] = task.lines[sent[0]:], len(task.lines)
            finished = task.state != "running"
            out = [("line", line, False) for line in new]
            return out + [("state", {"state": task.state, "error": task.error, "result": task.result}, finished)]

        return event_stream(events, 0.5)

    # --- jobs: the editor -------------------------------------------------------------------------

    @app.get("/jobs/new", response_class=HTMLResponse)
    def new_job(request: Request, prepared: str | None = None):
        raw = {"name": "my-job", "model": {"base": "embedded:smollm2-135m-instruct"},
               "data": {"train": [f"../prepared/{prepared}"] if prepared else []}}
        return _editor(request, "my-job", raw, {})

    @app.get("/jobs/{name}", response_class=HTMLResponse)
    def edit_job(request: Request, name: str):
        path = ws.job_file(name)
        if not path.is_file():
            raise WorkspaceError(f"no job {name!r} in the workspace; create one on the Jobs page")
        return _editor(request, path.stem, yaml.safe_load(path.read_text(encoding="utf-8")) or {}, {})

    @app.post("/jobs/save", response_class=HTMLResponse)
    async def save_job(request: Request):
        form = await request.form()
        file_name = str(form.get("file_name") or "")
        if form.get("source") == "yaml":
            try:
                raw = yaml.safe_load(str(form.get("yaml") or "")) or {}
                if not isinstance(raw, dict):
                    raise yaml.YAMLError("the top level must be a mapping of sections")
            except yaml.YAMLError as exc:
                return _editor(request, file_name, {}, {"(yaml)": f"not valid YAML: {exc}"}, str(form.get("yaml")))
        else:
            raw, problems = _form_to_raw(form)
            if problems:
                return _editor(request, file_name, raw, problems)
        problems = _validate(raw)
        try:
            path = ws.job_file(file_name)
        except WorkspaceError as exc:
            problems["(file name)"] = str(exc)
        if problems:
            return _editor(request, file_name, raw, problems)
        ws.write_job(path.stem, raw)
        return back(f"/jobs/{path.stem}?saved=1")

    def _editor(request, file_name: str, raw: dict, problems: dict, yaml_source: str | None = None):
        flat = _flatten(raw)
        fields = [{"key": key, "type": type_name, "default": default, "doc": doc, "value": flat.get(key, ""),
                   "choices": type_name.removeprefix("one of: ").split(", ") if type_name.startswith("one of:")
                   else None, "problem": problems.get(key)} for key, type_name, default, doc in describe_fields()]
        known = {f["key"] for f in fields}
        other = {k: v for k, v in problems.items() if k not in known}
        sections: dict[str, list] = {}
        for f in fields:
            sections.setdefault(f["key"].split(".")[0] if "." in f["key"] else "job", []).append(f)
        return studio.render("job.html", request, file_name=file_name, sections=sections, other=other,
                             yaml_source=yaml_source if yaml_source is not None else
                             yaml.safe_dump(raw, sort_keys=False, allow_unicode=True),
                             saved=request.query_params.get("saved"), queue=studio.queue)

    # --- the queue --------------------------------------------------------------------------------

    @app.post("/jobs/{name}/launch")
    def launch(name: str):
        path = ws.job_file(name)
        if not path.is_file():
            raise WorkspaceError(f"no job {name!r} in the workspace")
        job_id = studio.queue.submit(path, name=path.stem)
        return back(f"/queue/{job_id}")

    @app.post("/queue/{job_id}/cancel")
    def cancel(job_id: int):
        studio.queue.cancel(job_id)
        return back(f"/queue/{job_id}")

    @app.post("/queue/{job_id}/resume")
    def resume(job_id: int):
        return back(f"/queue/{studio.queue.resume(job_id)}")

    @app.get("/queue", response_class=HTMLResponse)
    def queue_page(request: Request):
        rows = []
        for job in studio.queue.list(100):
            run = _run_of(job)
            rows.append({**job, "run": f"{run.name}/{run.id}" if run else None,
                         "created_text": time.strftime("%Y-%m-%d %H:%M", time.localtime(job["created"]))})
        return studio.render("queue.html", request, queue=rows, jobs=ws.job_files(), running=studio.queue.max_running)

    @app.get("/queue/{job_id}", response_class=HTMLResponse)
    def queued(request: Request, job_id: int):
        job = studio.queue.get(job_id)
        if job is None:
            raise WorkspaceError(f"no queued job {job_id}")
        run = _run_of(job)
        if run is not None:
            return back(f"/runs/{run.name}/{run.id}")
        return studio.render("queued.html", request, job=job, log=studio.queue.log_tail(job_id))

    # --- runs: live curves, results ---------------------------------------------------------------

    @app.get("/runs/{name}/{run_id}", response_class=HTMLResponse)
    def run_page(request: Request, name: str, run_id: str):
        run = ws.run(name, run_id)
        job = _queue_job_of(run)
        return studio.render("run.html", request, run=run, job=job, summary=run.summary() or {},
                             eval=run.eval_summary(), total_steps=_total_steps(run),
                             examples=(run.eval_examples() or [])[:5] if run.eval_summary() else [],
                             layers=run.layer_change(), estimate=_estimate(ws, run),
                             job_log=studio.queue.log_tail(job["id"], 20) if job else "")

    @app.get("/runs/{name}/{run_id}/events")
    def run_events(name: str, run_id: str):
        from tailor.studio.app import event_stream

        run, offset = ws.run(name, run_id), [0]
        job_id = [None]  # the queue's job of this run: looked for until found, then only read by id

        def events():
            rows, offset[0] = _metrics_since(run, offset[0])
            if job_id[0] is None:
                job_id[0] = (_queue_job_of(run) or {}).get("id")
            job = studio.queue.get(job_id[0]) if job_id[0] is not None else None
            running = job is not None and job["state"] in ("queued", "running")
            state = {"done": run.done, "state": job["state"] if job else ("done" if run.done else "stopped"),
                     "log": studio.queue.log_tail(job["id"], 20) if job else ""}
            return [("metric", r, False) for r in rows] + [("state", state, not running)]

        return event_stream(events, 1.0)

    @app.get("/runs/{name}/{run_id}/report")
    def report(name: str, run_id: str):
        run = ws.run(name, run_id)
        if not run.report_file.is_file():
            raise WorkspaceError(f"run {name}/{run_id} has no report yet (it is written when training ends)")
        return FileResponse(run.report_file)

    @app.post("/runs/{name}/{run_id}/export")
    def export(name: str, run_id: str):
        run = ws.run(name, run_id)
        if not run.done:
            raise WorkspaceError(f"run {name}/{run_id} has not finished; export it once it has")
        task = studio.tasks.start(f"export {name}/{run_id}", lambda t: _export(run, t.say))
        return back(f"/tasks/{task.id}")

    @app.get("/compare", response_class=HTMLResponse)
    def compare(request: Request, runs: list[str] = Query(...)):
        """The job keys that differ between the runs, and their measures side by side."""
        chosen = [ws.run(*_run_ref(r)) for r in runs]
        if len(chosen) < 2:
            raise WorkspaceError("pick two runs or more to compare")
        jobs = [_flatten(r.raw_job() or {}) for r in chosen]
        keys = sorted({k for j in jobs for k in j} - {"name", "output.dir"})
        differ = [(k, [j.get(k, "(default)") for j in jobs]) for k in keys if len({j.get(k) for j in jobs}) > 1]
        measures: dict[str, list] = {}
        for i, r in enumerate(chosen):
            summary, evaluation = r.summary() or {}, r.eval_summary() or {}
            rows = {"steps": summary.get("steps"), "final train loss": summary.get("final_train_loss"),
                    "final validation loss": summary.get("final_val_loss"),
                    **{f"test {k} (tuned)": v for k, v in (evaluation.get("tuned") or {}).items()},
                    "gate": None if not evaluation.get("gate") else
                    ("passed" if evaluation["gate"].get("passed") else "failed")}
            for k, v in rows.items():
                measures.setdefault(k, [None] * len(chosen))[i] = v
        return studio.render("compare.html", request, runs=chosen, differ=differ, measures=measures)

    @app.get("/api/runs/{name}/{run_id}/metrics")
    def run_metrics(name: str, run_id: str):
        return JSONResponse(ws.run(name, run_id).metrics())

    # --- helpers that need the studio -------------------------------------------------------------

    def _queue_job_of(run: Run) -> dict | None:
        for job in studio.queue.list(200):
            if job.get("run_dir") and Path(job["run_dir"]).resolve() == run.path.resolve():
                return job
        return None

    def _run_of(job: dict) -> Run | None:
        return Run(job["run_dir"]) if job.get("run_dir") and Run(job["run_dir"]).exists else None

    def _validate(raw: dict) -> dict[str, str]:
        try:
            parse_job(raw, "job")
        except SpecError as exc:
            return dict(p.split(": ", 1) if ": " in p else ("(job)", p) for p in exc.problems)
        return {}


@functools.cache
def _sections() -> frozenset[str]:
    """The dotted prefixes of the schema's nested sections ("training.", "training.replay.")."""
    return frozenset(key.rsplit(".", 1)[0] + "." for key, *_ in describe_fields() if "." in key)


def _flatten(raw: dict, prefix: str = "") -> dict[str, str]:
    """The job's values by dotted key (the keys of `tailor spec`), as YAML text for the editor."""
    out = {}
    for key, value in (raw or {}).items():
        if isinstance(value, dict) and any(s.startswith(f"{prefix}{key}.") for s in _sections()):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip() \
                .removesuffix("\n...")
    return out


def _form_to_raw(form) -> tuple[dict, dict[str, str]]:
    """The editor's inputs (field names "k:KEY", values as YAML; empty = the default) as a job dict."""
    raw, problems = {}, {}
    for name, text in form.multi_items():
        if not name.startswith("k:") or not str(text).strip():
            continue
        key = name[2:]
        try:
            value = yaml.safe_load(str(text))
        except yaml.YAMLError as exc:
            problems[key] = f"not a YAML value: {exc}"
            continue
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 2e-4 (no dot) as text; people write it so
        node = raw
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return raw, problems


def _export(run: Run, say) -> str:
    """`tailor export RUN` with its parity check; the folder and the parity line, as the CLI says them."""
    from tailor.serve.export import export_run, parity, parity_lines, write_parity

    folder = export_run(run.path, None, "float32", say=say)
    result = parity(run.path, folder, None, 48)
    write_parity(folder, result)
    for line in parity_lines(result):
        say(line)
    return str(folder)


def _run_ref(ref: str) -> tuple[str, str]:
    name, _, run_id = ref.partition("/")
    return name, run_id


def _run_row(run: Run) -> dict:
    summary = run.summary() or {}
    gate = ((run.eval_summary() or {}).get("gate") or {})
    return {"name": run.name, "id": run.id, "done": run.done, "steps": summary.get("steps"),
            "train_loss": summary.get("final_train_loss"), "val_loss": summary.get("final_val_loss"),
            "gate": None if not gate else ("passed" if gate.get("passed") else "failed")}


def _metrics_since(run: Run, offset: int) -> tuple[list[dict], int]:
    """The rows metrics.jsonl gained since byte `offset` (only whole lines)."""
    path = run.metrics_file
    if not path.is_file():
        return [], offset
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1
    rows = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
    return rows, offset + end


def _total_steps(run: Run) -> int | None:
    """About how many optimizer steps the run makes: max_steps, or epochs of its packed rows (the
    values `auto` chose are in the manifest)."""
    try:
        training, manifest = run.job().training, run.manifest() if run.has_manifest else None
    except Exception:  # a run folder from an older version: no progress bar, the rest still shows
        return None
    if training.max_steps:
        return training.max_steps
    chosen = {a.get("key"): a.get("value") for a in (manifest.auto or [])} if manifest else {}
    value = lambda key: chosen.get(f"training.{key}", getattr(training, key))  # noqa: E731
    rows = (manifest.encoding or {}).get("rows") if manifest else None
    if not rows or not all(isinstance(value(k), (int, float)) for k in ("batch_size", "grad_accum", "epochs")):
        return None
    return math.ceil(math.ceil(rows / value("batch_size")) / value("grad_accum") * value("epochs"))


def _estimate(ws, run: Run) -> float | None:
    """The advisor's training seconds for this job, where the studio's advisor wrote it."""
    value = (read_json(ws.advice_file(run.name)) or {}).get("train_seconds")
    return float(value) if isinstance(value, (int, float)) else None


def _rejects(folder: Path, card: dict, allow: list[str]) -> list[dict]:
    """The first rejects with their reasons; the record's text anonymized as the dataset was (its
    strategy and allow-list)."""
    path = folder / "rejects.jsonl"
    if not path.is_file():
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if len(rows) == REJECTS_SHOWN:
                break
            rows.append(json.loads(line))
    texts = [str(r.get("record") or "") for r in rows]
    if any(texts):
        from tailor.data.privacy import Anonymizer

        strategy = (card.get("privacy") or {}).get("strategy", "placeholder")
        anonymizer = Anonymizer(strategy="placeholder" if strategy == "drop" else strategy, allow=allow)
        texts = [t for t, _ in anonymizer.anonymize_batch(texts)]
    return [{**r, "record": t} for r, t in zip(rows, texts)]

