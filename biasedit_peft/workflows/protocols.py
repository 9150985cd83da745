"""How a trained editor's debiasing is measured on StereoSet: the paper's per-batch protocol and a held-out one.

``per_batch`` (BiasEdit, Xu et al. 2025, Sec. 4): the items of each bias type are edited ``edit_batch_size``
at a time; each batch's edit is applied (functionally), that batch is scored, and the edit is undone. The
edit is therefore computed from the very items it is scored on.

``held_out`` (not in the paper): the target terms of each bias type are split in two halves (seeded); one
joint delta is computed from the items of the *edit* half and the items of the other half are scored with
it. No scored item, sentence or target term was seen by the edit, so it measures generalisation.

``joint`` (:func:`joint_protocol`): one joint delta from some items, scored on others (or the same ones).
``held_out`` is ``joint`` on a target split; the demo also runs it with the test items on both sides. The
protocol a deployment gets (the delta from ``train``, calibrated on ``dev``, merged, scored on ``test``) is in
``deployment.py``.

Both return StereoSet results in the schema of ``biasedit evaluate`` (``evaluation.stereoset_results``)
for the same items before and after, and never change the model or its adapter.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.stereoset import StereoSetItem
from ..evaluation import STEREOSET_ROLES, score_stereoset_items, stereoset_results
from ..metrics import N_RESAMPLES
from ..scoring import SentenceLogProbs, concat_scores, inverse_permutation


@dataclass(frozen=True)
class TargetSplit:
    """Target terms of a held-out split: the edit half and the scored half, per bias type."""

    edit: dict[str, list[str]]
    scored: dict[str, list[str]]

    def sides(self, items: Sequence[StereoSetItem]) -> tuple[list[int], list[int]]:
        """Indices of the ``items`` whose target term is in the edit half, and of those in the scored half."""
        edit = [i for i, item in enumerate(items) if item.target in self.edit[item.bias_type]]
        scored = [i for i, item in enumerate(items) if item.target in self.scored[item.bias_type]]
        return edit, scored


def _reorder(pieces: Sequence[dict[str, SentenceLogProbs]], order: torch.Tensor) -> dict[str, SentenceLogProbs]:
    """Concatenate per-batch role scores and put them back in item order (``order[k]`` = item of row ``k``)."""
    inverse = inverse_permutation(order)
    return {role: concat_scores([p[role] for p in pieces])[inverse] for role in STEREOSET_ROLES}


def edit_batches(items: Sequence[StereoSetItem], edit_batch_size: int) -> list[list[int]]:
    """Indices of ``items`` in edit batches: per bias type (in order of appearance), ``edit_batch_size`` each."""
    if edit_batch_size < 1:
        raise ValueError(f"edit_batch_size must be positive, got {edit_batch_size}")
    by_type: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        by_type.setdefault(item.bias_type, []).append(index)
    return [indices[start:start + edit_batch_size] for indices in by_type.values()
            for start in range(0, len(indices), edit_batch_size)]


def per_batch_protocol(
    editor, peft_model: nn.Module, tokenizer, items: Sequence[StereoSetItem], edit_batch_size: int = 32,
    batch_size: int = 32, mode: str = "reference", adapter_name: str = "default",
    n_resamples: int = N_RESAMPLES, seed: int = 0, progress: bool = True,
    unedited: dict[str, SentenceLogProbs] | None = None, keep_scores: bool = False,
) -> dict:
    """The paper's protocol: edit each batch, score it, undo.

    Args:
        editor: A trained editor.
        peft_model: Its model (left unchanged).
        tokenizer: The model's tokenizer.
        items: StereoSet items; batches are formed per bias type.
        edit_batch_size: Items per edit.
        batch_size: Sentences per scoring forward pass.
        mode: The SS unit of ``before`` / ``after`` (``"reference"`` or ``"paper"``).
        adapter_name: The adapter the edits are applied to (functionally).
        n_resamples: Bootstrap resamples for the CIs.
        seed: Bootstrap seed.
        progress: Show a progress bar.
        unedited: The role scores of ``items`` under the model as it is (``score_stereoset_items``), when the
            caller already has them; computed otherwise.
        keep_scores: Also return the role scores of every item (``"scores"``: ``{"before", "after"}``, each
            ``{role: SentenceLogProbs [n_items]}`` in item order), e.g. to score subsets of the items.

    Returns:
        ``{"protocol", "edit_batch_size", "n_batches", "n_items", "before", "after", "other_units"}``: results in
        ``mode``'s units, and under ``other_units`` (``{"mode", "before", "after"}``) in the other unit
        (reference SS and the paper code's SS disagree; docs/metrics.md); ``"scores"`` with ``keep_scores``.
    """
    items = list(items)
    if not items:
        raise ValueError("per_batch_protocol needs at least one StereoSet item")
    before = unedited if unedited is not None else score_stereoset_items(peft_model, tokenizer, items, batch_size,
                                                                        progress=False)
    batches = edit_batches(items, edit_batch_size)
    pieces = []
    for indices in tqdm(batches, desc="per-batch edits", disable=not progress):
        group = [items[i] for i in indices]
        cache, _, _ = editor.cache_samples(peft_model, tokenizer, group, batch_size)
        solutions = editor.predict(cache)
        with editor.edited(peft_model, solutions, adapter_name):
            pieces.append(score_stereoset_items(peft_model, tokenizer, group, batch_size, progress=False))
    after = _reorder(pieces, torch.tensor([i for indices in batches for i in indices]))
    other = "paper" if mode == "reference" else "reference"
    result = {
        "protocol": "per_batch", "edit_batch_size": edit_batch_size, "n_batches": len(batches), "n_items": len(items),
        "before": stereoset_results(items, before, mode, n_resamples, seed),
        "after": stereoset_results(items, after, mode, n_resamples, seed),
        "other_units": {"mode": other, "before": stereoset_results(items, before, other, n_resamples, seed),
                        "after": stereoset_results(items, after, other, n_resamples, seed)},
    }
    if keep_scores:
        result["scores"] = {"before": before, "after": after}
    return result


def split_targets(items: Sequence[StereoSetItem], seed: int = 0) -> TargetSplit:
    """Halve the target terms of each bias type at random (seeded); the edit half gets the extra one."""
    terms: dict[str, list[str]] = {}
    for item in items:
        terms.setdefault(item.bias_type, [])
        if item.target not in terms[item.bias_type]:
            terms[item.bias_type].append(item.target)
    edit, scored = {}, {}
    for bias_type, targets in terms.items():
        if len(targets) < 2:
            raise ValueError(f"Bias type {bias_type!r} has {len(targets)} target term(s); a held-out split needs 2")
        shuffled = sorted(targets)
        random.Random(f"{seed}/{bias_type}").shuffle(shuffled)
        half = (len(shuffled) + 1) // 2
        edit[bias_type], scored[bias_type] = sorted(shuffled[:half]), sorted(shuffled[half:])
    return TargetSplit(edit, scored)


def held_out_protocol(
    editor, peft_model: nn.Module, tokenizer, items: Sequence[StereoSetItem], batch_size: int = 32,
    mode: str = "reference", adapter_name: str = "default", n_resamples: int = N_RESAMPLES, seed: int = 0,
    progress: bool = True,
) -> dict:
    """One joint delta from half of the target terms, scored on the items of the other half.

    Args:
        editor: A trained editor.
        peft_model: Its model (left unchanged).
        tokenizer: The model's tokenizer.
        items: StereoSet items; the target terms of each bias type are halved (:func:`split_targets`).
        batch_size: Sentences per scoring forward pass.
        mode: The SS unit.
        adapter_name: The adapter the edit is applied to (functionally).
        n_resamples: Bootstrap resamples for the CIs.
        seed: The split's and the bootstrap's seed.
        progress: Show a progress bar.
    """
    items = list(items)
    split = split_targets(items, seed)
    edit_rows, scored_rows = split.sides(items)
    edit_items, scored_items = [items[i] for i in edit_rows], [items[i] for i in scored_rows]
    result = joint_protocol(editor, peft_model, tokenizer, edit_items, scored_items, batch_size, mode, adapter_name,
                            n_resamples, seed, progress)
    return {**result, "protocol": "held_out", "seed": seed, "edit_targets": split.edit,
            "scored_targets": split.scored}


def joint_protocol(
    editor, peft_model: nn.Module, tokenizer, edit_items: Sequence[StereoSetItem],
    scored_items: Sequence[StereoSetItem], batch_size: int = 32, mode: str = "reference",
    adapter_name: str = "default", n_resamples: int = N_RESAMPLES, seed: int = 0, progress: bool = True,
) -> dict:
    """One joint delta from ``edit_items`` (applied functionally), ``scored_items`` scored before and with it.

    Args:
        editor: A trained editor.
        peft_model: Its model (left unchanged).
        tokenizer: The model's tokenizer.
        edit_items: The items the delta is computed from (one solve).
        scored_items: The items scored (``edit_items`` again for the transductive case).
        batch_size: Sentences per scoring forward pass.
        mode: The SS unit.
        adapter_name: The adapter the edit is applied to (functionally).
        n_resamples: Bootstrap resamples for the CIs.
        seed: The bootstrap's seed.
        progress: Show a progress bar.

    Returns:
        ``{"protocol": "joint", "n_edit_items", "n_items", "n_edit_tokens", "before", "after"}``.
    """
    scored_items = list(scored_items)
    before = score_stereoset_items(peft_model, tokenizer, scored_items, batch_size, progress=False)
    cache, _, _ = editor.cache_samples(peft_model, tokenizer, list(edit_items), batch_size, progress=progress)
    solutions = editor.predict(cache)
    with editor.edited(peft_model, solutions, adapter_name):
        after = score_stereoset_items(peft_model, tokenizer, scored_items, batch_size, progress=False)
    return {
        "protocol": "joint", "n_edit_items": len(edit_items), "n_items": len(scored_items),
        "n_edit_tokens": cache.n_tokens,
        "before": stereoset_results(scored_items, before, mode, n_resamples, seed),
        "after": stereoset_results(scored_items, after, mode, n_resamples, seed),
    }
