"""`tailor studio`: check the settings are safe, open the workspace and its queue, serve the pages."""

from __future__ import annotations

from pathlib import Path

from tailor.errors import TailorError
from tailor.serve.server import is_loopback
from tailor.studio.app import Studio, create_app
from tailor.studio.queue import JobQueue
from tailor.studio.workspace import Workspace


class StudioSettingsError(TailorError, ValueError):
    pass


def build(workspace: str | Path, host: str = "127.0.0.1", token: str | None = None, max_running: int = 1,
          max_upload_mb: int = 200) -> tuple[Studio, object]:
    """(studio, app): the workspace opened and its queue started (jobs that ran when the studio
    stopped are reattached or marked interrupted)."""
    if not is_loopback(host) and not token:
        raise StudioSettingsError(f"--host {host}: a studio that other machines can reach trains, reads and "
                                  "writes files on this one; give it a --token (or TAILOR_STUDIO_TOKEN), or keep "
                                  "the default --host 127.0.0.1")
    if max_running < 1:
        raise StudioSettingsError(f"--max-running {max_running}: at least 1")
    ws = Workspace(Path(workspace))
    queue = JobQueue(ws.queue_db, ws.logs_dir, max_running=max_running, workdir=ws.root).start()
    studio = Studio(ws, queue, token=token, host=host, max_upload_bytes=max_upload_mb << 20)
    return studio, create_app(studio)


def serve(workspace: str | Path, host: str, port: int, token: str | None, max_running: int, max_upload_mb: int,
          say=print) -> None:
    import uvicorn

    studio, app = build(workspace, host, token, max_running, max_upload_mb)
    address = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
    say(f"Tailor Studio on {address}{'?token=' + token if token else ''} (workspace {studio.workspace.root}); "
        "Ctrl+C stops the studio, not the trainings it started")
    try:
        # The pages' event streams stay open while a run trains: a stop must not wait for them
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=3)
    finally:
        studio.queue.stop()

