"""The HTTP API: OpenAI's chat and text completions (streamed or not), models, feedback, health and
Prometheus metrics, with OpenAI-style JSON errors for every bad request.

Any OpenAI client works against it: set its base URL to http://HOST:PORT/v1 and its API key to
the server's (any string when the server has none).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Literal

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from jinja2 import TemplateError
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from tailor.errors import TailorError
from tailor.feedback.store import Completion, FeedbackStore
from tailor.models.decode import Request, Sampling
from tailor.serve.metrics import Metrics
from tailor.serve.models import ModelError, ModelSet

log = logging.getLogger("tailor.serve")


@dataclass
class Limits:
    max_tokens: int = 1024  # the most a request may ask for
    default_max_tokens: int = 256  # when a request does not say
    max_body_bytes: int = 1 << 20


class ApiError(TailorError):
    """A request the API refuses: answered with `status` and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


# --- requests ------------------------------------------------------------------------------------


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict] = Field(description="Text, or OpenAI's list of content parts (text parts only).")
    name: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Sampled(BaseModel):
    # Unknown keys are refused with their name, so a client never believes an option took effect.
    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    user: str | None = None
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0, description="not supported: 0 only")
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0, description="not supported: 0 only")


class ChatRequest(_Sampled):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(_Sampled):
    prompt: str | list[str]


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    completion_id: str
    rating: Literal["up", "down", 1, 2, 3, 4, 5] | None = None
    correction: str | None = Field(None, description="The answer the user wanted instead.")
    comment: str | None = None


class AdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    run: str = Field(description="A finished run folder on the server's disk.")
    name: str | None = None


# --- the app -------------------------------------------------------------------------------------


def create_app(models: ModelSet, store: FeedbackStore, api_keys: tuple[str, ...] = (), limits: Limits = Limits(),
               log_prompts=None) -> FastAPI:
    """log_prompts: None (prompts and answers are never logged) or a function text → text that
    the server logs them through (the anonymizer, or str for raw logs)."""
    app = FastAPI(title="Tailor", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = Metrics()
    models.batcher.on_step = metrics.batch_size.observe
    app.add_middleware(_BodyLimit, max_bytes=limits.max_body_bytes)

    @app.middleware("http")
    async def auth_and_measure(request: HttpRequest, call_next):
        started = time.perf_counter()
        path = request.url.path
        if api_keys and path != "/health":
            given = request.headers.get("authorization", "")
            if not given.startswith("Bearer ") or given.removeprefix("Bearer ").strip() not in api_keys:
                response = _error(ApiError(401, "Incorrect or missing API key: send `Authorization: Bearer KEY` "
                                                "with a key this server was started with (--api-key).",
                                           code="invalid_api_key", kind="authentication_error"))
                metrics.request(path, response.status_code, time.perf_counter() - started)
                return response
        response = await call_next(request)
        metrics.request(path, response.status_code, time.perf_counter() - started)
        return response

    @app.exception_handler(ApiError)
    async def api_error(_request, exc: ApiError):
        return _error(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        first = exc.errors()[0]
        loc = [str(p) for p in first["loc"] if p != "body"]
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

    @app.exception_handler(Exception)
    async def crashed(_request, exc: Exception):
        log.exception("request failed")  # the trace goes to the server's log, never to the client
        return _error(ApiError(500, f"internal error ({type(exc).__name__}); the server log has the details",
                               kind="server_error"))

    @app.get("/health")
    async def health():
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
    async def add_adapter(body: AdapterRequest):
        try:
            name = await run_in_threadpool(models.add_run, body.run, body.name)
        except (ModelError, ValueError, FileNotFoundError) as exc:
            raise ApiError(400, str(exc), param="run") from None
        return _model_card(models.served[name])

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        served = _served(models, body.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": _text(m.content, i)}
                    for i, m in enumerate(body.messages)]
        try:
            prompt_ids = served.engine.chat_prompt(messages)
        except TemplateError as exc:  # e.g. a template that insists on alternating user/assistant turns
            raise ApiError(400, f"messages: the model's chat template refuses this conversation ({exc})",
                           param="messages") from None
        return await _complete(served, body, prompt_ids, "chat", messages)

    @app.post("/v1/completions")
    async def complete(body: CompletionRequest):
        served = _served(models, body.model)
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError(400, "prompt: one prompt per request (send several requests: they are batched)",
                               param="prompt")
            prompt = prompt[0]
        return await _complete(served, body, served.engine.text_prompt(prompt), "text", prompt)

    @app.post("/v1/feedback")
    async def give_feedback(body: FeedbackRequest):
        if body.rating is None and body.correction is None and body.comment is None:
            raise ApiError(400, "feedback needs a rating (up, down or 1-5), a correction or a comment", param="rating")
        if not await run_in_threadpool(store.has_completion, body.completion_id):
            raise ApiError(404, f"no completion {body.completion_id} in this server's store; use the id of a "
                                f"completion this server answered", param="completion_id", code="not_found")
        feedback_id = await run_in_threadpool(store.add_feedback, body.completion_id, body.rating, body.correction,
                                              body.comment)
        metrics.feedback.labels("correction" if body.correction else "rating").inc()
        return {"id": feedback_id, "object": "feedback", "completion_id": body.completion_id}

    async def _complete(served, body: _Sampled, prompt_ids: list[int], kind: str, prompt):
        sampling = _sampling(body, limits, len(prompt_ids), served.engine.context)
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        completion_id, created = f"{prefix}-{uuid.uuid4().hex}", int(time.time())
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        # Text pieces only for a stream: waking the event loop at every token costs the decoder time.
        request = Request(prompt_ids, sampling, served.adapter,
                          on_text=(lambda t: loop.call_soon_threadsafe(pieces.put_nowait, t)) if body.stream else None,
                          on_done=lambda r: loop.call_soon_threadsafe(pieces.put_nowait, None))
        models.batcher.submit(served.engine, request)

        async def finish() -> dict:
            if request.error is not None:
                raise request.error
            usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": len(request.token_ids),
                     "total_tokens": len(prompt_ids) + len(request.token_ids)}
            metrics.tokens(served.name, usage)
            await run_in_threadpool(store.add_completion, Completion(
                completion_id, served.name, kind, prompt, request.text, request.finish_reason,
                usage["prompt_tokens"], usage["completion_tokens"]))
            if log_prompts is not None:  # the anonymizer runs NER: not on the event loop
                shown = prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False)
                shown, answer = await run_in_threadpool(lambda: (log_prompts(shown), log_prompts(request.text)))
                log.info("%s %s prompt=%s answer=%s", completion_id, served.name, shown, answer)
            return usage

        if not body.stream:
            while await pieces.get() is not None:
                pass
            usage = await finish()
            return _response(kind, completion_id, created, served.name, request.text, request.finish_reason, usage)

        async def events():
            try:
                if kind == "chat":
                    yield _sse(_chunk(kind, completion_id, created, served.name, {"role": "assistant", "content": ""}))
                while (piece := await pieces.get()) is not None:
                    delta = {"content": piece} if kind == "chat" else piece
                    yield _sse(_chunk(kind, completion_id, created, served.name, delta))
                try:
                    usage = await finish()
                except Exception as exc:  # headers are sent: the error goes in the stream, as OpenAI does
                    log.exception("streamed request failed")
                    yield _sse({"error": {"message": f"internal error ({type(exc).__name__})", "type": "server_error",
                                          "param": None, "code": None}})
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
    if len(stop) > 4 or any(not s for s in stop):
        raise ApiError(400, "stop: up to 4 non-empty strings", param="stop")
    return Sampling(max_tokens=asked or limits.default_max_tokens, temperature=body.temperature, top_p=body.top_p,
                    stop=stop, seed=body.seed)


def _model_card(served) -> dict:
    return {"id": served.name, "object": "model", "created": served.created, "owned_by": "tailor",
            "root": served.base, "parent": None if served.run_dir is None else served.base, "run_dir": served.run_dir}


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


def _error(exc: ApiError) -> JSONResponse:
    return JSONResponse({"error": {"message": exc.message, "type": exc.kind, "param": exc.param, "code": exc.code}},
                        status_code=exc.status)


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
