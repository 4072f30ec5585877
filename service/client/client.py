"""The blocking Python client: one typed method per RPC, the admin token, deadlines, retries on
UNAVAILABLE, and read-your-writes through `min_version`.

    from service.client import EditServeClient

    with EditServeClient("localhost:50051", token=os.environ.get("EDITSERVE_ADMIN_TOKEN")) as client:
        made = client.edit(subject="The Eiffel Tower", prompt="The Eiffel Tower is located in the city of",
                           target_new="Rome")
        print(client.generate("The Eiffel Tower is located in the city of", max_new_tokens=4).text)
        client.rollback(made.edit_id, reason="demo")

Imports neither torch nor any server module: only grpc and the generated stubs.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service._proto.editserve.v1 import editserve_pb2 as pb
from service._proto.editserve.v1 import editserve_pb2_grpc as pb_grpc

from . import requests as rq
from .errors import DeadlineExceededError, UnavailableError, from_rpc_error

_T = TypeVar("_T")

# A page of 1,000 edit records with their reports can pass gRPC's default 4 MiB.
CHANNEL_OPTIONS = (("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20))


@dataclass(frozen=True)
class RetryPolicy:
    """How a call that ends UNAVAILABLE (server unreachable, still loading, shutting down behind a load
    balancer) is tried again: `attempts` in all, exponential backoff with jitter between them."""

    attempts: int = 4
    initial_backoff_s: float = 0.25
    max_backoff_s: float = 4.0
    multiplier: float = 2.0

    def delays(self) -> Iterator[float]:
        delay = self.initial_backoff_s
        for _ in range(max(0, self.attempts - 1)):
            yield min(delay, self.max_backoff_s) * random.uniform(0.8, 1.2)
            delay *= self.multiplier


NO_RETRY = RetryPolicy(attempts=1)


class _Base:
    """What the blocking and the asyncio client share: settings, metadata, versions."""

    def __init__(
        self,
        address: str,
        *,
        token: str | None,
        timeouts: rq.Timeouts,
        retry: RetryPolicy,
        read_your_writes: bool,
    ) -> None:
        self.address = address
        self.timeouts = timeouts
        self.retry = retry
        self.read_your_writes = read_your_writes
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token.strip()}"),) if token and token.strip() else ()
        )
        self.written_version = 0  # highest edit-set version this client's own writes created

    def _wrote(self, version: int) -> None:
        self.written_version = max(self.written_version, version)

    def _min_version(self, min_version: int | None) -> int:
        """An explicit min_version wins; else, with read_your_writes, the version of our last write."""
        if min_version is not None:
            return min_version
        return self.written_version if self.read_your_writes else 0

    def _timeout(self, timeout: float | None, kind: str) -> float | None:
        return timeout if timeout is not None else getattr(self.timeouts, kind)


class EditServeClient(_Base):
    """Blocking client for one editserve address. Thread-safe (one gRPC channel); close it or use `with`.

    token: the server's admin token (EditService calls need it when the server has one).
    timeouts: default deadlines per kind of call; every method also takes `timeout=`.
    retry: how UNAVAILABLE is retried. Edit and BatchEdit always carry an idempotency key (a fresh one
        when the caller gives none), so a retry never stores an edit twice.
    read_your_writes: Generate and Score ask for at least the version of this client's last Edit, BatchEdit
        or Rollback (`min_version`), so they never read from a replica that has not applied it yet.
    """

    def __init__(
        self,
        address: str = "127.0.0.1:50051",
        *,
        token: str | None = None,
        timeouts: rq.Timeouts | None = None,
        retry: RetryPolicy | None = None,
        read_your_writes: bool = True,
        channel: grpc.Channel | None = None,
    ) -> None:
        super().__init__(
            address,
            token=token,
            timeouts=timeouts or rq.Timeouts(),
            retry=retry or RetryPolicy(),
            read_your_writes=read_your_writes,
        )
        self._own_channel = channel is None
        self.channel = channel or grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._generate = pb_grpc.GenerateServiceStub(self.channel)
        self._edits = pb_grpc.EditServiceStub(self.channel)
        self._info = pb_grpc.InfoServiceStub(self.channel)
        self._locate = pb_grpc.LocateServiceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def close(self) -> None:
        if self._own_channel:
            self.channel.close()

    def __enter__(self) -> EditServeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ plumbing

    def _call(self, method: Callable[..., _T], request: Any, timeout: float | None) -> _T:
        delays = self.retry.delays()
        while True:
            try:
                return method(request, metadata=self._metadata, timeout=timeout)
            except grpc.RpcError as exc:
                error = from_rpc_error(exc, self.address)
            if not isinstance(error, UnavailableError):
                raise error
            delay = next(delays, None)
            if delay is None:
                raise error
            time.sleep(delay)

    # ------------------------------------------------------------------ GenerateService

    def generate(
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
        """A whole completion. `messages` ((role, content) pairs, dicts or ChatMessage) go through the
        model's chat template; `use_edits=False` and `edit_paths=["hook"]` choose which edits apply."""
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
        return self._call(self._generate.Generate, request, self._timeout(timeout, "generate"))

    def generate_stream(
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
    ) -> Iterator[pb.GenerateStreamResponse]:
        """Text pieces as tokens are decoded; the last message carries the finish reason and the edits
        that fired. Retried on UNAVAILABLE only before the first piece arrived. Closing the iterator
        cancels the call (the server frees the sequence's batch slot at once)."""
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
        delays = self.retry.delays()
        while True:
            call = self._generate.GenerateStream(request, metadata=self._metadata, timeout=timeout)
            started = False
            try:
                for chunk in call:
                    started = True
                    yield chunk
                return
            except grpc.RpcError as exc:
                error = from_rpc_error(exc, self.address)
            finally:
                call.cancel()  # a no-op once finished; frees the server's slot when the caller stops early
            delay = next(delays, None)
            if started or not isinstance(error, UnavailableError) or delay is None:
                raise error
            time.sleep(delay)

    def score(
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
        """Per-token log-probabilities of `continuation` after `prompt`."""
        request = rq.score_request(
            prompt,
            continuation,
            use_edits=use_edits,
            edit_paths_=edit_paths,
            namespaces=namespaces,
            min_version=self._min_version(min_version),
        )
        return self._call(self._generate.Score, request, self._timeout(timeout, "generate"))

    # ------------------------------------------------------------------ EditService

    def edit(
        self, edit: rq.EditLike | None = None, *, timeout: float | None = None, **fields: Any
    ) -> pb.EditResponse:
        """One edit: keywords (`subject=`, `prompt=`, `target_new=`, `paraphrases=`, `descriptor=`,
        `actor=`, `force=`, `compile_descriptor=`, `idempotency_key=`), a mapping of them, or an EditRequest.
        A refusal by the quality gate raises QualityGateError with the report."""
        request = rq.edit_request(edit, **fields)
        if not request.idempotency_key:
            request.idempotency_key = rq.new_idempotency_key()
        response = self._call(self._edits.Edit, request, self._timeout(timeout, "edit"))
        self._wrote(response.version)
        return response

    def batch_edit(
        self,
        edits: Sequence[rq.EditLike],
        *,
        idempotency_key: str | None = None,
        force: bool = False,
        actor: str = "",
        namespace: str = "",
        timeout: float | None = None,
    ) -> pb.BatchEditResponse:
        """All the edits in one version, or none of them (one failing its gate refuses the batch: the
        QualityGateError carries every edit's report, in order)."""
        request = pb.BatchEditRequest(
            edits=[rq.edit_request(e) for e in edits],
            force=force,
            actor=actor,
            namespace=namespace,
            idempotency_key=idempotency_key or rq.new_idempotency_key(),
        )
        response = self._call(self._edits.BatchEdit, request, self._timeout(timeout, "edit"))
        self._wrote(response.version)
        return response

    def get_edit(self, edit_id: str, *, timeout: float | None = None) -> pb.EditRecord:
        request = pb.GetEditRequest(edit_id=edit_id)
        return self._call(self._edits.GetEdit, request, self._timeout(timeout, "default")).edit

    def list_edits(
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
        """One page of edit records, oldest first. `subject` and `text` are case-insensitive substrings
        (of the subject; of any of the edit's texts), `actor` a whole name; state "active", "rolled_back",
        "superseded" or None for all."""
        request = pb.ListEditsRequest(
            state=rq.edit_state(state),
            subject=subject,
            text=text,
            actor=actor,
            namespace=namespace,
            page_size=page_size,
            page_token=page_token,
        )
        return self._call(self._edits.ListEdits, request, self._timeout(timeout, "default"))

    def iter_edits(
        self,
        *,
        state: str | int | None = None,
        subject: str = "",
        text: str = "",
        actor: str = "",
        namespace: str = "",
        page_size: int = 500,
        timeout: float | None = None,
    ) -> Iterator[pb.EditRecord]:
        """Every matching edit record, page after page."""
        token = ""
        while True:
            page = self.list_edits(
                state=state,
                subject=subject,
                text=text,
                actor=actor,
                namespace=namespace,
                page_size=page_size,
                page_token=token,
                timeout=timeout,
            )
            yield from page.edits
            token = page.next_page_token
            if not token:
                return

    def rollback(
        self, edit_id: str, *, reason: str = "", actor: str = "", timeout: float | None = None
    ) -> pb.RollbackResponse:
        request = pb.RollbackRequest(edit_id=edit_id, reason=reason, actor=actor)
        response = self._call(self._edits.Rollback, request, self._timeout(timeout, "default"))
        self._wrote(response.version)
        return response

    def rollback_to(
        self,
        version: int,
        *,
        reason: str = "",
        actor: str = "",
        namespace: str = "",
        timeout: float | None = None,
    ) -> pb.RollbackToResponse:
        """Roll back every edit committed after `version` (one log entry)."""
        request = pb.RollbackToRequest(version=version, reason=reason, actor=actor, namespace=namespace)
        response = self._call(self._edits.RollbackTo, request, self._timeout(timeout, "default"))
        self._wrote(response.version)
        return response

    # ------------------------------------------------------------------ LocateService

    def trace(
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
        """Causal tracing of `prompt` with `subject`'s tokens corrupted: clean and corrupted p(answer), the
        residual / MLP / attention grids of indirect effect (layers x tokens) and the circuit summary.
        Computes on the model for seconds to minutes: the deadline is the edit one unless `timeout`."""
        request = rq.trace_request(prompt, subject, answer=answer, seed=seed, samples=samples, window=window)
        return self._call(self._locate.Trace, request, self._timeout(timeout, "edit"))

    # ------------------------------------------------------------------ InfoService, health, versions

    def server_info(self, *, timeout: float | None = None) -> pb.GetServerInfoResponse:
        return self._call(
            self._info.GetServerInfo, pb.GetServerInfoRequest(), self._timeout(timeout, "default")
        )

    def health(self, service: str = "", *, timeout: float | None = 5.0) -> str:
        """grpc.health.v1 status name: "SERVING", "NOT_SERVING", ... (not retried)."""
        try:
            reply = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, self.address) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def wait_for_version(self, version: int, *, timeout: float = 30.0, poll_s: float = 0.2) -> int:
        """Block until this server has applied edit-set `version` (e.g. one written through another
        replica); returns the version it serves. Raises DeadlineExceededError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            current = self.server_info(timeout=max(0.1, deadline - time.monotonic())).edit_version
            if current >= version:
                return current
            if time.monotonic() + poll_s > deadline:
                raise DeadlineExceededError(
                    f"{self.address} serves edit version {current}, "
                    f"still below {version} after {timeout:g} s",
                    address=self.address,
                )
            time.sleep(poll_s)
