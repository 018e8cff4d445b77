"""The HTTP API: OpenAI's chat and text completions (streamed or not), models, feedback, health and
Prometheus metrics, with OpenAI-style JSON errors for every bad request.

Any OpenAI client works against it: set its base URL to http://HOST:PORT/v1 and its API key to
the server's (any string when the server has none).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from jinja2 import TemplateError
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from tailor.errors import TailorError
from tailor.feedback.store import Completion, CompletionWriter, FeedbackStore, failure_reason
from tailor.models.decode import Request, Sampling
from tailor.serve.batcher import Unavailable
from tailor.serve.metrics import Metrics
from tailor.serve.models import ModelError, ModelSet

# The names pydantic puts in an error's location for the member of a union it tried
# ("messages.0.content.str"): type names, not keys of the request, so the client never sees them.
_UNION_MEMBER = re.compile(r"(str|int|float|bool|none|(list|dict|literal|function-\w+)\[.*\])")

log = logging.getLogger("tailor.serve")


@dataclass
class Limits:
    max_tokens: int = 1024  # the most a request may ask for
    default_max_tokens: int = 256  # when a request does not say
    max_body_bytes: int = 1 << 20
    max_waiting: int = 256  # requests waiting for a row; more get a 503 with Retry-After
    request_timeout: float = 600.0  # seconds from arrival to the last token; later: cancelled, 504


MAX_STOPS, MAX_STOP_CHARS = 4, 256  # stop strings are searched for at every token
RETRY_AFTER_S = 2  # what a 503 for a full queue tells the client to wait: about one short answer
POLL_S = 0.25  # how often a waiting request checks its client and its deadline


class ApiError(TailorError):
    """A request the API refuses: answered with `status` and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers


# --- requests ------------------------------------------------------------------------------------
# Every field is bounded here: a value the decoder cannot take (a seed over 64 bits, an empty
# prompt) would otherwise fail inside a batch, where other clients' requests decode too.

Seed = Annotated[int, Field(ge=0, lt=2**63, description="the sampler's seed: 0 to 2**63 - 1")]


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | Annotated[list[dict], Field(min_length=1)] = Field(
        description="Text, or OpenAI's list of content parts (text parts only).")
    name: str | None = Field(None, max_length=64)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Sampled(BaseModel):
    # Unknown keys are refused with their name, so a client never believes an option took effect.
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=1024)  # a base may be named by its folder
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: Seed | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    user: str | None = Field(None, max_length=256)
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0, description="not supported: 0 only")
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0, description="not supported: 0 only")


class ChatRequest(_Sampled):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(_Sampled):
    prompt: str | list[str] = Field(description="Text to continue, or a list of one text.")


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    completion_id: str = Field(max_length=100)
    rating: Literal["up", "down", 1, 2, 3, 4, 5] | None = None
    correction: str | None = Field(None, description="The answer the user wanted instead.")
    comment: str | None = None


class AdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    run: str = Field(max_length=1024, description="A finished LoRA run under the server's --runs-dir: NAME/RUN-ID.")
    name: str | None = None


# --- the app -------------------------------------------------------------------------------------


def create_app(models: ModelSet, store: FeedbackStore, api_keys: tuple[str, ...] = (), limits: Limits = Limits(),
               log_prompts=None, host: str = "127.0.0.1", admin_key: str | None = None,
               runs_dir: str | Path = "runs") -> FastAPI:
    """log_prompts: None (prompts and answers are never logged) or a function text → text that
    the server logs them through (the anonymizer, or str for raw logs). host: the address the
    server listens on; without API keys, the Host header must name it or loopback. admin_key:
    the key POST /v1/adapters needs (None: the route is closed); it adds runs from under runs_dir."""
    metrics = Metrics()
    writer = CompletionWriter(store, on_error=lambda completion_id, reason: _store_failed(
        metrics, "completion", f"completion {completion_id} not stored, its answer was sent", reason))
    app = FastAPI(title="Tailor", docs_url=None, redoc_url=None, openapi_url=None, lifespan=_closing(writer))
    models.batcher.on_step = metrics.batch_size.observe
    app.add_middleware(_BodyLimit, max_bytes=limits.max_body_bytes)
    app.add_middleware(_Front, metrics=metrics, api_keys=api_keys, hosts=local_hosts(host))

    @app.exception_handler(ApiError)
    async def api_error(_request, exc: ApiError):
        return _error(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        first = exc.errors()[0]
        loc = [str(p) for p in first["loc"] if p != "body" and not _UNION_MEMBER.fullmatch(str(p))]
        param = ".".join(loc) or None
        message = first["msg"]
        if first["type"] == "extra_forbidden":
            message = f"unsupported parameter {param}: Tailor does not implement it; remove it from the request"
        elif first["type"] == "json_invalid":
            message = f"the body is not valid JSON ({first.get('ctx', {}).get('error', message)})"
        else:
            message = f"{param or 'body'}: {message}"
        return _error(ApiError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status_code)
        return _error(ApiError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(Unavailable)
    async def unavailable(_request, exc: Unavailable):
        return _error(_as_api_error(exc))

    @app.exception_handler(Exception)
    async def crashed(_request, exc: Exception):
        return _error(_as_api_error(exc))

    @app.get("/health")
    async def health():
        if not models.batcher.alive:  # nothing would ever be answered: a load balancer should know
            return JSONResponse({"status": "error", "error": "the decoding thread has stopped (the server log has "
                                 "the error); restart the server", "models": models.names()}, status_code=503)
        return {"status": "ok", "models": models.names()}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [_model_card(models.served[n]) for n in models.names()]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str):
        return _model_card(_served(models, name))

    @app.post("/v1/adapters")
    async def add_adapter(body: AdapterRequest, client: HttpRequest):
        _check_admin(client, admin_key)
        try:  # ModelError's messages name the run as given, never by its folder on this disk
            name = await run_in_threadpool(models.add_run_under, runs_dir, body.run, body.name)
        except ModelError as exc:
            raise ApiError(400, str(exc), param="run") from None
        return _model_card(models.served[name])

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, client: HttpRequest):
        served = _served(models, body.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": _text(m.content, i)}
                    for i, m in enumerate(body.messages)]
        try:  # off the event loop: a long conversation takes a while to template and encode
            prompt_ids = await run_in_threadpool(served.engine.chat_prompt, messages)
        except TemplateError as exc:  # e.g. a template that insists on alternating user/assistant turns
            raise ApiError(400, f"messages: the model's chat template refuses this conversation ({exc})",
                           param="messages") from None
        return await _complete(served, body, prompt_ids, "chat", messages, client)

    @app.post("/v1/completions")
    async def complete(body: CompletionRequest, client: HttpRequest):
        served = _served(models, body.model)
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError(400, "prompt: one prompt per request (send several requests: they are batched)",
                               param="prompt")
            prompt = prompt[0]
        if not prompt:
            raise ApiError(400, "prompt: empty; send the text to continue", param="prompt")
        prompt_ids = await run_in_threadpool(served.engine.text_prompt, prompt)
        return await _complete(served, body, prompt_ids, "text", prompt, client)

    @app.post("/v1/feedback")
    async def give_feedback(body: FeedbackRequest):
        if body.rating is None and body.correction is None and body.comment is None:
            raise ApiError(400, "feedback needs a rating (up, down or 1-5), a correction or a comment", param="rating")
        # The completion's record may still wait in the writer's queue: feedback comes after it.
        if not await run_in_threadpool(writer.wait, body.completion_id):
            raise ApiError(503, f"completion {body.completion_id} is still waiting to be written to the feedback "
                                f"store; send the feedback again in a moment", param="completion_id",
                           code="store_busy", kind="server_error", headers={"Retry-After": str(RETRY_AFTER_S)})
        try:
            feedback_id = await run_in_threadpool(_add_feedback, store, body)
        except SQLAlchemyError as exc:
            _store_failed(metrics, "feedback", "feedback not stored", failure_reason(exc))
            raise ApiError(503, "the feedback store is unavailable (the server log says why); send the feedback "
                                "again later", code="store_unavailable", kind="server_error") from None
        if feedback_id is None:
            raise ApiError(404, f"no completion {body.completion_id} in this server's store; use the id of a "
                                f"completion this server answered", param="completion_id", code="not_found")
        metrics.feedback.labels("correction" if body.correction else "rating").inc()
        return {"id": feedback_id, "object": "feedback", "completion_id": body.completion_id}

    async def _complete(served, body: _Sampled, prompt_ids: list[int], kind: str, prompt, client: HttpRequest):
        deadline = time.monotonic() + limits.request_timeout
        if not prompt_ids:
            raise ApiError(400, "the prompt is empty once tokenized; send some text",
                           param="messages" if kind == "chat" else "prompt")
        sampling = _sampling(body, limits, len(prompt_ids), served.engine.context)
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        completion_id, created = f"{prefix}-{uuid.uuid4().hex}", int(time.time())
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        # Text pieces only for a stream: waking the event loop at every token costs the decoder time.
        request = Request(prompt_ids, sampling, served.adapter,
                          on_text=(lambda t: loop.call_soon_threadsafe(pieces.put_nowait, t)) if body.stream else None,
                          on_done=lambda r: loop.call_soon_threadsafe(pieces.put_nowait, None))
        if models.batcher.waiting >= limits.max_waiting:
            raise ApiError(503, f"the server is busy: {limits.max_waiting} requests are waiting already (tailor "
                                f"serve --max-waiting); retry in a moment", code="server_busy", kind="server_error",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        models.batcher.submit(served.engine, request)

        async def next_piece(watched: HttpRequest | None) -> str | None:
            """The next piece of answer (None: the answer is complete). At the deadline, or when the
            watched client (a non-streamed request's) has gone away, the request is cancelled (the
            batcher drops it, or frees its row) and this raises."""
            while (left := deadline - time.monotonic()) > 0:
                try:
                    return await asyncio.wait_for(pieces.get(), min(left, POLL_S))
                except asyncio.TimeoutError:
                    if watched is not None and await watched.is_disconnected():
                        request.cancelled = True
                        raise ApiError(499, "the client closed the connection", code="client_closed") from None
            request.cancelled = True
            raise ApiError(504, f"no complete answer within {limits.request_timeout:g} s (tailor serve "
                                f"--request-timeout); ask for fewer max_tokens, or retry when the server is less busy",
                           code="timeout", kind="server_error")

        async def finish() -> dict:
            if request.error is not None:
                raise request.error
            usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": len(request.token_ids),
                     "total_tokens": len(prompt_ids) + len(request.token_ids)}
            metrics.tokens(served.name, usage)
            # Written in the background: the answer is sent whether or not the store is up.
            writer.put(Completion(completion_id, served.name, kind, prompt, request.text, request.finish_reason,
                                  usage["prompt_tokens"], usage["completion_tokens"]))
            if log_prompts is not None:  # the anonymizer runs NER: not on the event loop
                shown = prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False)
                shown, answer = await run_in_threadpool(lambda: (log_prompts(shown), log_prompts(request.text)))
                log.info("%s %s prompt=%s answer=%s", completion_id, served.name, shown, answer)
            return usage

        if not body.stream:
            while await next_piece(client) is not None:
                pass
            usage = await finish()
            return _response(kind, completion_id, created, served.name, request.text, request.finish_reason, usage)

        async def events():
            try:
                if kind == "chat":
                    yield _sse(_chunk(kind, completion_id, created, served.name, {"role": "assistant", "content": ""}))
                try:  # a client that goes away cancels this generator: `finally` below frees its row
                    while (piece := await next_piece(None)) is not None:
                        delta = {"content": piece} if kind == "chat" else piece
                        yield _sse(_chunk(kind, completion_id, created, served.name, delta))
                    usage = await finish()
                except Exception as exc:  # headers are sent: the error goes in the stream, as OpenAI does
                    yield _sse(_error_body(_as_api_error(exc)))
                    return
                yield _sse(_chunk(kind, completion_id, created, served.name, {} if kind == "chat" else "",
                                  request.finish_reason))
                if body.stream_options and body.stream_options.include_usage:
                    yield _sse({**_chunk(kind, completion_id, created, served.name, None), "choices": [],
                                "usage": usage})
                yield "data: [DONE]\n\n"
            finally:
                request.cancelled = True  # a client that went away frees its row at the next token

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def _refusal(request: HttpRequest, api_keys: tuple[str, ...], hosts: set[str]) -> ApiError | None:
    """Why a request is refused before it is read, or None. A server with keys wants one (but for
    /health). A server without keys answers only requests addressed to this machine: otherwise a
    web page whose name resolves to 127.0.0.1 (DNS rebinding) could use it through a browser."""
    if not api_keys:
        given = request.headers.get("host", "")
        if host_name(given) in hosts:
            return None
        return ApiError(400, f"Host {given[:100]!r}: a server without an API key answers only requests to "
                             f"{', '.join(sorted(hosts))}; call it by one of those names, or start it with "
                             f"--api-key", code="invalid_host")
    # /v1/adapters takes the admin key instead, which the route checks (_check_admin)
    if request.url.path in ("/health", "/v1/adapters") or _key_ok(request.headers.get("authorization", ""), api_keys):
        return None
    return ApiError(401, "Incorrect or missing API key: send `Authorization: Bearer KEY` with a key this "
                         "server was started with (--api-key).", code="invalid_api_key", kind="authentication_error")


def _key_ok(authorization: str, api_keys: tuple[str, ...]) -> bool:
    """Compared in constant time with every key: the time taken tells nothing about a key."""
    given = authorization.removeprefix("Bearer ").strip().encode() if authorization.startswith("Bearer ") else b""
    matches = [hmac.compare_digest(given, key.encode()) for key in api_keys]
    return bool(given) and any(matches)


def local_hosts(host: str) -> set[str]:
    """The Host header names (without port) of this machine: loopback, and the address served on."""
    host = host.lower()
    return {"localhost", "127.0.0.1", "[::1]", host, f"[{host}]" if ":" in host else host}


def host_name(header: str) -> str:
    """A Host header without its port: 'localhost:8000' → 'localhost', '[::1]:8000' → '[::1]'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[:header.find("]") + 1]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _check_admin(client: HttpRequest, admin_key: str | None) -> None:
    """POST /v1/adapters loads weights from the server's disk: the operator's act, not a client's."""
    if not admin_key:
        raise ApiError(403, "adapters can be added only with --admin-key: start the server with one (or "
                            "TAILOR_ADMIN_KEY) and send it as `Authorization: Bearer KEY`",
                       code="admin_key_required", kind="permission_error")
    if not _key_ok(client.headers.get("authorization", ""), (admin_key,)):
        raise ApiError(403, "adapters can be added only with --admin-key: send the server's admin key as "
                            "`Authorization: Bearer KEY` (an --api-key is not enough)",
                       code="invalid_admin_key", kind="permission_error")


def _add_feedback(store: FeedbackStore, body: FeedbackRequest) -> int | None:
    """The new feedback's id, or None where the store holds no such completion."""
    if not store.has_completion(body.completion_id):
        return None
    return store.add_feedback(body.completion_id, body.rating, body.correction, body.comment)


def _store_failed(metrics: Metrics, operation: str, what: str, reason: str) -> None:
    metrics.store_errors.labels(operation).inc()
    log.error("feedback store: %s (%s)", what, reason)  # the reason holds no prompt: see failure_reason


def _closing(writer: CompletionWriter):
    """The app's lifespan: at shutdown, the completions still queued are written before the server exits."""

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        await run_in_threadpool(writer.close)

    return lifespan


def _served(models: ModelSet, name: str):
    try:
        return models.get(name)
    except KeyError:
        raise ApiError(404, f"The model {name} does not exist on this server; served: {', '.join(models.names())} "
                            f"(GET /v1/models lists them)", param="model", code="model_not_found") from None


def _text(content, index: int) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ApiError(400, f"messages.{index}.content: only text parts are supported (type text)",
                           param=f"messages.{index}.content")
        parts.append(part["text"])
    return "".join(parts)


def _sampling(body: _Sampled, limits: Limits, prompt_tokens: int, context: int) -> Sampling:
    asked = body.max_completion_tokens or body.max_tokens
    if asked is not None and asked > limits.max_tokens:
        raise ApiError(400, f"max_tokens {asked} is over this server's limit of {limits.max_tokens} "
                            f"(tailor serve --max-tokens)", param="max_tokens")
    if prompt_tokens >= context:
        raise ApiError(400, f"the prompt is {prompt_tokens} tokens; the model reads at most {context}. Shorten "
                            f"the conversation", param="messages", code="context_length_exceeded")
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if len(stop) > MAX_STOPS or any(not 0 < len(s) <= MAX_STOP_CHARS for s in stop):
        raise ApiError(400, f"stop: up to {MAX_STOPS} non-empty strings of at most {MAX_STOP_CHARS} characters",
                       param="stop")
    return Sampling(max_tokens=asked or limits.default_max_tokens, temperature=body.temperature, top_p=body.top_p,
                    stop=stop, seed=body.seed)


def _model_card(served) -> dict:
    """What GET /v1/models shows of a model: names, never a folder of the server's disk."""
    card = {"id": served.name, "object": "model", "created": served.created, "owned_by": "tailor",
            "root": _public(served.base), "parent": None if served.run_dir is None else _public(served.base)}
    if served.run_dir is not None:
        run = Path(served.run_dir)
        card["run"] = f"{run.parent.name}/{run.name}"  # NAME/RUN-ID, as under runs/
    return card


def _public(source: str) -> str:
    """A base model's name without the server's folders: a hub id or embedded:… as it is, a
    folder or a file by its last part."""
    if os.path.isabs(source) or source.startswith((".", "~")) or os.path.exists(source):
        return Path(source).name
    return source


def _response(kind, completion_id, created, model, text, finish_reason, usage) -> dict:
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
                  "logprobs": None}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        obj = "text_completion"
    return {"id": completion_id, "object": obj, "created": created, "model": model, "choices": [choice],
            "usage": usage}


def _chunk(kind, completion_id, created, model, delta, finish_reason=None) -> dict:
    if kind == "chat":
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": delta, "finish_reason": finish_reason, "logprobs": None}
        obj = "text_completion"
    return {"id": completion_id, "object": obj, "created": created, "model": model, "choices": [choice]}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _as_api_error(exc: Exception) -> ApiError:
    """How an exception is shown to a client: an ApiError as it is, the rest without details."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, Unavailable):
        return ApiError(503, str(exc), code="unavailable", kind="server_error")
    log.error("request failed", exc_info=exc)  # the trace goes to the server's log, never to the client
    return ApiError(500, f"internal error ({type(exc).__name__}); the server log has the details", kind="server_error")


def _error_body(exc: ApiError) -> dict:
    return {"error": {"message": exc.message, "type": exc.kind, "param": exc.param, "code": exc.code}}


def _error(exc: ApiError) -> JSONResponse:
    return JSONResponse(_error_body(exc), status_code=exc.status, headers=exc.headers)


class _Front:
    """Before any route: the Host and API key checks (_refusal); for every response, its status
    and the time until it starts, in the metrics. Plain ASGI rather than @app.middleware: Starlette's
    BaseHTTPMiddleware hides a client's disconnect from the routes, which watch for it to stop
    decoding for clients that went away."""

    def __init__(self, app, metrics: Metrics, api_keys: tuple[str, ...], hosts: set[str]):
        self.app, self.metrics, self.api_keys, self.hosts = app, metrics, api_keys, hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, path, answered = time.perf_counter(), scope["path"], False

        async def measured(message):
            nonlocal answered
            if message["type"] == "http.response.start":
                answered = True
                self.metrics.request(path, message["status"], time.perf_counter() - started)
            await send(message)

        if (refused := _refusal(HttpRequest(scope), self.api_keys, self.hosts)) is not None:
            return await _error(refused)(scope, receive, measured)
        try:
            await self.app(scope, receive, measured)
        except Exception:  # answered by the app's outermost handler, a 500
            if not answered:
                self.metrics.request(path, 500, time.perf_counter() - started)
            raise


class _BodyLimit:
    """Refuses request bodies over max_bytes (413) before they are read into memory."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and int(declared) > self.max_bytes:
            return await self._refuse(send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:  # a body sent without a length: FastAPI passes this on as a 413
                raise StarletteHTTPException(413, self.message)
            return message

        await self.app(scope, counted, send)

    @property
    def message(self) -> str:
        return f"the request body is over this server's limit of {self.max_bytes} bytes (tailor serve --max-body)"

    async def _refuse(self, send):
        response = _error(ApiError(413, self.message, code="request_too_large"))
        await send({"type": "http.response.start", "status": 413, "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body})
