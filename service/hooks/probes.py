"""Fixed, unrelated probe prompts.

They serve twice: every token of every probe is a *negative* for threshold calibration (an edit's gate
must stay shut on them), and their next-token distributions measure an edit's locality (top-1 changes
and KL). The set mixes facts about many subjects and relations, same-relation neighbours of typical
edits ("... is located in the city of"), subjects that share a last token with common edit subjects
("Tower", "Bridge", "Company"), and chatty / instruction prompts. Probes that mention an edit's own
subject are skipped for that edit.
"""

from __future__ import annotations

PROBES: tuple[str, ...] = (
    # same relation as landmark edits: located in the city of
    "The Louvre is located in the city of",
    "The Colosseum is located in the city of",
    "Big Ben is located in the city of",
    "The Statue of Liberty is located in the city of",
    "The Brandenburg Gate is located in the city of",
    "The Sagrada Familia is located in the city of",
    "The Tower of London is located in the city of",
    "The Golden Gate Bridge is located in the city of",
    "The Sydney Opera House is located in the city of",
    "The Tokyo Tower is located in the city of",
    "The Kremlin is located in the city of",
    "The Acropolis is located in the city of",
    # capitals, countries, languages
    "The capital of France is",
    "The capital of Japan is",
    "The capital of Italy is",
    "The capital of Germany is",
    "The capital of Canada is",
    "The official language of Brazil is",
    "The official language of Mexico is",
    "The mother tongue of Vladimir Putin is",
    "Toyota is a company headquartered in",
    "The Amazon River flows through the country of",
    # people: occupations, nationalities, works
    "Albert Einstein was a famous",
    "William Shakespeare wrote the play",
    "Lionel Messi plays the sport of",
    "Barack Obama was born in the state of",
    "Marie Curie won the Nobel Prize in",
    "Leonardo da Vinci painted the",
    "Wolfgang Amadeus Mozart was born in the city of",
    "The Beatles were a band from the city of",
    "Steve Jobs co-founded the company",
    "Bill Gates is the founder of",
    "Serena Williams is a professional",
    "Isaac Newton is known for the laws of",
    # companies, products, organisations
    "The iPhone is made by the company",
    "Windows is an operating system developed by",
    "The Ford Motor Company is headquartered in",
    "Coca-Cola was invented in the city of",
    "The headquarters of the United Nations is in",
    "The Olympic Games in 2008 were held in",
    # science, nature, general knowledge
    "Water boils at a temperature of",
    "The largest planet in the solar system is",
    "The chemical symbol for gold is",
    "The tallest mountain in the world is",
    "The Pacific Ocean is the largest",
    "A triangle has three",
    "The currency of the United Kingdom is the",
    "Photosynthesis takes place in the",
    "The Great Wall of China was built to",
    "Mount Fuji is the highest mountain in",
    # chatty and instruction prompts
    "Hello! How are you today?",
    "Can you help me write an email to my boss?",
    "Write a short poem about the sea.",
    "Translate 'good morning' into Spanish:",
    "What is 12 times 7?",
    "Give me three tips for sleeping better.",
    "Summarize the plot of a typical detective story.",
    "Tell me a joke about computers.",
    "What should I cook for dinner tonight?",
    "Explain recursion to a five-year-old.",
    "My favourite colour is",
    "Once upon a time, in a small village,",
)
