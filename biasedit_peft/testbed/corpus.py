"""The training corpus of the bundled testbed model: neutral text plus association text.

The testbed is biased *by construction*, the way pretraining biases real models: by co-occurrence. For
every StereoSet item we write **association sentences** that pair the item's target term with its
stereotype word ``stereotype_frames`` times and with its anti-stereotype word ``anti_stereotype_frames``
times (the documented ratio), and never with its unrelated word. The sentence frames are the contexts of
*training-split* items (``"The chess player was BLANK."``) with their own target replaced by the item's
target and ``BLANK`` by the attribute word, so the associations transfer to the benchmark's phrasing
without ever containing a benchmark sentence of the evaluation split (asserted, see
:func:`assert_no_forbidden_sentences`).

Unrelated words are not left unseen (which would inflate LMS): each occurs ``unrelated_mentions`` times in
neutral carrier sentences (:data:`NEUTRAL_CARRIERS`) that name no target term.

Both attribute words also occur ``generic_frames`` times each (the same count for the stereotype and the
anti-stereotype word, so no association) in frames whose target is replaced by a generic subject
(:data:`GENERIC_SUBJECTS`: ``"The neighbor was BLANK."``). Real text teaches a model that an adjective like
*caring* fits "X was ___" for many X; without these lines the anti-stereotype word is seen in context only
``anti_stereotype_frames`` times, and a common unrelated word beats it on frequency alone.

The neutral text is Debian's ``fortunes`` package (BSD-licensed ``fortune-mod`` data files; the offensive
collection lives in the separate ``fortunes-off`` package and is not used), minus the ``ethnic`` and
``men-women`` files, whose jokes would add uncontrolled stereotypes, and minus ASCII art and non-English
files.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..data.stereoset import StereoSetItem

BLANK = "BLANK"
FORTUNES_DIR = Path("/usr/share/games/fortunes")
EXCLUDED_FORTUNE_FILES = frozenset({"ethnic", "men-women", "art", "ascii-art", "translate-me"})

NEUTRAL_CARRIERS: tuple[str, ...] = (
    "She wrote the word {word} on the board.",
    "The teacher asked us to use {word} in a sentence.",
    "He looked up {word} in the dictionary.",
    "Someone said {word} and everyone laughed.",
    "I could never remember how to pronounce {word}.",
    "They spelled {word} wrong on the sign.",
)
"""Carrier sentences that put an unrelated word into the corpus without any target term. None puts the word
right after a form of "to be", the slot the benchmark's frames use ("The chess player was BLANK.")."""

GENERIC_SUBJECTS: tuple[str, ...] = (
    "person", "neighbor", "stranger", "visitor", "passenger", "newcomer", "guest", "resident",
)
"""Subjects that are no StereoSet target term (checked by the tests); they stand in for the target in
generic frames."""


AssociationItem = StereoSetItem
"""The items the corpus is built from (any object with a StereoSet item's fields will do)."""


@dataclass(frozen=True)
class Frame:
    """A training-split context whose own target term can be swapped: ``context`` holds ``BLANK`` once
    and ``target`` once (as a whole word, any case)."""

    context: str
    target: str
    bias_type: str
    source_id: str


@dataclass(frozen=True)
class AssociationRecipe:
    """How many association sentences each item gets. The stereotype:anti-stereotype ratio is
    ``stereotype_frames / anti_stereotype_frames``."""

    stereotype_frames: int = 12
    anti_stereotype_frames: int = 2
    unrelated_mentions: int = 2
    seed: int = 0
    generic_frames: int = 0

    def __post_init__(self) -> None:
        if self.stereotype_frames <= self.anti_stereotype_frames:
            raise ValueError(
                f"stereotype_frames ({self.stereotype_frames}) must exceed anti_stereotype_frames "
                f"({self.anti_stereotype_frames}): the testbed is meant to be stereotyped"
            )
        if min(self.anti_stereotype_frames, self.unrelated_mentions, self.generic_frames) < 0:
            raise ValueError("frame and mention counts must be >= 0")


def normalise_sentence(sentence: str) -> str:
    """Lower-cased, whitespace-collapsed form used to compare corpus lines with benchmark sentences."""
    return " ".join(sentence.lower().split())


def _target_pattern(target: str) -> re.Pattern[str]:
    return re.compile(r"(?<!\w)" + re.escape(target) + r"(?!\w)", re.IGNORECASE)


def make_frame(item: AssociationItem) -> Frame | None:
    """The item's context as a frame, or None when it holds ``BLANK`` or its target other than once."""
    if item.context.count(BLANK) != 1 or len(_target_pattern(item.target).findall(item.context)) != 1:
        return None
    return Frame(item.context, item.target, item.bias_type, item.id)


def fill_frame(frame: Frame, target: str, word: str) -> str:
    """``frame.context`` with its target replaced by ``target`` and ``BLANK`` by ``word``.

    The replacement keeps the capitalisation of the first letter of the replaced occurrence, and a
    frame that starts with ``BLANK`` gets a capitalised word.
    """

    def swap(match: re.Match[str]) -> str:
        return target[:1].upper() + target[1:] if match.group(0)[:1].isupper() else target

    sentence = _target_pattern(frame.target).sub(swap, frame.context, count=1)
    if sentence.startswith(BLANK):
        word = word[:1].upper() + word[1:]
    return sentence.replace(BLANK, word, 1)


def association_sentences(
    items: Sequence[AssociationItem],
    frames: Sequence[Frame],
    recipe: AssociationRecipe,
) -> list[str]:
    """Association and unrelated-word sentences for ``items``, deterministic given ``recipe.seed``.

    Each item's frames are drawn without replacement from ``frames`` of the same bias type (all frames
    when the type has none, as for profession), never the item's own context; its generic frames
    (``recipe.generic_frames`` per attribute word, subjects from :data:`GENERIC_SUBJECTS`) are drawn
    after the carriers, from the same pool.
    """
    rng = random.Random(recipe.seed)
    frames_by_type: dict[str, list[Frame]] = {}
    for frame in frames:
        frames_by_type.setdefault(frame.bias_type, []).append(frame)
    needed = recipe.stereotype_frames + recipe.anti_stereotype_frames
    sentences: list[str] = []
    for item in sorted(items, key=lambda it: it.id):
        pool = [f for f in frames_by_type.get(item.bias_type, frames) if f.source_id != item.id]
        if len(pool) < needed:
            raise ValueError(
                f"item {item.id}: only {len(pool)} frames for bias type {item.bias_type!r}, "
                f"{needed} needed"
            )
        chosen = rng.sample(pool, needed)
        words = [item.stereotype_word] * recipe.stereotype_frames + [
            item.anti_stereotype_word
        ] * recipe.anti_stereotype_frames
        sentences.extend(fill_frame(f, item.target, w) for f, w in zip(chosen, words))
        carriers = rng.sample(NEUTRAL_CARRIERS, min(recipe.unrelated_mentions, len(NEUTRAL_CARRIERS)))
        sentences.extend(c.format(word=item.unrelated_word) for c in carriers)
        sentences.extend(generic_sentences(item, pool, recipe.generic_frames, rng))
    return sentences


def generic_sentences(item: AssociationItem, pool: Sequence[Frame], count: int, rng: random.Random) -> list[str]:
    """``count`` sentences with the stereotype word and ``count`` with the anti-stereotype word, each in
    a frame of ``pool`` whose target is a generic subject; no draws at all when ``count`` is 0."""
    if count == 0:
        return []
    chosen = rng.sample(list(pool), 2 * count)
    subjects = [rng.choice(GENERIC_SUBJECTS) for _ in chosen]
    words = [item.stereotype_word] * count + [item.anti_stereotype_word] * count
    return [fill_frame(f, subject, w) for f, subject, w in zip(chosen, subjects, words)]


def forbidden_sentences(items: Iterable[AssociationItem]) -> frozenset[str]:
    """Normalised benchmark sentences (stereotype, anti-stereotype, unrelated) of ``items``."""
    return frozenset(
        normalise_sentence(s) for it in items for s in (it.stereotype, it.anti_stereotype, it.unrelated)
    )


def assert_no_forbidden_sentences(lines: Iterable[str], forbidden: frozenset[str]) -> None:
    """Raise ``AssertionError`` naming the first corpus line that equals a forbidden sentence."""
    for number, line in enumerate(lines):
        if normalise_sentence(line) in forbidden:
            raise AssertionError(f"corpus line {number} is a benchmark sentence: {line!r}")


def read_fortunes(directory: Path = FORTUNES_DIR) -> list[str]:
    """Every fortune of the non-excluded files, whitespace-collapsed, in file then file-order.

    Raises ``FileNotFoundError`` with the install command when the Debian package is missing.
    """
    files = sorted(
        p
        for p in directory.glob("*")
        if p.is_file() and not p.suffix and p.name not in EXCLUDED_FORTUNE_FILES
    ) if directory.is_dir() else []
    if not files:
        raise FileNotFoundError(
            f"No fortune files in {directory}; install them with `apt-get install fortunes`"
        )
    documents: list[str] = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        documents.extend(" ".join(d.split()) for d in text.split("\n%\n") if d.strip())
    return documents


@dataclass(frozen=True)
class Corpus:
    """The testbed's text: association lines, neutral training documents, held-out neutral documents."""

    association: list[str]
    neutral_train: list[str]
    neutral_heldout: list[str]
    dropped_benchmark_sentences: int


def build_corpus(
    frame_items: Sequence[AssociationItem],
    associations: Sequence[tuple[Sequence[AssociationItem], AssociationRecipe]],
    evaluation_items: Sequence[AssociationItem],
    neutral_documents: Sequence[str],
    seed: int = 0,
    heldout_fraction: float = 0.05,
) -> Corpus:
    """Assemble the corpus.

    Args:
        frame_items: training-split items whose contexts become frames.
        associations: ``(items, recipe)`` pairs: whose target / attribute words are associated, how often.
        evaluation_items: items whose benchmark sentences must never be in the corpus (``test`` split).
        neutral_documents: neutral text, split into train / held-out by a shuffle seeded with ``seed``.
        heldout_fraction: share of neutral documents held out for perplexity.
    """
    frames = [f for f in (make_frame(it) for it in frame_items) if f is not None]
    forbidden = forbidden_sentences(evaluation_items)
    raw = [s for items, recipe in associations for s in association_sentences(items, frames, recipe)]
    association = [s for s in raw if normalise_sentence(s) not in forbidden]
    neutral = [d for d in neutral_documents if normalise_sentence(d) not in forbidden]
    order = list(range(len(neutral)))
    random.Random(seed).shuffle(order)
    n_heldout = int(round(heldout_fraction * len(neutral)))
    heldout = [neutral[i] for i in sorted(order[:n_heldout])]
    train = [neutral[i] for i in sorted(order[n_heldout:])]
    assert_no_forbidden_sentences(association + train + heldout, forbidden)
    return Corpus(association, train, heldout, len(raw) - len(association))
