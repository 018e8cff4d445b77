"""The feedback loop in the studio: what users rated, and "continue training from this feedback":
export it (tailor feedback export), prepare it (tailor prepare) and queue a job that continues the
run from its adapter (tailor train --from-run), in one action."""

from __future__ import annotations

import time

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from tailor.studio.workspace import WorkspaceError

SHOWN = 100


def add_routes(app: FastAPI, studio) -> None:
    ws = studio.workspace

    def store():
        from tailor.feedback.store import FeedbackStore

        return FeedbackStore(ws.feedback_url)

    @app.get("/feedback", response_class=HTMLResponse)
    def feedback_page(request: Request):
        has_store = (ws.root / "feedback.db").exists()
        counts = store().counts() if has_store else {}
        rows = store().rows(limit=SHOWN) if has_store else []
        runs = {f"{r.name}-{r.id}": f"{r.name}/{r.id}" for r in ws.runs()}
        return studio.render("feedback.html", request, counts=counts, rows=rows, runs=runs)

    @app.post("/feedback/{model}/continue")
    def continue_training(model: str):
        runs = {f"{r.name}-{r.id}": r for r in ws.runs()}
        if model not in runs:
            raise WorkspaceError(f"{model!r} is not a run of this workspace: only a run's own feedback can continue it")
        run = runs[model]
        task = studio.tasks.start(f"feedback {model}", lambda t: _continue(studio, run, model, t.say))
        return RedirectResponse(f"/tasks/{task.id}", 303)


def _continue(studio, run, model: str, say) -> str:
    """Export `model`'s feedback, prepare it, write a job that continues `run` on it, queue the job.
    Returns the queued job's page."""
    from tailor.data.prepare import prepare
    from tailor.feedback.export import export
    from tailor.feedback.store import FeedbackStore

    ws, stamp = studio.workspace, time.strftime("%Y%m%d-%H%M%S")
    exported = export(FeedbackStore(ws.feedback_url), ws.root / "feedback" / f"{model}-{stamp}", model=model)
    say(f"{exported.n_completions} rated or corrected answers → {exported.n_supervised} training examples, "
        f"{exported.n_pairs} preference pairs")
    if exported.n_supervised == 0:
        raise WorkspaceError(f"no answer of {model} was rated well or corrected yet: nothing to train on. Rate "
                             "answers up, or send the answer you wanted, in the playground")
    name = f"feedback-{model}-{stamp}"
    prepare([str(exported.supervised)], ws.prepared_dir / name, say=say,
            config={"split": {"validation": 0.0, "test": 0.0}})
    job = run.raw_job() or {}
    job.update(name=f"{run.name}-feedback", data={"train": [f"../prepared/{name}"], "validation_fraction": 0.0},
               model={**job.get("model", {}), "from_run": str(run.path)})
    path = ws.write_job(f"{run.name}-feedback", job,
                        header=f"# Written by Tailor Studio: continue {run.name}/{run.id} on its users' feedback.\n")
    job_id = studio.queue.submit(path, name=path.stem)
    say(f"queued job #{job_id}: {path.name} continues {run.name}/{run.id} from its adapter")
    return f"/queue/{job_id}"
