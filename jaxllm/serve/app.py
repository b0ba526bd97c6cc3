"""The OpenAI-compatible HTTP layer: thin over the engine.

Every request is checked whole (model name, token ids, lengths, sampling values) before any
of it reaches the engine, and every error is the JSON error body with a 4xx/5xx code: the
server survives every bad request.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import jaxllm
from jaxllm.layout import check_token_ids
from jaxllm.serve.async_engine import AsyncEngine, EngineError
from jaxllm.serve.choice import Choice, token_text_fn
from jaxllm.serve.guards import Guards
from jaxllm.serve.images import ImageInput, MediaError
from jaxllm.serve.metrics import Metrics
from jaxllm.serve.openapi import (
    ChatCompletionResponse,
    CompletionResponse,
    DetokenizeResponse,
    ErrorResponse,
    ModelList,
    TokenizeResponse,
    VersionResponse,
)
from jaxllm.serve.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    SamplingRequest,
    TokenizeRequest,
    error_body,
)
from jaxllm.serve.shaping import ChatShaping, CompletionShaping, Shaping
from jaxllm.serve.streaming import stream_events
from jaxllm.serve.tokenizer import TextCodec
from jaxllm.serve.tools import prompt_messages

DEFAULT_MAX_REQUEST_BYTES = 8 * 2**20
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is there


class ApiError(Exception):
    def __init__(self, message: str, status: int = 400, kind: str = "BadRequestError"):
        super().__init__(message)
        self.status, self.kind = status, kind


@dataclasses.dataclass
class ServerState:
    engine: AsyncEngine
    codec: TextCodec | None
    model_name: str
    metrics: Metrics
    api_key: str | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    images: ImageInput = ImageInput()

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="jaxllm", version=jaxllm.__version__)
    app.state.jaxllm = state

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError):
        return JSONResponse(error_body(str(e), e.status, e.kind), status_code=e.status)

    @app.exception_handler(MediaError)
    async def _media_error(_: Request, e: MediaError):
        return JSONResponse(error_body(str(e), 400), status_code=400)

    @app.exception_handler(EngineError)
    async def _engine_error(_: Request, e: EngineError):
        return JSONResponse(error_body(str(e), e.status, e.kind), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError):
        message = "; ".join(_describe(err) for err in e.errors())
        return JSONResponse(error_body(message, 400), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        kind = _HTTP_KINDS.get(e.status_code, "BadRequestError")
        message = str(e.detail)
        if e.status_code == 405:
            message = (f"method {request.method} is not allowed on {request.url.path} "
                       f"(allowed: {(e.headers or {}).get('Allow')})")
        return JSONResponse(error_body(message, e.status_code, kind),
                            status_code=e.status_code, headers=e.headers)

    # A plain ASGI layer (not an http middleware, whose task group would wrap the body
    # limit's error and hide client disconnects): it sees every error the handlers above
    # do not.
    app.add_middleware(Guards, max_body_bytes=state.max_request_bytes, api_key=state.api_key)

    @app.get("/health", responses=_errors(500, 503))
    async def health():
        if (reason := state.engine.unhealthy) is not None:
            return JSONResponse(error_body(f"the engine cannot serve: {reason}", 503,
                                           "ServiceUnavailableError"), status_code=503)
        return {}

    @app.get("/version", responses={200: {"model": VersionResponse}, **_errors(500)})
    async def version():
        return {"version": jaxllm.__version__}

    @app.get("/metrics", response_class=PlainTextResponse, responses=_errors(500))
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", responses={200: {"model": ModelList}, **_errors(401, 500)})
    async def models():
        return {"object": "list", "data": [{
            "id": state.model_name, "object": "model", "created": int(time.time()),
            "owned_by": "jaxllm", "max_model_len": state.max_model_len}]}

    @app.post("/tokenize", responses={200: {"model": TokenizeResponse},
                                       **_errors(400, 404, 413, 500)})
    async def tokenize(req: TokenizeRequest):
        _check_model(state, req.model)
        codec = _need_codec(state)
        if (req.prompt is None) == (req.messages is None):
            raise ApiError("give exactly one of 'prompt' and 'messages'")
        if req.messages is not None:
            if any(m.image_urls() for m in req.messages):
                raise ApiError("/tokenize does not take images (it would leave out their "
                               "tokens): send text parts only")
            ids = await _encode_chat(codec, req.messages, True)
        else:
            ids = await _encode(codec, req.prompt, "prompt", req.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": state.max_model_len}

    @app.post("/detokenize", responses={200: {"model": DetokenizeResponse},
                                         **_errors(400, 404, 413, 500)})
    async def detokenize(req: DetokenizeRequest):
        _check_model(state, req.model)
        codec = _need_codec(state)
        _check_ids(state, req.tokens)
        return {"prompt": codec.decode(req.tokens)}

    @app.post("/v1/completions", responses=_generation_responses(CompletionResponse))
    async def completions(req: CompletionRequest, raw: Request):
        _check_model(state, req.model)
        prompts = await _completion_prompts(state, req.prompt)
        images = await state.images.load_urls(req.image_urls())
        if images:
            if len(prompts) != 1:
                raise ApiError(f"multi_modal_data images go with one prompt; this request "
                               f"has {len(prompts)}")
            prompts = [state.images.expand(prompts[0], images)]
        shaping = CompletionShaping(token_text_fn(state.codec), req,
                                    state.codec.decode if state.codec else lambda _: "")
        return await _serve(state, req, prompts, raw, shaping, images)

    @app.post("/v1/chat/completions", responses=_generation_responses(ChatCompletionResponse))
    async def chat_completions(req: ChatCompletionRequest, raw: Request):
        _check_model(state, req.model)
        codec = _need_codec(state)
        images = await state.images.load(req.messages)
        tools = req.tool_dicts() if req.tool_mode != "none" else None
        placeholder = codec.token_text(state.images.placeholder) if images else ""
        ids = await _encode_chat(codec, req.messages, req.add_generation_prompt, tools,
                                 placeholder)
        if images:
            ids = state.images.expand(ids, images)
        shaping = ChatShaping(token_text_fn(state.codec), req, _callable_tools(req))
        return await _serve(state, req, [ids], raw, shaping, images)

    _document_errors_as_400(app)
    return app


_ERROR_DESCRIPTIONS = {
    400: "A bad request; the message names the bad value",
    401: "No or a wrong API key (when the server has --api-key)",
    404: "The model does not exist",
    413: "The body is larger than --max-request-bytes",
    500: "An internal error",
    503: "The engine cannot serve",
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorResponse, "description": _ERROR_DESCRIPTIONS[code]}
            for code in codes}


def _generation_responses(model: type) -> dict[int | str, dict[str, Any]]:
    """A JSON body, or server-sent events with ``stream``; and every error."""
    return {200: {"model": model, "description": "The completion, or with stream=true its "
                  "chunks as server-sent events ending in 'data: [DONE]'",
                  "content": {"text/event-stream": {"schema": {"type": "string"}}}},
            **_errors(400, 401, 404, 413, 500, 503)}


def _document_errors_as_400(app: FastAPI) -> None:
    """Drops FastAPI's default 422 from the OpenAPI schema: validation errors are 400s here
    (documented per route with the other errors)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            for operations in schema["paths"].values():
                for operation in operations.values():
                    operation["responses"].pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema["components"]["schemas"].pop(name, None)
        return app.openapi_schema

    app.openapi = openapi


def _check_model(state: ServerState, name: str | None) -> None:
    if name is not None and name != state.model_name:
        raise ApiError(f"The model `{name}` does not exist.", 404, "NotFoundError")


def _need_codec(state: ServerState) -> TextCodec:
    if state.codec is None:
        raise ApiError("this model has no tokenizer (tokenizer.json): send token ids")
    return state.codec


def _check_ids(state: ServerState, ids: list[int]) -> None:
    try:
        check_token_ids(ids, state.engine.vocab_size)
    except ValueError as e:
        raise ApiError(str(e)) from e


def _describe(err: dict[str, Any]) -> str:
    """One validation error as text: the field, what is wrong, and the value sent."""
    where = ".".join(str(x) for x in err["loc"][1:])
    if err["type"] == "value_error":
        text = str(err["ctx"]["error"])
    elif err["type"] == "json_invalid":
        text = f"invalid JSON: {err['ctx']['error']}"
        where = f"at position {where}"
    elif err["type"] == "missing":
        text = err["msg"]
    else:
        text = f"{err['msg']} (got {err.get('input')!r:.80})"
    return f"{where}: {text}" if where else text


_HTTP_KINDS = {404: "NotFoundError", 405: "MethodNotAllowedError",
               413: "RequestTooLargeError"}


def _check_unicode(text: str, field: str) -> None:
    """Refuses text that is not valid Unicode (a lone surrogate, which JSON can carry)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(f"{field} is not valid Unicode: {text[e.start]!r} at position "
                       f"{e.start} is a lone surrogate") from e


async def _encode(codec: TextCodec, text: str, field: str,
                  add_special_tokens: bool = True) -> list[int]:
    """Token ids of ``text``, tokenized on a worker thread: a long prompt must not stall
    the event loop (and /health with it)."""
    _check_unicode(text, field)
    return await asyncio.to_thread(codec.encode, text, add_special_tokens)


async def _encode_chat(codec: TextCodec, messages: list[ChatMessage],
                       add_generation_prompt: bool,
                       tools: list[dict[str, Any]] | None = None,
                       image_placeholder: str = "") -> list[int]:
    rendered = [{**m.model_dump(exclude_none=True, exclude={"content"}),
                 **({} if m.content is None else {"content": m.text(image_placeholder)})}
                for m in messages]
    for i, m in enumerate(rendered):
        if "content" in m:
            _check_unicode(m["content"], f"messages.{i}.content")
    rendered = prompt_messages(rendered, tools, codec.template_has_tools)
    try:
        text = await asyncio.to_thread(codec.render_chat, rendered, add_generation_prompt,
                                       tools if codec.template_has_tools else None)
    except Exception as e:
        raise ApiError(f"cannot apply the chat template: {e}") from e
    return await _encode(codec, text, "messages", add_special_tokens=False)


async def _completion_prompts(state: ServerState, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and all(isinstance(x, int) for x in prompt):
        prompt = [prompt]
    if not prompt:
        raise ApiError("prompt must not be empty")
    out = []
    for i, p in enumerate(prompt):
        where = "prompt" if len(prompt) == 1 else f"prompt.{i}"
        ids = await _encode(_need_codec(state), p, where) if isinstance(p, str) else list(p)
        if not ids:
            raise ApiError("prompt must have at least one token")
        out.append(ids)
    return out


def _prepare(state: ServerState, req: SamplingRequest, prompts: list[list[int]],
             images: list | None = None) -> list[Choice]:
    """Every choice's engine request, all checked before any is submitted; ``images`` are
    the (one) prompt's."""
    base = uuid.uuid4().hex[:16]
    choices = []
    try:
        stops = req.stop_strings()
        for p, ids in enumerate(prompts):
            for j in range(req.n):
                index = p * req.n + j
                sampling = req.sampling(req.token_limit, seed_offset=index)
                engine_request = state.engine.prepare(
                    ids, sampling, f"{base}-{index}", ignore_eos=req.ignore_eos,
                    images=images or ())
                choices.append(Choice(index, engine_request, stops, state.codec,
                                      include_stop=req.include_stop_str_in_output,
                                      skip_special=req.skip_special_tokens))
    except ValueError as e:
        raise ApiError(str(e)) from e
    return choices


async def _run_choice(state: ServerState, choice: Choice) -> AsyncIterator[None]:
    """Feeds one choice from the engine, yielding after each output; stops early at a stop
    string (which aborts the engine request). Counted in the metrics however it ends: an
    error, or "abort" when its client left."""
    start = time.perf_counter()
    ended = "abort"
    try:
        async with contextlib.aclosing(state.engine.generate(choice.request)) as outputs:
            async for out in outputs:
                choice.feed(out)
                yield
                if choice.finish_reason:
                    break  # closing the stream aborts the engine request
    except Exception:
        ended = "error"
        raise
    finally:
        state.metrics.on_finish(choice.finish_reason or ended, len(choice.request.prompt),
                                choice.first_token_at and choice.first_token_at - start,
                                time.perf_counter() - start,
                                output_tokens=len(choice.token_ids),
                                cached_tokens=choice.num_cached_tokens,
                                inter_token=choice.inter_token, queued=choice.queued_seconds)


async def _serve(state: ServerState, req: SamplingRequest, prompts: list[list[int]], raw: Request,
                 shaping: Shaping, images: list | None = None):
    state.engine.check_serving()  # a 503 before a stream's status line, never a hang
    # On a worker thread: compiling a request's grammar (structured outputs) can take a while.
    choices = await asyncio.to_thread(_prepare, state, req, prompts, images)
    head = {"id": f"{shaping.id_prefix}-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": state.model_name}
    usage_of = lambda: _usage(prompts, req.n, choices)  # noqa: E731
    if req.stream:
        events = stream_events(
            choices, lambda c: _run_choice(state, c), shaping, head=head,
            include_usage=req.include_usage, usage_of=usage_of,
            continuous_usage=req.continuous_usage)
        return StreamingResponse(events, media_type="text/event-stream")
    if not await _drain(state, choices, raw):
        return Response(status_code=499)  # nobody reads it: the client has gone
    return {**head, "object": shaping.kind, "usage": usage_of(),
            "choices": [shaping.final(c) for c in choices]}


async def _drain(state: ServerState, choices: list[Choice], raw: Request) -> bool:
    """Runs every choice to its end; False when the client disconnected first. Leaving early
    (a disconnect, or one choice failing) aborts the others' engine requests."""

    async def drain(choice):
        async for _ in _run_choice(state, choice):
            pass

    tasks = [asyncio.create_task(drain(c)) for c in choices]
    try:
        pending = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, timeout=DISCONNECT_POLL_S,
                                               return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if isinstance(error := task.exception(), ValueError):
                    raise ApiError(str(error)) from error
                if error is not None:
                    raise error
            if pending and await raw.is_disconnected():
                return False
        return True
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _usage(prompts, n: int, choices: list[Choice]) -> dict[str, int]:
    prompt_tokens = sum(len(p) for p in prompts)
    completion = sum(len(c.token_ids) for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


def _callable_tools(req: ChatCompletionRequest) -> list[str]:
    """The names of the functions a chat request lets the model call (none: [])."""
    if req.tool_mode == "none":
        return []
    return [t["function"]["name"] for t in req.tool_dicts()]
