"""CrowS-Pairs (Nangia et al., 2020): minimal pairs, ``sent_more`` the more stereotypical one."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .resources import CROWS_FILE, open_text, resource_path

CROWS_BIAS_TYPES = (
    "race-color", "gender", "socioeconomic", "nationality", "religion", "age",
    "sexual-orientation", "physical-appearance", "disability",
)
# our StereoSet-style names -> CrowS-Pairs names
CROWS_NAMES = {"race": "race-color"}
DIRECTIONS = ("stereo", "antistereo")
_REQUIRED = ("sent_more", "sent_less", "stereo_antistereo", "bias_type")


class CrowsFormatError(ValueError):
    """A CrowS-Pairs CSV that lacks a field or holds a bad value (names file, row and field)."""


@dataclass(frozen=True)
class CrowsPair:
    """One pair; ``direction`` is ``stereo`` or ``antistereo`` (how the pair was written)."""

    sent_more: str
    sent_less: str
    direction: str
    bias_type: str


def crows_bias_type(name: str) -> str:
    """``race`` -> ``race-color``; CrowS-Pairs names pass through.

    Args:
        name: A bias type, ours or CrowS-Pairs'.
    """
    return CROWS_NAMES.get(name, name)


def load_crows(bias_types: Sequence[str] | None = None, path: str | Path | None = None) -> list[CrowsPair]:
    """CrowS-Pairs pairs, in file order.

    Args:
        bias_types: Keep only these, in CrowS names (``race-color``) or ours (``race``); None: all.
        path: A user CSV with the bundled file's columns; None: the bundled file.

    Raises:
        CrowsFormatError: The file is not UTF-8, lacks a column, has no rows or has a malformed row (named by its
            1-based data row).
        ValueError: No row of a wanted bias type.
    """
    source = Path(path) if path is not None else resource_path(CROWS_FILE)
    reader = csv.DictReader(io.StringIO(_read_text(source), newline=""))
    missing = [field for field in _REQUIRED if field not in (reader.fieldnames or [])]
    if missing:
        raise CrowsFormatError(f"{source}: header lacks field(s) {missing}")
    pairs = [_parse_row(row, f"{source}: row {index + 1}") for index, row in enumerate(reader)]
    if not pairs:
        raise CrowsFormatError(f"{source}: no rows")
    if bias_types is not None:
        wanted = [crows_bias_type(b) for b in bias_types]
        unknown = [b for b in wanted if b not in {p.bias_type for p in pairs}]
        if unknown:
            raise ValueError(f"{source}: no CrowS-Pairs rows of bias type {unknown}")
        pairs = [pair for pair in pairs if pair.bias_type in wanted]
    return pairs


def _read_text(source: Path) -> str:
    """The whole text of ``source`` (plain or gzipped).

    Raises:
        CrowsFormatError: It is not UTF-8, naming the file, the line and the byte.
    """
    try:
        with open_text(source) as handle:
            return handle.read()
    except UnicodeDecodeError as error:
        line = error.object[:error.start].count(b"\n") + 1
        raise CrowsFormatError(f"{source}: not UTF-8 text (line {line}, byte {error.start}); save it as UTF-8") \
            from None


def _parse_row(row: dict, where: str) -> CrowsPair:
    """One CSV row (a ``csv.DictReader`` dict) as a :class:`CrowsPair`; ``where`` names file and row in errors.

    Raises:
        CrowsFormatError: More cells than the header has, an empty required field, or a ``stereo_antistereo`` or
            ``bias_type`` value that CrowS-Pairs does not have.
    """
    if None in row:  # csv.DictReader files the cells beyond the header under None
        raise CrowsFormatError(f"{where}: {len(row) - 1 + len(row[None])} cells, but the header has "
                               f"{len(row) - 1} (an unquoted comma?)")
    for field in _REQUIRED:
        if not (row.get(field) or "").strip():
            raise CrowsFormatError(f"{where}: field {field!r} is empty")
    if row["stereo_antistereo"] not in DIRECTIONS:
        raise CrowsFormatError(
            f"{where}: field 'stereo_antistereo' must be one of {DIRECTIONS}, got {row['stereo_antistereo']!r}"
        )
    if row["bias_type"] not in CROWS_BIAS_TYPES:
        raise CrowsFormatError(
            f"{where}: field 'bias_type' must be one of {CROWS_BIAS_TYPES}, got {row['bias_type']!r}"
        )
    return CrowsPair(row["sent_more"], row["sent_less"], row["stereo_antistereo"], row["bias_type"])
