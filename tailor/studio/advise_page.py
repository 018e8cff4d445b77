"""Steps 2-3 in the studio: the advisor's questions as a form, its verdict, ranked models and
estimates, and "create this job" (the starter job, pointed at the workspace's prepared data)."""

from __future__ import annotations

import json
import time
from typing import get_args

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import ValidationError

from tailor.advise.answers import Answers, Expertise, MethodAnswer, Stage, UseCase
from tailor.files import write_json
from tailor.studio.workspace import WorkspaceError


def add_routes(app: FastAPI, studio) -> None:
    ws = studio.workspace

    def form_page(request: Request, values: dict, problems: dict):
        from tailor.advise.estimate import hardware_table

        return studio.render("advise.html", request, values=values, problems=problems,
                             prepared=ws.prepared_sets(), targets=["local", *hardware_table()],
                             choices={"use_case": get_args(UseCase), "stage": get_args(Stage),
                                      "expertise": get_args(Expertise), "method": get_args(MethodAnswer)},
                             descriptions={k: f.description for k, f in Answers.model_fields.items()})

    @app.get("/advise", response_class=HTMLResponse)
    def advise_form(request: Request, prepared: str | None = None):
        return form_page(request, {"prepared": prepared or "", "use_case": "voice", "languages": "en",
                                   "target": "local", "expertise": "some", "stage": "production", "method": "auto",
                                   "commercial": "true"}, {})

    @app.post("/advise", response_class=HTMLResponse)
    async def advise_start(request: Request):
        form = {k: str(v) for k, v in (await request.form()).items()}
        problems, answers = {}, None
        try:
            folder = ws.prepared(form.get("prepared", ""))
        except WorkspaceError as exc:
            problems["prepared"] = str(exc)
            folder = None
        raw = {"use_case": form.get("use_case"), "goal": form.get("goal", ""),
               "languages": [x.strip() for x in form.get("languages", "en").split(",") if x.strip()],
               "data": {"path": str(folder) if folder else None, "examples": None if folder else 1},
               "compute": {"target": form.get("target", "local")}, "expertise": form.get("expertise"),
               "stage": form.get("stage"), "commercial": form.get("commercial") == "true",
               "method": form.get("method", "auto")}
        for key in ("deadline_hours", "budget_usd"):
            if form.get(key, "").strip():
                try:
                    raw[key] = float(form[key])
                except ValueError:
                    problems[key] = f"a number, got {form[key]!r}"
        try:
            answers = Answers.model_validate(raw)
        except ValidationError as exc:
            for err in exc.errors():
                problems[".".join(str(p) for p in err["loc"]) or "answers"] = err["msg"]
        if problems:
            return form_page(request, form, problems)
        task = studio.tasks.start("advise", lambda t: _advise(ws, answers, form.get("prepared", ""), t.say))
        return RedirectResponse(f"/advise/{task.id}", 303)

    @app.get("/advise/{task_id}", response_class=HTMLResponse)
    def advice_page(request: Request, task_id: int):
        task = studio.tasks.get(task_id)
        if task is None or task.title != "advise":
            raise WorkspaceError(f"no advice {task_id} (advice is kept until the studio restarts)")
        if task.state != "done":
            return studio.render("task.html", request, task=task)
        return studio.render("advice.html", request, task=task, advice=task.result)

    @app.post("/advise/{task_id}/create")
    async def create_job(request: Request, task_id: int):
        task = studio.tasks.get(task_id)
        if task is None or task.state != "done" or not task.result.get("job"):
            raise WorkspaceError(f"advice {task_id} has no job to create (no model fitted the answers)")
        name = ws.check_name(str((await request.form()).get("name") or ""), "job name")
        ws.write_job(name, dict(task.result["job"], name=name),
                     header="# Written by Tailor Studio from the advisor's starter job.\n")
        write_json(ws.advice_file(name), {"train_seconds": task.result["train_seconds"], "created": time.time()})
        return RedirectResponse(f"/jobs/{name}?saved=1", 303)


def _advise(ws, answers: Answers, prepared: str, say) -> dict:
    """The advice as the page shows it; its starter job reads the prepared folder from jobs/."""
    from tailor.advise import advise, pick_hardware
    from tailor.advise.estimate import fmt_duration
    from tailor.advise.profile import from_path
    from tailor.advise.report import markdown

    data = from_path(answers.data.path, "embedded:smollm2-135m-instruct", ws.root / ".studio" / "advice", say)
    adv = advise(answers, data, pick_hardware(answers))
    job = None
    if adv.job is not None:
        job = json.loads(json.dumps(adv.job))
        job.setdefault("data", {})["train"] = [f"../prepared/{prepared}"]
    train_s = adv.run_time.training.seconds if adv.run_time else None
    return {"headline": adv.verdict.headline, "decision": adv.verdict.decision,
            "reasons": [{"side": r.side, "case": r.case, "text": r.text} for r in adv.verdict.reasons],
            "instead": list(adv.verdict.instead), "models": [
                {"name": c.model.name, "why": "; ".join(c.why[:3]), "method": c.plan.method,
                 "time": fmt_duration(c.plan.seconds), "memory_gb": round(c.plan.memory.total / 1e9, 1),
                 "usd": round(c.plan.usd, 2)} for c in adv.candidates if c.eligible][:5],
            "technique": f"{adv.technique.name}: {adv.technique.why}", "job": job, "train_seconds": train_s,
            "total": fmt_duration(adv.run_time.total_s) if adv.run_time else None, "markdown": markdown(adv),
            "hardware": adv.hardware.label}
