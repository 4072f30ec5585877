"""The composition root: the one place that turns `Settings` into the served stack.

    Settings -> edit log, descriptor encoder + retrieval store, hook layers + HookManager, editor (and its
                per-edit layer chooser) -> EditManager (EditPolicy)
             -> alignment adapter, Engine -> ScopeDetector, Router -> DataPlane (PlaneOptions)
             -> Authorizer, ServerOptions -> EditServeServer (its data plane from a factory, built on load)

Every component below takes its collaborators and small option values; none reads `Settings`. The
command line (service/cli.py), the in-process evaluation server and the tests build through here
(`load_data_plane`, `build_server`). Importing it is cheap (grpc, no torch): the model
stack's modules are imported by the builders that need them, so the command line can build and bind the
server from here before the model loads (in the loading thread).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from service import metrics
from service.auth import Authorizer
from service.config import Settings
from service.errors import ModelNotServable
from service.transport import EditServeServer, PlaneFactory, ServerOptions
from service.transport import serve as serve_server

if TYPE_CHECKING:  # the model stack: torch, transformers, faiss (imported by the builders below)
    from service.dataplane import DataPlane, PlaneOptions
    from service.edits import EditManager, EditorFactory, EditPolicy
    from service.engine import Engine
    from service.engine.adapter import RowAdapter
    from service.engine.loader import LoadedModel
    from service.hooks import HookManager
    from service.hooks.defaults import HookLayerChoice
    from service.retrieval.store import Encoder
    from service.router.routing import Router

__all__ = [
    "assemble_plane", "authorizer", "build_engine", "build_server", "edit_policy", "load_adapter",
    "load_data_plane", "open_edit_manager", "plane_options", "serve", "server_options", "trace_layer_chooser",
]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ edits


def edit_policy(settings: Settings) -> EditPolicy:
    from service.edits import EditPolicy

    return EditPolicy(
        max_edits=settings.max_edits,
        max_batch_edits=settings.max_batch_edits,
        max_hook_table_mb=settings.max_hook_table_mb,
        max_descriptor_chars=settings.max_descriptor_chars,
        compile_descriptors=settings.compile_descriptors,
        descriptor_hooks=settings.descriptor_hooks,
        fit_in_retrieval_prompt=settings.fit_in_retrieval_prompt,
        edit_layer=settings.edit_layer,
        retrieval_enabled=settings.retrieval_enabled,
    )


def descriptor_encoder(settings: Settings) -> Encoder:
    """With retrieval off no query is encoded: the encoder loads only if an Edit brings a descriptor."""
    from service.retrieval import DescriptorEncoder
    from service.retrieval.encoder import LazyDescriptorEncoder

    if settings.retrieval_enabled:
        return DescriptorEncoder(settings.encoder)
    return LazyDescriptorEncoder(settings.encoder)


def trace_layer_chooser(
    loaded: LoadedModel, candidates: Sequence[int], fallback: int
) -> Callable[[str, str], tuple[int, str]]:
    """The editor's per-edit layer choice (`layer: auto`): a causal trace of the edit's prompt."""
    from service.locate.layer_choice import choose_edit_layer

    def choose(prompt: str, subject: str) -> tuple[int, str]:
        choice = choose_edit_layer(loaded.model, loaded.tokenizer, prompt, subject, candidates,
                                   fallback=fallback)
        return choice.layer, choice.describe()

    return choose


def _hook_manager(loaded: LoadedModel, settings: Settings) -> tuple[HookManager, HookLayerChoice, list[int]]:
    """The hook layers (--hook-layers or the default rule) plus the auto-layer candidates, installed."""
    from service.hooks import HookManager
    from service.hooks.arch import UnsupportedArchitecture
    from service.hooks.defaults import auto_layer_candidates, choose_hook_layers

    choice = choose_hook_layers(loaded.model, settings.hook_layers)
    try:
        candidates = auto_layer_candidates(loaded.model, settings.auto_layer_candidates)
        hooks = HookManager(loaded.model, choice.layers, spare_layers=candidates)
    except UnsupportedArchitecture as exc:
        raise ModelNotServable(str(exc)) from exc
    except ValueError as exc:  # --hook-layers / --auto-layer-candidates name a layer it lacks
        raise ModelNotServable(str(exc)) from exc
    log.info("hook layers %s: %s; auto layer candidates %s", choice.layers, choice.rule, candidates)
    return hooks, choice, candidates


def open_edit_manager(
    loaded: LoadedModel,
    settings: Settings,
    *,
    encoder: Encoder | None = None,
    editor_factory: EditorFactory | None = None,
    warmup: bool = True,
) -> EditManager:
    """The edit manager of `settings`, its log replayed. `encoder` and `editor_factory` replace the
    configured ones (tests); `warmup=False` leaves the first edit to pay probe activations and the
    encoder's first call. On any failure the log is closed and the model is left unhooked."""
    from service.editlog import EditLog
    from service.edits import EditManager, default_editor_factory
    from service.retrieval import RetrievalStore

    store = RetrievalStore(encoder if encoder is not None else descriptor_encoder(settings))
    edit_log = EditLog.open(settings.edit_log_url or None, settings.data_dir)
    hooks: HookManager | None = None
    try:
        hooks, choice, candidates = _hook_manager(loaded, settings)
        make_editor = editor_factory or default_editor_factory(settings.locality_max_top1_changed)
        editor = make_editor(loaded, hooks)
        if editor.layer_chooser is None:
            editor.layer_chooser = trace_layer_chooser(loaded, candidates, choice.layers[0])
    except BaseException:
        if hooks is not None:
            hooks.uninstall()
        edit_log.close()
        raise
    manager = EditManager(loaded, edit_log, store, hooks, editor, edit_policy(settings),
                          hook_rule=choice.rule, auto_layer_candidates=candidates)
    if warmup:
        try:
            manager.warmup()
        except BaseException:
            manager.close()
            raise
    return manager


# ------------------------------------------------------------------------------------ serving


def load_adapter(loaded: LoadedModel, settings: Settings) -> RowAdapter | None:
    """The alignment adapter for rows with injected descriptors, or None; one that does not fit the
    model stops the start (exit 2) rather than serving without what the operator asked for."""
    from service.engine.adapter import AdapterError, RowAdapter, adapter_path
    from service.engine.loader import EMBEDDED_MODEL, EMBEDDED_NAME

    # "auto" asks what is served, not what --model said: a caller may hand in another loaded model.
    served = EMBEDDED_MODEL if loaded.name == EMBEDDED_NAME else loaded.name
    path = adapter_path(settings.alignment_adapter, served)
    if path is None or not settings.retrieval_enabled:
        return None
    try:
        adapter = RowAdapter(loaded.model, path)
    except AdapterError as exc:
        raise ModelNotServable(f"--alignment-adapter: {exc}") from exc
    log.info("alignment adapter %s: LoRA on %d layers, %.1f MiB", path, adapter.modules,
             adapter.nbytes / 2**20)
    return adapter


def build_engine(
    loaded: LoadedModel, hooks: HookManager, settings: Settings, adapter: RowAdapter | None = None
) -> Engine:
    from service.engine import Engine

    return Engine(loaded, hooks, max_batch_size=settings.max_batch_size, max_queue=settings.max_queue,
                  prefix_cache_bytes=settings.prefix_cache_mb << 20, adapter=adapter,
                  prefill_chunk_tokens=settings.prefill_chunk_tokens,
                  packed_weights=settings.packed_cpu_weights,
                  admission_wait_s=settings.admission_wait_ms / 1000,
                  arrival_gap_s=settings.admission_gap_ms / 1000)


def build_router(loaded: LoadedModel, manager: EditManager, settings: Settings) -> Router:
    """Scope detection over the manager's retrieval store (none with retrieval off), the request limits
    and the descriptor placement."""
    from service.router.prompt import PromptStyle
    from service.router.routing import Router
    from service.router.scope import ScopeDetector
    from service.router.validation import Limits

    scope = (
        ScopeDetector(manager.store, settings.scope_threshold, settings.retrieval_top_k,
                      settings.subject_scope_threshold, settings.name_scope_threshold,
                      settings.query_cache_entries)
        if settings.retrieval_enabled
        else None
    )
    limits = Limits(settings.max_prompt_tokens, settings.max_new_tokens_limit,
                    settings.default_max_new_tokens)
    style = PromptStyle(chat=settings.chat_placement, raw=settings.raw_placement)  # type: ignore[arg-type]
    return Router(loaded.tokenizer, scope, limits, style)


def plane_options(settings: Settings) -> PlaneOptions:
    from service.dataplane import PlaneOptions

    return PlaneOptions(log_poll_s=settings.log_poll_s, max_batch_size=settings.max_batch_size,
                        speculative_prefill=settings.speculative_prefill)


def assemble_plane(
    settings: Settings, loaded: LoadedModel, manager: EditManager, engine: Engine
) -> DataPlane:
    """The data plane over a built manager and engine: its router and options from `settings`."""
    from service.dataplane import DataPlane

    router = build_router(loaded, manager, settings)
    return DataPlane(loaded, manager, engine, router, plane_options(settings))


def load_data_plane(settings: Settings, loaded: LoadedModel | None = None) -> DataPlane:
    """Blocking (~30 s cold): model, encoder, edit-log replay. `loaded` lets tests share one model."""
    from service.dataplane import check_servable
    from service.engine.loader import load_model

    if settings.torch_threads > 0:  # 0 (auto) is applied by the command line, in the main thread
        import torch

        torch.set_num_threads(settings.torch_threads)
    if loaded is None:
        loaded = load_model(settings.model, device=settings.device, dtype=settings.dtype)
    check_servable(loaded)
    adapter = load_adapter(loaded, settings)
    manager = open_edit_manager(loaded, settings)
    try:
        engine = build_engine(loaded, manager.hooks, settings, adapter)
    except Exception:
        manager.close()
        if adapter is not None:
            adapter.remove()
        raise
    metrics.QUEUE_CAPACITY.set(settings.max_queue)  # so a dashboard can show the queue as a share of it
    return assemble_plane(settings, loaded, manager, engine)


# ------------------------------------------------------------------------------------ the server


def server_options(settings: Settings) -> ServerOptions:
    return ServerOptions(
        host=settings.host,
        port=settings.port,
        metrics_port=settings.metrics_port,
        http_port=settings.http_port,
        grace_period_s=settings.grace_period_s,
        health_poll_s=settings.health_poll_s,
        edit_log=settings.edit_log_url or f"SQLite under {settings.data_dir}",
    )


def authorizer(settings: Settings) -> Authorizer:
    """Credentials of both front ends; the token file is read here (a bad one stops the start)."""
    return Authorizer(settings.admin_token, settings.tokens_file)


def build_server(settings: Settings, plane_factory: PlaneFactory) -> EditServeServer:
    """The server of `settings`, not yet started; `plane_factory` builds the data plane on `load_plane`."""
    return EditServeServer(server_options(settings), authorizer(settings), plane_factory)


async def serve(settings: Settings, plane_factory: PlaneFactory, stop: asyncio.Event | None = None) -> int:
    """The process's server: built from `settings`, run until SIGTERM/SIGINT (or `stop`); the exit code."""
    return await serve_server(build_server(settings, plane_factory), stop)
