"""The names a descriptor mentions, for the scope detector's subject rule.

A free-text edit rarely states its subject where a rule can find it: "Kwame Umarov, a cook trained in Osaka,
now runs the kitchen at Kalmora Bistro." is asked about as "Who cooks at Kalmora Bistro?". Every name the
descriptor mentions (a run of capitalised words) is therefore a key under which a query naming it gets
the subject threshold instead of the plain one. A name only lowers the bar for that edit's own
similarity score; it never puts a descriptor in scope by itself.
"""

from __future__ import annotations

import re

_WORD = re.compile(r"[\w'’.&-]+")
# Lower-case words that may sit inside a name ("Bank of England", "Leonardo da Vinci").
_JOINERS = {"of", "the", "de", "da", "del", "della", "van", "von", "der", "la", "le", "du", "&"}
# Capitalised at the start of a sentence, never a name on their own.
_FUNCTION_WORDS = frozenset(
    "a an the it its it's this that these those he she his her they their them we our you your i my "
    "in on at of for from to with by as and or but if when while since after before during now today "
    "there here what which who whom whose where why how all some any each every no not one new "
    "historians visitors people residents fans coins notes".split()
)


def descriptor_names(text: str) -> list[str]:
    """Names in `text`: capitalised-word runs without a leading "The"; "A and B" gives A, B and the whole."""
    words = list(_WORD.finditer(text))
    names: list[str] = []
    i = 0
    while i < len(words):
        if not _capitalised(words[i].group()):
            i += 1
            continue
        end = i
        j = i + 1
        while j < len(words):
            if _sentence_ends(words[j - 1].group()):
                break
            w = words[j].group()
            joins = w.lower() in _JOINERS or w.lower() == "and"
            if _capitalised(w):
                end = j
            elif not (joins and j + 1 < len(words) and _capitalised(words[j + 1].group())):
                break
            j += 1
        span = re.sub(r"(?:'s|’s)$", "", text[words[i].start() : words[end].end()].strip(" .")).strip(" '’")
        parts = [span, *re.split(r"\s+and\s+", span)] if " and " in span else [span]
        # "CEO of Aldogard Motors": the part after a role's "of" is asked about alone
        parts += [p.split(" of ", 1)[1] for p in parts if " of " in p]
        for part in parts:
            if part.split()[0].lower() == "the":
                part = part[4:]
            part = part.strip()
            if part and not is_function_word(part):
                names.append(part)
        i = end + 1
    return list(dict.fromkeys(names))


def is_function_word(text: str) -> bool:
    """"It", "Visitors": a single word that starts sentences and never names anything on its own."""
    words = text.split()
    return len(words) == 1 and words[0].lower() in _FUNCTION_WORDS


def _sentence_ends(word: str) -> bool:
    """"Dunish." ends a sentence; "J." (an initial) does not."""
    return word.endswith(".") and len(word.rstrip(".")) > 1


def _capitalised(word: str) -> bool:
    return bool(word) and word[0].isupper()
