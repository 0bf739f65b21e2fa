"""Find object tags in a description as whole words, case-insensitive, tolerant of singular/plural.

The paper's code tests ``tag in text`` on substrings, so "cat" is found in "catalogue" and "car" in "scarf". Here
a tag matches only as whole words: "cat" matches "cat", "Cats" and "cat's", never "catalogue". The last word of a
tag is inflected both ways (a tagger may give "leaves" where the description says "leaf"); earlier words of a
multi-word tag must appear as written, separated by spaces or hyphens ("traffic light" matches "traffic-lights").
"""

from __future__ import annotations

import re
from functools import lru_cache

# Irregular plurals common in image tags; regular ones are handled by the suffix rules below.
IRREGULAR_PLURALS = {
    "child": "children",
    "foot": "feet",
    "goose": "geese",
    "man": "men",
    "mouse": "mice",
    "ox": "oxen",
    "person": "people",
    "tooth": "teeth",
    "woman": "women",
}
_IRREGULAR_SINGULARS = {plural: singular for singular, plural in IRREGULAR_PLURALS.items()}
_VOWELS = "aeiou"


def word_forms(word: str) -> set[str]:
    """Lower-case singular and plural spellings of one word (a superset: unused spellings are harmless)."""
    w = word.lower()
    forms = {w}
    # Plurals of w, if w is singular.
    forms.add(w + "s")
    if w.endswith(("s", "x", "z", "ch", "sh", "o")):
        forms.add(w + "es")  # bus -> buses, box -> boxes, tomato -> tomatoes
    if len(w) > 1 and w.endswith("y") and w[-2] not in _VOWELS:
        forms.add(w[:-1] + "ies")  # berry -> berries (but boy -> boys)
    if w.endswith("f"):
        forms.add(w[:-1] + "ves")  # leaf -> leaves
    if w.endswith("fe"):
        forms.add(w[:-2] + "ves")  # knife -> knives
    # Singulars of w, if w is plural.
    if w.endswith("ies") and len(w) > 3:
        forms.add(w[:-3] + "y")
    if w.endswith("ves") and len(w) > 3:
        forms.update({w[:-3] + "f", w[:-3] + "fe"})
    if w.endswith("es") and len(w) > 2:
        forms.add(w[:-2])
    if w.endswith("s") and not w.endswith("ss") and len(w) > 1:
        forms.add(w[:-1])
    # Irregular nouns, both ways.
    for table in (IRREGULAR_PLURALS, _IRREGULAR_SINGULARS):
        if w in table:
            forms.add(table[w])
    return forms


@lru_cache(maxsize=4096)
def tag_pattern(tag: str) -> re.Pattern[str] | None:
    """Compiled regex that finds ``tag`` as whole words; ``None`` for an empty tag."""
    words = re.findall(r"[\w']+", tag.lower())
    if not words:
        return None
    *head, last = words
    last_alternatives = "|".join(sorted((re.escape(f) for f in word_forms(last)), key=len, reverse=True))
    parts = [re.escape(w) for w in head] + [f"(?:{last_alternatives})"]
    # \b on both sides makes "cat" miss "catalogue" and "bobcat"; "cat's" still matches (the apostrophe is a boundary).
    return re.compile(r"\b" + r"[\s\-]+".join(parts) + r"\b", re.IGNORECASE)


def tag_found(tag: str, text: str) -> bool:
    """Whether ``tag`` occurs in ``text`` as whole words (see the module docstring)."""
    pattern = tag_pattern(tag)
    return bool(pattern and pattern.search(text))


def clean_tags(tags) -> list[str]:
    """The sample's tags as a list of distinct non-empty strings. Accepts a list or a comma-separated string."""
    if tags is None:
        return []
    if isinstance(tags, str):
        tags = tags.split(",")
    seen: dict[str, str] = {}
    for tag in tags:
        if tag is None:
            continue
        tag = " ".join(str(tag).split())
        if tag and tag.lower() not in seen:
            seen[tag.lower()] = tag
    return list(seen.values())


def tag_recall(tags, text: str) -> float | None:
    """Fraction of the distinct tags found in ``text``; ``None`` when there are no tags."""
    tags = clean_tags(tags)
    if not tags:
        return None
    return sum(tag_found(tag, text) for tag in tags) / len(tags)
