"""A small held-out neutral text for perplexity: our own paragraphs (see resources/NOTICE.md)."""

from __future__ import annotations

from pathlib import Path

from .._io import read_utf8
from .resources import NEUTRAL_TEXT_FILE, resource_path


def split_paragraphs(text: str) -> list[str]:
    """Non-empty paragraphs (separated by blank lines), inner whitespace collapsed."""
    return [" ".join(block.split()) for block in text.split("\n\n") if block.strip()]


def load_neutral_text(path: str | Path | None = None) -> list[str]:
    """Paragraphs (separated by blank lines) of the bundled neutral text, or of a user's text file.

    Args:
        path: A UTF-8 text file; None: the bundled neutral text.

    Raises:
        ValueError: The file holds no text.
    """
    source = Path(path) if path is not None else resource_path(NEUTRAL_TEXT_FILE)
    paragraphs = split_paragraphs(read_utf8(source))
    if not paragraphs:
        raise ValueError(f"{source}: no text to compute perplexity on")
    return paragraphs
