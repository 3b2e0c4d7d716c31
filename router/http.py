"""OpenAI-compatible HTTP on the router (FastAPI, served by uvicorn in the router's loop).

    POST /v1/completions   text_completion, streaming (server-sent events) or not
    GET  /v1/models        the served targets
    GET  /health           200 while serving, 503 while draining or with no replica
    GET  /metrics          Prometheus text format of the router process

Every completion goes through `Router.generate`, the same code path as gRPC: the request is
mapped to a `router_pb2.GenerateRequest`, so validation and errors are shared. Every error
(400, 401, 404, 405, 413, 429, 500, 503, 504) uses OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`; exception texts stay in the log.
With API keys configured (`router.auth`), `/v1/*` (and `/metrics` unless
`auth.protect_metrics` is off) need `Authorization: Bearer <key>`; `/health` stays open.

Request fields: `model`, `prompt` (a string or a list of token ids), `max_tokens` (default
16, as OpenAI), `temperature` (default 1.0, as OpenAI; 0 = greedy), `top_p`, `seed`, `stop`,
`stream`, `stream_options.include_usage`; extensions `top_k` (0 or -1 = off, as vLLM),
`method` and `num_speculative_tokens`. Unsupported OpenAI features (`n` > 1, `best_of` > 1,
`echo`, `logprobs`, `suffix`, batched prompts) are rejected with 400 rather than ignored.

Responses add a `specdec` object: `token_ids` of the completion (per chunk when streaming)
and, on the last message, `method` and `stats` (the `SpecStats` of the request).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from google.protobuf import json_format
from pydantic import BaseModel, ConfigDict, Field

from router.server import http_status_of
from shared import metrics
from shared.errors import InvalidArgumentError, ResourceExhaustedError, SpecdecError, UnauthenticatedError
from shared.pb.specdec.v1 import common_pb2, router_pb2

if TYPE_CHECKING:
    from router.server import Router

logger = logging.getLogger(__name__)

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
FLOAT32_TINY = 1.2e-38  # smallest normal float32: the wire type of sampling parameters

# gRPC request field → OpenAI request parameter, for `error.param`.
_PARAM_NAMES = {"max_new_tokens": "max_tokens"}
_FINISH_REASONS = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_ABORT: "abort",
    common_pb2.FINISH_REASON_UNSPECIFIED: None,
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """The subset of OpenAI's `CreateCompletionRequest` we serve, plus extensions."""

    model_config = ConfigDict(extra="ignore")

    model: str
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, description="Tokens to generate (OpenAI default 16).")
    temperature: float | None = Field(1.0, description="0 = greedy (OpenAI default 1.0).")
    top_p: float | None = 1.0
    top_k: int | None = Field(None, description="Extension: 0 or -1 = off.")
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    best_of: int | None = None
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    user: str | None = None
    method: str | None = Field(None, description="Extension: speculation method.")
    num_speculative_tokens: int | None = Field(None, description="Extension: fixed k per round.")


def _invalid(message: str, param: str) -> InvalidArgumentError:
    return InvalidArgumentError(message, field=param)


def _utf8(text: str, param: str) -> str:
    """JSON may carry lone surrogates (`"\\ud800"`), which no UTF-8 string field can hold."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _invalid(f"{param} is not valid Unicode (a lone surrogate)", param) from None
    return text


def _int_in(value: int, low: int, high: int, param: str) -> int:
    if not low <= value <= high:
        raise _invalid(f"{param} {value} is outside [{low}, {high}]", param)
    return value


def to_generate_request(body: CompletionRequest, request_id: str) -> router_pb2.GenerateRequest:
    """OpenAI completion body → the public gRPC request (range checks the proto cannot hold)."""
    if body.n != 1:
        raise _invalid("only n = 1 is supported", "n")
    if body.best_of not in (None, 1):
        raise _invalid("best_of is not supported", "best_of")
    if body.echo:
        raise _invalid("echo is not supported", "echo")
    if body.logprobs is not None:
        raise _invalid("logprobs is not supported", "logprobs")
    if body.suffix:
        raise _invalid("suffix is not supported", "suffix")

    req = router_pb2.GenerateRequest(model=_utf8(body.model, "model"), request_id=request_id)
    prompt = body.prompt
    if isinstance(prompt, str):
        req.text = _utf8(prompt, "prompt")
    elif prompt and not all(isinstance(t, int) for t in prompt):
        # A list of strings or of token lists is a batch; one prompt per request here.
        if len(prompt) != 1:
            raise _invalid("batched prompts are not supported; send one prompt", "prompt")
        only = prompt[0]
        if isinstance(only, str):
            req.text = _utf8(only, "prompt")
        else:
            req.token_ids.SetInParent()
            req.token_ids.token_ids.extend(_int_in(t, -(2**31), INT32_MAX, "prompt") for t in only)
    else:
        # Negative ids pass through to validation, which names the field; int32 is a wire limit.
        req.token_ids.SetInParent()
        req.token_ids.token_ids.extend(_int_in(t, -(2**31), INT32_MAX, "prompt") for t in prompt)

    req.max_new_tokens = _int_in(16 if body.max_tokens is None else body.max_tokens,
                                 -(2**31), INT32_MAX, "max_tokens")  # fmt: skip
    s = req.sampling
    s.temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    if top_p == 0.0:
        # NOTE: 0 on the wire means "unset"; an explicit 0 from a client is out of range.
        raise _invalid("top_p must be in (0, 1], got 0", "top_p")
    if 0.0 < top_p < FLOAT32_TINY:
        # NOTE: it would round to 0 on the wire, i.e. "unset" = 1.0: never silently widened
        raise _invalid(f"top_p {top_p} is too small to represent; use at least {FLOAT32_TINY}", "top_p")
    s.top_p = top_p
    if body.top_k is not None:
        s.top_k = 0 if body.top_k == -1 else _int_in(body.top_k, -(2**31), INT32_MAX, "top_k")
    if body.seed is not None:
        s.seed = _int_in(body.seed, -(2**63), INT64_MAX, "seed")
    if body.stop is not None:
        stop = [body.stop] if isinstance(body.stop, str) else body.stop
        req.stop.extend(_utf8(s, "stop") for s in stop)
    if body.method is not None:
        req.method = _utf8(body.method, "method")
        if not body.method:
            raise _invalid("method must be non-empty when given", "method")
    if body.num_speculative_tokens is not None:
        req.num_speculative_tokens = _int_in(
            body.num_speculative_tokens, -(2**31), INT32_MAX, "num_speculative_tokens"
        )
    return req


def error_body(message: str, type_: str, param: str | None, code: str | int | None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(e: SpecdecError) -> JSONResponse:
    param = _PARAM_NAMES.get(e.field, e.field) if e.field else None
    response = JSONResponse(
        error_body(e.message, e.openai_type, param, e.code.name.lower()),
        status_code=e.http_status,
    )
    if isinstance(e, ResourceExhaustedError):
        response.headers["Retry-After"] = str(max(1, math.ceil(e.retry_after_s)))
    elif isinstance(e, UnauthenticatedError):
        response.headers["WWW-Authenticate"] = "Bearer"
    return response


def stats_dict(stats: common_pb2.SpecStats) -> dict[str, Any]:
    return json_format.MessageToDict(
        stats, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _sse(obj: dict | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


_HTTP_ERROR_TYPES = {401: "authentication_error", 429: "rate_limit_error"}


def http_error(status: int, message: str, param: str | None = None) -> JSONResponse:
    """Any HTTP error in OpenAI's shape (`type` by status, `code` = the status's name)."""
    type_ = _HTTP_ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    try:
        code = HTTPStatus(status).phrase.lower().replace(" ", "_")
    except ValueError:  # not a standard status (499)
        code = None
    return JSONResponse(error_body(message, type_, param, code), status_code=status)


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets 413 before the app reads it
    all (declared Content-Length, or counted as a chunked body streams in)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._too_large(scope, receive, send)
        seen, too_large = 0, False

        async def counted():
            nonlocal seen, too_large
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    too_large = True  # the app sees a hang-up and stops reading
                    return {"type": "http.disconnect"}
            return message

        async def send_unless_too_large(message) -> None:
            if not too_large:
                await send(message)

        await self.app(scope, counted, send_unless_too_large)
        if too_large:
            await self._too_large(scope, receive, send)

    async def _too_large(self, scope, receive, send) -> None:
        response = http_error(413, f"request body over {self.max_bytes} bytes")
        await response(scope, receive, send)


def create_app(router: Router) -> FastAPI:
    app = FastAPI(title="specdec", docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, max_bytes=router.limits.max_body_bytes)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        response = http_error(exc.status_code, str(exc.detail))
        for name, value in (exc.headers or {}).items():
            response.headers[name] = value
        return response

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        logger.exception("request %s: unhandled error", request_id)
        return http_error(500, f"internal error (request {request_id})")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return http_error(400, "the request body is not valid JSON")
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = loc[0] if loc else None
        message = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body')}: {e.get('msg')}"
            for e in errors
        )
        return JSONResponse(
            error_body(message or "invalid request", "invalid_request_error", param, "invalid_argument"),
            status_code=400,
        )

    @app.exception_handler(SpecdecError)
    async def _domain_error(request: Request, exc: SpecdecError) -> JSONResponse:
        return error_response(exc)

    @app.get("/health")
    async def health() -> Response:
        ok = not router.draining and any(r.healthy for r in router.registry.all())
        return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)

    def admit(request: Request) -> str:
        """Key and rate limit (raises the domain error the handler above turns into 401/429);
        the caller's key id ("" when keys are off)."""
        client = request.client.host if request.client else "-"
        return router.gatekeeper.admit(request.headers.get("authorization"), client) or ""

    @app.get("/metrics")
    async def prometheus_metrics(request: Request) -> Response:
        if router.auth.protect_metrics:
            router.gatekeeper.authenticate(request.headers.get("authorization"))
        return Response(metrics.render_latest(), media_type=metrics.CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(admit)])
    async def list_models() -> dict:
        created = int(time.time())
        data = []
        for info in router.list_models().models:
            data.append(
                {
                    "id": info.name,
                    "object": "model",
                    "created": created,
                    "owned_by": "specdec",
                    "max_model_len": info.max_context,
                    "specdec": {
                        "max_new_tokens": info.max_new_tokens,
                        "methods": list(info.methods),
                        "tokenizer_hash": info.tokenizer_hash,
                        "num_replicas": info.num_replicas,
                    },
                }
            )
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request, tenant: str = Depends(admit)) -> Response:
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        req = to_generate_request(body, request_id)
        stream = router.generate(req, tenant=tenant)
        # The first message forces validation and admission: errors still get a status.
        try:
            first = await stream.__anext__()
        except BaseException:
            await stream.aclose()
            raise
        meta = {
            "id": f"cmpl-{request_id}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": body.model,
        }
        method = req.method or router.models[body.model].default_method
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _stream_events(first, stream, meta, method, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Request-Id": request_id},
            )
        return await _collect_or_cancel(request, first, stream, meta, method)

    return app


async def _stream_events(
    first: common_pb2.GenerateResponse,
    stream: AsyncIterator[common_pb2.GenerateResponse],
    meta: dict,
    method: str,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    """`data: {text_completion chunk}` per chunk, the finish chunk, then `data: [DONE]`.

    Starlette cancels this generator when the client disconnects; `finally` closes the
    router stream, which cancels the verifier call.
    """
    try:
        response: common_pb2.GenerateResponse | None = first
        while response is not None:
            kind = response.WhichOneof("response")
            if kind == "chunk":
                yield _sse(
                    {
                        **meta,
                        "choices": [
                            {"index": 0, "text": response.chunk.text, "logprobs": None,
                             "finish_reason": None}
                        ],
                        "specdec": {"token_ids": list(response.chunk.token_ids)},
                    }
                )  # fmt: skip
            elif kind == "complete":
                c = response.complete
                usage = _usage(c.usage)
                final = {
                    **meta,
                    "choices": [
                        {"index": 0, "text": "", "logprobs": None,
                         "finish_reason": _FINISH_REASONS.get(c.finish_reason)}
                    ],
                    "specdec": {"token_ids": [], "method": method, "stats": stats_dict(c.stats)},
                }  # fmt: skip
                if include_usage:
                    final["usage"] = usage
                yield _sse(final)
                break
            else:
                err = response.error
                yield _sse(error_body(err.message, "server_error", err.field or None, err.code))
                break
            response = await anext(stream, None)
        yield _sse("[DONE]")
    finally:
        await stream.aclose()


async def _collect(
    first: common_pb2.GenerateResponse,
    stream: AsyncIterator[common_pb2.GenerateResponse],
    meta: dict,
    method: str,
) -> JSONResponse:
    response: common_pb2.GenerateResponse | None = first
    token_ids: list[int] = []
    texts: list[str] = []
    while response is not None:
        kind = response.WhichOneof("response")
        if kind == "chunk":
            token_ids.extend(response.chunk.token_ids)
            texts.append(response.chunk.text)
        elif kind == "complete":
            c = response.complete
            return JSONResponse(
                {
                    **meta,
                    "choices": [
                        {"index": 0, "text": c.text, "logprobs": None,
                         "finish_reason": _FINISH_REASONS.get(c.finish_reason)}
                    ],
                    "usage": _usage(c.usage),
                    "specdec": {
                        "token_ids": list(c.token_ids) or token_ids,
                        "method": method,
                        "stats": stats_dict(c.stats),
                    },
                }  # fmt: skip
            )
        else:
            err = response.error
            return JSONResponse(
                error_body(err.message, "server_error", err.field or None, err.code),
                status_code=http_status_of(err.code),
            )
        response = await anext(stream, None)
    return JSONResponse(error_body("stream ended without a result", "server_error", None, 14), 503)


async def _collect_or_cancel(
    request: Request,
    first: common_pb2.GenerateResponse,
    stream: AsyncIterator[common_pb2.GenerateResponse],
    meta: dict,
    method: str,
) -> Response:
    """Collect the whole completion, cancelling upstream if the client disconnects first."""
    collect = asyncio.ensure_future(_collect(first, stream, meta, method))
    disconnect = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait((collect, disconnect), return_when=asyncio.FIRST_COMPLETED)
        if collect.done():
            return collect.result()
        collect.cancel()
        return Response(status_code=499)
    finally:
        disconnect.cancel()
        if not collect.done():
            collect.cancel()
        await asyncio.gather(collect, disconnect, return_exceptions=True)
        await stream.aclose()


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _usage(usage: common_pb2.Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }
