"""Edit requests checked and turned into plans, before anything is computed or stored.

Every caller mistake becomes InvalidArgument naming the field ("edits[2].prompt" inside a batch).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

from service.editlog import request_digest
from service.edits.compile import compile_descriptor
from service.errors import InvalidArgument
from service.hooks import Editor, EditSpec
from service.namespaces import DEFAULT_NAMESPACE, validate_namespace
from service.router.prompt import derive_descriptor, raw_prompt_prefix, relation_key, validate_descriptor
from service.types import BatchEditInput, EditInput

EditKind = Literal["triple", "descriptor"]


@dataclass(frozen=True)
class EditPlan:
    kind: EditKind
    spec: EditSpec | None  # triple edits only
    descriptor: str  # as stored and injected: validated, line breaks folded
    relation_key: str  # "" for descriptor-only edits (they never supersede)
    force: bool
    # The triple was compiled from a descriptor-only request: its hook entry is kept only when it passes
    # the quality gate (force covers the caller's own triples, not the server's reading of a sentence).
    derived: bool = False
    namespace: str = DEFAULT_NAMESPACE


def plan_edit(
    req: EditInput,
    editor: Editor,
    tokenizer: Any,
    max_descriptor_chars: int,
    *,
    force: bool | None = None,
    field_prefix: str = "",
    fit_in_retrieval_prompt: bool = False,
    compile_descriptors: bool = False,
    descriptor_hooks: bool = True,
    edit_layer: str = "fixed",
) -> EditPlan:
    """`edit_layer`: the hook layer rule of a request that names none ("fixed" or "auto").
    `fit_in_retrieval_prompt`: fit the value also after the edit's own descriptor block, the prompt the
    router builds when the edit is in scope (see EditSpec.serving_contexts)."""
    try:
        namespace = validate_namespace(req.namespace)
        compile_it = compile_descriptors if req.compile_descriptor is None else req.compile_descriptor
        layers, auto = parse_layer(req.layer, edit_layer)
        plan = _plan(req, editor, tokenizer, max_descriptor_chars, req.force if force is None else force,
                     compile_it, descriptor_hooks, (layers, auto))
    except InvalidArgument as exc:
        if not field_prefix:
            raise
        raise _prefixed(exc, field_prefix) from exc
    plan = replace(plan, namespace=namespace)
    if plan.spec is not None and fit_in_retrieval_prompt:
        plan.spec.serving_contexts = [raw_prompt_prefix([plan.descriptor])]
    return plan


def _plan(
    req: EditInput,
    editor: Editor,
    tokenizer: Any,
    max_chars: int,
    force: bool,
    compile_it: bool,
    descriptor_hooks: bool = True,
    layer: tuple[tuple[int, ...], bool] = ((), False),
) -> EditPlan:
    subject, prompt, target = (req.subject or ""), (req.prompt or ""), (req.target_new or "")
    paraphrases = list(req.paraphrases or [])
    descriptor = req.descriptor or ""
    if not (subject.strip() or prompt.strip() or target.strip()):
        if not descriptor.strip():
            raise InvalidArgument(
                "must be a non-empty string (or send only `descriptor` for a retrieval-only edit)",
                field="subject",
            )
        if paraphrases:
            raise InvalidArgument("are only for subject/prompt/target_new edits", field="paraphrases")
        text = validate_descriptor(descriptor, tokenizer, max_chars)
        if compile_it and (compiled := _compiled(text, editor, force, descriptor_hooks, layer)) is not None:
            return compiled
        return EditPlan("descriptor", None, text, "", force)

    spec = EditSpec(subject, prompt, target, paraphrases, layers=layer[0], auto_layer=layer[1])
    editor.validate(spec)
    if descriptor.strip():
        text = validate_descriptor(descriptor, tokenizer, max_chars)
    else:
        try:
            text = validate_descriptor(derive_descriptor(prompt, target), tokenizer, max_chars)
        except InvalidArgument as exc:
            # The derived descriptor carries the prompt into the retrieval template: its faults are the
            # prompt's (a special token, a role marker, too long to inject).
            raise InvalidArgument(
                f"the descriptor derived from prompt and target_new is refused ({_bare(exc)}); "
                "send a shorter `descriptor` or fix the prompt",
                field="prompt",
            ) from exc
    return EditPlan("triple", spec, text, relation_key(subject, prompt), force)


def _compiled(
    descriptor: str, editor: Editor, force: bool, hooks: bool,
    layer: tuple[tuple[int, ...], bool] = ((), False),
) -> EditPlan | None:
    """The plan of the first fact the descriptor states that the editor accepts (a descriptor usually
    leads with its update; later sentences add detail): a hook plan, or with `hooks` off a descriptor
    plan that only records the fact (its subject feeds the scope detector's subject rule)."""
    for fact in compile_descriptor(descriptor):
        spec = EditSpec(fact.subject, fact.prompt, fact.target_new, layers=layer[0], auto_layer=layer[1])
        try:
            editor.validate(spec)
        except InvalidArgument as exc:
            if exc.field == "layer":
                raise
            continue  # a target too long for v*, say: try another fact, else stay retrieval-only
        key = relation_key(fact.subject, fact.prompt)
        return EditPlan("triple" if hooks else "descriptor", spec, descriptor, key, force, derived=True)
    return None


def parse_layer(value: str, default_rule: str = "fixed") -> tuple[tuple[int, ...], bool]:
    """A request's `layer`: "" (the server's rule), "fixed" (the server's hook layers), "auto" (chosen per
    edit from a causal trace), or one layer index. Returns (named layers, auto)."""
    text = (value or "").strip().lower() or default_rule
    if text == "fixed":
        return (), False
    if text == "auto":
        return (), True
    if text.isdigit() and len(text) <= 4:
        return (int(text),), False
    raise InvalidArgument(
        f"must be empty, 'fixed', 'auto' or a layer index, got {value[:40]!r}", field="layer"
    )


def edit_digest(req: EditInput) -> str:
    """What "the same content" means for an idempotent retry (the actor is who, not what)."""
    return request_digest({"op": "edit", **_content(req)})


def batch_digest(req: BatchEditInput) -> str:
    return request_digest(
        {"op": "batch_edit", "force": bool(req.force), "edits": [_content(e) for e in req.edits]}
    )


def _content(req: EditInput) -> dict[str, Any]:
    content: dict[str, Any] = {
        "subject": req.subject or "",
        "prompt": req.prompt or "",
        "target_new": req.target_new or "",
        "paraphrases": list(req.paraphrases or []),
        "descriptor": req.descriptor or "",
        "force": bool(req.force),
    }
    if req.compile_descriptor is not None:  # absent when unset: digests of older requests stay the same
        content["compile_descriptor"] = bool(req.compile_descriptor)
    if req.namespace and req.namespace != DEFAULT_NAMESPACE:  # likewise
        content["namespace"] = req.namespace
    if req.layer:  # likewise
        content["layer"] = req.layer.strip().lower()
    return content


def _bare(exc: InvalidArgument) -> str:
    return str(exc).removeprefix(f"{exc.field}: ") if exc.field else str(exc)


def _prefixed(exc: InvalidArgument, prefix: str) -> InvalidArgument:
    return InvalidArgument(_bare(exc), field=f"{prefix}.{exc.field}" if exc.field else prefix)
