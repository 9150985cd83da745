"""Small neutral texts of our own (see resources/NOTICE.md): one for perplexity, one that guards the joint edit's
strength. They are separate on purpose: the perplexity reported after an edit is on text the edit's calibration
never looked at."""

from __future__ import annotations

from pathlib import Path

from .._io import read_utf8
from .resources import GUARD_TEXT_FILE, NEUTRAL_TEXT_FILE, PRESERVE_TEXT_FILE, resource_path


def split_paragraphs(text: str) -> list[str]:
    """Non-empty paragraphs (separated by blank lines), inner whitespace collapsed."""
    return [" ".join(block.split()) for block in text.split("\n\n") if block.strip()]


def load_paragraphs(path: str | Path) -> list[str]:
    """Paragraphs (separated by blank lines) of a UTF-8 text file.

    Raises:
        ValueError: The file holds no text.
    """
    paragraphs = split_paragraphs(read_utf8(Path(path)))
    if not paragraphs:
        raise ValueError(f"{path}: holds no text")
    return paragraphs


def load_neutral_text(path: str | Path | None = None) -> list[str]:
    """Paragraphs of the bundled neutral text (perplexity is reported on it), or of a user's text file (None: the
    bundled one)."""
    return load_paragraphs(path if path is not None else resource_path(NEUTRAL_TEXT_FILE))


def load_guard_text(path: str | Path | None = None) -> list[str]:
    """Paragraphs of the bundled guard text, or of a user's text file (None: the bundled one).

    The joint edit's scale is bounded by how much it raises this text's perplexity
    (``editor.calibration.calibrate_joint_scale``); it shares no paragraph with the perplexity text, so the
    perplexity reported after an edit stays held out.
    """
    return load_paragraphs(path if path is not None else resource_path(GUARD_TEXT_FILE))


def load_preserve_text(path: str | Path | None = None) -> list[str]:
    """Paragraphs of the bundled preservation text, or of a user's text file (None: the bundled one).

    A joint recipe with ``preserve > 0`` may keep this fluent text's keys where they are
    (``editor.joint.JointRecipe``; ``deployable_adapter(preserve_text=...)``); it shares no paragraph with the
    guard text or the perplexity text, so both stay held out.
    """
    return load_paragraphs(path if path is not None else resource_path(PRESERVE_TEXT_FILE))


BUNDLED = "bundled"
"""How an adapter or report records a bundled text (``--guard-text`` or ``--preserve-text`` not given)."""

UNRELATED = "unrelated"
"""The ``--preserve-text`` value that preserves the edit pairs' unrelated sentences' keys instead of a text."""

UNRELATED_LABEL = "the edit pairs' unrelated sentences"
"""How an adapter or report records preserved keys that are the edit pairs' unrelated sentences'."""


def preserve_text_file(value: str | None) -> str | None:
    """The user's file a ``--preserve-text`` value names; None for the bundled text (None) and for the edit pairs'
    unrelated sentences (:data:`UNRELATED`)."""
    return None if value in (None, UNRELATED) else value


def preserve_text_option(value: str | None) -> list[str] | None:
    """The paragraphs a ``--preserve-text`` value names: the bundled preservation text (None), a user's file, or
    None for the edit pairs' unrelated sentences (:data:`UNRELATED`)."""
    return None if value == UNRELATED else load_preserve_text(preserve_text_file(value))


def preserve_text_label(value: str | None) -> str | None:
    """What a ``--preserve-text`` value is recorded as: :data:`BUNDLED`, the file, or None (:data:`UNRELATED`)."""
    return None if value == UNRELATED else value if value is not None else BUNDLED


NO_GUARD = "none"
"""The ``--guard-text`` value that turns the guard off."""


def guard_text_file(value: str | None) -> str | None:
    """The user's file a ``--guard-text`` value names; None for the bundled text (None) and for no guard
    (:data:`NO_GUARD`)."""
    return None if value in (None, NO_GUARD) else value


def guard_text_label(value: str | None) -> str:
    """What a ``--guard-text`` value is recorded as: :data:`BUNDLED`, :data:`NO_GUARD` or the file."""
    return value if value is not None else BUNDLED


def guard_text_option(value: str | None) -> list[str]:
    """The paragraphs a ``--guard-text`` value names: the bundled guard text (None), none (:data:`NO_GUARD`: no
    bound), or a user's file."""
    return [] if value == NO_GUARD else load_guard_text(guard_text_file(value))
