"""A verifier deployment's Serve handle behind the interface the router uses for a gRPC
verifier stub (`Generate` → a call with `read()`, `code()`, `cancel()`; `GetLoad`), so the
router's relay, retries and error mapping are the same on Ray (`router.ray_app`) as over
gRPC. Statuses arrive in-band from `verifier_service.ray_deployment` and are raised as the
`grpc.aio.AioRpcError` the gRPC stub would raise."""

from __future__ import annotations

import asyncio

import grpc

from shared.errors import status_from_int
from shared.pb.specdec.v1 import common_pb2, verifier_pb2


class HandleCall:
    """One streaming `generate` call through a handle."""

    def __init__(self, responses, timeout: float | None) -> None:
        self._responses = responses  # a DeploymentResponseGenerator
        self._iter = responses.__aiter__()
        loop = asyncio.get_running_loop()
        self._deadline = None if timeout is None else loop.time() + timeout  # the whole call's, as gRPC
        self._code = grpc.StatusCode.OK
        self._done = asyncio.Event()

    async def read(self):
        try:
            remaining = None if self._deadline is None else max(self._deadline - asyncio.get_running_loop().time(), 0.001)
            item = await asyncio.wait_for(self._iter.__anext__(), remaining)
        except StopAsyncIteration:
            self._done.set()
            return grpc.aio.EOF
        except asyncio.TimeoutError:
            self._finish(grpc.StatusCode.DEADLINE_EXCEEDED)
            self.cancel()
            raise grpc.aio.AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, details="verifier call timed out") from None
        except Exception as e:  # noqa: BLE001 - a replica that died or refused: UNAVAILABLE, as over gRPC
            self._finish(grpc.StatusCode.UNAVAILABLE)
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, details=f"verifier replica: {e}") from e
        if isinstance(item, tuple):  # ("abort", code, details, trailing metadata)
            _, code, details, trailing = item
            status = status_from_int(code)
            self._finish(status)
            raise grpc.aio.AioRpcError(status, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), details)
        return common_pb2.GenerateResponse.FromString(item)

    def _finish(self, code: grpc.StatusCode) -> None:
        self._code = code
        self._done.set()

    async def code(self) -> grpc.StatusCode:
        """The call's status once it has ended (reads what is left, as gRPC waits for the
        handler to return)."""
        while not self._done.is_set():
            try:
                if await self.read() is grpc.aio.EOF:
                    break
            except grpc.aio.AioRpcError:
                break
        return self._code

    def cancel(self) -> None:
        self._responses.cancel()
        self._done.set()


class HandleStub:
    """The `VerifierServiceStub` calls the router makes, over a deployment handle."""

    def __init__(self, handle) -> None:
        self._stream = handle.options(stream=True)
        self._handle = handle

    def Generate(self, message: verifier_pb2.VerifierGenerateRequest, timeout: float | None = None,
                 metadata=None) -> HandleCall:  # fmt: skip
        return HandleCall(self._stream.generate.remote(message.SerializeToString()), timeout)

    async def GetLoad(self, request: verifier_pb2.GetLoadRequest, timeout: float | None = None):
        try:
            data = await asyncio.wait_for(self._handle.get_load.remote(), timeout)
        except Exception as e:  # noqa: BLE001 - as the gRPC stub: an RPC error the poller handles
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, details=str(e)) from e
        return verifier_pb2.GetLoadResponse.FromString(data)
