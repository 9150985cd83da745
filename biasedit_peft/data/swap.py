"""The gender-reversed robustness set: every gendered word swapped with its counterpart.

Word pairs come from the bundled ``bias_attribute_words.json`` (bias-bench). Where a word has
several counterparts (``lady`` -> ``gentleman`` / ``lord``), the first pair in the file wins,
except ``her``: ``his`` when a word follows it (possessive, the common case), else ``him``. Words
outside the lists (e.g. ``schoolgirl``) stay as they are. Labels keep their original role: the swapped
``stereotype`` sentence is the original stereotypical sentence with the genders reversed (e.g. "The mother
was caring" ->
"The father was caring"). A debiased model should stay near SS 50 on it too (BiasEdit, Sec. 5).
"""

from __future__ import annotations

import dataclasses
import json
import re
from functools import lru_cache
from typing import Iterable

from .resources import ATTRIBUTE_WORDS_FILE, resource_path
from .stereoset import StereoSetItem

SWAPPED_SUFFIX = ":gender-swapped"


@lru_cache(maxsize=None)
def load_bias_attribute_words() -> dict[str, list[list[str]]]:
    """``{"gender": [[male, female], ...], "race": [[...3]], "religion": [[...3]]}``."""
    with open(resource_path(ATTRIBUTE_WORDS_FILE), encoding="utf-8") as handle:
        return json.load(handle)


@lru_cache(maxsize=None)
def gender_swap_table() -> dict[str, str]:
    """Lower-case word -> its opposite-gender word, both directions, first pair wins."""
    table: dict[str, str] = {}
    for male, female in load_bias_attribute_words()["gender"]:
        table.setdefault(male, female)
        table.setdefault(female, male)
    return table


@lru_cache(maxsize=None)
def _swap_pattern() -> re.Pattern:
    words = sorted(gender_swap_table(), key=len, reverse=True)  # longest first: "mr." before "mr"
    return re.compile(r"(?<![\w'])(" + "|".join(map(re.escape, words)) + r")(?!\w)", re.IGNORECASE)


def _match_case(source: str, word: str) -> str:
    if source.isupper() and len(source) > 1:
        return word.upper()
    if source[0].isupper():
        return word[0].upper() + word[1:]
    return word


def _counterpart(match: re.Match) -> str:
    word = match.group(0)
    if word.lower() == "her":
        followed_by_word = re.match(r"\s+[A-Za-z]", match.string[match.end():]) is not None
        return _match_case(word, "his" if followed_by_word else "him")
    return _match_case(word, gender_swap_table()[word.lower()])


def swap_gender(text: str) -> str:
    """``text`` with each gendered word replaced by its counterpart, case kept.

    Args:
        text: Any English text.
    """
    return _swap_pattern().sub(_counterpart, text)


def gender_swapped(items: Iterable[StereoSetItem]) -> list[StereoSetItem]:
    """Gender-reversed copies of the gender items (others are skipped); ids get ``:gender-swapped``.

    Every text field is swapped (target, context, sentences, filler words); roles are kept.

    Args:
        items: StereoSet items of any bias types.
    """
    text_fields = ("target", "context", "stereotype", "anti_stereotype", "unrelated",
                   "stereotype_word", "anti_stereotype_word", "unrelated_word")
    return [
        dataclasses.replace(
            item, id=item.id + SWAPPED_SUFFIX,
            **{field: swap_gender(getattr(item, field)) for field in text_fields},
        )
        for item in items
        if item.bias_type == "gender"
    ]
