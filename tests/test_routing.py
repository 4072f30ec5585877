"""Request validation (every bad field named) and request-level routing (paths, scope, token ids)."""

from __future__ import annotations

import math

import pytest

from service.errors import InvalidArgument
from service.retrieval.encoder import DescriptorEncoder
from service.retrieval.store import RetrievalStore
from service.router.prompt import BLOCK_OPEN, render_chat
from service.router.routing import Router
from service.router.scope import ScopeDetector
from service.router.validation import Limits, validate_generate, validate_score
from service.types import ChatMessage, GenerateInput, ScoreInput

LIMITS = Limits(max_prompt_tokens=64, max_new_tokens=64, default_max_new_tokens=16)


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (GenerateInput(prompt=""), "prompt"),
        (GenerateInput(prompt="   "), "prompt"),
        (GenerateInput(messages=[ChatMessage("wizard", "hi")]), "messages[0].role"),
        (GenerateInput(messages=[ChatMessage("user", " ")]), "messages"),
        (GenerateInput(prompt="x", max_new_tokens=0), "max_new_tokens"),
        (GenerateInput(prompt="x", max_new_tokens=65), "max_new_tokens"),
        (GenerateInput(prompt="x", max_new_tokens=4, min_new_tokens=5), "min_new_tokens"),
        (GenerateInput(prompt="x", min_new_tokens=17), "min_new_tokens"),
        (GenerateInput(prompt="x", temperature=-0.1), "temperature"),
        (GenerateInput(prompt="x", temperature=math.nan), "temperature"),
        (GenerateInput(prompt="x", top_p=0.0), "top_p"),
        (GenerateInput(prompt="x", top_p=1.5), "top_p"),
        (GenerateInput(prompt="x", top_k=-1), "top_k"),
        (GenerateInput(prompt="x", seed=2**63), "seed"),
        (GenerateInput(prompt="x", stop=[""]), "stop"),
        (GenerateInput(prompt="x", stop=["s"] * 17), "stop"),
        (GenerateInput(prompt="x", edit_paths=("weights",)), "edit_paths"),  # type: ignore[arg-type]
    ],
)
def test_generate_validation_names_the_field(request_: GenerateInput, field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_generate(request_, LIMITS)
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}:")


def test_generate_validation_defaults() -> None:
    assert validate_generate(GenerateInput(prompt="hello"), LIMITS) == 16
    assert validate_generate(GenerateInput(prompt="hello", max_new_tokens=64, top_p=1.0), LIMITS) == 64
    assert validate_generate(GenerateInput(messages=[ChatMessage("user", "hi")]), LIMITS) == 16


@pytest.mark.parametrize(
    ("request_", "field"),
    [(ScoreInput(prompt="", continuation=" a"), "prompt"), (ScoreInput(prompt="a", continuation=""),
                                                             "continuation")],
)
def test_score_validation(request_: ScoreInput, field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_score(request_)
    assert err.value.field == field


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from service.engine.loader import embedded_gguf_path

    p = embedded_gguf_path()
    return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)


@pytest.fixture(scope="module")
def store() -> RetrievalStore:
    store = RetrievalStore(DescriptorEncoder())
    store.add("e-eiffel", "The Eiffel Tower is located in Rome.")
    return store


def test_out_of_scope_and_edits_off_are_byte_identical(tokenizer, store: RetrievalStore) -> None:
    router = Router(tokenizer, ScopeDetector(store), LIMITS)
    plain = list(tokenizer("What is 17 times 23?")["input_ids"])
    assert router.route_generate("What is 17 times 23?", [], True, ("hook", "retrieval")).prompt_ids == plain
    eiffel = "Where is the Eiffel Tower located?"
    off = router.route_generate(eiffel, [], False, ("hook", "retrieval"))
    assert off.prompt_ids == list(tokenizer(eiffel)["input_ids"]) and not off.use_hooks and not off.hits
    hook_only = router.route_generate(eiffel, [], True, ("hook",))
    assert hook_only.use_hooks and not hook_only.hits
    chat = [ChatMessage("user", "Tell me a joke about penguins.")]
    expected = tokenizer(render_chat([("user", chat[0].content)], tokenizer), add_special_tokens=False)
    assert router.route_generate("", chat, True, ("hook", "retrieval")).prompt_ids == expected["input_ids"]


def test_in_scope_prompt_carries_the_descriptor(tokenizer, store: RetrievalStore) -> None:
    router = Router(tokenizer, ScopeDetector(store), LIMITS)
    route = router.route_generate("Where is the Eiffel Tower located?", [], True, ("retrieval",))
    assert [h.edit_id for h in route.hits] == ["e-eiffel"] and not route.use_hooks
    text = tokenizer.decode(route.prompt_ids)
    assert text.startswith(BLOCK_OPEN) and "The Eiffel Tower is located in Rome." in text
    assert [(e.edit_id, e.path) for e in route.retrieval_edits()] == [("e-eiffel", "retrieval")]
    no_retrieval = Router(tokenizer, None, LIMITS)
    assert not no_retrieval.route_generate("Where is the Eiffel Tower located?", [], True,
                                           ("hook", "retrieval")).hits


def test_prompt_token_limit_names_the_field(tokenizer) -> None:
    router = Router(tokenizer, None, LIMITS)
    with pytest.raises(InvalidArgument) as err:
        router.route_generate("word " * 80, [], True, ("hook",))
    assert err.value.field == "prompt"
    with pytest.raises(InvalidArgument) as err:
        router.route_generate("", [ChatMessage("user", "word " * 80)], True, ("hook",))
    assert err.value.field == "messages"


def test_score_route_splits_prompt_and_continuation(tokenizer) -> None:
    router = Router(tokenizer, None, LIMITS)
    route, cont = router.route_score("The capital of France is", " Paris", True, ("hook",))
    joint = list(tokenizer("The capital of France is Paris")["input_ids"])
    assert route.prompt_ids + cont == joint


def test_only_a_query_without_a_cached_embedding_needs_the_encoder(tokenizer, store: RetrievalStore) -> None:
    """The data plane routes on the event loop unless the sentence encoder would run (dataplane._route):
    a new query with edits in the store needs it; the same query again, the hook path only, edits off,
    retrieval switched off or an empty store do not."""
    router = Router(tokenizer, ScopeDetector(store), LIMITS)
    both = ("hook", "retrieval")
    question = "Which city is the Eiffel Tower in, exactly?"
    assert router.needs_encoder(question, [], True, both)
    router.route_generate(question, [], True, both)
    assert not router.needs_encoder(question, [], True, both)  # its embedding is cached now
    chat = [ChatMessage("user", "Some context first. " + question)]  # another text: two new views
    assert router.needs_encoder("", chat, True, both)
    assert not router.needs_encoder("A new question?", [], True, ("hook",))
    assert not router.needs_encoder("A new question?", [], False, both)
    assert not Router(tokenizer, None, LIMITS).needs_encoder("A new question?", [], True, both)
    empty = ScopeDetector(RetrievalStore(store.encoder))
    assert not Router(tokenizer, empty, LIMITS).needs_encoder("A new question?", [], True, both)
