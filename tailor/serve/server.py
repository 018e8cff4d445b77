"""`tailor serve`: load the models, check the settings are safe, and run the API under uvicorn."""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tailor.errors import TailorError
from tailor.feedback.store import DEFAULT_DB, FeedbackStore
from tailor.serve.app import Limits, create_app
from tailor.serve.batcher import Batcher
from tailor.serve.models import ModelSet


class ServeError(TailorError, ValueError):
    """Settings the server refuses to start with; the message says what to change."""


@dataclass
class ServeSettings:
    runs: list[str] = field(default_factory=list)  # run folders, or NAME=FOLDER
    base: str | None = None  # a base model to serve besides the runs' (default: embedded, when no runs)
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()
    db: str = DEFAULT_DB
    dtype: str = "auto"
    max_batch: int = 8
    threads: int | None = None
    limits: Limits = field(default_factory=Limits)
    log_prompts: bool = False
    privacy: str | None = None  # a data.yaml or job file whose privacy: section configures the log anonymizer
    engine: str = "transformers"
    admin_key: str | None = None  # POST /v1/adapters needs it; None: the route is closed (403)
    runs_dir: str = "runs"  # the folder whose finished runs POST /v1/adapters may add, as NAME/RUN-ID


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def api_keys_from(values: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The keys of --api-key options and TAILOR_API_KEY: each may hold several, comma-separated
    ("a, b" → a and b); spaces around a key are not part of it, empty ones are dropped."""
    return tuple(key.strip() for value in values for key in value.split(",") if key.strip())


def check_settings(s: ServeSettings) -> None:
    if s.limits.max_waiting < 1:
        raise ServeError(f"--max-waiting {s.limits.max_waiting}: at least 1 (the requests that may wait for a row)")
    if not s.limits.request_timeout > 0:
        raise ServeError(f"--request-timeout {s.limits.request_timeout}: a number of seconds over 0")
    if not is_loopback(s.host) and not s.api_keys:
        raise ServeError(f"--host {s.host} makes the server reachable from other machines: give it an API key "
                         f"(--api-key KEY or the TAILOR_API_KEY environment variable); clients send it as "
                         f"`Authorization: Bearer KEY`")
    if s.admin_key is not None and s.admin_key.strip() in s.api_keys:
        raise ServeError("--admin-key is also an --api-key: every client could add adapters; choose an admin key "
                         "of its own (or TAILOR_ADMIN_KEY)")
    if s.limits.default_max_tokens > s.limits.max_tokens:
        s.limits.default_max_tokens = s.limits.max_tokens


def build(s: ServeSettings, say=print):
    """(app, models, batcher): everything loaded, ready for uvicorn or a test client."""
    check_settings(s)
    batcher = Batcher(256 if s.engine == "vllm" else s.max_batch)  # vLLM batches by itself: give it all that waits
    if s.threads:
        batcher.call(lambda: torch.set_num_threads(s.threads))
    models = ModelSet(batcher, s.dtype, engine=s.engine)
    if s.base or not s.runs:
        models.add_base(s.base or "embedded:smollm2-135m-instruct")
    for run in s.runs:
        name, _, folder = run.rpartition("=") if "=" in run else ("", "", run)
        added = models.add_run(Path(folder), name or None)
        say(f"serving {added} ← {folder}")
    say(f"serving {models.default} (also as `base`)")
    store = FeedbackStore(s.db)
    app = create_app(models, store, s.api_keys, s.limits, _prompt_logger(s), host=s.host,
                     admin_key=(s.admin_key or "").strip() or None, runs_dir=s.runs_dir)
    return app, models, batcher


def _prompt_logger(s: ServeSettings):
    """None (nothing logged), or the function prompts and answers go through before the log."""
    if not s.log_prompts:
        return None
    from tailor.data.privacy import Anonymizer
    from tailor.spec import PrivacySpec, load_data_config

    privacy = load_data_config(s.privacy)[0].privacy if s.privacy else PrivacySpec()
    if not privacy.enabled:
        return str
    anonymizer = Anonymizer.from_spec(privacy, drop_as="mask")  # a log line is never dropped: masked instead
    return lambda text: anonymizer.anonymize_batch([text])[0][0]


class InThread:
    """The API served by uvicorn in a thread of this process, on 127.0.0.1 and a free port (the
    quickstart's demonstration and the tests). `with InThread(app, batcher) as live: live.url`."""

    def __init__(self, app, batcher: Batcher | None = None, port: int = 0):
        import threading

        import uvicorn

        self.batcher = batcher
        # log_config=None: uvicorn's own logging setup (logging.config.dictConfig) would close the
        # handlers of the process it runs in, which here is someone else's (the quickstart's, a test's).
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                                    log_config=None))
        self.thread = threading.Thread(target=self.server.run, name="tailor-uvicorn", daemon=True)
        self.url = ""

    def __enter__(self) -> "InThread":
        import time

        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise RuntimeError("the server did not start (is the port free?)")
            time.sleep(0.02)
        self.url = "http://127.0.0.1:%d" % self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        if self.batcher is not None:
            self.batcher.close()


def serve(s: ServeSettings, say=print) -> None:
    import uvicorn

    app, _, batcher = build(s, say)
    logger = logging.getLogger("tailor.serve")  # errors always; prompts and answers with --log-prompts
    logger.setLevel(logging.INFO)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    say(f"OpenAI-compatible API on http://{s.host}:{s.port}/v1" + (" (API key required)" if s.api_keys else ""))
    try:
        uvicorn.run(app, host=s.host, port=s.port, log_level="info", timeout_graceful_shutdown=5)
    finally:
        batcher.close()
