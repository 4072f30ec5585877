"""OpenAI-compatible HTTP front end (Starlette on uvicorn), on its own port, in the gRPC server's process
and event loop, calling the same data plane: no second engine.

    POST /v1/completions        text completions, streamed as server-sent events with "stream": true
    POST /v1/chat/completions   chat completions, the same
    GET  /v1/models             the served model

A request chooses the namespaces whose edits apply with the `X-Editserve-Namespaces` header (comma-separated)
or the `editserve` extension object of the body (`{"namespaces": [...], "use_edits": ..., "edit_paths": [...],
"min_version": ..., "top_k": ...}`); every response (the last chunk of a stream) carries an `editserve`
object with the edit-set version served and the edits that applied. Errors have OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, with the HTTP status of the data plane's error
(service/errors.py), so a caller's mistake is a 4xx, never a 500.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from service import metrics
from service import types as t
from service.errors import EditServeError, InvalidArgument, NotFound
from service.namespaces import parse_namespace_list, validate_namespaces

from .servicers import PlaneSlot

log = logging.getLogger(__name__)

NAMESPACES_HEADER = "x-editserve-namespaces"
MODEL_ALIAS = "editserve"  # always accepted as `model`, whatever model is served
LISTEN_BACKLOG = 1024  # connections the kernel queues before accept (a burst of clients)
START_POLL_S = 0.01  # how often start() looks whether the HTTP server is up
STOP_MARGIN_S = 5  # past the grace period, seconds before a server that has not stopped is cancelled

# service.errors code -> (HTTP status, OpenAI error type)
HTTP_STATUS: dict[str, tuple[int, str]] = {
    "INVALID_ARGUMENT": (400, "invalid_request_error"),
    "FAILED_PRECONDITION": (400, "invalid_request_error"),
    "NOT_FOUND": (404, "not_found_error"),
    "ALREADY_EXISTS": (409, "conflict_error"),
    "UNAUTHENTICATED": (401, "authentication_error"),
    "PERMISSION_DENIED": (403, "permission_error"),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),
    "CANCELLED": (499, "cancelled"),
    "DEADLINE_EXCEEDED": (504, "timeout_error"),
    "UNAVAILABLE": (503, "service_unavailable_error"),
    "DATA_LOSS": (500, "internal_error"),
    "INTERNAL": (500, "internal_error"),
}
_FINISH = {"length": "length", "stop": "stop", "eos": "stop", "cancelled": "stop"}
# OpenAI parameters this server does not implement: sent with a non-default value they are a 400, never
# silently ignored (a caller relying on them would get answers it did not ask for).
_UNSUPPORTED_DEFAULTS: dict[str, tuple[object, ...]] = {
    "n": (None, 1),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "response_format": (None, {"type": "text"}),
}
_EXTENSION_FIELDS = ("namespaces", "use_edits", "edit_paths", "min_version", "top_k", "min_tokens")


def error_response(status: int, message: str, kind: str, *, param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


def domain_error_response(exc: EditServeError) -> JSONResponse:
    status, kind = HTTP_STATUS.get(exc.code, (500, "internal_error"))
    message = exc.message if status < 500 or exc.code == "UNAVAILABLE" else "internal error"
    return error_response(status, message, kind, param=exc.field, code=exc.code.lower())


class OpenAIFrontEnd:
    """The routes; `slot` is the gRPC server's, so both front ends serve the same data plane."""

    def __init__(self, slot: PlaneSlot, authorize: Callable[[Request, frozenset[str]], None] | None = None
                 ) -> None:
        self._slot = slot
        self._authorize = authorize  # raises Unauthenticated / PermissionDenied for a namespace read
        self._model_name = ""

    def app(self) -> Starlette:
        routes = [
            Route("/v1/completions", self._endpoint(self.completions, "completions"), methods=["POST"]),
            Route("/v1/chat/completions", self._endpoint(self.chat, "chat.completions"), methods=["POST"]),
            Route("/v1/models", self._endpoint(self.models, "models"), methods=["GET"]),
        ]
        return Starlette(routes=routes, exception_handlers={HTTPException: self._http_error,
                                                             Exception: self._internal_error})

    # ------------------------------------------------------------------------------ plumbing

    def _endpoint(self, handler: Callable[[Request], Any], name: str) -> Callable[[Request], Any]:
        rpc = f"http:{name}"

        async def endpoint(request: Request) -> Response:
            started = time.monotonic()
            try:
                response = await handler(request)
            except EditServeError as exc:
                response = domain_error_response(exc)
                if response.status_code >= 500 and exc.code != "UNAVAILABLE":
                    log.error("%s failed", rpc, exc_info=exc)
            metrics.REQUESTS.labels(rpc=rpc, code=str(response.status_code)).inc()
            metrics.REQUEST_DURATION.labels(rpc=rpc).observe(time.monotonic() - started)
            return response

        return endpoint

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind)

    async def _internal_error(self, request: Request, exc: Exception) -> Response:
        log.error("HTTP %s %s failed", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal error", "internal_error")

    async def _body(self, request: Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.body() or b"null")
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidArgument(f"the request body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise InvalidArgument("the request body must be a JSON object")
        return body

    async def _served_model(self, plane: t.DataPlaneProtocol) -> str:
        if not self._model_name:
            self._model_name = (await plane.server_info()).model_name
        return self._model_name

    async def _check_model(self, plane: t.DataPlaneProtocol, body: dict[str, Any]) -> str:
        name = await self._served_model(plane)
        model = body.get("model")
        if model in (None, "", name, MODEL_ALIAS):
            return name
        if not isinstance(model, str):
            raise InvalidArgument("must be a string", field="model")
        raise NotFound(f"this server serves {name!r} (or the alias {MODEL_ALIAS!r}), not {model!r}",
                       field="model")

    # ------------------------------------------------------------------------------ routes

    async def models(self, request: Request) -> Response:
        plane = self._slot.get()
        name = await self._served_model(plane)
        entry = {"id": name, "object": "model", "created": 0, "owned_by": "editserve"}
        return JSONResponse({"object": "list", "data": [entry]})

    async def completions(self, request: Request) -> Response:
        plane = self._slot.get()
        body = await self._body(request)
        model = await self._check_model(plane, body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise InvalidArgument("must be a string (or a list of one string; token ids are not accepted)",
                                  field="prompt")
        gen = self._generate_input(request, body, prompt=prompt)
        return await self._respond(plane, gen, body, model, chat=False)

    async def chat(self, request: Request) -> Response:
        plane = self._slot.get()
        body = await self._body(request)
        model = await self._check_model(plane, body)
        gen = self._generate_input(request, body, messages=_messages(body.get("messages")))
        return await self._respond(plane, gen, body, model, chat=True)

    # ------------------------------------------------------------------------------ requests

    def _generate_input(self, request: Request, body: dict[str, Any], *, prompt: str = "",
                        messages: list[t.ChatMessage] | None = None) -> t.GenerateInput:
        for name, defaults in _UNSUPPORTED_DEFAULTS.items():
            if name in body and body[name] not in defaults:
                raise InvalidArgument("is not supported by this server", field=name)
        logprobs = _logprobs_setting(body, chat=messages is not None)
        ext = body.get("editserve") or {}
        if not isinstance(ext, dict):
            raise InvalidArgument("must be an object", field="editserve")
        unknown = sorted(set(ext) - set(_EXTENSION_FIELDS))
        if unknown:
            raise InvalidArgument(
                f"unknown field(s) {', '.join(unknown)}; known: {', '.join(_EXTENSION_FIELDS)}",
                field="editserve",
            )
        namespaces = _namespaces(request.headers.get(NAMESPACES_HEADER), ext.get("namespaces"))
        if self._authorize is not None:
            self._authorize(request, namespaces)
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        stop = body.get("stop")
        stops = [stop] if isinstance(stop, str) else stop or []
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise InvalidArgument("must be a string or a list of strings", field="stop")
        paths = ext.get("edit_paths") or ["hook", "retrieval"]
        if not isinstance(paths, list) or any(p not in ("hook", "retrieval") for p in paths):
            raise InvalidArgument('must be a list of "hook" and "retrieval"', field="editserve.edit_paths")
        return t.GenerateInput(
            prompt=prompt,
            messages=messages or [],
            max_new_tokens=_int(max_tokens, "max_tokens", minimum=1),
            min_new_tokens=_int(ext.get("min_tokens"), "editserve.min_tokens", minimum=0),
            # OpenAI's default temperature is 1 (sampling); 0 is greedy here as there
            temperature=_number(body.get("temperature"), "temperature", 1.0, 0.0, 2.0),
            top_p=None if body.get("top_p") is None else _number(body["top_p"], "top_p", 1.0, 0.0, 1.0),
            top_k=_int(ext.get("top_k"), "editserve.top_k", minimum=0) or 0,
            seed=_seed(body.get("seed")),
            stop=stops,
            use_edits=_bool(ext.get("use_edits"), "editserve.use_edits", True),
            min_version=_int(ext.get("min_version"), "editserve.min_version", minimum=0) or 0,
            edit_paths=tuple(dict.fromkeys(paths)),  # type: ignore[arg-type]
            namespaces=tuple(sorted(namespaces)),
            logprobs=logprobs,
        )

    async def _respond(self, plane: t.DataPlaneProtocol, gen: t.GenerateInput, body: dict[str, Any],
                       model: str, *, chat: bool) -> Response:
        stream = _bool(body.get("stream"), "stream", False)
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise InvalidArgument("must be an object", field="stream_options")
        ident = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        created = int(time.time())
        if not stream:
            result = await plane.generate(gen)
            wanted = gen.logprobs is not None
            choice: dict[str, Any] = {
                "index": 0, "logprobs": _logprobs_doc(result.logprobs, chat) if wanted else None,
                "finish_reason": _FINISH.get(result.finish_reason, "stop"),
            }
            if chat:
                choice["message"] = {"role": "assistant", "content": result.text}
            else:
                choice["text"] = result.text
            return JSONResponse({
                "id": ident, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": model, "choices": [choice],
                "usage": _usage(result.prompt_tokens, result.completion_tokens),
                "editserve": _extension(result.edit_version, result.applied_edits, gen.namespaces),
            })
        chunks = plane.generate_stream(gen)
        # Open the stream before answering 200: a bad request or a full queue is still a plain 4xx.
        first = await _first(chunks)
        events = _sse(chunks, first, ident, created, model, gen.namespaces, chat,
                      bool(options.get("include_usage")), gen.logprobs is not None)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _first(chunks: AsyncIterator[t.GenerateChunk]) -> t.GenerateChunk | None:
    try:
        return await chunks.__anext__()
    except StopAsyncIteration:
        return None
    except BaseException:
        await chunks.aclose()  # type: ignore[attr-defined]
        raise


async def _sse(
    chunks: AsyncIterator[t.GenerateChunk], first: t.GenerateChunk | None, ident: str, created: int,
    model: str, namespaces: tuple[str, ...], chat: bool, include_usage: bool, logprobs: bool = False,
) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format; the last chunk carries `editserve`. When the client
    goes away Starlette cancels this generator, and `aclosing` closes the data plane's stream, which frees
    the sequence's batch slot at once."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def event(choice: dict[str, Any], **extra: Any) -> str:
        doc = {"id": ident, "object": kind, "created": created, "model": model, "choices": [choice], **extra}
        return f"data: {json.dumps(doc, ensure_ascii=False)}\n\n"

    async with aclosing(chunks):  # type: ignore[type-var]
        if chat:
            yield event({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None})
        pending = [first] if first is not None else []
        try:
            while True:
                if pending:
                    chunk = pending.pop()
                else:
                    try:
                        chunk = await chunks.__anext__()
                    except StopAsyncIteration:
                        break
                finish = _FINISH.get(chunk.finish_reason) if chunk.finish_reason else None
                piece: dict[str, Any] = {
                    "index": 0, "finish_reason": finish,
                    "logprobs": _logprobs_doc(chunk.logprobs, chat) if logprobs else None,
                }
                if chat:
                    piece["delta"] = {"content": chunk.text} if chunk.text or not finish else {}
                else:
                    piece["text"] = chunk.text
                extra: dict[str, Any] = {}
                if finish:
                    extra["editserve"] = _extension(chunk.edit_version, chunk.applied_edits, namespaces)
                yield event(piece, **extra)
                if finish and include_usage:
                    doc = {"id": ident, "object": kind, "created": created, "model": model, "choices": [],
                           "usage": _usage(chunk.prompt_tokens, chunk.completion_tokens)}
                    yield f"data: {json.dumps(doc)}\n\n"
        except EditServeError as exc:  # after the 200 went out: an error event, as OpenAI's streams do
            status, kind_ = HTTP_STATUS.get(exc.code, (500, "internal_error"))
            message = exc.message if status < 500 else "internal error"
            error = {"message": message, "type": kind_, "code": exc.code.lower()}
            yield f"data: {json.dumps({'error': error})}\n\n"
        yield "data: [DONE]\n\n"


# ---------------------------------------------------------------------------------- log-probabilities


def _logprobs_setting(body: dict[str, Any], *, chat: bool) -> int | None:
    """How many alternatives per token the request asks for; None when it asks for no log-probabilities.
    Chat: `logprobs` (bool) with `top_logprobs` (0-20); completions: `logprobs` (an int, 0-20)."""
    if chat:
        wanted = _bool(body.get("logprobs"), "logprobs", False)
        top = _int(body.get("top_logprobs"), "top_logprobs", minimum=0)
        if top is not None and not wanted:
            raise InvalidArgument("needs logprobs: true", field="top_logprobs")
        if top is not None and top > t.MAX_TOP_LOGPROBS:
            raise InvalidArgument(f"must lie in [0, {t.MAX_TOP_LOGPROBS}]", field="top_logprobs")
        return (top or 0) if wanted else None
    raw = body.get("logprobs")
    if raw is None:
        return None
    n = _int(raw, "logprobs", minimum=0)
    if n is not None and n > t.MAX_TOP_LOGPROBS:
        raise InvalidArgument(f"must lie in [0, {t.MAX_TOP_LOGPROBS}]", field="logprobs")
    return n


def _logprobs_doc(logprobs: list[t.GeneratedLogprob], chat: bool) -> dict[str, Any]:
    """OpenAI's shapes: chat `{"content": [{token, logprob, bytes, top_logprobs}]}`; completions
    `{tokens, token_logprobs, top_logprobs, text_offset}` (offsets within this piece of text)."""
    if chat:
        return {"content": [
            {"token": x.token, "logprob": x.logprob, "bytes": list(x.token.encode()),
             "top_logprobs": [{"token": a.token, "logprob": a.logprob, "bytes": list(a.token.encode())}
                              for a in x.top_logprobs]}
            for x in logprobs
        ]}
    offsets, at = [], 0
    for x in logprobs:
        offsets.append(at)
        at += len(x.token)
    return {
        "tokens": [x.token for x in logprobs],
        "token_logprobs": [x.logprob for x in logprobs],
        "top_logprobs": [{a.token: a.logprob for a in x.top_logprobs} for x in logprobs],
        "text_offset": offsets,
    }


# ---------------------------------------------------------------------------------- field parsing


def _namespaces(header: str | None, body: object) -> frozenset[str]:
    from_header = parse_namespace_list(header, "X-Editserve-Namespaces") if header else None
    from_body = None
    if body is not None:
        if not isinstance(body, list) or not all(isinstance(n, str) for n in body):
            raise InvalidArgument("must be a list of namespace names", field="editserve.namespaces")
        from_body = validate_namespaces(body, "editserve.namespaces")
    if from_header is not None and from_body is not None and from_header != from_body:
        raise InvalidArgument("the X-Editserve-Namespaces header and editserve.namespaces name different "
                              "namespaces; send one of them", field="editserve.namespaces")
    return from_header or from_body or validate_namespaces([])


def _messages(raw: object) -> list[t.ChatMessage]:
    if not isinstance(raw, list) or not raw:
        raise InvalidArgument("must be a non-empty list of messages", field="messages")
    out = []
    for n, m in enumerate(raw):
        if not isinstance(m, dict):
            raise InvalidArgument("must be an object", field=f"messages[{n}]")
        role = {"developer": "system"}.get(m.get("role"), m.get("role"))
        if role not in ("system", "user", "assistant"):
            raise InvalidArgument(f"role {m.get('role')!r} is not supported (system, developer, user, "
                                  "assistant)", field=f"messages[{n}].role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise InvalidArgument("only text content parts are supported", field=f"messages[{n}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise InvalidArgument("must be a string or a list of text parts", field=f"messages[{n}].content")
        out.append(t.ChatMessage(role=role, content=content))
    return out


def _int(value: object, name: str, *, minimum: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument("must be an integer", field=name)
    if value < minimum:
        raise InvalidArgument(f"must be >= {minimum}, got {value}", field=name)
    return value


def _number(value: object, name: str, default: float, lo: float, hi: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument("must be a number", field=name)
    if not lo <= value <= hi:
        raise InvalidArgument(f"must lie in [{lo:g}, {hi:g}], got {value}", field=name)
    return float(value)


def _bool(value: object, name: str, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidArgument("must be true or false", field=name)
    return value


def _seed(value: object) -> int:
    if value is None:
        return 0
    seed = _int(value, "seed", minimum=-(2**63))
    return (seed or 0) % 2**64  # OpenAI seeds are signed 64-bit; the engine's are unsigned


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _extension(version: int, applied: list[t.AppliedEdit], namespaces: tuple[str, ...]) -> dict[str, Any]:
    return {
        "edit_version": version,
        "namespaces": list(namespaces) or ["default"],
        "applied_edits": [{"edit_id": a.edit_id, "path": a.path, "score": round(float(a.score), 6),
                           "namespace": a.namespace} for a in applied],
    }


# ---------------------------------------------------------------------------------- the server


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside the gRPC server's event loop: the process's signal handling stays the gRPC
    server's (it stops both)."""

    def capture_signals(self) -> Any:  # type: ignore[override]
        import contextlib

        return contextlib.nullcontext()


class HttpFrontEnd:
    """Binds the port itself (so a taken port is an OSError at start, like gRPC's) and serves the app."""

    def __init__(self, app: Starlette, host: str, port: int, grace_s: float) -> None:
        self._app = app
        self._host = host
        self._port = port
        self._grace_s = grace_s
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self) -> None:
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self._host.strip("[]"), self._port))
        except OSError as exc:
            sock.close()
            raise OSError(f"cannot serve HTTP on {self._host}:{self._port}: {exc}") from exc
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        grace = max(1, round(self._grace_s)) if self._grace_s else None
        config = uvicorn.Config(self._app, lifespan="off", log_config=None, access_log=False,
                                timeout_graceful_shutdown=grace)
        self._server = _EmbeddedServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="editserve-http")
        while not self._server.started and not self._task.done():
            await asyncio.sleep(START_POLL_S)
        if self._task.done():
            self._task.result()  # raises what made it stop
            raise OSError("the HTTP server stopped at start")
        log.info("OpenAI-compatible HTTP on http://%s:%d/v1", self._host, self.port)

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(self._task, self._grace_s + STOP_MARGIN_S)
        except (TimeoutError, asyncio.CancelledError):
            self._task.cancel()
        except Exception:  # noqa: BLE001 - stopping: log, never mask the shutdown
            log.exception("the HTTP server failed while stopping")


__all__ = ["HTTP_STATUS", "NAMESPACES_HEADER", "HttpFrontEnd", "OpenAIFrontEnd", "error_response"]
