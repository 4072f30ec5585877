"""The asyncio client (grpc.aio): the same methods as `EditServeClient`, as coroutines.

    async with AsyncEditServeClient("localhost:50051", token=token) as client:
        async for chunk in client.generate_stream("Tell me about Paris.", max_new_tokens=32):
            print(chunk.text, end="")

The channel is opened on first use, inside the running event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any

from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service._proto.editserve.v1 import editserve_pb2 as pb
from service._proto.editserve.v1 import editserve_pb2_grpc as pb_grpc

from . import requests as rq
from .client import CHANNEL_OPTIONS, RetryPolicy, _Base
from .errors import DeadlineExceededError, UnavailableError, from_rpc_error


class AsyncEditServeClient(_Base):
    """Asyncio client for one editserve address; arguments as `EditServeClient`."""

    def __init__(
        self,
        address: str = "127.0.0.1:50051",
        *,
        token: str | None = None,
        timeouts: rq.Timeouts | None = None,
        retry: RetryPolicy | None = None,
        read_your_writes: bool = True,
    ) -> None:
        super().__init__(
            address,
            token=token,
            timeouts=timeouts or rq.Timeouts(),
            retry=retry or RetryPolicy(),
            read_your_writes=read_your_writes,
        )
        self._channel: aio.Channel | None = None

    @property
    def channel(self) -> aio.Channel:
        if self._channel is None:
            self._channel = aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)
            self._generate = pb_grpc.GenerateServiceStub(self._channel)
            self._edits = pb_grpc.EditServiceStub(self._channel)
            self._info = pb_grpc.InfoServiceStub(self._channel)
            self._locate = pb_grpc.LocateServiceStub(self._channel)
            self._health = health_pb2_grpc.HealthStub(self._channel)
        return self._channel

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def __aenter__(self) -> AsyncEditServeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, stub_method: Callable[[], Any], request: Any, timeout: float | None) -> Any:
        self.channel  # noqa: B018 - opens the channel and its stubs on first use
        delays = self.retry.delays()
        while True:
            try:
                return await stub_method()(request, metadata=self._metadata, timeout=timeout)
            except aio.AioRpcError as exc:
                error = from_rpc_error(exc, self.address)
            if not isinstance(error, UnavailableError):
                raise error
            delay = next(delays, None)
            if delay is None:
                raise error
            await asyncio.sleep(delay)

    # ------------------------------------------------------------------ GenerateService

    async def generate(
        self,
        prompt: str = "",
        *,
        messages: Iterable[rq.Message] | None = None,
        max_new_tokens: int | None = None,
        min_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float | None = None,
        top_k: int = 0,
        seed: int = 0,
        stop: Sequence[str] = (),
        use_edits: bool | None = None,
        edit_paths: Iterable[str | int] | None = None,
        namespaces: Iterable[str] | None = None,
        min_version: int | None = None,
        logprobs: int | None = None,
        timeout: float | None = None,
    ) -> pb.GenerateResponse:
        request = rq.generate_request(
            prompt,
            messages=messages,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=stop,
            use_edits=use_edits,
            edit_paths_=edit_paths,
            namespaces=namespaces,
            min_version=self._min_version(min_version),
            logprobs=logprobs,
        )
        return await self._call(lambda: self._generate.Generate, request, self._timeout(timeout, "generate"))

    async def generate_stream(
        self,
        prompt: str = "",
        *,
        messages: Iterable[rq.Message] | None = None,
        max_new_tokens: int | None = None,
        min_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float | None = None,
        top_k: int = 0,
        seed: int = 0,
        stop: Sequence[str] = (),
        use_edits: bool | None = None,
        edit_paths: Iterable[str | int] | None = None,
        namespaces: Iterable[str] | None = None,
        min_version: int | None = None,
        logprobs: int | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        """Text pieces as they are decoded; retried on UNAVAILABLE only before the first piece."""
        request = rq.generate_request(
            prompt,
            messages=messages,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=stop,
            use_edits=use_edits,
            edit_paths_=edit_paths,
            namespaces=namespaces,
            min_version=self._min_version(min_version),
            logprobs=logprobs,
        )
        timeout = self._timeout(timeout, "generate")
        self.channel  # noqa: B018
        delays = self.retry.delays()
        while True:
            call = self._generate.GenerateStream(request, metadata=self._metadata, timeout=timeout)
            started = False
            try:
                async for chunk in call:
                    started = True
                    yield chunk
                return
            except aio.AioRpcError as exc:
                error = from_rpc_error(exc, self.address)
            finally:
                call.cancel()
            delay = next(delays, None)
            if started or not isinstance(error, UnavailableError) or delay is None:
                raise error
            await asyncio.sleep(delay)

    async def score(
        self,
        prompt: str,
        continuation: str,
        *,
        use_edits: bool | None = None,
        edit_paths: Iterable[str | int] | None = None,
        namespaces: Iterable[str] | None = None,
        min_version: int | None = None,
        timeout: float | None = None,
    ) -> pb.ScoreResponse:
        request = rq.score_request(
            prompt,
            continuation,
            use_edits=use_edits,
            edit_paths_=edit_paths,
            namespaces=namespaces,
            min_version=self._min_version(min_version),
        )
        return await self._call(lambda: self._generate.Score, request, self._timeout(timeout, "generate"))

    # ------------------------------------------------------------------ EditService

    async def edit(
        self, edit: rq.EditLike | None = None, *, timeout: float | None = None, **fields: Any
    ) -> pb.EditResponse:
        request = rq.edit_request(edit, **fields)
        if not request.idempotency_key:
            request.idempotency_key = rq.new_idempotency_key()
        response = await self._call(lambda: self._edits.Edit, request, self._timeout(timeout, "edit"))
        self._wrote(response.version)
        return response

    async def batch_edit(
        self,
        edits: Sequence[rq.EditLike],
        *,
        idempotency_key: str | None = None,
        force: bool = False,
        actor: str = "",
        namespace: str = "",
        timeout: float | None = None,
    ) -> pb.BatchEditResponse:
        request = pb.BatchEditRequest(
            edits=[rq.edit_request(e) for e in edits],
            force=force,
            actor=actor,
            namespace=namespace,
            idempotency_key=idempotency_key or rq.new_idempotency_key(),
        )
        response = await self._call(lambda: self._edits.BatchEdit, request, self._timeout(timeout, "edit"))
        self._wrote(response.version)
        return response

    async def get_edit(self, edit_id: str, *, timeout: float | None = None) -> pb.EditRecord:
        request = pb.GetEditRequest(edit_id=edit_id)
        return (
            await self._call(lambda: self._edits.GetEdit, request, self._timeout(timeout, "default"))
        ).edit

    async def list_edits(
        self,
        *,
        state: str | int | None = None,
        subject: str = "",
        text: str = "",
        actor: str = "",
        namespace: str = "",
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> pb.ListEditsResponse:
        request = pb.ListEditsRequest(
            state=rq.edit_state(state),
            subject=subject,
            text=text,
            actor=actor,
            namespace=namespace,
            page_size=page_size,
            page_token=page_token,
        )
        return await self._call(lambda: self._edits.ListEdits, request, self._timeout(timeout, "default"))

    async def iter_edits(
        self,
        *,
        state: str | int | None = None,
        subject: str = "",
        text: str = "",
        actor: str = "",
        namespace: str = "",
        page_size: int = 500,
        timeout: float | None = None,
    ) -> AsyncIterator[pb.EditRecord]:
        token = ""
        while True:
            page = await self.list_edits(
                state=state,
                subject=subject,
                text=text,
                actor=actor,
                namespace=namespace,
                page_size=page_size,
                page_token=token,
                timeout=timeout,
            )
            for record in page.edits:
                yield record
            token = page.next_page_token
            if not token:
                return

    async def rollback(
        self, edit_id: str, *, reason: str = "", actor: str = "", timeout: float | None = None
    ) -> pb.RollbackResponse:
        request = pb.RollbackRequest(edit_id=edit_id, reason=reason, actor=actor)
        response = await self._call(lambda: self._edits.Rollback, request, self._timeout(timeout, "default"))
        self._wrote(response.version)
        return response

    async def rollback_to(
        self,
        version: int,
        *,
        reason: str = "",
        actor: str = "",
        namespace: str = "",
        timeout: float | None = None,
    ) -> pb.RollbackToResponse:
        request = pb.RollbackToRequest(version=version, reason=reason, actor=actor, namespace=namespace)
        response = await self._call(
            lambda: self._edits.RollbackTo, request, self._timeout(timeout, "default")
        )
        self._wrote(response.version)
        return response

    # ------------------------------------------------------------------ InfoService, health, versions

    async def trace(
        self,
        prompt: str,
        subject: str,
        *,
        answer: str = "",
        seed: int = 0,
        samples: int | None = None,
        window: int | None = None,
        timeout: float | None = None,
    ) -> pb.TraceResponse:
        """Causal tracing; arguments as `EditServeClient.trace`."""
        request = rq.trace_request(prompt, subject, answer=answer, seed=seed, samples=samples, window=window)
        return await self._call(lambda: self._locate.Trace, request, self._timeout(timeout, "edit"))

    async def server_info(self, *, timeout: float | None = None) -> pb.GetServerInfoResponse:
        return await self._call(
            lambda: self._info.GetServerInfo, pb.GetServerInfoRequest(), self._timeout(timeout, "default")
        )

    async def health(self, service: str = "", *, timeout: float | None = 5.0) -> str:
        self.channel  # noqa: B018
        try:
            reply = await self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except aio.AioRpcError as exc:
            raise from_rpc_error(exc, self.address) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    async def wait_for_version(self, version: int, *, timeout: float = 30.0, poll_s: float = 0.2) -> int:
        deadline = time.monotonic() + timeout
        while True:
            info = await self.server_info(timeout=max(0.1, deadline - time.monotonic()))
            if info.edit_version >= version:
                return info.edit_version
            if time.monotonic() + poll_s > deadline:
                raise DeadlineExceededError(
                    f"{self.address} serves edit version {info.edit_version}, still below {version} after "
                    f"{timeout:g} s",
                    address=self.address,
                )
            await asyncio.sleep(poll_s)


__all__ = ["AsyncEditServeClient"]
