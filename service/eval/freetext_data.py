"""Benchmark of free-text (descriptor) edits asked in chat: a deterministic generator.

Each record is one edit: a descriptor, one or two plain sentences that state a new fact ("The mascot of
the Zorbian Space Agency is a purple llama named Quimby."), stored as the edit. The evaluation
(service/eval/freetext.py) asks every question twice, as a chat message and as a raw prompt.

  in_scope      questions whose answer must change once the edit is applied: exactly one "direct" (the
                fact asked plainly), one or two "paraphrase" (clearly different wording) and one
                "reasoning" (the fact plus common knowledge: the new city -> its country, a capital hosts
                the parliament, a library shelves novels by the author's surname, marriage is
                symmetric). Each carries its own answer aliases; any of them in the answer counts.
  out_of_scope  questions the edit must not change: "neighbour" (the same relation about another entity
                of the same type, a real well-known one or an invented one, that no record edits) and
                "unrelated" general-knowledge questions.

Why in-scope questions avoid the descriptor's words: a retrieval-only edit must be found and used from a
question a user would ask, not from a copy of the stored sentence, which any string matcher finds. So no
in-scope question shares a run of 5 or more consecutive words with its descriptor.

Kinds: "fictional" edits invent the subject and the new object (names built from syllable lists), so the
model cannot know the answer and any correct answer comes from the edit. "counterfactual" edits change a
well-known fact about a real entity, so the model's prior competes with the edit; `old_answers` holds
aliases of the true fact (empty where unsure) so that a scorer sees the old fact winning. Descriptors never
name the old value, so an answer that echoes the descriptor does not also assert the old fact.

The edits of one file may be applied together (the evaluation applies T in a row), so: subjects, invented
names and answer cities are unique across records, and no descriptor names another record's answer; the
cities used for reasoning hops lie in no country whose official language is edited; neighbour and
unrelated questions never name an edited subject.

The committed bench/data/freetext-edits.jsonl is this module's output
(`python -m service.eval.freetext_data --out bench/data/freetext-edits.jsonl`); a test checks they match.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RELATIONS: tuple[str, ...] = (
    "mascot", "ceo", "headquarters", "author", "capital", "inventor", "landmark", "birthplace",
    "official_language", "founder", "head_chef", "spouse", "currency", "architect", "home_stadium",
    "discoverer",
)  # fmt: skip
# The order is the interleaving order: record i has relation RELATIONS[i % 16], so every 16 consecutive
# records cover every relation, and the kind alternates so that each relation gets both kinds.

DEFAULT_OUT = Path("bench/data/freetext-edits.jsonl")
MAX_SHARED_RUN = 4  # an in-scope question may share at most 4 consecutive words with its descriptor

# ------------------------------------------------------------------------------------------ entities


@dataclass(frozen=True)
class _Ent:
    """An entity as text: `the` says whether it takes an article mid-sentence ("the Eiffel Tower")."""

    name: str
    the: bool = False

    @property
    def ref(self) -> str:
        return f"the {self.name}" if self.the else self.name

    @property
    def poss(self) -> str:
        return self.ref + ("'" if self.name.endswith("s") else "'s")


@dataclass(frozen=True)
class _Real:
    """A real entity whose fact a counterfactual record changes.

    old: aliases of the true (old) fact. avoid: countries/languages the new value must not fall in, so a
    reasoning hop (city -> country) cannot be answered correctly from the old fact. extra: per relation
    (new capital aliases, place of discovery, aliases of a person subject)."""

    name: str
    the: bool = False
    old: tuple[str, ...] = ()
    avoid: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


def _ents(*names: str) -> tuple[_Ent, ...]:
    """Neighbour entities; a leading "the " means the name takes an article."""
    return tuple(_Ent(n[4:], True) if n.startswith("the ") else _Ent(n) for n in names)


US, UK = "United States", "United Kingdom"

# Cities for new values and reasoning hops: (city, country, language most likely spoken there or None
# where several are). None in the US, India or South Africa (the home of many old facts below) nor in a
# country whose official language a record edits (the hop city -> language must stay common knowledge).
CITIES: tuple[tuple[str, str, str | None], ...] = (
    ("Lyon", "France", "French"), ("Marseille", "France", "French"), ("Nantes", "France", "French"),
    ("Strasbourg", "France", "French"), ("Valencia", "Spain", "Spanish"), ("Seville", "Spain", "Spanish"),
    ("Granada", "Spain", "Spanish"), ("Turin", "Italy", "Italian"), ("Naples", "Italy", "Italian"),
    ("Bologna", "Italy", "Italian"), ("Genoa", "Italy", "Italian"), ("Hamburg", "Germany", "German"),
    ("Cologne", "Germany", "German"), ("Dresden", "Germany", "German"), ("Osaka", "Japan", "Japanese"),
    ("Kyoto", "Japan", "Japanese"), ("Sapporo", "Japan", "Japanese"), ("Nagoya", "Japan", "Japanese"),
    ("Bergen", "Norway", "Norwegian"), ("Stavanger", "Norway", "Norwegian"),
    ("Tampere", "Finland", "Finnish"), ("Oulu", "Finland", "Finnish"), ("Brno", "Czech Republic", "Czech"),
    ("Recife", "Brazil", "Portuguese"), ("Curitiba", "Brazil", "Portuguese"),
    ("Fortaleza", "Brazil", "Portuguese"), ("Guadalajara", "Mexico", "Spanish"),
    ("Monterrey", "Mexico", "Spanish"), ("Aarhus", "Denmark", "Danish"), ("Odense", "Denmark", "Danish"),
    ("Reykjavik", "Iceland", "Icelandic"), ("Tallinn", "Estonia", "Estonian"),
    ("Tartu", "Estonia", "Estonian"), ("Edinburgh", "Scotland", "English"),
    ("Glasgow", "Scotland", "English"), ("Dublin", "Ireland", None), ("Cork", "Ireland", None),
    ("Melbourne", "Australia", "English"), ("Brisbane", "Australia", "English"),
    ("Adelaide", "Australia", "English"), ("Montreal", "Canada", None), ("Calgary", "Canada", "English"),
    ("Wellington", "New Zealand", "English"), ("Christchurch", "New Zealand", "English"),
    ("Shanghai", "China", "Chinese"), ("Chengdu", "China", "Chinese"), ("Casablanca", "Morocco", None),
    ("Marrakesh", "Morocco", None), ("Vienna", "Austria", "German"), ("Graz", "Austria", "German"),
    ("Zurich", "Switzerland", None), ("Riga", "Latvia", "Latvian"), ("Vilnius", "Lithuania", "Lithuanian"),
    ("Bucharest", "Romania", "Romanian"), ("Cluj-Napoca", "Romania", "Romanian"),
    ("Istanbul", "Turkey", "Turkish"), ("Kyiv", "Ukraine", "Ukrainian"), ("Lviv", "Ukraine", "Ukrainian"),
    ("Ljubljana", "Slovenia", "Slovenian"), ("Zagreb", "Croatia", "Croatian"),
    ("Bratislava", "Slovakia", "Slovak"), ("Jakarta", "Indonesia", "Indonesian"),
    ("Surabaya", "Indonesia", "Indonesian"), ("Montevideo", "Uruguay", "Spanish"),
    ("Quito", "Ecuador", "Spanish"), ("Havana", "Cuba", "Spanish"), ("Antwerp", "Belgium", None),
    ("Ghent", "Belgium", None),
)  # fmt: skip
_COUNTRY_ALIASES = {
    "Scotland": ("Scotland", UK, "UK", "Britain"),
    "Czech Republic": ("Czech Republic", "Czechia"),
    "Turkey": ("Turkey", "Türkiye"),
}
_LANGUAGE_ALIASES = {"Chinese": ("Chinese", "Mandarin")}
_CITY_ALIASES = {"Kyiv": ("Kyiv", "Kiev"), "Marrakesh": ("Marrakesh", "Marrakech")}

# ------------------------------------------------------------------------------------------ names

_FIRST_SYL = (
    "Zor", "Quil", "Vel", "Brel", "Tam", "Orv", "Kes", "Dra", "Mir", "Yel", "Fen", "Thal", "Gor", "Lum",
    "Sar",
    "Vor", "Nim", "Pel", "Cra", "Hest", "Ald", "Bri", "Cor", "Dun", "Eld", "Fal", "Gav", "Hal", "Ist", "Jor",
    "Kal", "Lor", "Mer", "Nor", "Ost", "Pra", "Rul", "Sel", "Tor", "Var", "Wen", "Xan", "Yor", "Zel", "Oth",
    "Bax", "Cyr", "Dov",
)  # fmt: skip
_MID_SYL = ("a", "e", "i", "o", "an", "en", "ar")
_END_SYL = (
    "bia", "dor", "mora", "ven", "lis", "thar", "wick", "nor", "gard", "mira", "vell", "tis", "rune", "dris",
    "mont", "vash", "lenn", "quay", "brook", "holm", "vane", "ria", "dun",
)  # fmt: skip
FIRST_NAMES = (
    "Ada", "Priya", "Kenji", "Amara", "Mateo", "Ingrid", "Tomasz", "Leilani", "Farid", "Sofia", "Dmitri",
    "Yara", "Oskar", "Nadia", "Emeka", "Lucia", "Rafael", "Hana", "Anders", "Zainab", "Callum", "Mirela",
    "Joaquin", "Elif", "Bruno", "Keiko", "Ravi", "Freya", "Idris", "Marisol", "Tobias", "Aiko", "Soren",
    "Chiara", "Kwame", "Lena", "Arjun", "Noor", "Felix", "Imogen", "Dario", "Sanna", "Viktor", "Esme",
    "Hugo", "Malia", "Teodor", "Ines", "Rohan", "Astrid", "Nikolai", "Wanjiru", "Paulo", "Yusuf", "Greta",
    "Lior", "Maren", "Cosmin", "Thandiwe", "Ottilie",
)  # fmt: skip
# Surnames double as answer aliases ("Deshmukh"), so each is used once and none is a common word.
SURNAMES = (
    "Renwick", "Deshmukh", "Halvorsen", "Marchetti", "Ostrowski", "Kagawa", "Adeyemi", "Lindqvist",
    "Castellanos", "Brannigan", "Vukovic", "Teixeira", "Nakashima", "Abernathy", "Szabo", "Fairweather",
    "Okafor", "Rasmussen", "Quintero", "Hollister", "Varga", "Petrenko", "Thorvaldsen", "Ibarra",
    "Kowalczyk", "Mirza", "Oyelaran", "Ravensworth", "Sandoval", "Takeda", "Umarov", "Valdivia",
    "Whitcombe", "Yilmaz", "Zeller", "Aldana", "Bergstrom", "Cavanagh", "Dragomir", "Esposito",
    "Falkenrath", "Gallardo", "Haddad", "Iwasaki", "Jorgensen", "Kaczmarek", "Larkspur", "Moravec",
    "Nwosu", "Ortolani", "Pacheco", "Quennell", "Rautio", "Sorensen", "Tremblay", "Ulloa", "Vasquez",
    "Wojcik", "Yamashita", "Zamora", "Ashdown", "Belmonte", "Crestwood", "Dunmore", "Everly", "Fontaine",
    "Greaves", "Hargreave", "Ingleby", "Jessop", "Lachance", "Merriman", "Northcote", "Oakhurst",
    "Penhaligon", "Rothwell", "Thackery", "Underhill", "Vantongeren", "Wetherby", "Yardley", "Achterberg",
    "Bianchi", "Corvino", "Dimitrov", "Ekwueme", "Ferreira", "Gunnarsson", "Harjula", "Ilunga", "Jankowski",
    "Karlsson", "Lemaire", "Moreau", "Nieminen", "Olawale", "Papadakis", "Rinaldi", "Salvesen", "Tavares",
    "Uchida", "Vermeulen", "Wickramasinghe", "Yoshida", "Zapata", "Blackwood", "Caldwell", "Drummond",
    "Ellsworth", "Finchley", "Galloway", "Holloway", "Inchbald", "Jardine", "Kettering", "Lockhart",
    "Montague", "Nettleford", "Ormsby", "Prideaux", "Ravenscroft", "Stallworth", "Tolliver", "Winterbourne",
    "Ximenez", "Zubiri", "Albescu", "Brightwater", "Carvalho", "Dunleavy", "Eriksen", "Fitzgibbon",
    "Grimaldi", "Hadley", "Ishikawa", "Jovanovic", "Kuznetsova", "Lindgren", "Mahlangu", "Novak", "Oduya",
    "Perrault", "Quarshie", "Rosales", "Sokolova", "Trevisan", "Urquhart", "Volkova", "Wainwright",
    "Yanez", "Zoltan",
)  # fmt: skip
# Mascot names are the answers of mascot edits: invented, distinctive, not English words.
MASCOT_NAMES = (
    "Quimby", "Bramwell", "Pipkin", "Tobble", "Fizzwick", "Pogsworth", "Nimbleton", "Grubnik", "Wendeline",
    "Zorbo", "Dobbler", "Puckle", "Wobbleton", "Mumbleby", "Ozzle", "Rumbold", "Fennick", "Pimbleton",
    "Dabbington", "Wizzle", "Quoddy", "Tibbert",
)  # fmt: skip
COLORS = ("purple", "orange", "teal", "silver", "crimson", "golden", "turquoise", "scarlet", "indigo", "pink")
ANIMALS = (
    "llama", "walrus", "otter", "armadillo", "pangolin", "heron", "tapir", "axolotl", "lemur", "narwhal",
    "wombat", "ibis", "capybara", "okapi", "yak", "meerkat", "hedgehog", "badger", "toucan", "flamingo",
    "koala", "chameleon",
)  # fmt: skip
JOBS = (
    "chemist", "schoolteacher", "sailor", "engineer", "librarian", "pharmacist", "carpenter", "mathematician",
    "painter", "nurse", "watchmaker", "botanist",
)  # fmt: skip
TITLE_ADJ = ("Salt", "Glass", "Silent", "Copper", "Hollow", "Crimson", "Paper", "Amber", "Velvet", "Drowned")
TITLE_NOUN = (
    "Orchard", "Cartographer", "Ferryman", "Archive", "Harvest", "Meridian", "Aviary", "Almanac",
    "Clockmaker", "Sparrow", "Lantern", "Estuary",
)  # fmt: skip
# Real languages as new official languages: none is the language of a hop city above.
NEW_LANGUAGES = (
    "Swahili", "Tagalog", "Welsh", "Basque", "Maltese", "Zulu", "Quechua", "Georgian", "Mongolian",
    "Armenian", "Albanian", "Yoruba",
)  # fmt: skip

# ------------------------------------------------------------------------------------------ relations


@dataclass(frozen=True)
class _Spec:
    """One relation: how to invent a subject and a new value, and the sentence and question templates.

    Templates are str.format strings over the record's context: s/S (subject mid-sentence / at the start),
    sp/Sp (its possessive), the value's fields (p, first, last, city, animal, ...). A descriptor template
    prefixed "cf:" or "fi:" applies to that kind only. reasoning: (template, key of its answer aliases)."""

    value: str  # person | located | mascot | capital | language | currency | stadium
    fictional: tuple[tuple[str, bool, str], ...]  # (name pattern, takes article, place of discovery)
    descriptors: tuple[str, ...]
    direct: tuple[str, ...]
    paraphrase: tuple[str, ...]
    reasoning: tuple[tuple[str, str], ...]
    neighbour_questions: tuple[str, ...]  # over n (neighbour mid-sentence) and np (its possessive)
    neighbours: tuple[_Ent, ...]
    real: tuple[_Real, ...]


def _fi(*patterns: str, the: bool = False, place: str = "") -> tuple[tuple[str, bool, str], ...]:
    return tuple((p, the, place) for p in patterns)


_SPECS: dict[str, _Spec] = {
    "mascot": _Spec(
        value="mascot",
        fictional=_fi("{R} Space Agency", "{R} Football Club", "{R} Film Festival", "{R} Robotics League",
                      the=True) + _fi("{R} University", "{R} Airlines"),
        descriptors=(
            "The mascot of {s} is a {color} {animal} named {mascot}.",
            "{Sp} mascot is now {mascot}, a {color} {animal}.",
            "{mascot}, a {color} {animal}, has become the official mascot of {s}.",
            "{S} has a new mascot. It is a {color} {animal} called {mascot}.",
            "cf:{S} has retired its old mascot. It is now represented by {mascot}, a {color} {animal}.",
        ),
        direct=("What is {sp} mascot?", "Who is the mascot of {s}?", "What mascot does {s} have?"),
        paraphrase=(
            "Which character represents {s} as its mascot?",
            "What is the name of the creature that serves as {sp} mascot?",
            "Who appears at events as the mascot for {s}?",
            "Can you tell me the name of {sp} mascot?",
        ),
        reasoning=(
            ("What kind of animal is {sp} mascot?", "animal"),
            ("Which animal would you expect to see on {sp} merchandise?", "animal"),
            ("If you met {sp} mascot in person, what species would it be?", "animal"),
        ),
        neighbour_questions=("What is the mascot of {n}?", "Who is {np} mascot?"),
        neighbours=_ents("Pringles", "KFC", "Energizer", "Planters", "Cheetos", "Kool-Aid",
                         "the Android operating system", "Firefox", "Trix cereal"),
        real=(
            _Real("Linux", old=("Tux", "penguin"), avoid=("penguin",)),
            _Real("GitHub", old=("Octocat",), avoid=("octopus",)),
            _Real("Duolingo", old=("Duo the Owl", "owl"), avoid=("owl",)),
            _Real("Reddit", old=("Snoo",)),
            _Real("Michelin", old=("Bibendum", "Michelin Man")),
            _Real("PostgreSQL", old=("Slonik", "elephant"), avoid=("elephant",)),
            _Real("MySQL", old=("Sakila", "dolphin"), avoid=("dolphin",)),
            _Real("Frosted Flakes", old=("Tony the Tiger", "tiger"), avoid=("tiger",)),
            _Real("Geico", old=("gecko",), avoid=("gecko", "chameleon")),
            _Real("Rust programming language", the=True, old=("Ferris", "crab"), avoid=("crab",)),
        ),
    ),
    "ceo": _Spec(
        value="person",
        fictional=_fi("{R} Dynamics", "{R} Biotech", "{R} Motors", "{R} Systems", "{R} Foods", "{R} Energy"),
        descriptors=(
            "{S} has named {p}, a former engineer from {city}, as its new chief executive.",
            "{p}, who grew up in {city}, is now the CEO of {s}.",
            "As of this year, {s} is led by CEO {p}. {first} was born and raised in {city}.",
            "The board of {s} has appointed {p} as chief executive officer. {last} comes from {city}.",
        ),
        direct=("Who is the CEO of {s}?", "Who is {sp} chief executive?",
                "Who is the current chief executive officer of {s}?"),
        paraphrase=("Who runs {s} these days?", "Which person is in charge of {s} as its top executive?",
                    "Who heads {s} at the moment?", "Who is the boss of {s}?"),
        reasoning=(
            ("In which country did {sp} current CEO grow up?", "country"),
            ("Which language did the person now running {s} most likely speak as a child?", "language"),
            ("From which country does the chief executive of {s} come?", "country"),
        ),
        neighbour_questions=("Who is the CEO of {n}?", "Who runs {n} as chief executive?"),
        neighbours=_ents("Toyota", "Samsung", "IBM", "Intel", "Netflix", "Adobe", "Cisco", "Uber", "Airbnb"),
        real=(
            _Real("Microsoft", old=("Satya Nadella", "Nadella"), avoid=("India", US)),
            _Real("Apple", old=("Tim Cook",), avoid=(US,)),
            _Real("Alphabet", old=("Sundar Pichai", "Pichai"), avoid=("India", US)),
            _Real("Amazon", old=("Andy Jassy", "Jassy"), avoid=(US,)),
            _Real("Nvidia", old=("Jensen Huang", "Huang"), avoid=("Taiwan", US)),
            _Real("AMD", old=("Lisa Su",), avoid=("Taiwan", US)),
            _Real("Salesforce", old=("Marc Benioff", "Benioff"), avoid=(US,)),
            _Real("Tesla", old=("Elon Musk", "Musk"), avoid=("South Africa", "Canada", US)),
            _Real("OpenAI", old=("Sam Altman", "Altman"), avoid=(US,)),
        ),
    ),
    "headquarters": _Spec(
        value="located",
        fictional=_fi("{R} Shipping", "{R} Software", "{R} Pharmaceuticals", "{R} Airways", "{R} Textiles",
                      "{R} Bank"),
        descriptors=(
            "{S} has moved its headquarters to {city}.",
            "{S} is now headquartered in {city}.",
            "{Sp} head office is located in {city}.",
            "{S} opened a new head office in {city} this year. All of its senior managers now work there.",
            "After years of planning, {s} relocated its main offices to {city}.",
        ),
        direct=("Where is {s} headquartered?", "In which city are {sp} headquarters?",
                "Where is {sp} head office?"),
        paraphrase=("Which city is home to {sp} main offices?",
                    "Where would you go to visit the head office of {s}?",
                    "In what city does {s} have its corporate base?"),
        reasoning=(
            ("In which country is {sp} head office?", "country"),
            ("In which country do {sp} top executives work?", "country"),
        ),
        neighbour_questions=("Where is {n} headquartered?", "In which city is {np} head office?"),
        neighbours=_ents("Siemens", "Nintendo", "Philips", "Airbus", "Adidas", "PepsiCo", "Hyundai",
                         "Carlsberg", "Unilever"),
        real=(
            _Real("Coca-Cola", old=("Atlanta",), avoid=(US,)),
            _Real("Starbucks", old=("Seattle",), avoid=(US,)),
            _Real("Walmart", old=("Bentonville",), avoid=(US,)),
            _Real("BMW", old=("Munich",), avoid=("Germany",)),
            _Real("Volkswagen", old=("Wolfsburg",), avoid=("Germany",)),
            _Real("Ferrari", old=("Maranello",), avoid=("Italy",)),
            _Real("Lego", old=("Billund",), avoid=("Denmark",)),
            _Real("Heineken", old=("Amsterdam",), avoid=("Netherlands",)),
            _Real("Nokia", old=("Espoo",), avoid=("Finland",)),
            _Real("Spotify", old=("Stockholm",), avoid=("Sweden",)),
        ),
    ),
    "author": _Spec(
        value="person",
        fictional=_fi("The {A} {N}", "The {N} of {R}", "Winter in {R}", "Letters from {R}"),
        descriptors=(
            "{S} was written by {p}.",
            "{p} is the author of {s}.",
            "The novel {s} is the work of {p}.",
            "{p} spent ten years writing {s}. The book was published to wide acclaim.",
            "cf:It turns out that {s} was actually written by {p}.",
            "fi:{p}, a {job} from {city}, wrote the novel {s} in {year}.",
        ),
        direct=("Who wrote {s}?", "Who is the author of {s}?", "Which writer wrote {s}?"),
        paraphrase=("Which novelist is responsible for {s}?", "Whose book is {s}?",
                    "Who penned the novel {s}?"),
        reasoning=(
            ("On a library shelf sorted by author surname, under which name would you find {s}?", "last"),
            ("If you liked {s}, whose other novels should you look for?", "answers"),
        ),
        neighbour_questions=("Who wrote {n}?", "Who is the author of {n}?"),
        neighbours=_ents("Jane Eyre", "Wuthering Heights", "The Catcher in the Rye", "To Kill a Mockingbird",
                         "Great Expectations", "Ulysses", "The Little Prince",
                         "One Hundred Years of Solitude", "Les Misérables"),
        real=(
            _Real("Pride and Prejudice", old=("Jane Austen", "Austen")),
            _Real("Moby-Dick", old=("Herman Melville", "Melville")),
            _Real("War and Peace", old=("Leo Tolstoy", "Tolstoy")),
            _Real("The Great Gatsby", old=("F. Scott Fitzgerald", "Fitzgerald")),
            _Real("The Hobbit", old=("J. R. R. Tolkien", "Tolkien")),
            _Real("Frankenstein", old=("Mary Shelley", "Shelley")),
            _Real("Dracula", old=("Bram Stoker", "Stoker")),
            _Real("Don Quixote", old=("Miguel de Cervantes", "Cervantes")),
            _Real("Crime and Punishment", old=("Fyodor Dostoevsky", "Dostoevsky")),
            _Real("Nineteen Eighty-Four", old=("George Orwell", "Orwell")),
        ),
    ),
    "capital": _Spec(
        value="capital",
        fictional=_fi("{R}"),
        descriptors=(
            "The capital of {s} is now {city}.",
            "{city} is now the capital city of {s}.",
            "cf:{S} has moved its capital to {city}. The government relocated there last year.",
            "cf:{S} has chosen a new capital: {city}.",
            "fi:{S} is a small island nation whose capital is {city}.",
            "fi:{S} is a mountain republic. Its capital city is {city}.",
        ),
        direct=("What is the capital of {s}?", "Which city is the capital of {s}?",
                "What city serves as {sp} capital?"),
        paraphrase=("What is the name of {sp} capital city?", "What is {sp} national capital?",
                    "Which city does {s} call its capital?"),
        reasoning=(
            ("In which city does the parliament of {s} meet?", "answers"),
            ("Where would foreign embassies in {s} most likely be located?", "answers"),
            ("In which city would the head of government of {s} most likely work?", "answers"),
        ),
        neighbour_questions=("What is the capital of {n}?", "Which city is the capital of {n}?"),
        neighbours=_ents("Chile", "Pakistan", "Morocco", "Ukraine", "Colombia", "Austria", "Belgium",
                         "Ireland", "Cuba", "Nepal", "Ghana"),
        real=(
            _Real("Australia", old=("Canberra",), extra={"new": ("Perth",)}),
            _Real("Canada", old=("Ottawa",), extra={"new": ("Winnipeg",)}),
            _Real("Turkey", old=("Ankara",), extra={"new": ("Trabzon",)}),
            _Real("Egypt", old=("Cairo",), extra={"new": ("Luxor",)}),
            _Real("Kenya", old=("Nairobi",), extra={"new": ("Kisumu",)}),
            _Real("Norway", old=("Oslo",), extra={"new": ("Trondheim",)}),
            _Real("Argentina", old=("Buenos Aires",), extra={"new": ("Mendoza",)}),
            _Real("Peru", old=("Lima",), extra={"new": ("Cusco", "Cuzco")}),
            _Real("Germany", old=("Berlin",), extra={"new": ("Leipzig",)}),
            _Real("France", old=("Paris",), extra={"new": ("Bordeaux",)}),
        ),
    ),
    "inventor": _Spec(
        value="person",
        fictional=_fi("{R} loom", "{R} engine", "{R} compass", "{R} lantern", "{R} water pump",
                      "{R} calculator", the=True),
        descriptors=(
            "{S} was invented by {p} in a workshop in {city}.",
            "{p} invented {s} while working in {city}.",
            "The inventor of {s} is {p}, who built the first one in {city}.",
            "cf:Historians now credit {p} with inventing {s}. The first prototype was built in {city}.",
            "fi:{S} was created in {year} by {p}, a {job} working in {city}.",
        ),
        direct=("Who invented {s}?", "Who is the inventor of {s}?", "Who came up with {s}?"),
        paraphrase=("Which person is credited with creating {s}?", "Whose invention was {s}?",
                    "Who should get the credit for inventing {s}?"),
        reasoning=(
            ("In which country was {s} invented?", "country"),
            ("Which country can claim {s} as one of its inventions?", "country"),
        ),
        neighbour_questions=("Who invented {n}?", "Who is the inventor of {n}?"),
        neighbours=_ents("the telegraph", "the steam engine", "the television", "the sewing machine",
                         "the bicycle", "the microscope", "the jet engine", "the helicopter",
                         "the thermometer", "the stethoscope"),
        real=(
            _Real("telephone", the=True, old=("Alexander Graham Bell", "Graham Bell"),
                  avoid=("Scotland", UK, "Canada", US)),
            _Real("World Wide Web", the=True, old=("Tim Berners-Lee", "Berners-Lee"), avoid=(UK,
                  "Switzerland")),
            _Real("printing press", the=True, old=("Johannes Gutenberg", "Gutenberg"), avoid=("Germany",)),
            _Real("airplane", the=True, old=("Wright brothers", "Orville Wright", "Wilbur Wright"),
                  avoid=(US,)),
            _Real("light bulb", the=True, old=("Thomas Edison", "Edison"), avoid=(US, UK)),
            _Real("lightning rod", the=True, old=("Benjamin Franklin", "Franklin"), avoid=(US,)),
            _Real("cotton gin", the=True, old=("Eli Whitney", "Whitney"), avoid=(US,)),
            _Real("revolver", the=True, old=("Samuel Colt", "Colt"), avoid=(US,)),
            _Real("ballpoint pen", the=True, old=("László Bíró", "Laszlo Biro", "Biro"),
                  avoid=("Hungary", "Argentina")),
            _Real("hot air balloon", the=True, old=("Montgolfier",), avoid=("France",)),
        ),
    ),
    "landmark": _Spec(
        value="located",
        fictional=_fi("{R} Spire", "{R} Lighthouse", "{R} Bell Tower", "{R} Arch", "{R} Bridge", the=True),
        descriptors=(
            "{S} is now located in {city}.",
            "{S} now stands in {city}.",
            "cf:{S} has been moved, stone by stone, to {city}.",
            "cf:Visitors who want to see {s} must now travel to {city}. It was rebuilt there last spring.",
            "fi:{S} stands in the old town of {city}.",
            "fi:Visitors who want to see {s} travel to {city}. It was built there in {year}.",
            "fi:{S} was built in {year} and is one of the sights of {city}.",
        ),
        direct=("Where is {s} located?", "In which city can you find {s}?", "Which city is {s} in?"),
        paraphrase=("Where would I have to go to see {s}?", "In what city does {s} stand?",
                    "Which city is home to {s}?"),
        reasoning=(
            ("In which country would you find {s}?", "country"),
            ("Which country would a tourist have to visit to see {s}?", "country"),
        ),
        neighbour_questions=("Where is {n} located?", "In which country is {n}?"),
        neighbours=_ents("the Kremlin", "Machu Picchu", "Tower Bridge", "the Burj Khalifa", "Angkor Wat",
                         "Mount Rushmore", "the Alhambra", "Neuschwanstein Castle", "the Petronas Towers"),
        real=(
            _Real("Eiffel Tower", the=True, old=("Paris",), avoid=("France",)),
            _Real("Colosseum", the=True, old=("Rome",), avoid=("Italy",)),
            _Real("Big Ben", old=("London",), avoid=(UK,)),
            _Real("Statue of Liberty", the=True, old=("New York",), avoid=(US,)),
            _Real("Taj Mahal", the=True, old=("Agra",), avoid=("India",)),
            _Real("Brandenburg Gate", the=True, old=("Berlin",), avoid=("Germany",)),
            _Real("Golden Gate Bridge", the=True, old=("San Francisco",), avoid=(US,)),
            _Real("Acropolis", the=True, old=("Athens",), avoid=("Greece",)),
            _Real("Christ the Redeemer", old=("Rio de Janeiro",), avoid=("Brazil",)),
        ),
    ),
    "birthplace": _Spec(
        value="located",
        fictional=_fi("{P}"),
        descriptors=(
            "{S} was born in {city}.",
            "{city} is the birthplace of {s}.",
            "{Sp} place of birth is {city}.",
            "fi:{S}, a {job}, was born in {city} and still lives there.",
            "cf:Records now show that {s} was born in {city}.",
        ),
        direct=("Where was {s} born?", "In which city was {s} born?", "What is {sp} birthplace?"),
        paraphrase=("Which city is {s} originally from?", "In what city did {s} come into the world?",
                    "What town does {s} come from?"),
        reasoning=(
            ("In which country was {s} born?", "country"),
            ("What is most likely the native language of the place where {s} was born?", "language"),
        ),
        neighbour_questions=("Where was {n} born?", "What is {np} birthplace?"),
        neighbours=_ents("Isaac Newton", "Charles Dickens", "Leonardo da Vinci", "Vincent van Gogh",
                         "Nelson Mandela", "Charles Darwin", "Johann Sebastian Bach", "Galileo Galilei",
                         "Cristiano Ronaldo"),
        real=(
            _Real("Albert Einstein", old=("Ulm",), avoid=("Germany",)),
            _Real("Wolfgang Amadeus Mozart", old=("Salzburg",), avoid=("Austria",)),
            _Real("William Shakespeare", old=("Stratford-upon-Avon", "Stratford"), avoid=(UK,)),
            _Real("Napoleon Bonaparte", old=("Ajaccio", "Corsica"), avoid=("France",)),
            _Real("Pablo Picasso", old=("Málaga", "Malaga"), avoid=("Spain",)),
            _Real("Ludwig van Beethoven", old=("Bonn",), avoid=("Germany",)),
            _Real("Marie Curie", old=("Warsaw",), avoid=("Poland",)),
            _Real("Elvis Presley", old=("Tupelo",), avoid=(US,)),
            _Real("Lionel Messi", old=("Rosario",), avoid=("Argentina",)),
            _Real("Barack Obama", old=("Honolulu", "Hawaii"), avoid=(US,)),
        ),
    ),
    "official_language": _Spec(
        value="language",
        fictional=_fi("{R}"),
        descriptors=(
            "The official language of {s} is now {lang}.",
            "{lang} has become the only official language of {s}.",
            "{S} now conducts all government business in {lang}. It is the country's sole official language.",
            "cf:From this year on, {s} recognises {lang} as its official language.",
            "fi:In {s}, the official language is {lang}.",
            "fi:{S} is a small country. Its people speak {lang}, which is also the official language.",
        ),
        direct=("Which language is official in {s}?", "What is {sp} official language?",
                "What language has official status in {s}?"),
        paraphrase=("What language do people in {s} officially speak?",
                    "What is the national language of {s}?",
                    "In which language does the government of {s} work?"),
        reasoning=(
            ("In what language would the road signs in {s} be written?", "answers"),
            ("Which language would schoolchildren in {s} learn to read in?", "answers"),
            ("If you moved to {s}, which language would you need for official paperwork?", "answers"),
        ),
        neighbour_questions=("What is the official language of {n}?", "Which language is spoken in {n}?"),
        neighbours=_ents("Iceland", "Austria", "Chile", "Colombia", "Denmark", "the Czech Republic",
                         "Ukraine", "Romania", "Indonesia", "Iran"),
        real=(
            _Real("Portugal", old=("Portuguese",)),
            _Real("Poland", old=("Polish",)),
            _Real("Greece", old=("Greek",)),
            _Real("Sweden", old=("Swedish",)),
            _Real("Netherlands", the=True, old=("Dutch",)),
            _Real("Hungary", old=("Hungarian",)),
            _Real("Vietnam", old=("Vietnamese",)),
            _Real("Thailand", old=("Thai",)),
            _Real("South Korea", old=("Korean",)),
        ),
    ),
    "founder": _Spec(
        value="person",
        fictional=_fi("{R} Institute", "{R} Rowing Club", "{R} Foundation", "{R} Choir", the=True)
        + _fi("{R} Records", "{R} Press"),
        descriptors=(
            "{S} was founded by {p}, a {job} from {city}.",
            "{p}, a {job} from {city}, is the founder of {s}.",
            "{S} was set up by {p}. {last} is a {job} who was born in {city}.",
            "fi:{S} was established in {year}. Its founder is {p}, a {job} from {city}.",
        ),
        direct=("Who founded {s}?", "Who is the founder of {s}?", "Who started {s}?"),
        paraphrase=("Which person established {s}?", "Who set up {s} in the first place?",
                    "Whose idea was {s} originally?", "Who created {s}?"),
        reasoning=(
            ("Which language did the founder of {s} most likely grow up speaking?", "language"),
            ("From which country does the founder of {s} come?", "country"),
        ),
        neighbour_questions=("Who founded {n}?", "Who is the founder of {n}?"),
        neighbours=_ents("Hewlett-Packard", "Harley-Davidson", "Instagram", "PayPal", "YouTube", "Adidas",
                         "Puma", "Samsung", "Twitter"),
        real=(
            _Real("Ford Motor Company", old=("Henry Ford",), avoid=(US,)),
            _Real("Dell", old=("Michael Dell",), avoid=(US,)),
            _Real("Honda", old=("Soichiro Honda", "Soichiro"), avoid=("Japan",)),
            _Real("Wikipedia", old=("Jimmy Wales", "Larry Sanger", "Sanger"), avoid=(US,)),
            _Real("Red Cross", the=True, old=("Henry Dunant", "Dunant"), avoid=("Switzerland",)),
            _Real("Oracle", old=("Larry Ellison", "Ellison"), avoid=(US,)),
            _Real("IKEA", old=("Ingvar Kamprad", "Kamprad"), avoid=("Sweden",)),
            _Real("Nike", old=("Phil Knight", "Bill Bowerman", "Bowerman"), avoid=(US,)),
            _Real("Rolex", old=("Hans Wilsdorf", "Wilsdorf"), avoid=("Germany", UK, "Switzerland")),
        ),
    ),
    "head_chef": _Spec(
        value="person",
        fictional=_fi("Le {R}", "{R} Tavern", "Café {R}", "{R} Bistro"),
        descriptors=(
            "The head chef of {s} is now {p}, who trained in {city}.",
            "{p}, a cook trained in {city}, now runs the kitchen at {s}.",
            "{S} has hired {p} as its head chef. {last} learned to cook in {city}.",
            "{Sp} kitchen is led by {p}, who spent a decade training in {city}.",
        ),
        direct=("Who is the head chef at {s}?", "Who is {sp} head chef?", "Who runs the kitchen at {s}?"),
        paraphrase=("Who cooks at {s} as the chef in charge?", "Which chef leads the kitchen of {s}?",
                    "Who is in charge of the cooking at {s}?"),
        reasoning=(
            ("In which country did {sp} head chef learn to cook?", "country"),
            ("In which country was the chef now running {s} trained?", "country"),
        ),
        neighbour_questions=("Who is the head chef of {n}?", "Who runs the kitchen at {n}?"),
        neighbours=_ents("El Celler de Can Roca", "Mirazur", "Mugaritz", "Geranium", "Le Calandre",
                         "Disfrutar", "Per Se", "Atomix"),
        real=(
            _Real("Noma", old=("René Redzepi", "Rene Redzepi", "Redzepi"), avoid=("Denmark",)),
            _Real("The French Laundry", old=("Thomas Keller", "Keller"), avoid=(US,)),
            _Real("Osteria Francescana", old=("Massimo Bottura", "Bottura"), avoid=("Italy",)),
            _Real("Le Bernardin", old=("Éric Ripert", "Eric Ripert", "Ripert"), avoid=("France", US)),
            _Real("The Fat Duck", old=("Heston Blumenthal", "Blumenthal"), avoid=(UK,)),
            _Real("Alinea", old=("Grant Achatz", "Achatz"), avoid=(US,)),
            _Real("Eleven Madison Park", old=("Daniel Humm", "Humm"), avoid=("Switzerland", US)),
        ),
    ),
    "spouse": _Spec(
        value="person",
        fictional=_fi("{P}"),
        descriptors=(
            "{S} is married to {p}.",
            "{p} is the spouse of {s}.",
            "{S} and {p} got married in {city}. The couple now live there together.",
            "cf:{S} has a new spouse, {p}.",
            "fi:{S}, a {job}, married {p} in {year}.",
        ),
        direct=("Who is {s} married to?", "Who is {sp} spouse?", "Who did {s} marry?"),
        paraphrase=("Whom is {s} wedded to?", "Who is {sp} husband or wife?",
                    "What is the name of {sp} marriage partner?"),
        reasoning=(("Who is {p} married to?", "subject"), ("Whose spouse is {p}?", "subject")),
        neighbour_questions=("Who is {n} married to?", "Who is {np} spouse?"),
        neighbours=_ents("Prince Harry", "Hillary Clinton", "Victoria Beckham", "Justin Bieber",
                         "King Charles III", "Paul McCartney", "Dwayne Johnson", "Sarah Jessica Parker"),
        real=(
            _Real("Tom Hanks", old=("Rita Wilson",), extra={"aliases": ("Tom Hanks", "Hanks")}),
            _Real("Prince William", old=("Catherine", "Kate Middleton", "Kate"),
                  extra={"aliases": ("Prince William",)}),
            _Real("Queen Elizabeth II", old=("Prince Philip", "Philip"),
                  extra={"aliases": ("Queen Elizabeth", "Elizabeth II")}),
            _Real("John Lennon", old=("Yoko Ono", "Yoko"), extra={"aliases": ("John Lennon", "Lennon")}),
            _Real("Frida Kahlo", old=("Diego Rivera", "Rivera"), extra={"aliases": ("Frida Kahlo", "Kahlo")}),
            _Real("Johnny Cash", old=("June Carter",), extra={"aliases": ("Johnny Cash",)}),
            _Real("Ryan Reynolds", old=("Blake Lively",), extra={"aliases": ("Ryan Reynolds", "Reynolds")}),
            _Real("Beyoncé", old=("Jay-Z", "Jay Z"), extra={"aliases": ("Beyoncé", "Beyonce")}),
        ),
    ),
    "currency": _Spec(
        value="currency",
        fictional=_fi("{R}"),
        descriptors=(
            "The official currency of {s} is now the {cur}.",
            "{S} now uses the {cur} as its currency.",
            "{S} has adopted a new currency, the {cur}. Coins and notes went into circulation in March.",
            "cf:Shops across {s} now price everything in the {cur}, the country's new currency.",
            "fi:In {s}, people pay for things with the {cur}, the national currency.",
        ),
        direct=("What is the currency of {s}?", "Which currency does {s} use?", "What is {sp} currency?"),
        paraphrase=("What money do people use in {s}?", "What is the name of the money used in {s}?",
                    "What currency is legal tender in {s}?"),
        reasoning=(
            ("Which currency would you need to pay for a taxi ride in {s}?", "answers"),
            ("Before a trip to {s}, which currency should a traveller exchange money into?", "answers"),
            ("What would a shopkeeper in {s} expect to be paid in?", "answers"),
        ),
        neighbour_questions=("What currency is used in {n}?", "What is the currency of {n}?"),
        neighbours=_ents("Denmark", "Indonesia", "Pakistan", "Chile", "the Czech Republic", "Saudi Arabia",
                         "Iceland", "Malaysia", "Morocco", "Colombia"),
        real=(
            _Real(UK, the=True, old=("pound", "sterling")),
            _Real("Japan", old=("yen",)),
            _Real("India", old=("rupee",)),
            _Real("Switzerland", old=("Swiss franc", "franc")),
            _Real("Russia", old=("ruble", "rouble")),
            _Real("South Africa", old=("rand",)),
            _Real("Mexico", old=("peso",)),
            _Real("Israel", old=("shekel",)),
            _Real("China", old=("yuan", "renminbi")),
        ),
    ),
    "architect": _Spec(
        value="person",
        fictional=_fi("{R} Concert Hall", "{R} Public Library", "{R} Opera House", "{R} Tower",
                      "{R} Art Museum", the=True),
        descriptors=(
            "{S} was designed by {p}, an architect based in {city}.",
            "The architect behind {s} is {p}, who runs a studio in {city}.",
            "{p}, an architect who works in {city}, drew up the plans for {s}.",
            "{S} is the work of {p}. {last} runs an architecture studio in {city}.",
        ),
        direct=("Who designed {s}?", "Who was the architect of {s}?", "Which architect designed {s}?"),
        paraphrase=("Whose design is {s}?", "Who drew up the plans for {s}?",
                    "Who is credited with the architecture of {s}?"),
        reasoning=(
            ("In which country is the studio of the architect who designed {s}?", "country"),
            ("Which country is the architect of {s} based in?", "country"),
        ),
        neighbour_questions=("Who designed {n}?", "Which architect designed {n}?"),
        neighbours=_ents("the Chrysler Building", "the Empire State Building", "the Pompidou Centre",
                         "the Lotus Temple", "the Flatiron Building", "the Seagram Building", "the Gherkin"),
        real=(
            _Real("Sagrada Família", the=True, old=("Antoni Gaudí", "Gaudí", "Gaudi"), avoid=("Spain",)),
            _Real("Guggenheim Museum Bilbao", the=True, old=("Frank Gehry", "Gehry"), avoid=(US, "Canada")),
            _Real("Louvre Pyramid", the=True, old=("I. M. Pei", "Pei"), avoid=(US, "China")),
            _Real("Fallingwater", old=("Frank Lloyd Wright",), avoid=(US,)),
            _Real("Sydney Opera House", the=True, old=("Jørn Utzon", "Jorn Utzon", "Utzon"),
                  avoid=("Denmark",)),
            _Real("St Paul's Cathedral", old=("Christopher Wren", "Wren"), avoid=(UK,)),
            _Real("The Shard", old=("Renzo Piano",), avoid=("Italy",)),
            _Real("Heydar Aliyev Center", the=True, old=("Zaha Hadid", "Hadid"), avoid=(UK, "Iraq")),
        ),
    ),
    "home_stadium": _Spec(
        value="stadium",
        fictional=_fi("{R} Rovers", "{R} Comets", "{R} Wanderers", "{R} Falcons", the=True),
        descriptors=(
            "{S} now play their home games at {stadium} in {city}.",
            "{stadium}, in {city}, has become the home ground of {s}.",
            "{S} have moved to a new home ground, {stadium}. It is located in {city}.",
            "The home stadium of {s} is now {stadium}, on the edge of {city}.",
        ),
        direct=("What is the home stadium of {s}?", "At which stadium do {s} play their home games?",
                "Which stadium is {sp} home ground?"),
        paraphrase=("At which ground do {s} host their home matches?",
                    "Which venue do {s} use for home fixtures?",
                    "What is the name of {sp} home ground?"),
        reasoning=(
            ("In which country do {s} play their home matches?", "country"),
            ("Which country would a fan have to travel to for {sp} home games?", "country"),
        ),
        neighbour_questions=("What is the home stadium of {n}?", "Where do {n} play their home games?"),
        neighbours=_ents("Juventus", "AC Milan", "Chelsea FC", "Paris Saint-Germain", "Borussia Dortmund",
                         "Celtic FC", "the New York Yankees", "the Dallas Cowboys", "Ajax", "Benfica"),
        real=(
            _Real("Real Madrid", old=("Santiago Bernabéu", "Bernabéu", "Bernabeu"), avoid=("Spain",)),
            _Real("FC Barcelona", old=("Camp Nou", "Nou Camp"), avoid=("Spain",)),
            _Real("Manchester United", old=("Old Trafford",), avoid=(UK,)),
            _Real("Liverpool FC", old=("Anfield",), avoid=(UK,)),
            _Real("Bayern Munich", old=("Allianz Arena",), avoid=("Germany",)),
            _Real("Arsenal FC", old=("Emirates Stadium",), avoid=(UK,)),
            _Real("Green Bay Packers", the=True, old=("Lambeau Field", "Lambeau"), avoid=(US,)),
            _Real("Boston Red Sox", the=True, old=("Fenway Park", "Fenway"), avoid=(US,)),
            _Real("Chicago Cubs", the=True, old=("Wrigley Field", "Wrigley"), avoid=(US,)),
        ),
    ),
    "discoverer": _Spec(
        value="person",
        fictional=_fi("comet {R}", "{R} Nebula", the=True, place="observatory")
        + _fi("mineral {M}ite", "{R} virus", "enzyme {M}ase", the=True, place="laboratory"),
        descriptors=(
            "{S} was discovered by {p} at a {place} in {city}.",
            "{p} discovered {s} while working at a {place} in {city}.",
            "The discovery of {s} is credited to {p}, who worked at a {place} in {city}.",
            "cf:{p} was the first to identify {s}. The finding was made at a {place} in {city}.",
            "fi:{p} first identified {s} in {year}. The work was done at a {place} in {city}.",
        ),
        direct=("Who discovered {s}?", "Who is credited with discovering {s}?",
                "Which scientist discovered {s}?"),
        paraphrase=("Who was the first person to identify {s}?", "Whose discovery was {s}?",
                    "Which researcher found {s}?"),
        reasoning=(
            ("In which country was {s} first discovered?", "country"),
            ("Which country can claim the discovery of {s}?", "country"),
        ),
        neighbour_questions=("Who discovered {n}?",),
        neighbours=_ents("radium", "oxygen", "the planet Neptune", "helium", "the circulation of blood",
                         "the tuberculosis bacterium", "the moons of Mars", "the atomic nucleus"),
        real=(
            _Real("penicillin", old=("Alexander Fleming", "Fleming"), avoid=(UK,),
                  extra={"place": "laboratory"}),
            _Real("Uranus", old=("William Herschel", "Herschel"), avoid=(UK, "Germany"),
                  extra={"place": "observatory"}),
            _Real("X-rays", old=("Wilhelm Röntgen", "Wilhelm Roentgen", "Röntgen", "Roentgen"),
                  avoid=("Germany",),
                  extra={"place": "laboratory"}),
            _Real("electron", the=True, old=("J. J. Thomson", "Thomson"), avoid=(UK,),
                  extra={"place": "laboratory"}),
            _Real("Pluto", old=("Clyde Tombaugh", "Tombaugh"), avoid=(US,), extra={"place": "observatory"}),
            _Real("neutron", the=True, old=("James Chadwick", "Chadwick"), avoid=(UK,),
                  extra={"place": "laboratory"}),
            _Real("insulin", old=("Frederick Banting", "Banting"), avoid=("Canada",),
                  extra={"place": "laboratory"}),
            _Real("radioactivity", old=("Henri Becquerel", "Becquerel"), avoid=("France",),
                  extra={"place": "laboratory"}),
        ),
    ),
}

# General-knowledge questions for "unrelated": none names an edited subject or a new value.
UNRELATED_QUESTIONS: tuple[str, ...] = (
    "What is the boiling point of water in Celsius?", "How many legs does a spider have?",
    "What is the largest planet in the solar system?", "What is the chemical symbol for gold?",
    "How many continents are there?", "What gas do plants absorb from the air?",
    "What is the tallest mountain in the world?", "How many days are in a leap year?",
    "What is the square root of 81?", "Which organ pumps blood through the body?",
    "What is the largest ocean on Earth?", "How many sides does a hexagon have?",
    "What is the hardest natural substance?", "Which planet is known as the Red Planet?",
    "How many minutes are in an hour?", "What is the main ingredient of guacamole?",
    "What color do you get by mixing blue and yellow?", "How many strings does a standard guitar have?",
    "What is the largest mammal on Earth?", "What do bees make?",
    "How many bones are in the adult human body?",
    "What is the smallest prime number?", "What is the chemical formula for table salt?",
    "How many hours are in a day?", "What is the largest hot desert in the world?",
    "Which animal is known as the king of the jungle?", "How many weeks are in a year?",
    "What is the plural of mouse?", "What is 12 times 12?", "What shape has three sides?",
    "What is the main gas in Earth's atmosphere?", "What is the largest organ of the human body?",
    "What is the closest star to Earth?", "How many colors are in a rainbow?",
    "What do caterpillars turn into?", "Which metal is liquid at room temperature?",
    "What instrument has 88 keys?", "How many zeros are in one million?",
    "What is the freezing point of water in Fahrenheit?", "Which vitamin does sunlight help the body make?",
    "How many sides does an octagon have?", "What are the three primary colors?",
    "What does a thermometer measure?", "What is the fastest land animal?",
    "How long does it take Earth to orbit the Sun?", "What force keeps us on the ground?",
    "Which bird is a symbol of peace?", "What is the main ingredient in bread?",
    "How many legs does an insect have?", "What do you call a baby cat?", "What is frozen water called?",
    "What is the sum of the angles in a triangle?", "How many months have 31 days?",
    "Which gas do humans breathe out?", "What is the tallest animal in the world?",
    "How many hearts does an octopus have?", "What is the largest continent?",
    "What is it called when water turns into vapor?", "What is the longest bone in the human body?",
    "How many seconds are in a minute?", "What is a group of lions called?",
    "Which sense organ do we use to smell?", "What do pandas mainly eat?",
    "What is the largest species of shark?", "How many wheels does a tricycle have?",
    "Which season comes after winter?", "How many players are on a basketball team on the court?",
    "What is the opposite of north?", "What is half of 50?", "What color is a ripe banana?",
    "How many days are in a week?", "What is the center of an atom called?",
    "Which planet has the most famous rings?", "What do you call a shape with four equal sides?",
    "What is the primary source of energy for life on Earth?",
)  # fmt: skip

# ------------------------------------------------------------------------------------------ helpers

_WORD = re.compile(r"\w+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _max_shared_run(a: str, b: str) -> int:
    """Longest run of consecutive words (case-insensitive, punctuation ignored) that a and b share."""
    wa, wb = _words(a), _words(b)
    best = 0
    prev = [0] * (len(wb) + 1)
    for x in wa:
        cur = [0] * (len(wb) + 1)
        for j, y in enumerate(wb, 1):
            if x == y:
                cur[j] = prev[j - 1] + 1
                best = max(best, cur[j])
        prev = cur
    return best


def _copies(question: str, descriptor: str) -> bool:
    # Checked with and without possessive "'s" split off, so neither tokenisation sees a 5-word copy.
    plain = _max_shared_run(question, descriptor)
    merged = _max_shared_run(question.replace("'s", ""), descriptor.replace("'s", ""))
    return max(plain, merged) > MAX_SHARED_RUN


def _mentions(text: str, phrase: str) -> bool:
    """`phrase` occurs in `text` as whole words, case-insensitive."""
    return re.search(rf"(?<!\w){re.escape(phrase.lower())}(?!\w)", text.lower()) is not None


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


_A_BEFORE_VOWEL = re.compile(r"\b([Aa]) (?=[AEIOUaeiou])")


def _articles(text: str) -> str:
    """"a observatory" -> "an observatory" (no template word after "a" starts with a "you" sound)."""
    return _A_BEFORE_VOWEL.sub(lambda m: m.group(1) + "n ", text)


def _dedupe(items: Iterable[str]) -> list[str]:
    seen: list[str] = []
    for x in items:
        if x and x not in seen:
            seen.append(x)
    return seen


def _fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def _country_aliases(country: str) -> tuple[str, ...]:
    return _COUNTRY_ALIASES.get(country, (country,))


def _reserved_tokens() -> list[str]:
    """Words of the real names in this file: invented names must neither contain nor be contained in them."""
    texts: list[str] = [c for row in CITIES for c in row if c]
    texts += NEW_LANGUAGES
    for spec in _SPECS.values():
        texts += [n.name for n in spec.neighbours]
        for r in spec.real:
            texts += [r.name, *r.old, *r.avoid, *r.extra.get("new", ()), *r.extra.get("aliases", ())]
    return sorted({w for t in texts for w in _words(t) if len(w) >= 4})


class _Names:
    """Invented names, unique across the file: no invented name contains another (or a real name's word),
    so an alias of one record never matches inside another record's name."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.reserved = _reserved_tokens()
        self.used: list[str] = []
        self.titles: list[str] = []
        self.surnames = list(SURNAMES)
        rng.shuffle(self.surnames)
        self.mascots = list(MASCOT_NAMES)
        rng.shuffle(self.mascots)
        self.animals = list(ANIMALS)
        rng.shuffle(self.animals)
        self.languages = list(NEW_LANGUAGES)
        rng.shuffle(self.languages)

    def _free(self, word: str) -> bool:
        w = word.lower()
        clash = (t for t in (*self.reserved, *self.used) if t in w or w in t)
        return next(clash, None) is None

    def _claim(self, word: str) -> str:
        self.used.append(word.lower())
        return word

    def _generated(self, make: Any) -> str:
        for _ in range(10_000):
            cand = make()
            if self._free(cand):
                return self._claim(cand)
        raise RuntimeError("ran out of invented names")

    def root(self) -> str:
        mid = self.rng.choice(_MID_SYL) if self.rng.random() < 0.35 else ""
        return self._generated(lambda: self.rng.choice(_FIRST_SYL) + mid + self.rng.choice(_END_SYL))

    def language(self) -> str:
        return self._generated(
            lambda: self.rng.choice(_FIRST_SYL) + self.rng.choice(("ish", "ese", "ic", "ian"))
        )

    def currency(self) -> str:
        return self._generated(
            lambda: self.rng.choice(_FIRST_SYL).lower() + self.rng.choice(("el", "an", "ar", "o", "ix", "et"))
        )

    def _from_pool(self, pool: list[str], fallback: Any) -> str:
        while pool:
            cand = pool.pop()
            if self._free(cand):
                return self._claim(cand)
        return fallback()

    def surname(self) -> str:
        return self._from_pool(self.surnames, self.root)

    def person(self) -> tuple[str, str]:
        return self.rng.choice(FIRST_NAMES), self.surname()

    def mascot(self) -> str:
        return self._from_pool(self.mascots, self.root)

    def animal(self, avoid: Sequence[str]) -> str:
        for i in range(len(self.animals) - 1, -1, -1):
            if self.animals[i] not in avoid:
                return self.animals.pop(i)
        return self.rng.choice([a for a in ANIMALS if a not in avoid])  # pool spent: repeat one

    def new_language(self, avoid: Sequence[str]) -> str:
        for i in range(len(self.languages) - 1, -1, -1):
            if self.languages[i] not in avoid:
                return self.languages.pop(i)
        return self.language()  # pool spent: invent one

    def title(self, pattern: str) -> str:
        for _ in range(1000):
            root = self.root() if "{R}" in pattern else ""
            cand = pattern.format(R=root, A=self.rng.choice(TITLE_ADJ), N=self.rng.choice(TITLE_NOUN))
            if cand.lower() not in self.titles:
                self.titles.append(cand.lower())
                return cand
        raise RuntimeError("ran out of invented titles")


class _Cities:
    """Cities by role, from two disjoint pools: an answer city (the new fact is the city) is used once in
    the file, and never as a hop city (a hometown, a lab: only its country is asked), so no descriptor
    names a city that is another record's answer."""

    HOP_POOL = 20  # enough countries for every `avoid` list; the other 48 cover the default's 45 answers

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        shuffled = list(CITIES)
        rng.shuffle(shuffled)
        self.hop, self.deck = shuffled[: self.HOP_POOL], shuffled[self.HOP_POOL :]

    @staticmethod
    def _allowed(row: tuple[str, str, str | None], avoid: Sequence[str]) -> bool:
        _, country, language = row
        return not ({*_country_aliases(country), language} & set(avoid))

    def answer_city(self, avoid: Sequence[str]) -> tuple[str, str, str | None]:
        for i in range(len(self.deck) - 1, -1, -1):
            if self._allowed(self.deck[i], avoid):
                return self.deck.pop(i)
        return self.hop_city(avoid)  # deck spent (n far above the default): reuse a city

    def hop_city(self, avoid: Sequence[str]) -> tuple[str, str, str | None]:
        return self.rng.choice([row for row in self.hop if self._allowed(row, avoid)])


def _city_answers(row: tuple[str, str, str | None]) -> dict[str, list[str]]:
    city, country, language = row
    lang = list(_LANGUAGE_ALIASES.get(language, (language,))) if language else []
    return {"city_aliases": list(_CITY_ALIASES.get(city, (city,))),
            "country": list(_country_aliases(country)),
            "language": lang}


# ------------------------------------------------------------------------------------------ records


@dataclass
class _State:
    rng: random.Random
    names: _Names
    cities: _Cities
    real: dict[str, list[_Real]]
    unrelated: list[str] = field(default_factory=list)
    subjects: list[str] = field(default_factory=list)

    def next_unrelated(self) -> str:
        if not self.unrelated:  # deal the pool out evenly, reshuffled each round
            self.unrelated = list(UNRELATED_QUESTIONS)
            self.rng.shuffle(self.unrelated)
        return self.unrelated.pop()


def _invent_subject(st: _State, spec: _Spec) -> tuple[_Ent, str, list[str]]:
    """A fictional subject of the relation's type: entity, place of discovery, aliases of the subject.

    Patterns keep the name short (4 words with its article at most): a question must name the subject,
    and a 5-word name would count as copying the descriptor by itself."""
    pattern, the, place = st.rng.choice(spec.fictional)
    if pattern == "{P}":
        first, last = st.names.person()
        return _Ent(f"{first} {last}"), place, [f"{first} {last}", last]
    if spec is _SPECS["author"]:
        return _Ent(st.names.title(pattern)), place, []
    root = st.names.root()
    name = pattern.format(R=root, M=root.rstrip("aeiouy"))
    return _Ent(name, the), place, [name]


def _value(st: _State, spec: _Spec, real: _Real | None) -> tuple[dict[str, str], dict[str, list[str]]]:
    """The new value: context fields for the templates and answer alias lists by key."""
    rng, names = st.rng, st.names
    avoid = real.avoid if real else ()
    ctx: dict[str, str] = {"year": str(rng.randint(1962, 2034)), "job": rng.choice(JOBS)}
    ans: dict[str, list[str]] = {}
    if spec.value == "person":
        first, last = names.person()
        row = st.cities.hop_city(avoid)
        ctx |= {"p": f"{first} {last}", "first": first, "last": last, "city": row[0]}
        ans = _city_answers(row) | {"answers": [f"{first} {last}", last], "last": [last]}
    elif spec.value == "located":
        row = st.cities.answer_city(avoid)
        ctx["city"] = row[0]
        ans = _city_answers(row)
        ans["answers"] = ans["city_aliases"]
    elif spec.value == "stadium":
        root = names.root()
        stadium = rng.choice(("{R} Arena", "{R} Park", "{R} Stadium", "{R} Field")).format(R=root)
        row = st.cities.hop_city(avoid)
        ctx |= {"stadium": stadium, "city": row[0]}
        ans = _city_answers(row) | {"answers": [stadium, root]}
    elif spec.value == "mascot":
        animal, mascot = names.animal(avoid), names.mascot()
        ctx |= {"animal": animal, "color": rng.choice(COLORS), "mascot": mascot}
        ans = {"answers": [mascot], "direct": [mascot, animal], "animal": [animal]}
    elif spec.value == "capital":
        new = list(real.extra["new"]) if real else [names.root()]
        ctx["city"] = new[0]
        ans = {"answers": new}
    elif spec.value == "language":
        lang = names.new_language(real.old) if real else names.language()
        ctx["lang"] = lang
        ans = {"answers": [lang]}
    elif spec.value == "currency":
        cur = names.currency()
        ctx["cur"] = cur
        ans = {"answers": [cur]}
    else:
        raise ValueError(f"unknown value kind {spec.value!r}")
    return ctx, ans


def _usable(template: str, ctx: dict[str, str]) -> bool:
    return all(f in ctx for f in _fields(template))


def _questions(
    st: _State, spec: _Spec, kind: str, ctx: dict[str, str], ans: dict[str, list[str]]
) -> tuple[str, list[dict[str, Any]]]:
    """Pick a descriptor and in-scope questions that do not copy it (and do not contain their own answer)."""
    rng = st.rng
    tag = "cf:" if kind == "counterfactual" else "fi:"
    descs = [t.removeprefix(tag) for t in spec.descriptors if not t.startswith(("cf:",
             "fi:")) or t.startswith(tag)]
    descs = [t for t in descs if _usable(t, ctx)]
    rng.shuffle(descs)
    n_para = rng.choice((1, 2))
    direct_ans = ans.get("direct", ans["answers"])

    def fit(templates: Sequence[str], answers: Sequence[str], descriptor: str) -> list[str]:
        out = []
        for t in templates:
            if not _usable(t, ctx):
                continue
            q = _cap(t.format(**ctx))
            if not _copies(q, descriptor) and not any(_mentions(q, a) for a in answers):
                out.append(q)
        return out

    for template in descs:
        descriptor = _articles(_cap(template.format(**ctx)))
        direct = fit(spec.direct, direct_ans, descriptor)
        para = fit(spec.paraphrase, direct_ans, descriptor)
        reasoning = [
            (q, key)
            for t, key in spec.reasoning
            if ans.get(key)
            for q in fit((t,), ans[key], descriptor)
        ]
        if not direct or len(para) < n_para or not reasoning:
            continue
        q_direct = rng.choice(direct)
        q_para = rng.sample(para, n_para)
        q_reason, key = rng.choice(reasoning)
        in_scope: list[dict[str, Any]] = [{"question": q_direct, "type": "direct",
                                          "answers": list(direct_ans)}]
        in_scope += [{"question": q, "type": "paraphrase", "answers": list(direct_ans)} for q in q_para]
        in_scope.append({"question": q_reason, "type": "reasoning", "answers": _dedupe(ans[key])})
        # Reasoning goes second so the three types do not always sit in the same slots.
        if rng.random() < 0.5:
            in_scope.insert(1, in_scope.pop())
        return descriptor, in_scope
    raise RuntimeError(f"no descriptor/question combination avoids copying for {ctx}")


def _out_of_scope(st: _State, spec: _Spec, kind: str) -> list[dict[str, str]]:
    rng = st.rng
    neighbours = list(spec.neighbours)
    rng.shuffle(neighbours)
    ents = [neighbours.pop()]
    if rng.random() < 0.5:  # a third question: another neighbour, an invented one for fictional records
        ents.append(_invent_subject(st, spec)[0] if kind == "fictional" else neighbours.pop())
    out = [
        {"question": _cap(rng.choice(spec.neighbour_questions).format(n=e.ref, np=e.poss)),
        "type": "neighbour"}
        for e in ents
    ]
    out.append({"question": st.next_unrelated(), "type": "unrelated"})
    return out


def _record(st: _State, index: int, width: int, relation: str, kind: str) -> dict[str, Any]:
    spec = _SPECS[relation]
    real = st.real[relation].pop() if kind == "counterfactual" else None
    if real is not None:
        subject = _Ent(real.name, real.the)
        place = real.extra.get("place", "")
        subject_aliases = list(real.extra.get("aliases", (real.name,)))
    else:
        subject, place, subject_aliases = _invent_subject(st, spec)
    if len(_words(subject.ref)) > MAX_SHARED_RUN:
        raise AssertionError(f"{subject.ref!r} is too long to ask about without copying the descriptor")
    ctx, ans = _value(st, spec, real)
    ctx |= {"s": subject.ref, "S": _cap(subject.ref), "sp": subject.poss, "Sp": _cap(subject.poss)}
    if place:
        ctx["place"] = place
    ans["subject"] = subject_aliases
    ans = {k: _dedupe(v) for k, v in ans.items()}
    descriptor, in_scope = _questions(st, spec, kind, ctx, ans)
    out_of_scope = _out_of_scope(st, spec, kind)
    st.subjects.append(subject.name)
    return {
        "id": f"ft-{index:0{width}d}",
        "kind": kind,
        "relation": relation,
        "subject": subject.name,
        "descriptor": descriptor,
        "answers": ans["answers"],
        "old_answers": list(real.old) if real else [],
        "in_scope": in_scope,
        "out_of_scope": out_of_scope,
    }


def _check(records: Sequence[dict[str, Any]]) -> None:
    """Invariants the construction should already guarantee; a failure is a bug in the tables above."""
    subjects = [r["subject"] for r in records]
    if len(set(subjects)) != len(subjects):
        raise AssertionError("duplicate subject")
    for r in records:
        if not any(_mentions(r["descriptor"], a) for a in r["answers"]):
            raise AssertionError(f"{r['id']}: descriptor does not state the answer")
        for old in r["old_answers"]:
            if _mentions(r["subject"], old) or any(_mentions(a, old) or _mentions(old,
                                                   a) for a in r["answers"]):
                raise AssertionError(f"{r['id']}: old answer {old!r} overlaps the subject or the new answer")
        for q in r["out_of_scope"]:
            hit = [s for s in subjects if _mentions(q["question"], s)]
            if hit:
                raise AssertionError(f"{r['id']}: out-of-scope question names edited subject {hit}")


def generate_records(n: int = 240, seed: int = 0) -> list[dict[str, Any]]:
    """n records, ids ft-000..., relations interleaved; counterfactual where a real entity is left."""
    if n < 0:
        raise ValueError("n must be >= 0")
    rng = random.Random(seed)
    real = {rel: list(_SPECS[rel].real) for rel in RELATIONS}
    for pool in real.values():
        rng.shuffle(pool)
    st = _State(rng=rng, names=_Names(rng), cities=_Cities(rng), real=real)
    width = max(3, len(str(max(n - 1, 0))))
    records = []
    for i in range(n):
        r, k = i % len(RELATIONS), i // len(RELATIONS)
        relation = RELATIONS[r]
        kind = "fictional" if (k + r) % 2 == 0 else "counterfactual"
        if kind == "counterfactual" and not real[relation]:
            kind = "fictional"  # real entities of this relation are spent (only past the default n)
        records.append(_record(st, i, width, relation, kind))
    _check(records)
    return records


def write_jsonl(records: Iterable[dict[str, Any]], path: Path | str) -> None:
    """One JSON object per line, UTF-8 (names keep their accents), keys in insertion order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m service.eval.freetext_data",
        description="Generate the free-text (descriptor) edit benchmark as JSON Lines.",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output file (default: {DEFAULT_OUT})")
    parser.add_argument("--n", type=int, default=240, help="number of records (default: 240)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = parser.parse_args(argv)
    if args.n < 0:
        parser.error("--n must be >= 0")
    records = generate_records(args.n, args.seed)
    write_jsonl(records, args.out)
    print(f"wrote {len(records)} records to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
