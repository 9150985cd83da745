"""StereoSet items as tracing prompts: the token pair, the target term's tokens, the shared prefix.

An item's stereotype and anti-stereotype sentences differ only in the words filling BLANK. Tokenised as
``BOS + sentence`` (exactly as :func:`~biasedit_peft.scoring.encode_sentences` does), they share a prefix
of ``prefix_len`` tokens. ``log p(anti) - log p(stereo)`` only depends on the tokens after it (the prefix
terms cancel), and every state at a prefix position is the same in both sentences, so a state "at
position t" is well defined for the pair. Tracing corrupts the target term, so the term must lie in
that prefix: items whose term comes after BLANK ("The BLANK schoolgirl ...") cannot be traced this way
(their bias shows in ``p(term | attribute)``, which noise on the term's own input cannot change) and are
skipped with a reason.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ..data.stereoset import StereoSetItem
from ..scoring import encode_sentences

POSITIONS = ("subject", "last_subject", "later", "last")
"""Position groups of the grid: target-term tokens before its last one, the term's last token, the tokens
between it and the last one, and the last token of the shared prefix (the one predicting the BLANK)."""

SKIP_REASONS = {
    "target_not_found": "the target term does not occur in the sentence (case-insensitive)",
    "target_after_blank": "the target term is not inside the prefix the two sentences share",
    "no_difference": "the stereotype and anti-stereotype sentences tokenise identically",
}


class UntraceableItem(ValueError):
    """An item that cannot be traced; ``reason`` is a key of :data:`SKIP_REASONS`."""

    def __init__(self, reason: str, item_id: str):
        super().__init__(f"item {item_id}: {SKIP_REASONS[reason]}")
        self.reason = reason


@dataclass(frozen=True)
class TracePrompt:
    """One item ready to trace.

    ``input_ids`` / ``attention_mask`` [2, T] long: ``BOS + stereotype`` (row 0) and ``BOS + anti-stereotype``
    (row 1), right-padded. Target-term tokens are positions ``[subject_start, subject_end)``; the rows agree
    on positions ``[0, prefix_len)`` and ``subject_end <= prefix_len``.
    """

    item_id: str
    target: str
    input_ids: Tensor
    attention_mask: Tensor
    subject_start: int
    subject_end: int
    prefix_len: int
    tokens: tuple[str, ...]
    """The text of the traced tokens, positions ``subject_start .. prefix_len - 1``."""

    @property
    def positions(self) -> Tensor:
        """Traced positions [P] long: first target token to the last prefix token (earlier states are clean)."""
        return torch.arange(self.subject_start, self.prefix_len)

    def position_groups(self) -> Tensor:
        """[P, 4] bool: which of :data:`POSITIONS` each traced position belongs to.

        Groups are disjoint except that the term's last token can also be the last token.
        """
        t = self.positions
        last_subject, last = self.subject_end - 1, self.prefix_len - 1
        return torch.stack([t < last_subject, t == last_subject, (t > last_subject) & (t < last), t == last], -1)


def _subject_span(tokenizer, sentence: str, target: str, item_id: str) -> tuple[int, int]:
    """Token positions ``[start, end)`` (BOS = position 0) of the words holding the first occurrence of ``target``."""
    begin = sentence.lower().find(target.lower())
    if begin < 0:
        raise UntraceableItem("target_not_found", item_id)
    end = begin + len(target)
    while begin > 0 and sentence[begin - 1].isalnum():  # the whole word: "Schoolgirls" for "schoolgirl"
        begin -= 1
    while end < len(sentence) and sentence[end].isalnum():
        end += 1
    try:
        encoded = tokenizer(sentence, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise ValueError("Bias tracing needs a fast tokenizer (one that returns offset mappings)") from None
    offsets = encoded["offset_mapping"]
    if encoded["input_ids"] and encoded["input_ids"][0] == tokenizer.bos_token_id and offsets[0] == (0, 0):
        offsets = offsets[1:]  # encode_sentences drops a BOS the tokenizer adds by itself
    hits = [i for i, (lo, hi) in enumerate(offsets) if lo < end and hi > begin]
    if not hits:
        raise UntraceableItem("target_not_found", item_id)
    return hits[0] + 1, hits[-1] + 2


def prepare_prompt(tokenizer, item: StereoSetItem) -> TracePrompt:
    """The :class:`TracePrompt` of ``item``.

    Args:
        tokenizer: The traced model's tokenizer.
        item: A StereoSet item whose target term comes before the blank.

    Raises:
        UntraceableItem: The item cannot be traced (its ``reason`` is one of :data:`SKIP_REASONS`).
    """
    batch = encode_sentences(tokenizer, [item.stereotype, item.anti_stereotype])
    stereo, anti = batch.input_ids[0], batch.input_ids[1]
    length = int(batch.attention_mask.sum(-1).min())
    differs = (stereo[:length] != anti[:length]).nonzero()
    if len(differs) == 0 and batch.attention_mask[0].sum() == batch.attention_mask[1].sum():
        raise UntraceableItem("no_difference", item.id)
    prefix_len = int(differs[0]) if len(differs) else length
    start, end = _subject_span(tokenizer, item.stereotype, item.target, item.id)
    if end > prefix_len:
        raise UntraceableItem("target_after_blank", item.id)
    tokens = tuple(tokenizer.decode([int(i)]) for i in stereo[start:prefix_len])
    return TracePrompt(item.id, item.target, batch.input_ids, batch.attention_mask, start, end, prefix_len, tokens)


def prepare_prompts(tokenizer, items: Sequence[StereoSetItem]) -> tuple[list[TracePrompt], dict[str, int]]:
    """Prompts of the traceable ``items`` (in order) and the number skipped per reason.

    Args:
        tokenizer: The traced model's tokenizer.
        items: StereoSet items.
    """
    prompts, skipped = [], Counter()
    for item in items:
        try:
            prompts.append(prepare_prompt(tokenizer, item))
        except UntraceableItem as error:
            skipped[error.reason] += 1
    return prompts, dict(skipped)
