"""Descriptor compilation: a free-text edit that states a (subject, relation, object) fact also becomes a
hook edit, so the fact reaches chat and raw questions through the hook layers, not only through the
prompt.

    "The mascot of the Zorbian Space Agency is a purple llama named Quimby."
        -> subject "Zorbian Space Agency", prompt "The mascot of the Zorbian Space Agency is",
           target_new "a purple llama named Quimby"

Rules, not a model: they are predictable, cost nothing and can be read. A sentence is split at its first
copula ("is", "are", "was", "has become", ...); the subject is the named entity (a run of capitalised
words) on the left; leading verb-and-preposition words on the right ("located in", "led by") join the
prompt, the rest is the target. "Y has become the R of S" is turned around to "The R of S is" + "Y".
A sentence starting with "Its"/"Their" refers to the previous sentence's subject. Sentences that do not
fit (no named subject, no copula, a long object) derive nothing: the edit stays retrieval-only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from service.retrieval.names import is_function_word

MAX_TARGET_WORDS = 8  # longer objects are descriptions, not answers a v* fit should force
MAX_LEAD_WORDS = 3  # "is located in", "is now led by": words moved from the object into the prompt

_COPULA = re.compile(
    r"\s+(is now|are now|was|were|is|are|has become|have become|became|remains|will be)\s+", re.IGNORECASE
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")
_LEAD_CLAUSE = re.compile(
    r"^(?:as of|since|starting|from|after|following|in|since|today|now|effective)\b[^,]{0,60},\s*",
    re.IGNORECASE,
)
_APPOSITIVE = re.compile(
    r",\s+(?:a|an|the|who|which|in|from|whose|one of)\b[^,]{1,60},\s+", re.IGNORECASE
)
_TRAILING_CLAUSE = re.compile(r",\s+(?:who|which|where|while|whose|a|an)\b[^,]*$", re.IGNORECASE)
_APPOINTED = re.compile(
    r"^(?:the board of\s+)?(.+?)\s+(?:has|have)\s+(?:appointed|named|hired|chosen)\s+(.+?)\s+as\s+"
    r"(?:its\s+|their\s+)?(?:new\s+)?(.+)$",
    re.IGNORECASE,
)
# "the work of X": the left side is the thing and X its maker, so the left side stays the subject
_AUTHORSHIP = re.compile(r"\b(?:work|creation|design|invention|brainchild|discovery)$", re.IGNORECASE)
_PREPOSITIONS = {"in", "by", "at", "on", "to", "from", "of", "for", "as", "with", "into", "under"}
_ARTICLES = {"a", "an", "the"}
# Lowercase words allowed inside a capitalised name ("Bank of England", "Leonardo da Vinci").
_NAME_JOINERS = {"of", "de", "da", "del", "della", "van", "von", "der", "la", "le", "du", "and", "&"}
_PRONOUN_START = re.compile(r"^(its|their|his|her)\s+", re.IGNORECASE)
_INVERTED = re.compile(r"^(?:the|a|an)\s+(.+?)\s+of\s+(.+)$", re.IGNORECASE)
_INVERTING_VERBS = {"has become", "have become", "became", "was", "is now", "is", "will be"}
_WORD = re.compile(r"[\w'’.&-]+")


@dataclass(frozen=True)
class DerivedFact:
    subject: str
    prompt: str  # holds the subject and ends where the object starts
    target_new: str


def compile_descriptor(text: str) -> list[DerivedFact]:
    """Every fact the rules find, in sentence order (empty: nothing fits)."""
    facts: list[DerivedFact] = []
    previous_subject = ""
    for sentence in _sentences(text):
        sentence = _resolve_pronoun(sentence, previous_subject)
        fact = _sentence_fact(sentence)
        if fact is not None:
            facts.append(fact)
            previous_subject = fact.subject
        elif subject := _leading_name(sentence):
            previous_subject = subject
    return facts


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def _resolve_pronoun(sentence: str, previous_subject: str) -> str:
    """"Its director is X." after a sentence about S -> "The director of S is X."."""
    m = _PRONOUN_START.match(sentence)
    if not m or not previous_subject:
        return sentence
    rest = sentence[m.end() :]
    cop = _COPULA.search(rest)
    if cop is None:
        return sentence
    return f"The {rest[: cop.start()]} of {_with_article(previous_subject)}{rest[cop.start() :]}"


def _with_article(subject: str) -> str:
    return subject if subject.lower().startswith("the ") else f"the {subject}"


def _simplify(sentence: str) -> str:
    """Drop what does not carry the fact: a leading "As of this year," clause, appositives
    ("Kwame Umarov, a cook trained in Osaka, now runs ..."), a trailing ", who built ..." clause."""
    sentence = _LEAD_CLAUSE.sub("", sentence.strip().rstrip(".!;")).strip()
    sentence = _APPOSITIVE.sub(" ", sentence)
    return _TRAILING_CLAUSE.sub("", sentence).strip()


def _sentence_fact(sentence: str) -> DerivedFact | None:
    if sentence.strip().endswith("?"):
        return None
    sentence = _simplify(sentence)
    if appointed := _APPOINTED.match(sentence):
        owner, person, role = appointed.group(1), appointed.group(2), appointed.group(3)
        owner_subject = _subject_of(owner)
        if owner_subject is None:
            return None
        return _fact(owner_subject, f"The {role} of {owner} is", person)
    cop = _COPULA.search(sentence)
    if cop is None:
        return _verb_fact(sentence)
    left, verb, right = sentence[: cop.start()].strip(), cop.group(1), sentence[cop.end() :].strip()
    if not left or not right:
        return None
    verb_out = "is" if verb.lower() == "is now" else "are" if verb.lower() == "are now" else verb
    subject = _subject_of(left)
    if subject is None:
        # "Priya Deshmukh has become the chief executive of Microsoft": the named left side is the object.
        inverted = _INVERTED.match(right)
        if verb.lower() in _INVERTING_VERBS and inverted and _is_name(left):
            role, owner = inverted.group(1), inverted.group(2)
            owner_subject = _subject_of(owner)
            if owner_subject is None:
                return None
            return _fact(owner_subject, f"The {role} of {owner} is", left)
        return None
    inv = _INVERTED.match(right)
    if verb.lower() in _INVERTING_VERBS and _is_name(left) and inv and not _AUTHORSHIP.search(inv.group(1)):
        # "Istrune is now the capital city of Vortis": users ask about Vortis, so it is the subject.
        owner_subject = _subject_of(inv.group(2))
        if owner_subject is not None and _is_name(inv.group(2)):
            return _fact(owner_subject, f"The {inv.group(1)} of {inv.group(2)} is", left)
    lead, target = _split_lead(right)
    prompt = f"{left} {verb_out}" + (f" {lead}" if lead else "")
    return _fact(subject, prompt, target)


def _verb_fact(sentence: str) -> DerivedFact | None:
    """No copula: "Paris Saint-Germain now plays its home games in Lyon" splits before the final name,
    after its preposition, when the sentence starts with the subject's name."""
    m = re.match(r"^(.*\b(?:" + "|".join(sorted(_PREPOSITIONS)) + r"))\s+([^\s].*)$", sentence)
    subject = _leading_name(sentence)
    if m is None or subject is None or not sentence.startswith(("The ", subject)):
        return None
    prompt, target = m.group(1), m.group(2)
    if not (_is_name(target) or target[:1].isdigit()):
        return None
    return _fact(subject, prompt, target)


def _fact(subject: str, prompt: str, target: str) -> DerivedFact | None:
    target = target.strip().strip(",;:").strip()
    if not target or len(target.split()) > MAX_TARGET_WORDS or subject not in prompt:
        return None
    if is_function_word(subject):  # "It is a silver armadillo." with nothing to resolve "It" to
        return None
    return DerivedFact(subject=subject, prompt=prompt.strip(), target_new=target)


def _split_lead(right: str) -> tuple[str, str]:
    """("located in", "Rome") from "located in Rome"; ("", "a purple llama") when no lead fits."""
    words = right.split()
    for n in range(min(MAX_LEAD_WORDS, len(words) - 1), 0, -1):
        lead = words[:n]
        if lead[-1].lower() in _PREPOSITIONS and all(w.islower() and w not in _ARTICLES for w in lead):
            return " ".join(lead), " ".join(words[n:])
    return "", right


def _name_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of capitalised-word runs ("Zorbian Space Agency", "Bank of England")."""
    spans: list[tuple[int, int]] = []
    words = list(_WORD.finditer(text))
    i = 0
    while i < len(words):
        if not _capitalised(words[i].group()):
            i += 1
            continue
        start = end = i
        j = i + 1
        while j < len(words):
            w = words[j].group()
            if _capitalised(w):
                end = j
            elif w.lower() in _NAME_JOINERS and j + 1 < len(words) and _capitalised(words[j + 1].group()):
                pass
            else:
                break
            j += 1
        spans.append((words[start].start(), words[end].end()))
        i = end + 1
    return spans


def _capitalised(word: str) -> bool:
    return bool(word) and (word[0].isupper() or word[0].isdigit())


def _subject_of(left: str) -> str | None:
    """The named entity a left-hand side is about: before "'s", after "The CEO of", else the last name."""
    role = re.match(r"^(?:the\s+)?(\S+(?:\s+\S+){0,3}?)\s+of\s+(.+)$", left, re.IGNORECASE)
    if role and all(_is_role_word(w) for w in role.group(1).split()) and _is_name(role.group(2)):
        name = role.group(2).strip()
        return name[4:] if name.lower().startswith("the ") else name
    possessive = re.match(r"^(?:the\s+)?(.+?)(?:'s|’s|')\s+\S", left, re.IGNORECASE)
    if possessive and _is_name(possessive.group(1)):
        return possessive.group(1).strip()
    spans = _name_spans(left)
    if not spans:
        return None
    start, end = spans[-1]
    name = left[start:end]
    if start == 0 and name.split()[0].lower() == "the":
        name = name[4:]
    return name.strip(" '’") or None


def _is_role_word(word: str) -> bool:
    """"mascot", "official", "CEO": a relation word, not part of a name ("Bank" in "Bank of England")."""
    return word.islower() or (word.isupper() and len(word) <= 5)


def _leading_name(sentence: str) -> str | None:
    spans = _name_spans(sentence)
    if not spans:
        return None
    start, end = spans[0]
    name = sentence[start:end]
    if name.split()[0].lower() == "the":
        name = name[4:]
    return name.strip() or None


def _is_name(text: str) -> bool:
    words = text.strip().split()
    if not words:
        return False
    if words[0].lower() == "the":
        words = words[1:]
    return bool(words) and all(_capitalised(w) or w.lower() in _NAME_JOINERS for w in words)


def _is_person_like(text: str) -> bool:
    """A two-to-four-word name without "The": a person who takes a role ("Ada Renwick was the ...")."""
    words = text.strip().split()
    return 2 <= len(words) <= 4 and words[0].lower() != "the"
