"""Calibrating an editor's edit strength on dev: one scalar, chosen by the selection rule.

An editor's value changes ``D = -lr[m] (u . u~) g~`` are linear in its step sizes ``lr[m]``, and the ridge
solve is linear in ``D``, so multiplying every ``lr[m]`` by ``c`` multiplies every delta by ``c`` exactly
(``S(c D) = c S(D)``). How far an edit should go is the quantity a short meta-training run pins down least
well: dev SS after the edit swings from under-editing (SS stays near its pre-edit value) to over-editing
(SS far below 50, LMS lost) between validations a few meta-steps apart. :func:`calibrate_edit_scale` edits
every dev group once per candidate ``c`` (each group's keys and value gradients are cached once; the
unedited prefix of the LM is replayed) and picks the ``c`` with the best
:func:`~biasedit_peft.editor.trainer.selection_score`: dev SS closest to 50 within the LMS and perplexity
bounds. :func:`scale_edits` then bakes ``c`` into the editor's ``lr``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..metrics import item_ss_lms
from ..scoring import encode_sentences, score_sentences
from .cache import EditSample
from .editor import BiasEditor, forward_logits, length_order
from .replay import PrefixReplay
from .solve import RidgeDelta, RidgeSolution

EDIT_SCALES = (0.25, 0.5, 0.71, 1.0, 1.41, 2.0, 4.0)
"""Candidate multipliers of the edit (powers of sqrt 2 around 1, and the ends of a 16x range)."""


def scaled_solutions(solutions: dict[str, RidgeSolution], scale: float) -> dict[str, RidgeSolution]:
    """The same solutions with every delta multiplied by ``scale`` (its right factor scaled)."""
    return {name: replace(s, delta=RidgeDelta(s.delta.left, s.delta.right * scale)) for name, s in solutions.items()}


@torch.no_grad()
def scale_edits(editor: BiasEditor, scale: float) -> None:
    """Multiply every step size ``lr[m]`` of ``editor`` by ``scale``: every delta it predicts scales by it."""
    for net in editor.nets.values():
        net.lr.mul_(scale)


def _group_scores(model: nn.Module, tokenizer, group: Sequence[EditSample], batch_size: int) -> torch.Tensor:
    """Mean token log-probs ``[3, P]`` (stereotype, anti-stereotype, unrelated rows) of ``group``."""
    sentences = [s.stereotype for s in group] + [s.anti_stereotype for s in group] + [s.unrelated for s in group]
    return score_sentences(model, tokenizer, sentences, batch_size=batch_size).mean.view(3, len(group))


def calibrate_edit_scale(
    editor: BiasEditor, peft_model: nn.Module, tokenizer, groups: Sequence[Sequence[EditSample]],
    score: Callable[[dict[str, float]], float], batch_size: int = 16, scales: Sequence[float] = EDIT_SCALES,
    adapter_name: str = "default", progress: bool = False, replay: PrefixReplay | None = None,
) -> dict:
    """Edit each of ``groups`` at every ``scales`` multiple of ``editor``'s edit and rank the multiples.

    Args:
        editor: A trained editor.
        peft_model: Its model.
        tokenizer: The model's tokenizer.
        groups: Dev edit sets (each edited on its own, as in the per-batch protocol); samples need ``unrelated``.
        score: Ranks a row of pooled dev metrics (lower is better), e.g. ``trainer.selection_score``.
        batch_size: Sentence pairs per LM forward pass.
        scales: The candidate multiples.
        adapter_name: The adapter the edits are applied to (functionally).
        progress: Show a progress bar.
        replay: A :class:`PrefixReplay` of this model already checked (the trainer's); None: one is made and
            checked here against a full forward.

    Returns:
        ``{"scale": best, "rows": [{"scale", "ss_pre", "ss_post", "lms_pre", "lms_post", "nll_increase",
        "selection"}, ...]}`` (one row per scale, in ``scales`` order; ``nll_increase`` is the mean rise of the
        unrelated sentences' mean token NLL). Neither ``editor`` nor the model is changed.
    """
    layers = editor.check_compatible(peft_model)
    if replay is None:
        replay = PrefixReplay(peft_model, list(layers.values()))
        probe = encode_sentences(tokenizer, [s.unrelated for s in groups[0][:batch_size]])
        replay.check(lambda: forward_logits(peft_model, probe))
    before, after = [], {scale: [] for scale in scales}
    for group in tqdm(groups, desc="calibrating the edit scale", disable=not progress):
        group = [group[i] for i in length_order(tokenizer, group).tolist()]
        cache, _, _ = editor.cache_samples(peft_model, tokenizer, group, batch_size)
        solutions = editor.predict(cache)
        with replay.record() as prefixes:
            before.append(_group_scores(peft_model, tokenizer, group, batch_size))
        for scale in scales:
            with editor.edited(peft_model, scaled_solutions(solutions, scale), adapter_name), \
                    replay.replay(prefixes if prefixes else None):
                after[scale].append(_group_scores(peft_model, tokenizer, group, batch_size))
    pre = torch.cat(before, 1)
    pre_metrics = item_ss_lms(pre[0], pre[1], pre[2])
    rows = []
    for scale in scales:
        post = torch.cat(after[scale], 1)
        post_metrics = item_ss_lms(post[0], post[1], post[2])
        row = {"scale": scale, "ss_pre": pre_metrics["ss"], "ss_post": post_metrics["ss"],
               "lms_pre": pre_metrics["lms"], "lms_post": post_metrics["lms"],
               "nll_increase": (pre[2] - post[2]).mean().item()}
        row["selection"] = score(row)
        rows.append(row)
    best = min(rows, key=lambda row: (row["selection"], abs(row["scale"] - 1.0)))
    return {"scale": best["scale"], "rows": rows}
