"""A small client for specdec's public gRPC API (`specdec.v1.GenerationService`), blocking
and asyncio, importable by other services without torch:

    from router.client import SpecdecClient

    client = SpecdecClient("127.0.0.1:50051")            # API key from SPECDEC_API_KEY
    done = client.generate("codelm-target-m", "def fib(n):", max_new_tokens=64, method="draft_model")
    print(done.text, done.finish_reason, done.stats["mean_acceptance_length"])
    for chunk in client.stream("codelm-target-m", "def fib(n):"):   # Chunk ..., then Completion
        ...

- auth: `Authorization: Bearer <key>` metadata (`api_key=`, default the first key in
  SPECDEC_API_KEY);
- deadlines: `timeout_s` per call (gRPC deadline);
- retries: only before the first token, only for what another attempt can fix (UNAVAILABLE:
  no replica yet or a restart; RESOURCE_EXHAUSTED: full), with tenacity's jittered
  exponential waits; once a token has arrived an error is the caller's (a retry would
  duplicate output);
- typed results: `Chunk` per streamed round, `Completion` at the end, `ClientError` with the
  gRPC status, message and the request field at fault.
- TLS: `ca_file=` (and a client certificate for mTLS servers).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field

import grpc
import tenacity
from google.protobuf import json_format

from router.auth import API_KEY_ENV
from shared import tls
from shared.errors import FIELD_METADATA, status_from_int
from shared.pb.specdec.v1 import common_pb2, router_pb2, router_pb2_grpc
from shared.types import SamplingParams
from shared.wire import sampling_to_proto

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
_FINISH = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length",
           common_pb2.FINISH_REASON_ABORT: "abort"}  # fmt: skip


@dataclass(slots=True)
class Chunk:
    token_ids: list[int]  # tokens of one round (several when drafts were accepted)
    text: str


@dataclass(slots=True)
class Completion:
    token_ids: list[int]
    text: str
    finish_reason: str  # stop | length | abort
    prompt_tokens: int
    completion_tokens: int
    stats: dict = field(default_factory=dict)  # SpecStats: tau, draft/accepted tokens, ...


@dataclass(slots=True)
class ModelInfo:
    name: str
    max_context: int
    max_new_tokens: int
    methods: list[str]
    num_replicas: int


class ClientError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, field: str = "") -> None:
        super().__init__(f"{code.name}: {message}")
        self.code, self.message, self.field = code, message, field


def default_api_key() -> str | None:
    key = os.environ.get(API_KEY_ENV, "").split(",")[0].strip()
    return key or None


def build_request(model: str, prompt: str | Sequence[int], *, max_new_tokens: int = 64,
                  temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                  stop: Sequence[str] = (), method: str = "", num_speculative_tokens: int | None = None,
                  request_id: str = "") -> router_pb2.GenerateRequest:  # fmt: skip
    request = router_pb2.GenerateRequest(
        model=model, max_new_tokens=max_new_tokens, stop=list(stop), method=method, request_id=request_id,
        sampling=sampling_to_proto(SamplingParams(temperature, top_p, top_k, seed)),
    )  # fmt: skip
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.token_ids.SetInParent()
        request.token_ids.token_ids.extend(prompt)
    if num_speculative_tokens is not None:
        request.num_speculative_tokens = num_speculative_tokens
    return request


def _completion(c: common_pb2.GenerateComplete) -> Completion:
    stats = json_format.MessageToDict(c.stats, preserving_proto_field_name=True,
                                      always_print_fields_with_no_presence=True)  # fmt: skip
    return Completion(list(c.token_ids), c.text, _FINISH.get(c.finish_reason, "unspecified"),
                      c.usage.prompt_tokens, c.usage.completion_tokens, stats)  # fmt: skip


def _rpc_error(e: grpc.RpcError) -> ClientError:
    field_ = dict(e.trailing_metadata() or ()).get(FIELD_METADATA, "")
    return ClientError(e.code(), e.details() or "", field_)


def _retrying(attempts: int, asynchronous: bool):
    kwargs = dict(
        retry=tenacity.retry_if_exception(lambda e: isinstance(e, ClientError) and e.code in RETRYABLE),
        stop=tenacity.stop_after_attempt(attempts),
        wait=tenacity.wait_random_exponential(multiplier=0.1, max=2.0),
        reraise=True,
    )
    return tenacity.AsyncRetrying(**kwargs) if asynchronous else tenacity.Retrying(**kwargs)


class _Base:
    def __init__(self, address: str, *, api_key: str | None = None, timeout_s: float | None = 120.0,
                 attempts: int = 3, ca_file: str | None = None, cert_file: str | None = None,
                 key_file: str | None = None) -> None:  # fmt: skip
        """`ca_file`: TLS, trusting that CA (PEM); `cert_file`/`key_file`: a client
        certificate for servers that ask for one. None: plaintext."""
        self.address = address
        self.credentials = None
        if ca_file is not None:
            read = lambda p: open(p, "rb").read() if p else None  # noqa: E731
            self.credentials = grpc.ssl_channel_credentials(read(ca_file), read(key_file), read(cert_file))
        self.api_key = api_key if api_key is not None else default_api_key()
        self.timeout_s = timeout_s
        self.attempts = attempts

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()

    @staticmethod
    def _item(response: common_pb2.GenerateResponse) -> Chunk | Completion:
        kind = response.WhichOneof("response")
        if kind == "chunk":
            return Chunk(list(response.chunk.token_ids), response.chunk.text)
        if kind == "complete":
            return _completion(response.complete)
        err = response.error
        raise ClientError(status_from_int(err.code), err.message, err.field)


class SpecdecClient(_Base):
    """Blocking client; one channel per client (thread-safe, reuse it)."""

    def __init__(self, address: str, **kwargs) -> None:
        super().__init__(address, **kwargs)
        self._channel = tls.channel(address, self.credentials)
        self._stub = router_pb2_grpc.GenerationServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> SpecdecClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stream(self, model: str, prompt: str | Sequence[int], **options) -> Iterator[Chunk | Completion]:
        """Chunks as the verifier emits them, then the Completion (last item)."""
        request = build_request(model, prompt, **options)
        first, responses = None, None
        for attempt in _retrying(self.attempts, asynchronous=False):
            with attempt:
                responses = self._stub.Generate(request, timeout=self.timeout_s, metadata=self.metadata)
                try:
                    first = next(responses, None)
                except grpc.RpcError as e:
                    raise _rpc_error(e) from None
                if first is None:
                    raise ClientError(grpc.StatusCode.UNAVAILABLE, "the stream ended without a result")
        try:
            yield self._item(first)
            for response in responses:
                yield self._item(response)
        except grpc.RpcError as e:
            raise _rpc_error(e) from None

    def generate(self, model: str, prompt: str | Sequence[int], **options) -> Completion:
        *_, done = self.stream(model, prompt, **options)
        return done

    def models(self) -> list[ModelInfo]:
        try:
            resp = self._stub.ListModels(router_pb2.ListModelsRequest(), timeout=self.timeout_s,
                                         metadata=self.metadata)  # fmt: skip
        except grpc.RpcError as e:
            raise _rpc_error(e) from None
        return [ModelInfo(m.name, m.max_context, m.max_new_tokens, list(m.methods), m.num_replicas)
                for m in resp.models]  # fmt: skip


class AsyncSpecdecClient(_Base):
    """asyncio client (grpc.aio); create and use it inside one event loop."""

    def __init__(self, address: str, **kwargs) -> None:
        super().__init__(address, **kwargs)
        self._channel = tls.aio_channel(address, self.credentials)
        self._stub = router_pb2_grpc.GenerationServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncSpecdecClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def stream(self, model: str, prompt: str | Sequence[int], **options) -> AsyncIterator[Chunk | Completion]:
        request = build_request(model, prompt, **options)
        call, first = None, None
        async for attempt in _retrying(self.attempts, asynchronous=True):
            with attempt:
                call = self._stub.Generate(request, timeout=self.timeout_s, metadata=self.metadata)
                try:
                    first = await call.read()
                except grpc.aio.AioRpcError as e:
                    raise _rpc_error(e) from None
        try:
            response = first
            while response is not grpc.aio.EOF:
                yield self._item(response)
                response = await call.read()
        except grpc.aio.AioRpcError as e:
            raise _rpc_error(e) from None
        finally:
            call.cancel()

    async def generate(self, model: str, prompt: str | Sequence[int], **options) -> Completion:
        done = None
        async for item in self.stream(model, prompt, **options):
            done = item
        return done
