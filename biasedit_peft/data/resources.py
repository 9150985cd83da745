"""Where the bundled benchmark files live, and how to open them (gzip or plain)."""

from __future__ import annotations

import gzip
import io
from pathlib import Path
from typing import IO

RESOURCES = Path(__file__).parent / "resources"

STEREOSET_FILES = {"dev": "stereoset_dev.json.gz", "test": "stereoset_test.json.gz"}
STEREOSET_SPLITS_FILE = "stereoset_splits.json"
CROWS_FILE = "crows_pairs_anonymized.csv.gz"
ATTRIBUTE_WORDS_FILE = "bias_attribute_words.json"
NEUTRAL_TEXT_FILE = "neutral_text.txt"
GUARD_TEXT_FILE = "guard_text.txt"
PRESERVE_TEXT_FILE = "preserve_text.txt"


def resource_path(name: str) -> Path:
    """Absolute path of a bundled resource; a clear error when the package data is missing."""
    path = RESOURCES / name
    if not path.is_file():
        raise FileNotFoundError(
            f"Bundled data file {path} is missing; reinstall biasedit-peft "
            "(or rebuild the data with `python scripts/bundle_data.py`)."
        )
    return path


def open_text(path: str | Path) -> IO[str]:
    """Open a text file for reading, transparently gunzipping ``*.gz``."""
    path = Path(path)
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")
