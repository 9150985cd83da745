"""The deployment protocol: what a user who merges the adapter gets on sentences nobody edited.

The paper's per-batch protocol edits the very items it scores. A deployed adapter is computed once and then
meets everything else, so here:

1. one joint delta is computed from the edit data only (StereoSet ``train``, or a user's own pairs), by the
   pooled solve of ``editor/joint.py`` with the ridge relative to the keys (:data:`JOINT_RECIPES`);
2. its strength is calibrated on held-out pairs (StereoSet ``dev``, whose target terms neither ``train`` nor
   ``test`` has: :func:`~biasedit_peft.editor.calibration.calibrate_joint_scale`), because a delta pooled over
   thousands of pairs is weaker per pair than the 32-pair edits the editor was trained on, within bounds on the
   pairs' LMS and on the perplexity of a fluent guard text (``data.load_guard_text``; not the perplexity text);
3. it is written into the adapter (:func:`deployable_adapter`), merged, and the merged model is scored on
   ``test`` (unseen items and target terms), CrowS-Pairs (another benchmark), the gender-swapped ``test``
   items, and perplexity; :func:`deployment_check` reads the result against the targets.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Sequence

from torch import nn

from ..data.crows import crows_bias_type
from ..data.neutral import BUNDLED, UNRELATED_LABEL, load_guard_text
from ..editor.cache import as_edit_sample
from ..editor.calibration import (
    JOINT_SCALES,
    MAX_NLL_INCREASE,
    calibrate_joint_scale,
    chosen_row,
    scaled_solutions,
    target_score,
)
from ..editor.joint import JointRecipe, pooled_statistics, recipe_solutions

JOINT_RECIPES: tuple[JointRecipe, ...] = (JointRecipe(ridge=1.0),)
"""The re-fits of the pooled solve a deployment tries (``editor/joint.py``): the ridge relative to the keys,
``lambda = tr(U^T U) / d_in``. Measured against the editor's own ``lambda`` (``scripts/joint_ridge_sweep.py``;
docs/results.md, "Joint recipes"): the same debiasing of unseen targets at a fraction of the perplexity cost, on
SmolLM2 (+1.1 % against +8.2 %) and on the testbed (-2.6 % against +1.9 %); dev alone does not tell them apart (its
unrelated-sentence NLL bound let +8.2 % through), so the recipe is fixed, not chosen on dev."""

EDIT_DATA = "stereoset:train"
CALIBRATION_DATA = "stereoset:dev"
MAX_LMS_DROP = 3.0
MAX_PERPLEXITY_RISE = 0.05
"""Relative perplexity rise the deployment target allows (5 %)."""
CALIBRATION_MARGIN = 0.5
"""The joint scale is chosen within this fraction of the LMS and NLL bounds on the held-out pairs (an LMS drop of
1.5, an NLL rise of log(1.05) / 2): chosen right at a bound on dev, the same edit overshot it on ``test`` (testbed,
6 blocks: dev LMS drop 3.0, test 3.9-7.5; docs/results.md), since a bound on a sample is met by half the
resamples at the boundary."""


def record_edit(peft_config, report: dict, editor_id: str, edit_data: str, bias_types: str, limit: int | None,
                calibrated_on: str | None, guard_text: str | None = BUNDLED,
                preserve_text: str | None = None) -> None:
    """Write where a deployed delta came from into its adapter config (``editor_id``, ``edit_data``,
    ``edit_info``), as the model card and the Hub read them; ``report`` is :func:`deployable_adapter`'s,
    ``bias_types`` the comma-separated types edited, ``guard_text`` the text that bounded the scale ("bundled",
    a file or "none"; recorded as None when nothing was calibrated) and ``preserve_text`` how the text whose keys
    a preserving recipe kept is named ("bundled" or a file). ``preserved_keys`` is recorded only for a recipe that
    preserves keys, from the report: that name, or the edit pairs' unrelated sentences."""
    peft_config.editor_id = editor_id
    peft_config.edit_data = edit_data
    peft_config.edit_info = {"n_samples": report["n_samples"], "n_tokens": report["n_tokens"],
                             "bias_types": bias_types, "limit": limit, "scale": report["scale"],
                             "recipe": JointRecipe(**report["recipe"]).label, "calibrated_on": calibrated_on,
                             "guard_text": guard_text if calibrated_on is not None else None}
    if report.get("preserved") == "text":
        peft_config.edit_info["preserved_keys"] = preserve_text or "a given text"
    elif report.get("preserved") == "unrelated":
        peft_config.edit_info["preserved_keys"] = UNRELATED_LABEL


def calibration_score(row: dict[str, float], margin: float = CALIBRATION_MARGIN) -> float:
    """``target_score`` with the LMS and NLL bounds scaled by ``margin``: the rank of one joint scale."""
    return target_score(row, MAX_LMS_DROP * margin, MAX_NLL_INCREASE * margin)


def deployable_adapter(
    editor, peft_model: nn.Module, tokenizer, edit_samples: Sequence[Any],
    calibration_samples: Sequence[Any] | None = None, batch_size: int = 16, adapter_name: str = "default",
    scales: Sequence[float] = JOINT_SCALES, progress: bool = True, processes=None,
    recipes: Sequence[JointRecipe] = JOINT_RECIPES, guard_text: Sequence[str] | None = None,
    preserve_text: Sequence[str] | None = None,
) -> dict:
    """Write one joint delta from ``edit_samples`` into adapter ``adapter_name``, solved and scaled as held-out pairs
    say.

    Args:
        editor: A trained editor.
        peft_model: Its model with the BiasEdit adapter (the delta is added to what the adapter holds).
        tokenizer: The model's tokenizer.
        edit_samples: The pairs the delta is computed from (StereoSet items, dicts or tuples).
        calibration_samples: Held-out pairs with an unrelated sentence: each of ``recipes`` is solved and its scale
            calibrated on them (``calibrate_joint_scale``, ranked by :func:`calibration_score`), and the best
            (recipe, scale) is written; None: the first recipe at the editor's own scale (1).
        batch_size: Sentence pairs per LM forward pass.
        adapter_name: The adapter written.
        scales: The coarse multiples tried.
        progress: Show progress bars.
        processes: Split the caching across processes (``joint.pooled_statistics``; default: those of a launcher,
            else this one). The calibration runs whole on each.
        recipes: How the pooled solve may be re-fitted (``editor/joint.py``); a recipe that preserves keys uses
            ``preserve_text``, else the edit pairs' unrelated sentences, and is skipped when there are none. Ties go
            to the earlier recipe.
        guard_text: Fluent paragraphs whose perplexity bounds the calibrated scale (``calibrate_joint_scale``);
            None: the bundled guard text (``data.load_guard_text``); empty: no such bound.
        preserve_text: Paragraphs whose keys a recipe with ``preserve > 0`` keeps (e.g. ``data.load_preserve_text``,
            fluent text that neither the guard nor the perplexity text shares); None: the edit pairs' unrelated
            sentences. A paragraph longer than the model's context gives the keys of its first tokens, as the guard
            text is cut (``calibration.text_nll``).

    Returns:
        ``{"n_samples", "n_tokens", "layers", "scale", "recipe", "calibration", "preserved", "recipes"}``: ``recipe``
        the chosen one (``{"preserve", "ridge"}``), ``calibration`` its ``calibrate_joint_scale`` result (None
        without calibration pairs), ``preserved`` whose keys it kept (``"text"``, ``"unrelated"`` or None),
        ``recipes`` one row per recipe tried (``preserve``, ``ridge``, ``scale``, ``selection``).
    """
    if len(edit_samples) == 0:
        raise ValueError("deployable_adapter needs at least one edit sample; got an empty list")
    if not recipes:
        raise ValueError("deployable_adapter needs at least one joint recipe")
    if tokenizer is None:
        from ..editor.editor import _load_tokenizer_for

        tokenizer = _load_tokenizer_for(peft_model)
    samples = [as_edit_sample(sample, index) for index, sample in enumerate(edit_samples)]
    keepable = keepable_keys(samples, preserve_text)
    usable = [r for r in recipes if not r.preserve or keepable]
    if not usable:
        raise nothing_to_preserve(samples)
    if not calibration_samples:
        usable = usable[:1]
    preserved = keepable if any(r.preserve for r in usable) else None
    if guard_text is None and calibration_samples:  # only a calibration reads it
        guard_text = load_guard_text()
    statistics, n_tokens = pooled_statistics(editor, peft_model, tokenizer, samples, batch_size, preserved,
                                             processes, progress)
    tried = []
    for recipe in usable:
        solutions = recipe_solutions(statistics, recipe)
        calibration = None
        if calibration_samples:
            calibration = calibrate_joint_scale(editor, peft_model, tokenizer, solutions, calibration_samples,
                                                calibration_score, batch_size=batch_size, scales=scales,
                                                adapter_name=adapter_name, progress=progress, guard_text=guard_text)
        tried.append((recipe, solutions, calibration))
    recipe, solutions, calibration = min(tried, key=lambda t: _selection(t[2]))  # min is stable: ties go first
    scale = calibration["scale"] if calibration else 1.0
    editor.write_solutions(peft_model, scaled_solutions(solutions, scale), adapter_name)
    return {"n_samples": len(samples), "n_tokens": n_tokens, "layers": list(statistics), "scale": scale,
            "recipe": asdict(recipe), "calibration": calibration,
            "preserved": None if not recipe.preserve else "text" if preserve_text else "unrelated",
            "recipes": [{**asdict(r), "scale": c["scale"] if c else 1.0, "selection": _selection(c)}
                        for r, _, c in tried]}


def keepable_keys(samples: Sequence[Any], preserve_text: Sequence[str] | None) -> list[str] | None:
    """The sentences a preserving recipe keeps: ``preserve_text``, else the edit pairs' unrelated sentences when every
    pair has one, else None (:func:`nothing_to_preserve` says why). ``samples`` are edit pairs with an ``unrelated``
    attribute (``EditSample`` or StereoSet items). (``pooled_statistics`` keeps the keys of a paragraph's first tokens
    when it is longer than the model's context.)"""
    if isinstance(preserve_text, str):
        raise TypeError("preserve_text takes a list of paragraphs, not one string")
    if preserve_text is not None:
        if not preserve_text:
            raise ValueError("preserve_text is empty: pass paragraphs, or None for the pairs' unrelated sentences")
        return list(preserve_text)
    unrelated = [s.unrelated for s in samples if s.unrelated]
    return unrelated if len(unrelated) == len(samples) else None


def nothing_to_preserve(samples: Sequence[Any]) -> ValueError:
    """The error for a recipe that must preserve the edit pairs' unrelated sentences when some pairs lack one
    (:func:`keepable_keys` gave None): how many lack one, and what to pass instead."""
    missing = sum(not s.unrelated for s in samples)
    return ValueError(f"every joint recipe preserves the unrelated sentences of the edit pairs, which {missing} of "
                      f"{len(samples)} lack; give a text to preserve instead (preserve_text, or --preserve-text FILE "
                      "in biasedit debias and scripts/joint_ridge_sweep.py)")


def _selection(calibration: dict | None) -> float:
    """The selection score of a calibration's chosen row (0 without calibration)."""
    if calibration is None:
        return 0.0
    return chosen_row(calibration)["selection"]


def _outside(value: float, interval: Sequence[float] | None) -> bool | None:
    return None if not interval else not (interval[0] <= value <= interval[1])


def deployment_check(before: dict, after: dict, bias_types: Sequence[str], max_lms_drop: float = MAX_LMS_DROP,
                     max_perplexity_rise: float = MAX_PERPLEXITY_RISE) -> dict:
    """The deployment targets, per bias type, from two ``evaluate_model`` results (before / merged after).

    Per type: ``ss_halfway`` (``|SS_after - 50| <= |SS_before - 50| / 2``), ``ss_outside_ci`` (SS after lies outside
    the 95 % CI of SS before: a move inside it is not told apart from resampling noise), ``crows_toward_50``
    (``|CrowS_after - 50| < |CrowS_before - 50|``; None without CrowS-Pairs of the type) and ``lms_ok`` (LMS drop
    at most ``max_lms_drop``); ``perplexity_ok``: ``ppl_after <= (1 + max_perplexity_rise) ppl_before``;
    ``all_ok``: every one of them holds.
    """
    rows: dict[str, Any] = {}
    for bias_type in bias_types:
        if bias_type not in before.get("stereoset", {}) or bias_type not in after.get("stereoset", {}):
            continue
        b, a = before["stereoset"][bias_type], after["stereoset"][bias_type]
        row = {"ss_before": b["ss"], "ss_after": a["ss"], "lms_drop": b["lms"] - a["lms"],
               "ss_halfway": abs(a["ss"] - 50) <= abs(b["ss"] - 50) / 2,
               "ss_outside_ci": _outside(a["ss"], b.get("ss_ci")), "lms_ok": b["lms"] - a["lms"] <= max_lms_drop}
        crows_type = crows_bias_type(bias_type)
        crows_b, crows_a = before.get("crows", {}).get(crows_type), after.get("crows", {}).get(crows_type)
        row["crows_before"] = crows_b["metric"] if crows_b else None
        row["crows_after"] = crows_a["metric"] if crows_a else None
        row["crows_toward_50"] = abs(crows_a["metric"] - 50) < abs(crows_b["metric"] - 50) if crows_b and crows_a \
            else None
        rows[bias_type] = row
    ppl_b, ppl_a = before.get("perplexity"), after.get("perplexity")
    rows["perplexity_rise"] = ppl_a / ppl_b - 1 if ppl_b and ppl_a is not None else None
    rows["perplexity_ok"] = rows["perplexity_rise"] is not None and rows["perplexity_rise"] <= max_perplexity_rise
    types = [r for k, r in rows.items() if k in bias_types]
    rows["all_ok"] = bool(types) and rows["perplexity_ok"] and all(
        r["ss_halfway"] and r["lms_ok"] and r["crows_toward_50"] is not False for r in types)
    return rows
