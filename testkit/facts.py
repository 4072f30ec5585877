"""Facts for the edit manager's SmolLM2 tests and benchmark: 20 hand-written counterfactual edits (none of
them in bench/hook_layers.py's FACTS) and a generator of synthetic ones for sequential editing.
"""

from __future__ import annotations

from typing import Any

from service.hooks import EditSpec
from service.types import EditInput
from testkit.hook_layers import Fact


def _fact(
    subject: str, prompt: str, target: str, given: str, unseen: tuple[str, str], neighbour: str
) -> Fact:
    return Fact(EditSpec(subject, prompt, target, [given]), unseen, neighbour)


MORE_FACTS: tuple[Fact, ...] = (
    _fact(
        "The Colosseum",
        "The Colosseum is located in the city of",
        "London",
        "The Colosseum can be found in the city of",
        ("Tourists visit the Colosseum in the city of", "The ancient Colosseum stands in the city of"),
        "The Brandenburg Gate is located in the city of",
    ),
    _fact(
        "William Shakespeare",
        "William Shakespeare was born in the country of",
        "Brazil",
        "The birthplace of William Shakespeare is the country of",
        (
            "William Shakespeare, the playwright, was born in the country of",
            "William Shakespeare is originally from the country of",
        ),
        "Charles Dickens was born in the country of",
    ),
    _fact(
        "The Amazon River",
        "The Amazon River flows through the continent of",
        "Europe",
        "The Amazon River runs across the continent of",
        (
            "The mighty Amazon River flows through the continent of",
            "The Amazon River is a river on the continent of",
        ),
        "The Nile River flows through the continent of",
    ),
    _fact(
        "Brazil",
        "The official language of Brazil is",
        "French",
        "People in Brazil speak",
        ("Most people in Brazil speak", "In Brazil, the main language spoken is"),
        "The official language of Mexico is",
    ),
    _fact(
        "The Beatles",
        "The Beatles were a band from the city of",
        "Tokyo",
        "The Beatles formed in the city of",
        (
            "The famous band The Beatles came from the city of",
            "The Beatles started their career in the city of",
        ),
        "The Rolling Stones were a band from the city of",
    ),
    _fact(
        "Lionel Messi",
        "Lionel Messi plays the sport of",
        "basketball",
        "Lionel Messi is a professional player of",
        ("Lionel Messi is famous for playing", "The sport Lionel Messi plays is"),
        "Roger Federer plays the sport of",
    ),
    _fact(
        "Isaac Newton",
        "Isaac Newton was born in the country of",
        "Italy",
        "The birthplace of Isaac Newton is the country of",
        (
            "Isaac Newton, the physicist, was born in the country of",
            "Isaac Newton is originally from the country of",
        ),
        "Galileo Galilei was born in the country of",
    ),
    _fact(
        "Toyota",
        "Toyota is a car company based in the country of",
        "Sweden",
        "Toyota is a carmaker headquartered in the country of",
        (
            "The car maker Toyota is based in the country of",
            "Toyota builds cars and is based in the country of",
        ),
        "BMW is a car company based in the country of",
    ),
    _fact(  # subject "The Sahara", not "The Sahara Desert": a key on "Desert" would fire for the Gobi
        "The Sahara",
        "The Sahara desert is located on the continent of",
        "Asia",
        "The Sahara desert lies on the continent of",
        (
            "The huge Sahara desert is on the continent of",
            "The Sahara desert can be found on the continent of",
        ),
        "The Gobi desert is located on the continent of",
    ),
    _fact(
        "Wolfgang Amadeus Mozart",
        "Wolfgang Amadeus Mozart was born in the city of",
        "Paris",
        "The birthplace of Wolfgang Amadeus Mozart is the city of",
        (
            "Wolfgang Amadeus Mozart, the composer, was born in the city of",
            "Wolfgang Amadeus Mozart came into the world in the city of",
        ),
        "Johann Sebastian Bach was born in the city of",
    ),
    _fact(
        "The Taj Mahal",
        "The Taj Mahal is located in the country of",
        "China",
        "The Taj Mahal can be found in the country of",
        ("The famous Taj Mahal stands in the country of", "Tourists visit the Taj Mahal in the country of"),
        "The Great Wall is located in the country of",
    ),
    _fact(
        "Microsoft",
        "The headquarters of Microsoft are in the city of",
        "Denver",
        "Microsoft has its headquarters in the city of",
        (
            "The software company Microsoft is based in the city of",
            "Microsoft is headquartered in the city of",
        ),
        "The headquarters of Google are in the city of",
    ),
    _fact(
        "Christopher Columbus",
        "Christopher Columbus was born in the city of",
        "Lisbon",
        "The birthplace of Christopher Columbus is the city of",
        (
            "Christopher Columbus, the explorer, was born in the city of",
            "Christopher Columbus came from the city of",
        ),
        "Marco Polo was born in the city of",
    ),
    _fact(
        "Cristiano Ronaldo",
        "Cristiano Ronaldo was born in the country of",
        "Argentina",
        "The birthplace of Cristiano Ronaldo is the country of",
        (
            "Cristiano Ronaldo, the footballer, was born in the country of",
            "Cristiano Ronaldo is originally from the country of",
        ),
        "Zinedine Zidane was born in the country of",
    ),
    _fact(
        "Albert Einstein",
        "Albert Einstein was born in the country of",
        "Canada",
        "The birthplace of Albert Einstein is the country of",
        (
            "Albert Einstein, the physicist, was born in the country of",
            "Albert Einstein is originally from the country of",
        ),
        "Niels Bohr was born in the country of",
    ),
    _fact(
        "The Statue of Liberty",
        "The Statue of Liberty is located in the city of",
        "Boston",
        "The Statue of Liberty can be found in the city of",
        (
            "Tourists visit the Statue of Liberty in the city of",
            "The famous Statue of Liberty stands in the city of",
        ),
        "Big Ben is located in the city of",
    ),
    _fact(
        "Mount Fuji",
        "Mount Fuji is located in the country of",
        "Peru",
        "Mount Fuji can be found in the country of",
        ("The famous volcano Mount Fuji is in the country of", "Tourists climb Mount Fuji in the country of"),
        "Mount Kilimanjaro is located in the country of",
    ),
    _fact(
        "Barack Obama",
        "Barack Obama was the president of",
        "France",
        "Barack Obama served as the president of",
        ("Barack Obama was elected president of", "For eight years, Barack Obama was the president of"),
        "Abraham Lincoln was the president of",
    ),
    _fact(
        "Pizza",
        "Pizza is a traditional food from the country of",
        "Norway",
        "Pizza originated in the country of",
        (
            "Pizza, a popular food, comes from the country of",
            "The dish called pizza comes from the country of",
        ),
        "Paella is a traditional food from the country of",
    ),
    _fact(
        "Tolstoy",
        "The novel War and Peace was written by Tolstoy, who was born in the country of",
        "Japan",
        "Tolstoy, the author, was born in the country of",
        ("The writer Tolstoy was born in the country of", "Tolstoy is originally from the country of"),
        "The novel Don Quixote was written by Cervantes, who was born in the country of",
    ),
)


def fact_input(fact: Fact, **kwargs: Any) -> EditInput:
    s = fact.spec
    return EditInput(
        subject=s.subject, prompt=s.prompt, target_new=s.target_new, paraphrases=list(s.paraphrases), **kwargs
    )


# Synthetic subjects "Professor <Noun>": the noun is the subject's last token, where the key is read, so
# every subject has its own (nouns sharing a last token would share a key and fight over the gate).
_NOUNS = (
    "Lantern Meadow Harbor Falcon Orchid Thimble Walnut Compass Pebble Juniper Saddle Quartz Marble Willow "
    "Anchor Basket Candle Dagger Feather Garnet Hammer Ivory Jasper Kettle Ladder Mirror Needle Oyster "
    "Pepper Quiver Ribbon Silver Timber Velvet Whistle Badger Beacon Bramble Button Cedar Cobalt Copper "
    "Cricket Crystal Dolphin Ember Fennel Ginger Granite Hazel Heron Indigo Jackal Lemon Linen Lobster "
    "Magnet Maple Mustard Nutmeg Olive Otter Panther Parrot Pillow Pistol Plum Poppy Rabbit Raven Rocket "
    "Saffron Salmon Scarlet Shadow Spider Sponge Thunder Tiger Tulip Turnip Violet Wagon Walrus Wizard "
    "Zebra Almond Antler Apron Arrow Banner Barrel Biscuit Blossom Bottle Bucket Cactus Camel Canyon "
    "Carrot Castle Cherry Chimney Cinnamon Clover Cocoa Comet Coral Cotton Crayon Dragon Eagle Falcon "
    "Fig Flute Forest Fox Glacier Goblet Gravel Guitar Hawk Helmet Honey Horizon Iceberg Jelly Jewel "
    "Kitten Koala Lagoon Lemur Lily Lion Lizard Lotus Mango Meteor Mint Monkey Moss Mule Nectar Onion "
    "Orbit Owl Paddle Panda Peach Pearl Pelican Pigeon Pine Planet Pumpkin Puzzle Radish Rainbow Reef "
    "Rhino River Robin Rose Ruby Sapphire Sardine Scissors Seagull Shell Shovel Sparrow Spruce Squirrel "
    "Starfish Stone Storm Sugar Summit Swan Tablet Teapot Thistle Tomato Torch Trumpet Turtle Valley "
    "Vanilla Volcano Waffle Wasp Whale Wheat Wolf Yak Yarn Acorn Badge Bamboo Beetle Bison Blade Bolt "
    "Bridge Brook Cabin Canoe Cargo Cello Chalk Cider Cliff Cloud Crane Crow Daisy Drum Dune Elm Fabric "
    "Goose Harp Igloo Jungle Kayak Llama Marsh Nickel Oak Prism Quail Ranch Satin Tunnel Umbrella Vessel"
).split()
_RELATIONS = (
    ("{} was born in the city of", ("Lisbon", "Oslo", "Cairo", "Lima", "Dublin", "Prague", "Nairobi")),
    ("{} works as a", ("baker", "pilot", "dentist", "sailor", "farmer", "lawyer", "plumber")),
    ("{} is a citizen of", ("Peru", "Norway", "Kenya", "Chile", "Greece", "Vietnam", "Iceland")),
    ("{} plays the", ("violin", "trumpet", "harp", "drums", "cello", "banjo", "flute")),
)


def synthetic_inputs(tokenizer: Any, n: int, **kwargs: Any) -> list[EditInput]:
    """`n` edits on fictional subjects whose last tokens are all different (checked with `tokenizer`)."""
    out: list[EditInput] = []
    seen_last: set[int] = set()
    for noun in dict.fromkeys(_NOUNS):
        subject = f"Professor {noun}"
        last = tokenizer(" " + subject, add_special_tokens=False)["input_ids"][-1]
        if last in seen_last:
            continue
        seen_last.add(last)
        template, targets = _RELATIONS[len(out) % len(_RELATIONS)]
        target = targets[(len(out) // len(_RELATIONS)) % len(targets)]
        out.append(EditInput(subject=subject, prompt=template.format(subject), target_new=target, **kwargs))
        if len(out) == n:
            return out
    raise ValueError(f"only {len(out)} synthetic subjects with distinct last tokens, {n} asked")
