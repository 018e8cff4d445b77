"""Tailor Studio's pages: the seven steps of a fine-tuning job in a browser.

Server-rendered (Jinja2) pages, a few lines of our own JavaScript (static/studio.js) and Plotly
from the plotly package: nothing is fetched from the network, nothing is built at install time.
Every action calls the same library functions as the CLI; training runs as `tailor train`
processes through the queue (queue.py), so a closed page or a restarted studio loses nothing.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, StreamingResponse
from jinja2 import Environment, PackageLoader, select_autoescape

from tailor.errors import TailorError
from tailor.serve.app import host_name, local_hosts
from tailor.studio import advise_page, feedback_page, pages, playground
from tailor.studio.queue import JobQueue
from tailor.studio.tasks import Tasks
from tailor.studio.workspace import Workspace

_STATIC = Path(__file__).parent / "static"


class Studio:
    """What the pages share: the workspace, the training queue, the short tasks, the settings."""

    def __init__(self, workspace: Workspace, queue: JobQueue, token: str | None = None, host: str = "127.0.0.1",
                 max_upload_bytes: int = 200 << 20):
        self.workspace, self.queue, self.tasks = workspace, queue, Tasks()
        self.token, self.host, self.max_upload_bytes = token, host, max_upload_bytes
        # Sent with every form and fetch of our pages; a page of another site cannot read it, so it
        # cannot make a browser post to the studio (cross-site request forgery).
        self.csrf = secrets.token_urlsafe(24)
        self.templates = Environment(loader=PackageLoader("tailor.studio", "templates"),
                                     autoescape=select_autoescape(["html"]))

    def render(self, template: str, request: Request, **context) -> HTMLResponse:
        page = self.templates.get_template(template).render(csrf=self.csrf, path=request.url.path, **context)
        return HTMLResponse(page)


def create_app(studio: Studio) -> FastAPI:
    app = FastAPI(title="Tailor Studio", docs_url=None, redoc_url=None, openapi_url=None)

    app.add_middleware(_Guard, studio=studio)

    @app.exception_handler(TailorError)
    async def user_error(request: Request, exc: TailorError):
        page = studio.render("error.html", request, message=str(exc))
        page.status_code = 400
        return page

    @app.get("/static/{name}")
    async def static(name: str):
        if name == "plotly.min.js":
            import plotly

            return FileResponse(Path(plotly.__file__).parent / "package_data" / "plotly.min.js",
                                media_type="text/javascript")
        path = _STATIC / Workspace.check_name(name)
        if not path.is_file():
            raise HTTPException(404)
        return FileResponse(path)

    for routes in (pages, advise_page, playground, feedback_page):
        routes.add_routes(app, studio)
    return app


class _Guard:
    """Every request passes here first (plain ASGI, so that streams notice a client that leaves):
    the Host check of a studio without a token (DNS rebinding), the token, and the CSRF check of
    everything that is not a GET. Forms carry the CSRF value in their query string
    (`?csrf=…`), fetches in the X-Studio-CSRF header, so the body is never read here."""

    def __init__(self, app, studio: Studio):
        self.app, self.studio = app, studio
        self.hosts = local_hosts(studio.host)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        refusal = self.refusal(request)
        if refusal is None:
            return await self.app(scope, receive, send)
        await refusal(scope, receive, send)

    def refusal(self, request: Request):
        studio, host_header = self.studio, request.headers.get("host") or ""
        host = host_name(host_header)
        if studio.token is None and host not in self.hosts:
            return HTMLResponse(f"host {host!r} is not this studio's; open it as http://127.0.0.1", 400)
        if studio.token is not None:
            given = request.query_params.get("token")
            if given is not None and hmac.compare_digest(given.encode(), studio.token.encode()):
                response = RedirectResponse(request.url.path, 303)
                response.set_cookie("tailor_studio", studio.token, httponly=True, samesite="strict")
                return response
            cookie = request.cookies.get("tailor_studio") or ""
            if not hmac.compare_digest(cookie.encode(), studio.token.encode()):
                return HTMLResponse("this studio needs its token: open the address `tailor studio` printed "
                                    "(…/?token=…)", 401)
        if request.method not in ("GET", "HEAD"):
            origin = request.headers.get("origin")
            sent = request.headers.get("x-studio-csrf") or request.query_params.get("csrf") or ""
            if (origin and origin.split("://", 1)[-1] != host_header) or \
                    not hmac.compare_digest(sent.encode(), studio.csrf.encode()):
                return HTMLResponse("refused: this request did not come from this studio's own pages "
                                    "(reload the page and try again)", 403)
        return None


async def sse(events, interval: float = 1.0):
    """Server-sent events from `events()`, a function returning (name, data, finished) tuples each
    time it is called; the stream ends after a batch that says finished."""
    while True:
        finished = False
        for name, data, finished in events():
            yield f"event: {name}\ndata: {json.dumps(data)}\n\n"
        if finished:
            yield "event: end\ndata: {}\n\n"
            return
        await asyncio.sleep(interval)


def event_stream(events, interval: float = 1.0) -> StreamingResponse:
    return StreamingResponse(sse(events, interval), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
