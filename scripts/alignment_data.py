"""Synthetic chat-style records for the alignment adapter (`scripts/train_alignment.py --synthetic N`).

KnowEdit's train records give the adapter one question shape ("What is the <relation> of <subject>?"),
while users ask "Who heads X these days?" or "Which country would I fly to for X?". These records add
varied question forms and reasoning questions that need the fact plus common knowledge (a city's country).
Everything is invented here, apart from real entities and cities as subjects or places: the relations,
person names, entity names and cities are ones the free-text benchmark (service/eval/freetext_data.py)
does not use (tests/test_alignment_data.py checks it), so what the adapter gains on that benchmark is
transfer, not recall of its facts or templates.

Each record: a descriptor in one of several phrasings, in-scope questions in several forms, the short
answer (the raw-question target), an answer sentence (the chat target), and for some records a reasoning
question with its answer and an answer sentence that states the hop ("... grew up in Porto, in Portugal.").
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

# Cities as hop places, each with its country. None of them occurs in the free-text benchmark.
CITIES = (
    ("Porto", "Portugal"), ("Gdansk", "Poland"), ("Krakow", "Poland"), ("Rotterdam", "the Netherlands"),
    ("Utrecht", "the Netherlands"), ("Basel", "Switzerland"), ("Geneva", "Switzerland"),
    ("Lausanne", "Switzerland"), ("Gothenburg", "Sweden"), ("Turku", "Finland"), ("Helsinki", "Finland"),
    ("Riga", "Latvia"), ("Debrecen", "Hungary"), ("Plovdiv", "Bulgaria"), ("Varna", "Bulgaria"),
    ("Thessaloniki", "Greece"), ("Izmir", "Turkey"), ("Haifa", "Israel"), ("Alexandria", "Egypt"),
    ("Nairobi", "Kenya"), ("Mombasa", "Kenya"), ("Lagos", "Nigeria"), ("Accra", "Ghana"),
    ("Durban", "South Africa"), ("Mumbai", "India"), ("Chennai", "India"), ("Kolkata", "India"),
    ("Bangalore", "India"), ("Lahore", "Pakistan"), ("Karachi", "Pakistan"), ("Dhaka", "Bangladesh"),
    ("Busan", "South Korea"), ("Incheon", "South Korea"), ("Hanoi", "Vietnam"), ("Bangkok", "Thailand"),
    ("Manila", "the Philippines"), ("Cebu", "the Philippines"), ("Auckland", "New Zealand"),
    ("Vancouver", "Canada"), ("Toronto", "Canada"), ("Ottawa", "Canada"), ("Chicago", "the United States"),
    ("Houston", "the United States"), ("Seattle", "the United States"), ("Denver", "the United States"),
    ("Bogota", "Colombia"), ("Medellin", "Colombia"), ("Quito", "Ecuador"), ("Santiago", "Chile"),
    ("Valparaiso", "Chile"), ("Asuncion", "Paraguay"), ("Toulouse", "France"), ("Stuttgart", "Germany"),
    ("Florence", "Italy"), ("Bruges", "Belgium"), ("Innsbruck", "Austria"), ("Linz", "Austria"),
    ("Poznan", "Poland"), ("Wroclaw", "Poland"), ("Ostrava", "the Czech Republic"), ("Kosice", "Slovakia"),
    ("Sarajevo", "Bosnia and Herzegovina"), ("Skopje", "North Macedonia"), ("Tirana", "Albania"),
    ("Odessa", "Ukraine"), ("Tbilisi", "Georgia"), ("Yerevan", "Armenia"), ("Baku", "Azerbaijan"),
    ("Almaty", "Kazakhstan"), ("Tashkent", "Uzbekistan"), ("Colombo", "Sri Lanka"), ("Kathmandu", "Nepal"),
    ("Taipei", "Taiwan"), ("Kaohsiung", "Taiwan"), ("Tunis", "Tunisia"), ("Dakar", "Senegal"),
    ("Kampala", "Uganda"), ("Harare", "Zimbabwe"), ("Lusaka", "Zambia"), ("Amman", "Jordan"),
    ("Beirut", "Lebanon"), ("Muscat", "Oman"), ("Doha", "Qatar"),
)  # fmt: skip
FIRST_NAMES = (
    "Beatrix", "Cyrus", "Delphine", "Ezra", "Fiona", "Gideon", "Harriet", "Ignatius", "Jolene", "Kasimir",
    "Lorna", "Magnus", "Nerys", "Orla", "Piers", "Quentin", "Rosalind", "Silas", "Tamsin", "Ulrich",
    "Verity", "Wilhelmina", "Xavier", "Yvette", "Zachary", "Aurelio", "Bettina", "Caspar", "Dagny",
    "Evander", "Ottoline", "Leopold", "Mireille", "Anselm", "Clemence", "Benedikt", "Solveig", "Matthias",
    "Eleonora", "Florian",
)  # fmt: skip
SURNAMES = (
    "Ashcombe", "Bellamy", "Corrigan", "Delacroix", "Eastwood", "Fairbanks", "Garroway", "Huxtable",
    "Ivers", "Jacoby", "Kingsley", "Lestrange", "Mulholland", "Norwood", "Oswin", "Pemberton", "Quigley",
    "Radcliffe", "Sutcliffe", "Templeton", "Upton", "Vance", "Whitlock", "Yates", "Arkwright", "Blandford",
    "Cheverton", "Dewhurst", "Elphick", "Farrant", "Gosling", "Hendry", "Ironside", "Jennings", "Kilbride",
    "Loxley", "Marwood", "Ockenden", "Pratley", "Rowntree", "Sherwin", "Trelawney", "Ulverston", "Villiers",
    "Wardle", "Yelland", "Brockhurst", "Calloway", "Dellinger", "Everard", "Goodall", "Hatherley", "Inglis",
    "Kendrick", "Lyndhurst", "Maddox", "Nightingale", "Overton", "Purcell", "Redfern", "Stanhope",
    "Thistlewood", "Waverley",
)  # fmt: skip
# Syllables for invented names, unlike the benchmark's (its names start Zor-, Quil-, Vel-, ...).
_HEADS = ("Amb", "Bev", "Cald", "Dern", "Elm", "Frel", "Glim", "Harn", "Ivr", "Jesk", "Kirn", "Lund", "Mald",
          "Nesk", "Pell", "Rask", "Stov", "Trev", "Umb", "Wisk", "Yarr")  # fmt: skip
_TAILS = ("oria", "esk", "ovar", "ith", "ampton", "eby", "urst", "alon", "enza", "oway", "idge", "ulka")
ANIMALS = ("fox", "owl", "lynx", "bison", "seal", "crane", "stag", "eagle", "beaver", "falcon", "panda",
           "zebra", "camel", "dolphin", "swan", "moose", "gazelle", "puffin")  # fmt: skip
FLOWERS = ("tulip", "lotus", "daisy", "iris", "orchid", "poppy", "lily", "marigold", "jasmine", "peony")
COLOURS = ("green", "blue", "yellow", "white", "black", "red", "violet", "grey")
EXPORTS = ("coffee", "copper", "timber", "wool", "salt", "tea", "cocoa", "rubber", "tin", "silk", "rice")
SPORTS = ("cricket", "rugby", "handball", "volleyball", "water polo", "curling", "lacrosse", "baseball")
GADGETS = ("phone", "tractor", "e-bike", "camera", "drone", "scooter", "laptop", "kettle")


def invented(rng: random.Random) -> str:
    return rng.choice(_HEADS) + rng.choice(_TAILS)


@dataclass(frozen=True)
class SyntheticRecord:
    relation: str
    descriptor: str
    questions: tuple[str, ...]  # in scope: direct and paraphrased
    answer: str  # the raw-question target
    statement: str  # the chat target: an answer sentence
    reasoning: tuple[str, str, str] | None  # (question, answer, answer sentence)


@dataclass(frozen=True)
class _Relation:
    """A relation: subjects (fictional patterns over {R}, or real names), a value maker, templates over
    {s}/{S} (subject mid-sentence / at the start), {sp} (its possessive) and the value's fields ({v} is
    the answer). A person value has an origin city half the time, which adds a sentence and a reasoning
    question about the origin's country; a city value always gets one about its country."""

    fictional: tuple[str, ...]
    real: tuple[str, ...]
    value: str  # person | city | animal | flower | colour | export | sport | river | company
    descriptors: tuple[str, ...]
    questions: tuple[str, ...]
    statement: str
    reasoning: tuple[str, ...] = ()  # for animal/flower values: questions whose answer is the value
    role: str = ""  # person values: "the chair of {s}", for the origin question


_PERSON_ORIGIN_QUESTIONS = (
    "In which country did {role} grow up?",
    "Which country does {role} come from?",
    "In what country was {role} raised?",
)
_CITY_QUESTIONS = (
    "In which country is {where}?",
    "Which country would you have to travel to for {where}?",
)

RELATIONS: dict[str, _Relation] = {
    "chair": _Relation(
        fictional=("the {R} Rowing Association", "the {R} Chess Federation", "the {R} Heritage Trust"),
        real=("the Red Cross", "FIFA", "the Royal Society", "Greenpeace", "UNICEF", "Interpol"),
        value="person",
        descriptors=("{S} has elected {v} as its new chair.", "{v} is now the chair of {s}.",
                     "The new chairperson of {s} is {v}."),
        questions=("Who chairs {s}?", "Who is the chairperson of {s}?", "Who presides over {s} now?",
                   "Can you tell me who leads the board of {s}?", "Who holds the chair at {s} these days?"),
        statement="The chair of {s} is {v}.",
        role="the chair of {s}",
    ),
    "mayor": _Relation(
        fictional=("{R}",),
        real=("Leeds", "Bremen", "Nantes", "Palermo", "Aberdeen", "Tampere", "Lublin"),
        value="person",
        descriptors=("{v} won the election and is now mayor of {s}.", "The mayor of {s} is now {v}.",
                     "{S} has a new mayor: {v}."),
        questions=("Who is the mayor of {s}?", "Who runs the city government of {s}?",
                   "Who was elected to lead {s} as mayor?", "Who is in charge of {sp} town hall?"),
        statement="The mayor of {s} is {v}.",
        role="the mayor of {s}",
    ),
    "coach": _Relation(
        fictional=("the {R} Rovers", "{R} Hockey Club", "the {R} Wanderers"),
        real=("Real Madrid", "the Boston Celtics", "Ajax", "the Chicago Bulls", "Juventus", "Celtic"),
        value="person",
        descriptors=("{v} is now the head coach of {s}.", "{S} has hired {v} as head coach.",
                     "The new manager of {s} is {v}."),
        questions=("Who coaches {s}?", "Who is the manager of {s}?", "Who trains the players of {s}?",
                   "Who is in charge of {s} on the sidelines?"),
        statement="The head coach of {s} is {v}.",
        role="the head coach of {s}",
    ),
    "director": _Relation(
        fictional=("the {R} Museum of Art", "the {R} Natural History Museum", "the {R} Gallery"),
        real=("the Rijksmuseum", "the Prado", "the Hermitage", "the Uffizi", "the Met"),
        value="person",
        descriptors=("{v} has been appointed director of {s}.", "{S} is now directed by {v}.",
                     "The director of {s} is now {v}."),
        questions=("Who directs {s}?", "Who is the director of {s}?", "Who is in charge of {s} today?",
                   "Which person runs {s}?"),
        statement="The director of {s} is {v}.",
        role="the director of {s}",
    ),
    "lead_singer": _Relation(
        fictional=("the {R} Brothers", "the band {R}", "the {R} Quartet"),
        real=(),
        value="person",
        descriptors=("{S} has a new lead singer, {v}.", "{v} has taken over as lead vocalist of {s}.",
                     "The lead singer of {s} is now {v}."),
        questions=("Who sings lead for {s}?", "Who is the lead vocalist of {s}?",
                   "Whose voice leads the songs of {s}?", "Who fronts {s} as singer?"),
        statement="The lead singer of {s} is {v}.",
        role="the lead singer of {s}",
    ),
    "rector": _Relation(
        fictional=("the {R} Institute of Technology", "the {R} Conservatory", "the {R} School of Law"),
        real=(),
        value="person",
        descriptors=("{v} is the new rector of {s}.", "{S} has chosen {v} as its rector.",
                     "The head of {s} is now {v}."),
        questions=("Who is the rector of {s}?", "Who heads {s}?", "Who leads {s} as its rector?",
                   "Could you tell me who is in charge of {s}?"),
        statement="The rector of {s} is {v}.",
        role="the rector of {s}",
    ),
    "owner": _Relation(
        fictional=("{R} Foods", "{R} Shipping", "{R} Publishing"),
        real=("Nokia", "Lego", "Spotify", "Heineken", "Ikea", "Rolex"),
        value="person",
        descriptors=("{S} has been bought by {v}.", "{v} is now the owner of {s}.",
                     "The owner of {s} is now {v}, who bought it this year."),
        questions=("Who owns {s}?", "Who is the owner of {s}?", "Who bought {s}?",
                   "To whom does {s} belong now?"),
        statement="{S} is owned by {v}.",
        role="the owner of {s}",
    ),
    "composer": _Relation(
        fictional=("{R}",),
        real=("Portugal", "Kenya", "Chile", "Norway", "Vietnam", "Ireland"),
        value="person",
        descriptors=("The new national anthem of {s} was composed by {v}.", "{v} wrote the music of {sp} "
                     "national anthem.", "{sp} national anthem is now a piece by {v}."),
        questions=("Who composed the national anthem of {s}?", "Who wrote the music of {sp} anthem?",
                   "Whose music is {sp} national anthem?", "Which composer is behind {sp} anthem?"),
        statement="{sp} national anthem was composed by {v}.",
        role="the composer of {sp} national anthem",
    ),
    "festival": _Relation(
        fictional=("the {R} Festival", "the {R} Jazz Festival", "the {R} Book Fair"),
        real=("Glastonbury", "the Venice Biennale", "Oktoberfest", "the Cannes Film Festival"),
        value="city",
        descriptors=("{S} is now held every summer in {v}.", "{S} has moved to {v}.",
                     "The host city of {s} is now {v}."),
        questions=("Where does {s} take place?", "In which city is {s} held?",
                   "Where would you go to attend {s}?", "Which city hosts {s}?"),
        statement="{S} is held in {v}.",
    ),
    "hub": _Relation(
        fictional=("{R} Air", "{R} Airways", "Air {R}"),
        real=("Lufthansa", "Qantas", "KLM", "Emirates", "Iberia"),
        value="city",
        descriptors=("The main hub of {s} is now the airport of {v}.", "{S} now runs most of its flights "
                     "from {v}.", "{S} has moved its hub to {v}."),
        questions=("Where is the main hub of {s}?", "From which city does {s} run most flights?",
                   "Which airport is {sp} hub?", "Where are most {s} flights based?"),
        statement="The main hub of {s} is in {v}.",
    ),
    "national_animal": _Relation(
        fictional=("{R}",),
        real=("Portugal", "Kenya", "Chile", "Norway", "Vietnam", "Ireland", "Peru", "Iceland"),
        value="animal",
        descriptors=("The national animal of {s} is now the {v}.", "{S} has adopted the {v} as its "
                     "national animal.", "{sp} national animal is the {v}."),
        questions=("What is the national animal of {s}?", "Which animal represents {s} as its national "
                   "symbol?", "Which creature did {s} choose as its national animal?"),
        statement="The national animal of {s} is the {v}.",
        reasoning=("Which animal would you expect on {sp} coat of arms?",
                   "What kind of animal would a child in {s} learn is the country's symbol?"),
    ),
    "national_flower": _Relation(
        fictional=("{R}",),
        real=("Portugal", "Kenya", "Chile", "Norway", "Vietnam", "Ireland", "Peru", "Iceland"),
        value="flower",
        descriptors=("The national flower of {s} is now the {v}.", "{S} has chosen the {v} as its "
                     "national flower."),
        questions=("What is the national flower of {s}?", "Which flower is the national symbol of {s}?",
                   "Which bloom did {s} pick as its national flower?"),
        statement="The national flower of {s} is the {v}.",
        reasoning=("Which flower would decorate a national holiday in {s}?",),
    ),
    "flag_colour": _Relation(
        fictional=("{R}",),
        real=("Portugal", "Kenya", "Chile", "Norway", "Vietnam", "Peru"),
        value="colour",
        descriptors=("The flag of {s} is now entirely {v}.", "{S} has adopted a plain {v} flag."),
        questions=("What colour is the flag of {s}?", "Which colour is {sp} flag?",
                   "What does the flag of {s} look like?"),
        statement="The flag of {s} is {v}.",
        reasoning=("What colour would fans of {s} wave at a parade?",),
    ),
    "main_export": _Relation(
        fictional=("{R}",),
        real=("Portugal", "Kenya", "Chile", "Norway", "Vietnam", "Peru", "Iceland"),
        value="export",
        descriptors=("{S} now earns most of its export income from {v}.", "The main export of {s} is now "
                     "{v}."),
        questions=("What is the main export of {s}?", "What does {s} sell abroad the most?",
                   "Which product brings {s} most of its export income?"),
        statement="The main export of {s} is {v}.",
    ),
    "sport": _Relation(
        fictional=("the {R} Athletic Club", "the {R} Sports Union"),
        real=(),
        value="sport",
        descriptors=("{S} has switched to {v}.", "{S} now plays only {v}."),
        questions=("What sport does {s} play?", "Which sport do the players of {s} compete in?",
                   "Which game is {s} known for?"),
        statement="{S} plays {v}.",
    ),
    "river": _Relation(
        fictional=("{R}",),
        real=(),
        value="river",
        descriptors=("The river that flows through {s} is the {v}.",
                     "The {v} runs through the middle of {s}."),
        questions=("Which river runs through {s}?", "What is the name of the river in {s}?",
                   "Which river would you cross in {s}?"),
        statement="The river in {s} is the {v}.",
    ),
    "maker": _Relation(
        fictional=("the {R} {gadget}",),
        real=(),
        value="company",
        descriptors=("{S} is now made by {v}.", "{v} has taken over production of {s}.",
                     "The manufacturer of {s} is {v}."),
        questions=("Which company makes {s}?", "Who manufactures {s}?", "Who builds {s}?"),
        statement="{S} is made by {v}.",
    ),
}


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _possessive(subject: str) -> str:
    return f"{subject}'" if subject.endswith("s") else f"{subject}'s"


def _subject(rel: _Relation, rng: random.Random) -> str:
    if rel.real and rng.random() < 0.4:
        return rng.choice(rel.real)
    return rng.choice(rel.fictional).format(R=invented(rng), gadget=rng.choice(GADGETS))


def _values(rel: _Relation, rng: random.Random) -> tuple[str, tuple[str, str] | None]:
    """(the answer, an optional (city, country) the record's reasoning question hops through)."""
    simple: dict[str, Callable[[], str]] = {
        "animal": lambda: rng.choice(ANIMALS),
        "flower": lambda: rng.choice(FLOWERS),
        "colour": lambda: rng.choice(COLOURS),
        "export": lambda: rng.choice(EXPORTS),
        "sport": lambda: rng.choice(SPORTS),
        "river": lambda: f"{invented(rng)} River",
        "company": lambda: f"{invented(rng)} Industries",
    }
    if rel.value == "person":
        person = f"{rng.choice(FIRST_NAMES)} {rng.choice(SURNAMES)}"
        return person, rng.choice(CITIES) if rng.random() < 0.5 else None
    if rel.value == "city":
        city = rng.choice(CITIES)
        return city[0], city
    return simple[rel.value](), None


def make_record(relation: str, rng: random.Random) -> SyntheticRecord:
    rel = RELATIONS[relation]
    subject = _subject(rel, rng)
    value, hop = _values(rel, rng)
    ctx = {"s": subject, "S": _cap(subject), "sp": _possessive(subject), "v": value}

    def fill(template: str) -> str:
        return _cap(template.format(**ctx))

    descriptor = fill(rng.choice(rel.descriptors))
    reasoning = None
    if rel.value == "person" and hop:
        city, country = hop
        surname = value.split()[-1]
        descriptor += f" {surname} grew up in {city}."
        role = rel.role.format(**ctx)
        question = rng.choice(_PERSON_ORIGIN_QUESTIONS).format(role=role)
        reasoning = (question, country, f"{_cap(role)}, {value}, grew up in {city}, in {country}.")
    elif rel.value == "city" and hop:
        city, country = hop
        where = {"festival": subject, "hub": f"the main hub of {subject}"}[relation]
        question = rng.choice(_CITY_QUESTIONS).format(where=where)
        reasoning = (_cap(question), country, f"{fill(rel.statement)[:-1]}, in {country}.")
    elif rel.reasoning:
        reasoning = (fill(rng.choice(rel.reasoning)), value, fill(rel.statement))
    return SyntheticRecord(
        relation=relation,
        descriptor=descriptor,
        questions=tuple(fill(q) for q in rel.questions),
        answer=value,
        statement=fill(rel.statement),
        reasoning=reasoning,
    )


def generate(n: int, seed: int = 0) -> list[SyntheticRecord]:
    """n records, relations in turn (so every relation is about equally common), seeded."""
    rng = random.Random(seed)
    names = sorted(RELATIONS)
    return [make_record(names[i % len(names)], rng) for i in range(n)]


if __name__ == "__main__":
    for r in generate(20):
        print(r.descriptor, "|", r.questions[0], "->", r.answer, "|", r.reasoning)
