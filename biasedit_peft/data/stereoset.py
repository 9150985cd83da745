"""StereoSet intrasentence items: parsing the original schema, noisy-row rule, bundled splits.

An item has one context with a ``BLANK`` and three full sentences. Their roles (stereotype,
anti-stereotype, unrelated) are always taken from each sentence's ``gold_label``, never from the
position in the list nor from a derived file (the BiasEdit paper's released ``gender_test.json`` has
them swapped, see docs/data.md).

Noisy rows (rule ``NOISE_RULES``) are kept, flagged and counted, never dropped silently: the three
full sentences are well formed and labelled in every noisy row of StereoSet, so scoring them is
sound; only the BLANK filler words need the fallback described in :func:`fill_words`.
"""

from __future__ import annotations

import json
import logging
import re
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from .resources import STEREOSET_FILES, STEREOSET_SPLITS_FILE, open_text, resource_path

logger = logging.getLogger(__name__)

ROLES = ("stereotype", "anti-stereotype", "unrelated")
SPLITS = ("train", "dev", "test", "train-fit", "train-calib")

# Noisy-context rules, checked in this order; the first that matches names the row's noise.
NOISE_RULES = {
    "multiple_blanks": "the context holds more than one BLANK (case-insensitive)",
    "glued_blank": "the word holding BLANK is not BLANK between an optional opening quote or bracket "
    "and optional trailing punctuation "
    "(e.g. '.BLANK', 'BLANKed', \"BLANK's\", 'very`BLANK')",
    "unaligned": "the sentences do not equal the context with BLANK replaced (case-insensitive)",
}

_BLANK = re.compile(r"blank", re.IGNORECASE)
_OPENERS = "\"'([{\u201c\u2018"


class StereoSetFormatError(ValueError):
    """A StereoSet file that does not follow the original schema (names file, row and field)."""


@dataclass(frozen=True)
class StereoSetItem:
    """One intrasentence item, roles from ``gold_label``.

    ``stereotype`` / ``anti_stereotype`` / ``unrelated`` are the full sentences;
    ``*_word`` the text that fills BLANK in each. ``noise`` is ``""`` for clean rows, else the
    name of the :data:`NOISE_RULES` rule that flagged the row.
    """

    id: str
    target: str
    bias_type: str
    context: str
    stereotype: str
    anti_stereotype: str
    unrelated: str
    stereotype_word: str
    anti_stereotype_word: str
    unrelated_word: str
    noise: str = ""

    def sentence(self, role: str) -> str:
        """The full sentence of ``role`` (``"stereotype"``, ``"anti-stereotype"``, ``"unrelated"``)."""
        return {"stereotype": self.stereotype, "anti-stereotype": self.anti_stereotype,
                "unrelated": self.unrelated}[role]


@dataclass(frozen=True)
class NoiseReport:
    """How many rows were flagged noisy, by rule, and which ids (they are kept, not dropped)."""

    count: int
    by_rule: dict[str, int]
    ids: tuple[str, ...]

    def summary(self) -> str:
        if not self.count:
            return "no noisy StereoSet rows"
        rules = ", ".join(f"{rule}: {n}" for rule, n in sorted(self.by_rule.items()))
        return f"{self.count} noisy StereoSet rows kept and flagged ({rules}); rules in docs/data.md"


def noise_report(items: Iterable[StereoSetItem]) -> NoiseReport:
    """How many of ``items`` are flagged noisy, per rule, and their ids.

    Args:
        items: StereoSet items (``item.noise`` names the broken rule, ``""`` when none).
    """
    noisy = [item for item in items if item.noise]
    return NoiseReport(len(noisy), dict(Counter(item.noise for item in noisy)), tuple(i.id for i in noisy))


def context_noise(context: str) -> str:
    """The name of the first context rule in :data:`NOISE_RULES` that ``context`` breaks, or ``""``."""
    if len(_BLANK.findall(context)) > 1:
        return "multiple_blanks"
    words = [word for word in context.split() if "BLANK" in word]
    if len(words) != 1 or words[0].lstrip(_OPENERS).rstrip(string.punctuation) != "BLANK":
        return "glued_blank"
    return ""


def _aligned_fill(context: str, sentence: str) -> str | None:
    """The text replacing the first BLANK, if ``sentence`` is ``context`` with its BLANKs filled.

    Case-insensitive (StereoSet lower-cases most sentences); each BLANK matches a non-empty span.
    """
    pieces = [re.escape(piece) for piece in _BLANK.split(context)]
    match = re.fullmatch("(.+?)".join(pieces), sentence, re.IGNORECASE | re.DOTALL)
    return match.group(1) if match else None


def _diff_fill(sentences: Sequence[str]) -> list[str]:
    """Fill words by word-level diff: drop the words all sentences share at both ends."""
    split = [s.split() for s in sentences]
    shortest = min(len(words) for words in split)
    head = 0
    while head < shortest and len({words[head].lower() for words in split}) == 1:
        head += 1
    tail = 0
    while tail < shortest - head and len({words[-1 - tail].lower() for words in split}) == 1:
        tail += 1
    return [" ".join(words[head: len(words) - tail]).strip(string.punctuation) for words in split]


def fill_words(context: str, sentences: Sequence[str]) -> tuple[list[str], bool]:
    """The BLANK fillers of ``sentences`` and whether they aligned with the context.

    Clean rows: the sentence minus the context's text around BLANK (case-insensitive). When that
    fails (noisy rows), the word-level difference between the three sentences.
    """
    if _BLANK.search(context):
        aligned = [_aligned_fill(context, s) for s in sentences]
        if all(word is not None and word.strip() for word in aligned):
            return [word.strip() for word in aligned], True
    return _diff_fill(sentences), False


def _require(row: Any, field: str, kind: type, where: str) -> Any:
    if not isinstance(row, dict):
        raise StereoSetFormatError(f"{where}: expected an object with field {field!r}, got {type(row).__name__}")
    if field not in row:
        raise StereoSetFormatError(f"{where}: missing field {field!r}")
    value = row[field]
    if not isinstance(value, kind):
        raise StereoSetFormatError(
            f"{where}: field {field!r} must be {kind.__name__}, got {type(value).__name__}"
        )
    return value


def parse_item(row: dict, where: str) -> StereoSetItem:
    """One original-schema row to a :class:`StereoSetItem`; ``where`` names file and row in errors.

    Raises:
        StereoSetFormatError: A missing or mistyped field, an empty ``bias_type`` or sentence, a ``gold_label`` that
            is unknown, repeated or missing, or a stereotype sentence equal to its anti-stereotype sentence.
    """
    item_id = _require(row, "id", str, where)
    target = _require(row, "target", str, where)
    bias_type = _require(row, "bias_type", str, where)
    if not bias_type.strip():
        raise StereoSetFormatError(f"{where}: field 'bias_type' is empty")
    context = _require(row, "context", str, where)
    sentence_rows = _require(row, "sentences", list, where)
    by_role: dict[str, str] = {}
    for index, sentence_row in enumerate(sentence_rows):
        at = f"{where}, sentences[{index}]"
        label = _require(sentence_row, "gold_label", str, at)
        text = _require(sentence_row, "sentence", str, at)
        if label not in ROLES:
            raise StereoSetFormatError(f"{at}: field 'gold_label' must be one of {ROLES}, got {label!r}")
        if label in by_role:
            raise StereoSetFormatError(f"{at}: field 'gold_label' repeats {label!r}")
        if not text.strip():
            raise StereoSetFormatError(f"{at}: field 'sentence' is empty")
        by_role[label] = text
    missing = [role for role in ROLES if role not in by_role]
    if missing:
        raise StereoSetFormatError(f"{where}: field 'sentences' lacks gold_label {missing}")
    sentences = [by_role[role] for role in ROLES]
    if sentences[0].strip() == sentences[1].strip():
        raise StereoSetFormatError(f"{where}: field 'sentences': the stereotype and anti-stereotype sentences are the "
                                   f"same ({sentences[0]!r}), so the pair measures nothing")
    words, aligned = fill_words(context, sentences)
    noise = context_noise(context) or ("" if aligned else "unaligned")
    return StereoSetItem(
        id=item_id, target=target, bias_type=bias_type, context=context,
        stereotype=sentences[0], anti_stereotype=sentences[1], unrelated=sentences[2],
        stereotype_word=words[0], anti_stereotype_word=words[1], unrelated_word=words[2],
        noise=noise,
    )


def _select(items: list[StereoSetItem], bias_types: Sequence[str] | None, noisy: str, source: str):
    if noisy not in ("keep", "drop"):
        raise ValueError(f"noisy must be 'keep' or 'drop', got {noisy!r}")
    if bias_types is not None:
        wanted = list(bias_types)
        known = {item.bias_type for item in items}
        unknown = [b for b in wanted if b not in known]
        if unknown:
            raise ValueError(f"{source}: no items of bias type {unknown}; available: {sorted(known)}")
        items = [item for item in items if item.bias_type in wanted]
    report = noise_report(items)
    if report.count:
        logger.info("%s: %s", source, report.summary())
    if noisy == "drop":
        items = [item for item in items if not item.noise]
    return items


def read_stereoset_rows(path: str | Path) -> list[dict]:
    """The raw intrasentence rows of an original-schema StereoSet file (``.json`` or ``.json.gz``)."""
    path = Path(path)
    try:
        with open_text(path) as handle:
            document = json.load(handle)
    except json.JSONDecodeError as error:
        raise StereoSetFormatError(f"{path}: not valid JSON ({error})") from None
    except UnicodeDecodeError as error:
        raise StereoSetFormatError(f"{path}: not UTF-8 text (byte {error.start}); save it as UTF-8") from None
    if isinstance(document, dict) and "data" in document:
        data = document["data"]
        if not isinstance(data, dict) or not isinstance(data.get("intrasentence"), list):
            raise StereoSetFormatError(f"{path}: field 'data.intrasentence' must be a list")
        rows = data["intrasentence"]
    elif isinstance(document, list):  # a bare list of intrasentence rows is accepted too
        rows = document
    else:
        raise StereoSetFormatError(f"{path}: expected {{'data': {{'intrasentence': [...]}}}} or a list of rows")
    if not rows:
        raise StereoSetFormatError(f"{path}: no intrasentence items")
    return rows


def parse_rows(rows: Sequence[dict], path: str | Path) -> list[StereoSetItem]:
    """Every row of file ``path`` as a :class:`StereoSetItem` (:func:`parse_item`); errors name the file and the
    1-based row.

    Raises:
        StereoSetFormatError: A malformed row, or an ``id`` that an earlier row already has.
    """
    items: list[StereoSetItem] = []
    first_row: dict[str, int] = {}
    for number, row in enumerate(rows, 1):
        item = parse_item(row, f"{path}: row {number}")
        if item.id in first_row:
            raise StereoSetFormatError(f"{path}: row {number}: field 'id' repeats {item.id!r} (row "
                                       f"{first_row[item.id]})")
        first_row[item.id] = number
        items.append(item)
    return items


def load_stereoset_file(
    path: str | Path, bias_types: Sequence[str] | None = None, noisy: str = "keep"
) -> list[StereoSetItem]:
    """Items of a user StereoSet file in the original schema.

    Noisy rows are kept and flagged (``item.noise``) unless ``noisy="drop"``; either way their
    count is logged and :func:`noise_report` summarises them.

    Args:
        path: A StereoSet JSON file (``data.intrasentence`` rows), plain or gzipped.
        bias_types: Keep only these; None: all.
        noisy: ``"keep"`` or ``"drop"`` the rows that break a rule of :data:`NOISE_RULES`.

    Raises:
        StereoSetFormatError: A malformed file (no items, a bad row, a repeated id), naming the file, the 1-based
            row and the field.
        ValueError: An unknown bias type, or nothing left once noisy rows are dropped.
    """
    items = _select(parse_rows(read_stereoset_rows(path), path), bias_types, noisy, str(path))
    if not items:
        raise ValueError(f"{path}: no intrasentence items left once the noisy rows are dropped")
    return items


def _bundled(file_key: str) -> list[StereoSetItem]:
    path = resource_path(STEREOSET_FILES[file_key])
    return parse_rows(read_stereoset_rows(path), path)


def load_split_ids() -> dict[str, list[str]]:
    """The bundled ``{"train": [ids], "dev": [ids]}`` split of StereoSet's test file."""
    with open_text(resource_path(STEREOSET_SPLITS_FILE)) as handle:
        document = json.load(handle)
    return {"train": document["train"], "dev": document["dev"]}


def load_stereoset(
    split: str = "test", bias_types: Sequence[str] | None = None, noisy: str = "keep"
) -> list[StereoSetItem]:
    """Bundled StereoSet intrasentence items of ``split``.

    - ``"test"``: StereoSet's public dev file: gender / race / religion (255 / 962 / 79) as in the
      BiasEdit paper, plus profession (810) as an extra held-out type.
    - ``"train"`` / ``"dev"``: the bundled, seeded 8:1 split of StereoSet's test file
      (gender / race / religion only), grouped by target term and stratified by bias type.
    - ``"train-fit"`` / ``"train-calib"``: ``train`` carved 8:1 again the same way
      (:func:`~biasedit_peft.data.splits.split_calibration`): meta-train on ``train-fit`` and calibrate the edit
      scale on ``dev`` plus ``train-calib``, target terms the editor never saw.

    Args:
        split: One of :data:`SPLITS`.
        bias_types: Keep only these; None: all of the split.
        noisy: ``"keep"`` (default) or ``"drop"`` the rows flagged by :data:`NOISE_RULES`.

    Raises:
        ValueError: An unknown split or bias type.
    """
    if split == "test":
        items = _bundled("dev")
    elif split in ("train", "dev"):
        wanted = set(load_split_ids()[split])
        items = [item for item in _bundled("test") if item.id in wanted]
    elif split in ("train-fit", "train-calib"):
        from .splits import split_calibration  # splits.py imports this module

        train = load_stereoset("train")
        wanted = set(split_calibration(train)[split])
        items = [item for item in train if item.id in wanted]
    else:
        raise ValueError(f"Unknown StereoSet split {split!r}; choose one of {SPLITS}")
    return _select(items, bias_types, noisy, f"StereoSet {split}")
