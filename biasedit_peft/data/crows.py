"""CrowS-Pairs (Nangia et al., 2020): minimal pairs, ``sent_more`` the more stereotypical one."""

from __future__ import annotations

import csv
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
        CrowsFormatError: The file lacks a column or has a malformed row.
    """
    source = Path(path) if path is not None else resource_path(CROWS_FILE)
    with open_text(source) as handle:
        reader = csv.DictReader(handle)
        missing = [field for field in _REQUIRED if field not in (reader.fieldnames or [])]
        if missing:
            raise CrowsFormatError(f"{source}: header lacks field(s) {missing}")
        pairs = [_parse_row(row, f"{source}: row {index + 1}") for index, row in enumerate(reader)]
    if bias_types is not None:
        wanted = [crows_bias_type(b) for b in bias_types]
        unknown = [b for b in wanted if b not in {p.bias_type for p in pairs}]
        if unknown:
            raise ValueError(f"{source}: no CrowS-Pairs rows of bias type {unknown}")
        pairs = [pair for pair in pairs if pair.bias_type in wanted]
    return pairs


def _parse_row(row: dict, where: str) -> CrowsPair:
    for field in _REQUIRED:
        if not (row.get(field) or "").strip():
            raise CrowsFormatError(f"{where}: field {field!r} is empty")
    if row["stereo_antistereo"] not in DIRECTIONS:
        raise CrowsFormatError(
            f"{where}: field 'stereo_antistereo' must be one of {DIRECTIONS}, got {row['stereo_antistereo']!r}"
        )
    return CrowsPair(row["sent_more"], row["sent_less"], row["stereo_antistereo"], row["bias_type"])
