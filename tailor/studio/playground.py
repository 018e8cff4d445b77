"""Step 7 in the studio: chat with a finished run and its base side by side, rate the answers.

The playground is `tailor serve`'s own API (tailor/serve), mounted at /playground/api and built
the first time a run is opened: the same batching, streaming and feedback store as a deployment,
with the workspace's feedback.db, so that what users rate here feeds the feedback loop. Runs are
added to it as they are opened; LoRA runs share one copy of their base."""

from __future__ import annotations

import threading

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

from tailor.runs import Run
from tailor.studio.workspace import WorkspaceError


class Playground:
    """The serving stack behind /playground/api, built on first use."""

    def __init__(self, studio):
        self.studio, self.app, self.models, self.batcher = studio, None, None, None
        self._lock = threading.Lock()

    def open(self, run: Run) -> tuple[str, str]:
        """(the run's model name, its base's model name) in the playground's API, loading them when new."""
        from tailor.serve.models import check_name
        from tailor.serve.server import ServeSettings, build

        name = check_name(f"{run.name}-{run.id}")
        with self._lock:
            if self.models is None:
                self.app, self.models, self.batcher = build(ServeSettings(
                    runs=[f"{name}={run.path}"], db=self.studio.workspace.feedback_url, host=self.studio.host,
                    dtype="auto"), say=lambda m: None)
            elif name not in self.models.names():
                self.models.add_run(run.path, name)
        return name, self.models.get(name).base

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()

    async def __call__(self, scope, receive, send):  # the ASGI app mounted at /playground/api
        if self.app is None:
            response = JSONResponse({"error": {"message": "open a run in the playground first", "type":
                                               "invalid_request_error", "param": None, "code": "no_model"}}, 404)
            return await response(scope, receive, send)
        await self.app(scope, receive, send)


def add_routes(app: FastAPI, studio) -> None:
    ws = studio.workspace
    studio.playground = Playground(studio)
    app.mount("/playground/api", studio.playground)

    @app.get("/playground", response_class=HTMLResponse)
    def playground(request: Request, run: str | None = None):
        finished = [r for r in ws.runs() if r.done and r.result is not None]
        chosen = names = None
        if run:
            name, _, run_id = run.partition("/")
            chosen = ws.run(name, run_id)
            if not chosen.done or chosen.result is None:
                raise WorkspaceError(f"run {run} has not finished; the playground serves finished runs")
            names = studio.playground.open(chosen)
        return studio.render("playground.html", request, runs=finished, chosen=chosen,
                             tuned=names[0] if names else None, base=names[1] if names else None)
