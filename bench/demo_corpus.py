"""The demo's training text: a deterministic, generated English-like corpus (no downloads, no third-party text).

``python -m bench.demo_corpus`` (re)writes bench/data/corpus.txt; ``load_corpus()`` reads it, or regenerates the same
bytes in memory when the file is missing. The text comes from a small grammar (stories, facts, arithmetic, dialogue)
driven by ``random.Random(seed)``, so a byte-level model has structure to learn: words, spelling, punctuation, counts.
"""

from __future__ import annotations

import random
from pathlib import Path

CORPUS_PATH = Path(__file__).resolve().parent / "data" / "corpus.txt"
DEFAULT_SIZE = 320_000
DEFAULT_SEED = 1234

NAMES = ("Ada", "Basil", "Clara", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kira", "Lev", "Mara",
         "Nils", "Olga", "Pavel", "Quinn", "Rosa", "Sami", "Tove")  # fmt: skip
ANIMALS = ("fox", "heron", "badger", "otter", "crow", "hare", "wolf", "owl", "lynx", "mole", "swan", "toad")
LEGS = {"heron": 2, "crow": 2, "owl": 2, "swan": 2}
PLACES = ("the mill", "the river", "the old bridge", "the orchard", "the harbour", "the forest", "the market",
          "the lighthouse", "the valley", "the library", "the station", "the garden")  # fmt: skip
ADJECTIVES = ("quiet", "bright", "cold", "narrow", "patient", "curious", "tired", "golden", "heavy", "gentle",
              "distant", "small", "ancient", "careful", "restless")  # fmt: skip
OBJECTS = ("lamp", "letter", "basket", "compass", "kettle", "map", "rope", "bell", "coat", "book", "key", "boat")
VERBS = ("carried", "found", "mended", "painted", "counted", "lost", "watched", "opened", "followed", "sold")
TIMES = ("At dawn", "In the evening", "Before the storm", "After supper", "On Sunday", "Late at night", "In spring",
         "Every morning")  # fmt: skip
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
           "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen")  # fmt: skip


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _a(word: str) -> str:
    return f"{_article(word)} {word}"


def _story_sentence(rng: random.Random) -> str:
    who, what, adj = rng.choice(NAMES), rng.choice(OBJECTS), rng.choice(ADJECTIVES)
    forms = (
        f"{rng.choice(TIMES)}, {who} {rng.choice(VERBS)} {_a(adj)} {what} near {rng.choice(PLACES)}.",
        f"The {rng.choice(ADJECTIVES)} {rng.choice(ANIMALS)} {rng.choice(VERBS)} the {what} by {rng.choice(PLACES)}.",
        f"{who} and {rng.choice(NAMES)} walked to {rng.choice(PLACES)} with {_a(rng.choice(ADJECTIVES))} {what}.",
        f"Nobody knew why the {what} was so {rng.choice(ADJECTIVES)}, but {who} did not ask.",
    )
    return rng.choice(forms)


def _fact_sentence(rng: random.Random) -> str:
    a, b = rng.randrange(10), rng.randrange(9)
    animal = rng.choice(ANIMALS)
    legs = NUMBERS[LEGS.get(animal, 4)]
    forms = (
        f"{NUMBERS[a].capitalize()} plus {NUMBERS[b]} is {NUMBERS[a + b]}.",
        f"{_a(animal).capitalize()} has {legs} legs and lives near {rng.choice(PLACES)}.",
        f"{NUMBERS[a + b].capitalize()} minus {NUMBERS[b]} is {NUMBERS[a]}.",
        f"The {animal} is {rng.choice(ADJECTIVES)}; the {rng.choice(ANIMALS)} is {rng.choice(ADJECTIVES)}.",
    )
    return rng.choice(forms)


def _dialogue(rng: random.Random) -> str:
    a, b, what = rng.choice(NAMES), rng.choice(NAMES), rng.choice(OBJECTS)
    return (
        f'"Where is the {what}?" asked {a}.\n'
        f'"By {rng.choice(PLACES)}," said {b}, "next to the {rng.choice(ADJECTIVES)} {rng.choice(OBJECTS)}."\n'
    )


def generate_corpus(size: int = DEFAULT_SIZE, seed: int = DEFAULT_SEED) -> str:
    """About ``size`` characters of text (ASCII, paragraphs separated by blank lines); same seed -> same text."""
    rng = random.Random(seed)
    parts: list[str] = []
    total = 0
    while total < size:
        kind = rng.random()
        if kind < 0.5:
            para = " ".join(_story_sentence(rng) for _ in range(rng.randint(3, 7))) + "\n"
        elif kind < 0.8:
            para = " ".join(_fact_sentence(rng) for _ in range(rng.randint(2, 5))) + "\n"
        else:
            para = "".join(_dialogue(rng) for _ in range(rng.randint(1, 3)))
        parts.append(para + "\n")
        total += len(para) + 1
    return "".join(parts)[:size]


def load_corpus(path: Path = CORPUS_PATH) -> bytes:
    """The corpus as bytes (the byte-level model's tokens); generated in memory if the file is missing."""
    if path.is_file():
        return path.read_bytes()
    return generate_corpus().encode("ascii")


def main() -> None:
    CORPUS_PATH.parent.mkdir(parents=True, exist_ok=True)
    CORPUS_PATH.write_text(generate_corpus(), encoding="ascii")


if __name__ == "__main__":
    main()
