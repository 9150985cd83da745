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

A deployed adapter is one *joint* delta from many samples (``BiasEditor.debias``), and how strong it should be
is not what a per-group edit needs: pooled over thousands of pairs, the ridge solve averages value changes
that partly disagree, so the joint delta is weaker per pair than a 32-pair edit. :func:`calibrate_joint_scale`
scales one joint solution and scores held-out pairs (StereoSet ``dev``: target terms the edit never saw) at
each multiple of :data:`JOINT_SCALES`, then at the two half-steps (x / ÷ sqrt 2) around the best. Where it is
given a guard text (fluent paragraphs: ``data.load_guard_text``), each multiple is also bounded by how much it
raises that text's perplexity: the pairs' unrelated sentences are nonsense fillers ("... are usually bicycle."),
whose NLL did not rise over nine SmolLM2 deployments while the perplexity of fluent text rose up to 10.5 %.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..metrics import item_ss_lms
from ..scoring import encode_sentences, model_context_length, score_sentences
from .cache import EditSample, as_edit_sample
from .editor import BiasEditor, forward_logits, length_order
from .replay import PrefixReplay
from .solve import RidgeDelta, RidgeSolution

EDIT_SCALES = (0.25, 0.5, 0.71, 1.0, 1.41, 2.0, 4.0)
"""Candidate multipliers of the edit (powers of sqrt 2 around 1, and the ends of a 16x range)."""
JOINT_SCALES = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
"""Coarse multipliers of a joint delta (powers of 2); the two half-steps around the best are tried next."""
INITIAL_EDIT_SCALES = (0.0625, 0.25, 1.0, 4.0, 16.0)
"""Multiples of the preset's step sizes tried before meta-training (``initial_edit_scale``): powers of 4, a 256x
range, extended past its ends as :data:`MAX_EDGE_STEPS` allows (to x256 and /256)."""
MAX_EDGE_STEPS = 4
"""How many times :func:`calibrate_edit_scale` may double the grid's largest multiple (or halve its smallest) while
that end scores best (:func:`next_edge_scale`): up to x64 and /64. The editor's step sizes start at the preset's
``lr``, and how strong an edit that makes depends on the model: the same preset needs x2 on SmolLM2 and more on a
family whose value gradients are smaller."""
OUT_OF_BOUNDS = 100.0
"""The score from which a row is out of the LMS or NLL bounds (:func:`target_score`)."""
MAX_LMS_DROP = 3.0
"""LMS points an edit may cost and still count as within bounds (:func:`target_score`)."""
MAX_NLL_INCREASE = 0.0488
"""Rise of the mean token NLL an edit may cause (``log 1.05``: ~5 % perplexity), of the unrelated sentences and,
where it is scored, of the guard text (:func:`target_score`)."""
MIN_DEBIAS_GAIN = 1.0
"""SS points toward 50 below which a calibrated editor counts as not debiasing the validation pairs
(:func:`debias_gain`): on SmolLM2 a failed meta-training moved dev SS by 0.47 at its chosen multiple, seed 1's
editor by 8.51."""


def debias_gain(row: dict[str, float]) -> float:
    """How many SS points an edit moved toward 50: ``|ss_pre - 50| - |ss_post - 50|`` of a calibration row."""
    return abs(row["ss_pre"] - 50.0) - abs(row["ss_post"] - 50.0)


def chosen_row(calibration: dict) -> dict:
    """The row of a calibration result (:func:`calibrate_edit_scale`, :func:`calibrate_joint_scale`) at its chosen
    scale."""
    return next(row for row in calibration["rows"] if row["scale"] == calibration["scale"])


def calibration_summary(calibration: dict) -> str:
    """One line of a calibration result: the chosen multiple, then every row's ``xC: SS pre->post, LMS drop D``."""
    rows = "; ".join(f"x{row['scale']:g}: SS {row['ss_pre']:.1f}->{row['ss_post']:.1f}, LMS drop "
                     f"{row['lms_pre'] - row['lms_post']:.2f}" for row in calibration["rows"])
    return f"x{calibration['scale']:g} chosen ({rows})"


def by_type_summary(row: dict) -> str | None:
    """Each bias type's SS in one calibration row, ``"gender 60.4->61.0 (n=154), race 52.0->47.4 (n=614)"``, or None
    where the row holds no ``by_type``. The multiple is ranked on the pooled pairs, where one type's overshoot can
    hide another's shortfall (Gemma 3 270M: pooled 54.1 -> 50.3 with race at 47.4 and gender at 61.0), so the demo
    prints the chosen row's beside it."""
    by_type = row.get("by_type")
    if not by_type:
        return None
    return ", ".join(f"{bias_type} {metrics['ss_pre']:.1f}->{metrics['ss_post']:.1f} (n={metrics['n']})"
                     for bias_type, metrics in by_type.items())


def nll_rise(metrics: dict[str, float]) -> float:
    """The larger NLL rise of a row: ``nll_increase`` (unrelated sentences) or ``text_nll_increase`` (the guard
    text, where it was scored)."""
    return max(metrics["nll_increase"], metrics.get("text_nll_increase", -math.inf))


def target_score(metrics: dict[str, float], max_lms_drop: float = MAX_LMS_DROP,
                 max_nll_increase: float = MAX_NLL_INCREASE) -> float:
    """How good an edit with pooled ``metrics`` (``ss_post``, ``lms_pre``, ``lms_post``, ``nll_increase`` and,
    optionally, ``text_nll_increase``) is; lower is better.

    ``|ss_post - 50|`` when the LMS drop is at most ``max_lms_drop`` and :func:`nll_rise` at most
    ``max_nll_increase``; else ``100 +`` the excess LMS drop ``+ 100 x`` the excess NLL rise (every edit within
    both bounds ranks first, the rest by how far they are out).
    """
    lms_excess = max(0.0, metrics["lms_pre"] - metrics["lms_post"] - max_lms_drop)
    nll_excess = max(0.0, nll_rise(metrics) - max_nll_increase)
    if lms_excess == 0.0 and nll_excess == 0.0:
        return abs(metrics["ss_post"] - 50.0)
    return OUT_OF_BOUNDS + lms_excess + 100.0 * nll_excess


def next_edge_scale(calibration: dict) -> float | None:
    """The multiple to try past the end of a calibration's rows (:func:`rank_scales`) when its best sits there.

    Twice the largest multiple when the largest scores best, is within bounds and has moved SS toward 50 but not
    across it (a stronger edit can still come closer). Half the smallest when the smallest scores best and a weaker
    edit can do better: it overshot 50, broke a bound, or moved SS away from 50. None otherwise.
    """
    scales = [row["scale"] for row in calibration["rows"]]
    best = chosen_row(calibration)
    short_of_50 = (best["ss_pre"] - 50.0) * (best["ss_post"] - 50.0) > 0
    still_approaching = best["selection"] < OUT_OF_BOUNDS and short_of_50 and debias_gain(best) > 0
    if best["scale"] == max(scales) and still_approaching:
        return 2.0 * best["scale"]
    if best["scale"] == min(scales) and best["scale"] > 0 and not still_approaching:
        return best["scale"] / 2.0
    return None


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


def checked_replay(editor: BiasEditor, peft_model: nn.Module, tokenizer, probe: Sequence[EditSample],
                   batch_size: int, replay: PrefixReplay | None = None) -> PrefixReplay:
    """``replay`` when given (already checked), else a :class:`PrefixReplay` of ``editor``'s layers checked against
    a full forward on the unrelated sentences of ``probe``."""
    if replay is not None:
        return replay
    replay = PrefixReplay(peft_model, list(editor.check_compatible(peft_model).values()))
    encoded = encode_sentences(tokenizer, [s.unrelated for s in probe[:batch_size]])
    replay.check(lambda: forward_logits(peft_model, encoded))
    return replay


def _unedited_scores(peft_model: nn.Module, tokenizer, scored: Sequence[EditSample], replay: PrefixReplay,
                     batch_size: int) -> tuple[torch.Tensor, list | None]:
    """Scores ``[3, P]`` of ``scored`` unedited, and the prefixes ``replay`` recorded on the way (None if off)."""
    with replay.record() as prefixes:
        before = _group_scores(peft_model, tokenizer, scored, batch_size)
    return before, prefixes if prefixes else None


def _edited_scores(
    editor: BiasEditor, peft_model: nn.Module, tokenizer, solutions: dict[str, RidgeSolution],
    scored: Sequence[EditSample], scales: Sequence[float], replay: PrefixReplay, prefixes: list | None,
    batch_size: int, adapter_name: str,
) -> dict[float, torch.Tensor]:
    """Scores ``[3, P]`` of ``scored`` with ``scale x solutions`` for each of ``scales``, the unedited prefix
    replayed from ``prefixes`` (:func:`_unedited_scores`)."""
    after = {}
    for scale in scales:
        with editor.edited(peft_model, scaled_solutions(solutions, scale), adapter_name), replay.replay(prefixes):
            after[scale] = _group_scores(peft_model, tokenizer, scored, batch_size)
    return after


def text_nll(model: nn.Module, tokenizer, paragraphs: Sequence[str], batch_size: int) -> float:
    """Token-weighted mean NLL (nats) of ``paragraphs``, each scored on its own: ``log`` of their perplexity.

    A paragraph longer than the model's context is cut to its beginning (the guard needs fluent tokens, not whole
    paragraphs; the bundled ones are at most 80 tokens with BOS under the testbed's GPT-2 tokenizer)."""
    scores = score_sentences(model, tokenizer, paragraphs, batch_size=batch_size,
                             max_length=model_context_length(model))
    return -(scores.sum.double().sum() / scores.n_tokens.sum()).item()


def _text_nll_increases(
    editor: BiasEditor, peft_model: nn.Module, tokenizer, solutions: dict[str, RidgeSolution],
    paragraphs: Sequence[str], scales: Sequence[float], before: float, batch_size: int, adapter_name: str,
) -> dict[float, float]:
    """Per scale, the rise of :func:`text_nll` of ``paragraphs`` under ``scale x solutions`` over ``before`` (its
    unedited value): the log of the perplexity ratio."""
    rises = {}
    for scale in scales:
        with editor.edited(peft_model, scaled_solutions(solutions, scale), adapter_name):
            rises[scale] = text_nll(peft_model, tokenizer, paragraphs, batch_size) - before
    return rises


def metrics_by_type(pre: torch.Tensor, post: torch.Tensor, bias_types: Sequence[str | None]) -> dict[str, dict]:
    """``{bias type: {"n", "ss_pre", "ss_post", "lms_pre", "lms_post", "nll_increase"}}`` of the columns of
    ``pre`` / ``post`` (mean token log-probs ``[3, N]``: stereotype, anti-stereotype, unrelated rows) whose
    ``bias_types`` ``[N]`` name that type (columns without one are left out): how each type moved under one
    multiple. Recorded only, never ranked on; the pooled row is what :func:`rank_scales` ranks."""
    result = {}
    for bias_type in dict.fromkeys(t for t in bias_types if t is not None):
        columns = torch.tensor([t == bias_type for t in bias_types])
        before, now = item_ss_lms(*pre[:, columns]), item_ss_lms(*post[:, columns])
        result[bias_type] = {"n": int(columns.sum()), "ss_pre": before["ss"], "ss_post": now["ss"],
                             "lms_pre": before["lms"], "lms_post": now["lms"],
                             "nll_increase": (pre[2, columns] - post[2, columns]).mean().item()}
    return result


def rank_scales(pre: torch.Tensor, after: dict[float, torch.Tensor],
                score: Callable[[dict[str, float]], float], text_rises: dict[float, float] | None = None,
                bias_types: Sequence[str | None] = ()) -> dict:
    """``{"scale": best, "rows": [...]}`` from pooled mean token log-probs ``[3, N]`` (stereotype, anti-stereotype,
    unrelated rows) before and after each scale: the calibrations' ranking (lowest ``score``, ties to the scale
    nearest 1). ``text_rises``: the guard text's NLL rise per scale, recorded as ``text_nll_increase``.
    ``bias_types`` ``[N]`` (each column's, where known): each row also records ``by_type``
    (:func:`metrics_by_type`)."""
    pre_metrics = item_ss_lms(pre[0], pre[1], pre[2])
    typed = any(t is not None for t in bias_types)
    rows = []
    for scale, post in after.items():
        post_metrics = item_ss_lms(post[0], post[1], post[2])
        row = {"scale": scale, "ss_pre": pre_metrics["ss"], "ss_post": post_metrics["ss"],
               "lms_pre": pre_metrics["lms"], "lms_post": post_metrics["lms"],
               "nll_increase": (pre[2] - post[2]).mean().item()}
        if text_rises is not None:
            row["text_nll_increase"] = text_rises[scale]
        row["selection"] = score(row)
        if typed:
            row["by_type"] = metrics_by_type(pre, post, bias_types)
        rows.append(row)
    best = min(rows, key=lambda row: (row["selection"], abs(row["scale"] - 1.0)))
    return {"scale": best["scale"], "rows": rows}


def calibrate_edit_scale(
    editor: BiasEditor, peft_model: nn.Module, tokenizer, groups: Sequence[Sequence[EditSample]],
    score: Callable[[dict[str, float]], float] = target_score, batch_size: int = 16,
    scales: Sequence[float] = EDIT_SCALES, adapter_name: str = "default", progress: bool = False,
    replay: PrefixReplay | None = None, max_edge_steps: int = MAX_EDGE_STEPS,
) -> dict:
    """Edit each of ``groups`` at every ``scales`` multiple of ``editor``'s edit and rank the multiples; while the
    best is the largest or smallest multiple tried, try the next one past that end (:func:`next_edge_scale`), at
    most ``max_edge_steps`` times.

    Args:
        editor: A trained editor.
        peft_model: Its model.
        tokenizer: The model's tokenizer.
        groups: Dev edit sets (each edited on its own, as in the per-batch protocol); samples need ``unrelated``.
        score: Ranks a row of pooled dev metrics (lower is better): :func:`target_score` or
            ``trainer.selection_score``; going past the grid's ends reads a score of :data:`OUT_OF_BOUNDS` or more
            as out of the LMS / NLL bounds, as those do.
        batch_size: Sentence pairs per LM forward pass.
        scales: The candidate multiples.
        adapter_name: The adapter the edits are applied to (functionally).
        progress: Show a progress bar.
        replay: A :class:`PrefixReplay` of this model already checked (the trainer's); None: one is made and
            checked here against a full forward.
        max_edge_steps: How many multiples past the grid's ends may be tried (0: ``scales`` only). Each costs one
            more pass over ``groups`` (keys cached and scored again, one edited scoring).

    Returns:
        ``{"scale": best, "rows": [{"scale", "ss_pre", "ss_post", "lms_pre", "lms_post", "nll_increase",
        "selection"}, ...]}`` (one row per scale, in ``scales`` order, then the multiples past the ends in the order
        tried; ``nll_increase`` is the mean rise of the unrelated sentences' mean token NLL; ties go to the scale
        nearest 1). Where samples name their ``bias_type``, each row also holds ``by_type``
        (:func:`metrics_by_type`). Neither ``editor`` nor the model is changed.
    """
    replay = checked_replay(editor, peft_model, tokenizer, groups[0], batch_size, replay)
    groups = [[group[i] for i in length_order(tokenizer, group).tolist()] for group in groups]
    bias_types = [sample.bias_type for group in groups for sample in group]
    before, after = _scores_of_groups(editor, peft_model, tokenizer, groups, scales, batch_size, adapter_name,
                                      progress, replay)
    result = rank_scales(before, after, score, bias_types=bias_types)
    for _ in range(max_edge_steps):
        edge = next_edge_scale(result)
        if edge is None:
            break
        _, more = _scores_of_groups(editor, peft_model, tokenizer, groups, [edge], batch_size, adapter_name,
                                    progress, replay)
        after.update(more)
        result = rank_scales(before, after, score, bias_types=bias_types)
    return result


def _scores_of_groups(
    editor: BiasEditor, peft_model: nn.Module, tokenizer, groups: Sequence[Sequence[EditSample]],
    scales: Sequence[float], batch_size: int, adapter_name: str, progress: bool, replay: PrefixReplay,
) -> tuple[torch.Tensor, dict[float, torch.Tensor]]:
    """Scores ``[3, N]`` of every group's samples unedited, and ``{scale: [3, N]}`` with each group edited on its
    own at each of ``scales`` (groups concatenated in order; each is scored in the order it is given)."""
    before, after = [], {scale: [] for scale in scales}
    for group in tqdm(groups, desc=f"calibrating the edit scale (x{', x'.join(f'{s:g}' for s in scales)})",
                      disable=not progress):
        cache, _, _ = editor.cache_samples(peft_model, tokenizer, group, batch_size)
        pre, prefixes = _unedited_scores(peft_model, tokenizer, group, replay, batch_size)
        post = _edited_scores(editor, peft_model, tokenizer, editor.predict(cache), group, scales, replay, prefixes,
                              batch_size, adapter_name)
        before.append(pre)
        for scale in scales:
            after[scale].append(post[scale])
    return torch.cat(before, 1), {scale: torch.cat(after[scale], 1) for scale in scales}


def calibrate_joint_scale(
    editor: BiasEditor, peft_model: nn.Module, tokenizer, solutions: dict[str, RidgeSolution],
    scored: Sequence[EditSample], score: Callable[[dict[str, float]], float] = target_score, batch_size: int = 16,
    scales: Sequence[float] = JOINT_SCALES, adapter_name: str = "default", progress: bool = False,
    replay: PrefixReplay | None = None, guard_text: Sequence[str] = (),
) -> dict:
    """Rank multiples of one joint solution by the metrics of held-out pairs ``scored`` under it.

    ``scales`` first, then the two half-steps (``best x sqrt 2`` and ``best / sqrt 2``) around the best of them.

    Args:
        editor: The editor that computed ``solutions``.
        peft_model: Its model.
        tokenizer: The model's tokenizer.
        solutions: One joint solution per edited layer (anything with a ``.delta``: the ``RidgeSolution`` of
            ``BiasEditor.joint_solutions`` or the ``PooledSolution`` of ``joint.recipe_solutions``).
        scored: Held-out pairs (with ``unrelated``), e.g. StereoSet ``dev``: other target terms than the edit's.
        score: Ranks a row of pooled metrics (lower is better).
        batch_size: Sentences per LM forward pass.
        scales: The coarse multiples.
        adapter_name: The adapter the edit is applied to (functionally).
        progress: Show a progress bar.
        replay: A checked :class:`PrefixReplay` of this model, else one is made and checked.
        guard_text: Fluent paragraphs (``data.load_guard_text``) whose NLL rise ``score`` also sees, as each row's
            ``text_nll_increase``; empty: none.

    Returns:
        As :func:`calibrate_edit_scale`, rows in the order they were scored, with ``text_nll_increase`` where
        ``guard_text`` is given.
    """
    if isinstance(guard_text, (str, bytes)):
        raise TypeError("guard_text takes paragraphs (e.g. data.load_guard_text(path)), not one string or a path")
    scored = [as_edit_sample(sample, index) for index, sample in enumerate(scored)]
    scored = [scored[i] for i in length_order(tokenizer, scored).tolist()]
    replay = checked_replay(editor, peft_model, tokenizer, scored, batch_size, replay)
    with tqdm(total=len(scales) + 2, desc="calibrating the joint scale", disable=not progress) as bar:
        pre, prefixes = _unedited_scores(peft_model, tokenizer, scored, replay, batch_size)  # recorded once
        guard = list(guard_text)
        text_before = text_nll(peft_model, tokenizer, guard, batch_size) if guard else 0.0

        def score_at(multiples: Sequence[float]) -> tuple[dict[float, torch.Tensor], dict[float, float] | None]:
            pairs = _edited_scores(editor, peft_model, tokenizer, solutions, scored, multiples, replay, prefixes,
                                   batch_size, adapter_name)
            rises = _text_nll_increases(editor, peft_model, tokenizer, solutions, guard, multiples, text_before,
                                        batch_size, adapter_name) if guard else None
            return pairs, rises

        after, text_rises = score_at(scales)
        bar.update(len(scales))
        coarse = rank_scales(pre, after, score, text_rises)["scale"]
        finer = [s for s in (coarse / math.sqrt(2), coarse * math.sqrt(2))
                 if all(abs(s / tried - 1) > 1e-6 for tried in after)]
        more, more_rises = score_at(finer)
        after.update(more)
        if text_rises is not None:
            text_rises.update(more_rises)
        bar.update(2)
    return rank_scales(pre, after, score, text_rises, [sample.bias_type for sample in scored])
