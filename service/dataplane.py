"""The data plane: everything a request does below the transport (KServe's DataPlane, transport-neutral).

    Generate: validate -> router (scope detection, prompt, token ids) -> engine (batched decoding, hook gate)
    Edit:     edit manager (compute off the event loop, quality gate, edit log, atomic publish)

The gRPC servicers call these coroutines with `service.types` dataclasses and map the domain errors raised
here to status codes. Nothing here knows about grpc.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from service import __version__, metrics
from service.engine.cpu_threads import released_after
from service.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    ModelNotServable,
    ResourceExhausted,
    Unavailable,
)
from service.namespaces import validate_namespaces
from service.router.routing import Route, Router
from service.router.validation import effective_min_new_tokens, validate_generate, validate_score
from service.types import (
    AppliedEdit,
    BatchEditInput,
    BatchEditResult,
    EditInput,
    EditResult,
    EffectGrid,
    GenerateChunk,
    GeneratedLogprob,
    GenerateInput,
    GenerateResult,
    ListEditsInput,
    RollbackInput,
    RollbackResult,
    RollbackToInput,
    RollbackToResult,
    ScoreInput,
    ScoreResult,
    ServerInfo,
    TokenLogprob,
    TopLogprob,
    TraceInput,
    TraceResult,
)

if TYPE_CHECKING:
    from service.editlog import EditView
    from service.edits import EditManager, EditSnapshot
    from service.engine import Engine
    from service.engine.loader import LoadedModel
    from service.engine.scheduler import Ticket
    from service.engine.sequence import TokenStream

log = logging.getLogger(__name__)

# Traces run at once at most (each is hundreds of batched forwards); one more is RESOURCE_EXHAUSTED.
MAX_CONCURRENT_TRACES = 1


def check_servable(loaded: LoadedModel) -> None:
    """Refuse, before any edit-log work, a model the engine or the editor would serve wrongly: an unknown
    cache layout, or logits that are not the LM head of the last hidden state (hooks/arch.py). A model
    without MLP down projections fails the same way when the hook manager is built."""
    from service.hooks.arch import UnsupportedArchitecture, check_logits_path
    from service.kvcache import check_cache_layout

    check_cache_layout(loaded.model)
    try:
        probe = loaded.tokenizer("The capital of France is")["input_ids"] or [0]
        check_logits_path(loaded.model, probe)
    except UnsupportedArchitecture as exc:
        raise ModelNotServable(str(exc)) from exc


@dataclass(frozen=True)
class PlaneOptions:
    """What the data plane itself reads from the settings of the same names (service/config.py)."""

    log_poll_s: float  # how often to apply edits other replicas appended to a shared log; 0 = never
    max_batch_size: int  # the engine's bound, as GetServerInfo reports it
    # Take the queue place before routing (detection overlaps the wait for a batch slot); False routes
    # first and queues after, the order bench/queue_overlap.py compares against.
    reserve_queue_place: bool = True
    # Prefill a request's plain prompt while the sentence encoder routes it (`_route_speculatively`).
    speculative_prefill: bool = False


class DataPlane:
    def __init__(
        self, loaded: LoadedModel, manager: EditManager, engine: Engine, router: Router, options: PlaneOptions
    ) -> None:
        """service/compose.py builds the collaborators from Settings (`load_data_plane`)."""
        self.loaded = loaded
        self.manager = manager
        self.engine = engine
        self.router = router
        self.options = options
        self._ready = False
        self._tailer: asyncio.Task[None] | None = None
        self._traces = 0  # traces running (event-loop state: read and written on the loop only)
        metrics.MODEL_INFO.info({
            "model": loaded.name, "dtype": str(loaded.dtype).removeprefix("torch."),
            "device": str(loaded.device), "hook_layers": ",".join(map(str, manager.hooks.default_layers)),
            "hook_layer_rule": manager.hook_rule, "architecture": loaded.architecture,
        })

    # ------------------------------------------------------------------------------------ lifecycle

    @property
    def ready(self) -> bool:
        return self._ready

    def healthy(self) -> bool:
        """Cheap: started, and the engine's worker runs without a run of failed forwards."""
        return self._ready and self.engine.healthy

    async def deep_check(self, timeout_s: float) -> bool:
        """One tiny forward through the engine's queue and the hook layers (a Score of one token),
        within `timeout_s`: the server answers, not only its process."""
        if not self.healthy():
            return False
        tokenizer = self.loaded.tokenizer
        prompt = tokenizer("Hello", add_special_tokens=False)["input_ids"] or [0]
        try:
            await asyncio.wait_for(self.engine.score(prompt, prompt[-1:], use_hooks=True), timeout_s)
        except Exception:  # noqa: BLE001 - any failure is "cannot serve"; the reason is logged
            log.warning("deep health check failed", exc_info=True)
            return False
        return True

    async def start(self) -> None:
        await self.engine.start()
        if self.options.log_poll_s > 0:
            self._tailer = asyncio.create_task(self._tail_log(self.options.log_poll_s), name="log-tailer")
        self._ready = True

    async def _tail_log(self, interval_s: float) -> None:
        """Apply edits other replicas append to a shared (PostgreSQL) log; on SQLite it finds nothing."""
        failed = 0  # polls failed in a row: an unreachable database is logged when it goes and comes back
        while True:
            await asyncio.sleep(interval_s)
            try:
                version = await asyncio.to_thread(released_after(self.manager.catch_up))
            except Unavailable as exc:
                metrics.EDIT_LOG_SYNC_ERRORS.inc()
                if not failed:
                    log.warning("%s; Edits answer UNAVAILABLE, Generate serves version %d, retrying every "
                                "%.1f s", exc, self.manager.version, interval_s)
                failed += 1
                continue
            except Exception:  # a database hiccup must not kill the tailer; the next poll retries
                metrics.EDIT_LOG_SYNC_ERRORS.inc()
                log.exception("reading the shared edit log failed; retrying in %.1f s", interval_s)
                failed += 1
                continue
            if failed:
                log.warning("the edit log is reachable again after %d failed reads; serving version %d",
                            failed, version)
                failed = 0

    async def shutdown(self, grace_s: float) -> None:
        self._ready = False
        if self._tailer is not None:
            self._tailer.cancel()
        try:
            await self.engine.stop(grace_s)
        finally:
            # Edits in flight finish their log commit under the manager's lock before it closes.
            await asyncio.to_thread(released_after(self.manager.close))

    def _require_ready(self) -> None:
        if not self._ready:
            raise Unavailable("the server is starting or shutting down")

    async def _require_version(self, min_version: int) -> None:
        current = self.manager.version
        if min_version > current:
            # Read-your-writes across replicas: the edit may already be in the shared log.
            current = await asyncio.to_thread(released_after(self.manager.catch_up))
        if min_version > current:
            raise FailedPrecondition(
                f"this replica serves edit version {current}, below the requested {min_version}",
                field="min_version",
            )

    # ------------------------------------------------------------------------------------ generation

    def _logprobs(
        self, token_ids: list[int], logprobs: list[tuple[float, list[tuple[int, float]]]]
    ) -> list[GeneratedLogprob]:
        if not logprobs:
            return []
        decode = self.loaded.tokenizer.decode
        return [
            GeneratedLogprob(
                token_id=t, token=decode([t]), logprob=lp,
                top_logprobs=[TopLogprob(token_id=i, token=decode([i]), logprob=v) for i, v in top],
            )
            for t, (lp, top) in zip(token_ids, logprobs, strict=True)
        ]

    async def generate(self, request: GenerateInput) -> GenerateResult:
        pieces: list[str] = []
        logprobs: list[GeneratedLogprob] = []
        last: GenerateChunk | None = None
        async for chunk in self.generate_stream(request):
            pieces.append(chunk.text)
            logprobs += chunk.logprobs
            last = chunk
        assert last is not None and last.finish_reason is not None  # the stream always ends with one
        return GenerateResult(
            text="".join(pieces),
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens,
            finish_reason=last.finish_reason,
            edit_version=last.edit_version,
            applied_edits=last.applied_edits,
            logprobs=logprobs,
        )

    async def generate_stream(self, request: GenerateInput) -> AsyncIterator[GenerateChunk]:
        from service.engine import EngineRequest, SamplingParams

        self._require_ready()
        max_new = validate_generate(request, self.router.limits)
        namespaces = validate_namespaces(request.namespaces)
        await self._require_version(request.min_version)
        # One published edit set for the whole request: the router's retrieval and every forward's hook
        # table come from this snapshot, and its version is the one the response reports. The request sees
        # only the namespaces it names (views of the snapshot: masks, nothing copied).
        snap = self.manager.snapshot().scoped(namespaces)
        # The queue place is taken on arrival: requests are served in arrival order however long their
        # scope detection takes, and a full queue answers before any encoder work.
        ticket = self.engine.reserve() if self.options.reserve_queue_place else None
        args = (request.prompt, request.messages, request.use_edits, request.edit_paths)
        try:
            params = SamplingParams(
                max_new_tokens=max_new,
                temperature=request.temperature,
                top_p=1.0 if request.top_p is None else request.top_p,
                top_k=request.top_k,
                seed=request.seed,
                stop=list(request.stop),
                min_new_tokens=effective_min_new_tokens(request),
                logprobs=request.logprobs,
            )
            speculate = self.options.speculative_prefill and self.router.needs_encoder(*args, snap.retrieval)
            plain = self.router.plain_route(*args) if speculate else None
        except BaseException:
            if ticket is not None:
                self.engine.release(ticket)
            raise

        def queued(route: Route, place: Ticket | None) -> TokenStream:
            # The alignment adapter (if any) runs on this row only when descriptors were injected.
            return self.engine.stream(
                EngineRequest(route.prompt_ids, params, use_hooks=route.use_hooks, deadline=request.deadline,
                              hook_table=snap.hooks, adapted=bool(route.hits)),
                place,
            )

        if plain is None:
            try:
                route = await self._route(request, snap)
            except BaseException:
                if ticket is not None:
                    self.engine.release(ticket)
                raise
            stream = queued(route, ticket)
        else:
            route, stream = await self._route_speculatively(request, snap, plain, queued, ticket)
        try:
            async for event in stream:
                final = event.finish_reason is not None
                yield GenerateChunk(
                    text=event.text,
                    token_ids=list(event.token_ids),
                    finish_reason=event.finish_reason,
                    prompt_tokens=event.prompt_tokens,
                    completion_tokens=event.completion_tokens,
                    edit_version=snap.version,
                    applied_edits=self._applied(route, event.hook_fires) if final else [],
                    logprobs=self._logprobs(event.token_ids, event.logprobs),
                )
        finally:
            # Closing the engine's stream frees the batch slot when our caller stops early (cancel).
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _route_speculatively(
        self,
        request: GenerateInput,
        snap: EditSnapshot,
        plain: Route,
        queued: Callable[[Route, Ticket | None], TokenStream],
        ticket: Ticket | None,
    ) -> tuple[Route, TokenStream]:
        """Queue the request with its plain prompt at once and route it meanwhile (the sentence encoder
        runs): most requests have no descriptor in scope, and for them the prefill that ran during scope
        detection is the one they need, so detection costs their first token nothing. A request that does
        get descriptors is queued again at the same turn with its real prompt; the speculative row is
        cancelled and its tokens, held back until now, are never sent."""
        stream = queued(plain, ticket)
        try:
            route = await self._route(request, snap)
            if route.hits:
                place = self.engine.keep_place(stream)
                await stream.aclose()
                stream = queued(route, place)
                metrics.SPECULATIVE_PREFILLS.labels("discarded").inc()
            else:
                metrics.SPECULATIVE_PREFILLS.labels("kept").inc()
        except BaseException:
            await stream.aclose()
            raise
        return route, stream

    async def _route(self, request: GenerateInput, snap: EditSnapshot) -> Route:
        if request.deadline is not None and time.monotonic() >= request.deadline:
            raise DeadlineExceeded("the deadline passed before the request was routed")
        args = (request.prompt, request.messages, request.use_edits, request.edit_paths)
        if not self.router.needs_encoder(*args, snap.retrieval):
            # Tokenising and an index search (the query's embedding is cached): about a millisecond, less
            # than a hand-off to a worker thread costs on a busy host, so it runs here.
            return self.router.route_generate(*args, None, snap.retrieval)
        # The sentence encoder runs: keep it off the event loop. Threads that ran torch give their OpenMP
        # workers back (service/engine/cpu_threads.py), or every team sleeps between kernels on a 2-core
        # host.
        return await asyncio.to_thread(
            released_after(self.router.route_generate), *args, None, snap.retrieval
        )

    async def score(self, request: ScoreInput) -> ScoreResult:
        self._require_ready()
        validate_score(request)
        namespaces = validate_namespaces(request.namespaces)
        await self._require_version(request.min_version)
        snap = self.manager.snapshot().scoped(namespaces)
        route, continuation_ids = await asyncio.to_thread(
            released_after(self.router.route_score), request.prompt, request.continuation, request.use_edits,
            request.edit_paths, snap.retrieval,
        )
        out = await self.engine.score(route.prompt_ids, continuation_ids, use_hooks=route.use_hooks,
                                      hook_table=snap.hooks)
        tokenizer = self.loaded.tokenizer
        tokens = [
            TokenLogprob(token_id=t, token=tokenizer.decode([t]), logprob=lp, is_greedy=g, argmax_token_id=a)
            for t, lp, g, a in zip(
                continuation_ids, out.logprobs, out.greedy, out.argmax or [-1] * len(out.greedy), strict=True
            )
        ]
        return ScoreResult(
            tokens=tokens,
            total_logprob=float(sum(out.logprobs)),
            edit_version=snap.version,
            prompt_tokens=len(route.prompt_ids),
            applied_edits=self._applied(route, out.hook_fires),
        )

    # ------------------------------------------------------------------------------------ editing

    async def edit(self, request: EditInput) -> EditResult:
        self._require_ready()
        return await asyncio.to_thread(released_after(self.manager.edit), request)

    async def batch_edit(self, request: BatchEditInput) -> BatchEditResult:
        self._require_ready()
        return await asyncio.to_thread(released_after(self.manager.batch_edit), request)

    async def get_edit(self, edit_id: str) -> EditView:
        return await asyncio.to_thread(self.manager.get, edit_id)

    async def list_edits(self, request: ListEditsInput) -> tuple[list[EditView], str]:
        return await asyncio.to_thread(self.manager.list, request)

    async def rollback(self, request: RollbackInput) -> RollbackResult:
        self._require_ready()
        return await asyncio.to_thread(released_after(self.manager.rollback), request)

    async def rollback_to(self, request: RollbackToInput) -> RollbackToResult:
        self._require_ready()
        return await asyncio.to_thread(released_after(self.manager.rollback_to), request)

    async def server_info(self) -> ServerInfo:
        counts = self.manager.counts()
        return ServerInfo(
            model_name=self.loaded.name,
            dtype=str(self.loaded.dtype).removeprefix("torch."),
            device=str(self.loaded.device),
            hook_layers=list(self.manager.hooks.default_layers),
            hook_layer_rule=self.manager.hook_rule,
            edit_layer=self.manager.policy.edit_layer,
            auto_layer_candidates=list(self.manager.auto_layer_candidates),
            architecture=self.loaded.architecture,
            edit_version=self.manager.version,
            active_edits=counts.active,
            active_hook_edits=counts.active_hook,
            active_descriptor_edits=counts.active_descriptor,
            total_edits=counts.total,
            server_version=__version__,
            max_batch_size=self.options.max_batch_size,
        )

    # ------------------------------------------------------------------------------------ locating

    async def trace(self, request: TraceInput) -> TraceResult:
        """Causal tracing on the base model (service/locate/trace.py), in a thread beside serving: its
        forward hooks act in that thread only, and the edit tables are off there (hooks.disabled)."""
        self._require_ready()
        if self._traces >= MAX_CONCURRENT_TRACES:
            raise ResourceExhausted(
                f"{self._traces} trace(s) running, at most {MAX_CONCURRENT_TRACES} at a time; retry later")
        if request.deadline is not None and time.monotonic() >= request.deadline:
            raise DeadlineExceeded("the deadline passed before the trace started")
        self._traces += 1
        try:
            return await asyncio.to_thread(released_after(self._trace), request)
        finally:
            self._traces -= 1

    def _trace(self, request: TraceInput) -> TraceResult:
        from service.hooks.arch import UnsupportedArchitecture, decoder_layers
        from service.locate.trace import (
            DEFAULT_SAMPLES,
            DEFAULT_WINDOW,
            MAX_TRACE_TOKENS,
            calculate_hidden_flow,
            circuit_summary,
            prepare_trace,
        )

        tokenizer = self.loaded.tokenizer
        prompt = prepare_trace(tokenizer, request.prompt, request.subject, request.answer,
                               max_tokens=min(self.router.limits.max_prompt_tokens, MAX_TRACE_TOKENS))
        samples = DEFAULT_SAMPLES if request.samples is None else request.samples
        window = request.window
        if window is None:
            window = min(DEFAULT_WINDOW, len(decoder_layers(self.loaded.model)))
        try:
            with self.manager.hooks.disabled():
                trace = calculate_hidden_flow(self.loaded.model, prompt, samples=samples, window=window,
                                              seed=request.seed, deadline=request.deadline)
        except UnsupportedArchitecture as exc:
            raise FailedPrecondition(f"this model cannot be traced: {exc}") from exc
        mlp_top, attn_top = circuit_summary(trace)

        def grid(kind: str) -> EffectGrid:
            values = trace.grid(kind)
            return EffectGrid(layers=values.shape[0], tokens=values.shape[1],
                              values=[float(v) for v in values.flatten().tolist()])

        return TraceResult(
            tokens=[tokenizer.decode([i]) for i in trace.ids],
            subject_start=trace.subject[0], subject_end=trace.subject[1],
            answer=tokenizer.decode([trace.answer_id]), answer_token_id=trace.answer_id,
            clean_probability=trace.clean_p, corrupted_probability=trace.corrupted_p,
            residual=grid("residual"), mlp=grid("mlp"), attention=grid("attention"),
            mlp_at_subject=mlp_top, attention_at_last=attn_top,
            samples=trace.samples, window=trace.window, seed=trace.seed, noise=trace.noise,
            seconds=trace.seconds,
        )

    def _applied(self, route: Route, hook_fires: dict[str, float]) -> list[AppliedEdit]:
        return _applied(route, hook_fires, self.manager.registry.namespace_of)


def _applied(
    route: Route, hook_fires: dict[str, float], namespace_of: Callable[[str], str]
) -> list[AppliedEdit]:
    """Retrieval hits first (they shaped the prompt), then hook edits that fired, best score first."""
    hooks = [AppliedEdit(edit_id, "hook", score)
             for edit_id, score in sorted(hook_fires.items(), key=lambda kv: -kv[1])]
    return [replace(a, namespace=namespace_of(a.edit_id)) for a in route.retrieval_edits() + hooks]
