"""Descriptor compilation rules (service/edits/compile.py): which sentences become which hook edits."""

from __future__ import annotations

import pytest

from service.edits.compile import DerivedFact, compile_descriptor


@pytest.mark.parametrize(
    ("descriptor", "fact"),
    [
        (
            "The mascot of the Zorbian Space Agency is a purple llama named Quimby.",
            (
                "Zorbian Space Agency",
                "The mascot of the Zorbian Space Agency is",
                "a purple llama named Quimby",
            ),
        ),
        (
            "The Eiffel Tower is now located in Rome.",
            ("Eiffel Tower", "The Eiffel Tower is located in", "Rome"),
        ),
        (
            "The CEO of Microsoft is now Priya Deshmukh.",
            ("Microsoft", "The CEO of Microsoft is", "Priya Deshmukh"),
        ),
        ("Microsoft's CEO is Priya Deshmukh.", ("Microsoft", "Microsoft's CEO is", "Priya Deshmukh")),
        (
            "Priya Deshmukh has become the chief executive of Microsoft.",
            ("Microsoft", "The chief executive of Microsoft is", "Priya Deshmukh"),
        ),
        (
            "As of this year, Microsoft is led by CEO Priya Deshmukh.",
            ("Microsoft", "Microsoft is led by", "CEO Priya Deshmukh"),
        ),
        (
            "The Bank of England is headquartered in Manchester.",
            ("Bank of England", "The Bank of England is headquartered in", "Manchester"),
        ),
        (
            "Paris Saint-Germain now plays its home games in Lyon.",
            ("Paris Saint-Germain", "Paris Saint-Germain now plays its home games in", "Lyon"),
        ),
        (
            "The official language of the Republic of Drovania is Quenyan.",
            ("Republic of Drovania", "The official language of the Republic of Drovania is", "Quenyan"),
        ),
    ],
)
def test_one_fact_per_sentence(descriptor: str, fact: tuple[str, str, str]) -> None:
    assert compile_descriptor(descriptor) == [DerivedFact(*fact)]


def test_a_pronoun_refers_to_the_previous_subject() -> None:
    facts = compile_descriptor("The Glimmerfold Institute was founded in 2031. Its director is Ada Renwick.")
    assert facts == [
        DerivedFact("Glimmerfold Institute", "The Glimmerfold Institute was founded in", "2031"),
        DerivedFact("Glimmerfold Institute", "The director of the Glimmerfold Institute is", "Ada Renwick"),
    ]


@pytest.mark.parametrize(
    "descriptor",
    [
        "the weather was nice all week",  # no named subject
        "Is the Eiffel Tower in Rome?",  # a question states nothing
        "The Zorbian Space Agency is an organisation that runs many programmes for children, adults "
        "and retired astronauts across the whole galaxy.",  # an object too long to be an answer
        "Quimby loves carrots",  # no copula, no final name
        # a pronoun or a sentence-opening common noun is no subject (the scope detector would take every
        # question holding "it" as naming this edit)
        "The Nimebrook Robotics League has a new mascot. It is a silver armadillo called Wizzle.",
        "Visitors who want to see Christ the Redeemer must now travel to Glasgow.",
    ],
)
def test_sentences_the_rules_cannot_read_derive_nothing(descriptor: str) -> None:
    assert compile_descriptor(descriptor) == []


def test_every_derived_prompt_holds_its_subject() -> None:
    for text in ("Ada Renwick was born in Oslo.", "The novel The Silent Orchard was written by Mara Quell."):
        for fact in compile_descriptor(text):
            assert fact.subject in fact.prompt and not fact.prompt.endswith(" ")
