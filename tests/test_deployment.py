"""The deployment protocol (workflows/deployment.py): the joint-scale calibration, the adapter it writes, the
targets it is read against, and the gender-swapped benchmark it scores."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from biasedit_peft.data import gender_swapped, load_guard_text, load_stereoset
from biasedit_peft.editor.calibration import calibrate_joint_scale, chosen_row, scaled_solutions, target_score
from biasedit_peft.editor.joint import JointRecipe, pooled_statistics, recipe_solutions
from biasedit_peft.evaluation import evaluate_model, evaluate_perplexity, evaluate_stereoset, take_per_type
from biasedit_peft.metrics import item_ss_lms, perplexity
from biasedit_peft.scoring import score_sentences
from biasedit_peft.tuner.deltas import get_deltas
from biasedit_peft.workflows.deployment import calibration_score, deployable_adapter, deployment_check

from factories import editor_tokenizer, peft_model, samples, trained_editor

TOKENIZER = editor_tokenizer()


def test_the_joint_scale_is_ranked_within_half_the_bounds():
    row = {"ss_post": 52.0, "lms_pre": 90.0, "lms_post": 88.0, "nll_increase": 0.01}  # a 2-point LMS drop
    assert target_score(row) == pytest.approx(2.0)  # inside the editor's bounds (3 points)
    assert calibration_score(row) == pytest.approx(100.5)  # 0.5 over the joint calibration's 1.5
    assert calibration_score({**row, "lms_post": 89.0}) == pytest.approx(2.0)
    assert calibration_score({**row, "lms_post": 89.0, "nll_increase": 0.0344}) == pytest.approx(101.0)  # 0.0244


def test_target_score_by_hand():
    inside = {"ss_post": 46.5, "lms_pre": 90.0, "lms_post": 88.0, "nll_increase": 0.01}
    assert target_score(inside) == pytest.approx(3.5)
    assert target_score({**inside, "lms_post": 85.0}) == pytest.approx(102.0)  # 5-point drop: 2 over
    assert target_score({**inside, "nll_increase": 0.0588}) == pytest.approx(101.0)  # 0.01 over the bound
    assert target_score({**inside, "lms_post": 85.0}, max_lms_drop=6.0) == pytest.approx(3.5)


def test_the_guard_texts_nll_rise_is_bounded_like_the_unrelated_sentences():
    inside = {"ss_post": 46.5, "lms_pre": 90.0, "lms_post": 88.0, "nll_increase": 0.01}
    assert target_score({**inside, "text_nll_increase": 0.02}) == pytest.approx(3.5)  # both under log 1.05
    assert target_score({**inside, "text_nll_increase": 0.0588}) == pytest.approx(101.0)  # 0.01 over the bound
    assert target_score({**inside, "nll_increase": -0.2, "text_nll_increase": 0.0588}) == pytest.approx(101.0)
    assert calibration_score({**inside, "lms_post": 89.0, "text_nll_increase": 0.0344}) == pytest.approx(101.0)


def test_joint_calibration_records_the_guard_texts_perplexity_rise_at_each_scale(tmp_path):
    model, editor = trained_editor(tmp_path)
    edit, held_out, other = samples(24)[:8], samples(24)[8:16], samples(24)[16:]
    guard = [f"{s.anti_stereotype} {s.unrelated}" for s in other]
    solutions, _ = editor.joint_solutions(model, edit, TOKENIZER, batch_size=2, progress=False)
    result = calibrate_joint_scale(editor, model, TOKENIZER, solutions, held_out, batch_size=2, scales=(1.0, 8.0),
                                   guard_text=guard)
    before = evaluate_perplexity(model, TOKENIZER, guard, batch_size=3)  # another path: exp of the token mean
    for row in result["rows"]:
        with editor.edited(model, scaled_solutions(solutions, row["scale"])):
            after = evaluate_perplexity(model, TOKENIZER, guard, batch_size=3)
        assert row["text_nll_increase"] == pytest.approx(math.log(after / before), abs=1e-5)
        assert row["selection"] == target_score(row)
    assert any(row["text_nll_increase"] != 0 for row in result["rows"])
    unguarded = calibrate_joint_scale(editor, model, TOKENIZER, solutions, held_out, batch_size=2, scales=(1.0, 8.0))
    assert all("text_nll_increase" not in row for row in unguarded["rows"])
    with pytest.raises(TypeError, match="paragraphs"):  # a path is not split into one-letter paragraphs
        calibrate_joint_scale(editor, model, TOKENIZER, solutions, held_out, guard_text="guard.txt")


def test_a_guard_text_over_its_bound_moves_the_chosen_multiple(tmp_path):
    model, editor = trained_editor(tmp_path)
    edit, held_out, other = samples(24)[:8], samples(24)[8:16], samples(24)[16:]
    guard = [f"{s.anti_stereotype} {s.unrelated}" for s in other]
    solutions, _ = editor.joint_solutions(model, edit, TOKENIZER, batch_size=2, progress=False)

    def calibrate(max_nll_increase: float) -> dict:
        score = functools.partial(target_score, max_lms_drop=math.inf, max_nll_increase=max_nll_increase)
        return calibrate_joint_scale(editor, model, TOKENIZER, solutions, held_out, score, batch_size=2,
                                     guard_text=guard)

    free = calibrate(math.inf)  # SS alone decides
    rises = {row["scale"]: row["text_nll_increase"] for row in free["rows"]}
    bound = rises[free["scale"]] - 1e-6  # just under the guard text's rise at the unbounded choice
    assert any(rise <= bound and row["nll_increase"] <= bound
               for row, rise in ((r, rises[r["scale"]]) for r in free["rows"]))  # another multiple fits under it
    guarded = calibrate(bound)
    chosen = chosen_row(guarded)
    assert guarded["scale"] != free["scale"] and chosen["text_nll_increase"] <= bound
    assert chosen["selection"] < 100  # within both bounds


def test_deployable_adapter_guards_with_the_bundled_text_unless_told_otherwise(tmp_path):
    model, editor = trained_editor(tmp_path)
    edit, held_out = samples(16)[:8], samples(16)[8:]

    def guard_perplexity() -> float:  # three paragraphs are over the tiny model's 64 positions: cut to them
        scores = score_sentences(model, TOKENIZER, load_guard_text(), batch_size=3, max_length=64)
        return perplexity(scores.sum, scores.n_tokens)

    before = guard_perplexity()
    guarded = deployable_adapter(editor, model, TOKENIZER, edit, held_out, batch_size=2, scales=(1.0,),
                                 progress=False)
    after = guard_perplexity()  # under the chosen multiple, now written into the adapter
    chosen = next(row for row in guarded["calibration"]["rows"] if row["scale"] == guarded["scale"])
    assert chosen["text_nll_increase"] == pytest.approx(math.log(after / before), abs=1e-5) and after != before
    plain = deployable_adapter(editor, model, TOKENIZER, edit, held_out, batch_size=2, scales=(1.0,),
                               progress=False, guard_text=())
    assert all("text_nll_increase" not in row for row in plain["calibration"]["rows"])


def test_joint_calibration_scores_each_scale_of_one_solution_on_held_out_pairs(tmp_path):
    model, editor = trained_editor(tmp_path)
    edit, held_out = samples(16)[:8], samples(16)[8:]
    solutions, _ = editor.joint_solutions(model, edit, TOKENIZER, batch_size=2, progress=False)
    result = calibrate_joint_scale(editor, model, TOKENIZER, solutions, held_out, batch_size=2, scales=(1.0, 4.0))
    rows = {row["scale"]: row for row in result["rows"]}
    coarse = min((rows[1.0], rows[4.0]), key=lambda r: (r["selection"], abs(r["scale"] - 1)))["scale"]
    assert sorted(rows) == sorted({1.0, 4.0, coarse / math.sqrt(2), coarse * math.sqrt(2)})  # + the half-steps
    # one row recomputed with full forwards: the held-out pairs under 4 x the joint solution
    sentences = [s.stereotype for s in held_out] + [s.anti_stereotype for s in held_out]
    sentences += [s.unrelated for s in held_out]
    pre = score_sentences(model, TOKENIZER, sentences, batch_size=2).mean.view(3, -1)
    with editor.edited(model, scaled_solutions(solutions, 4.0)):
        post = score_sentences(model, TOKENIZER, sentences, batch_size=2).mean.view(3, -1)
    expected = item_ss_lms(post[0], post[1], post[2])
    assert rows[4.0]["ss_pre"] == pytest.approx(item_ss_lms(pre[0], pre[1], pre[2])["ss"])
    assert rows[4.0]["ss_post"] == pytest.approx(expected["ss"])
    assert rows[4.0]["lms_post"] == pytest.approx(expected["lms"])
    assert rows[4.0]["nll_increase"] == pytest.approx((pre[2] - post[2]).mean().item(), abs=1e-5)
    assert all(row["selection"] == target_score(row) for row in result["rows"])
    assert result["scale"] == min(result["rows"], key=lambda r: (r["selection"], abs(r["scale"] - 1)))["scale"]


def test_deployable_adapter_writes_the_chosen_multiple_of_the_joint_delta(tmp_path):
    model, editor = trained_editor(tmp_path)
    edit, held_out = samples(16)[:8], samples(16)[8:]
    solutions, _ = editor.joint_solutions(model, edit, TOKENIZER, batch_size=2, progress=False)
    report = deployable_adapter(editor, model, TOKENIZER, edit, held_out, batch_size=2, scales=(0.5, 2.0),
                                progress=False, recipes=(JointRecipe(),))  # the editor's own pooled solve
    assert report["calibration"]["scale"] == report["scale"] and report["n_samples"] == 8
    assert all(row["selection"] == calibration_score(row) for row in report["calibration"]["rows"])
    written = get_deltas(model)
    editor_layers = editor.check_compatible(model)
    for name, solution in solutions.items():
        expected = report["scale"] * solution.delta.dense()  # key -> value [in, out]
        layer = editor_layers[name]
        got = written[name] if layer.fan_in_fan_out else written[name].T
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-8)
    # without held-out pairs: the editor's own scale; the default recipe is the relative ridge, rescaled
    fresh = peft_model()
    report = deployable_adapter(editor, fresh, TOKENIZER, edit, None, batch_size=2, progress=False)
    assert report["scale"] == 1.0 and report["recipe"] == {"preserve": 0.0, "ridge": 1.0}
    statistics, _ = pooled_statistics(editor, peft_model(), TOKENIZER, edit, 2)
    for name, solution in recipe_solutions(statistics, JointRecipe(ridge=1.0)).items():
        got = get_deltas(fresh)[name] if editor_layers[name].fan_in_fan_out else get_deltas(fresh)[name].T
        torch.testing.assert_close(got, solution.delta.dense(), rtol=1e-5, atol=1e-8)


def test_deployable_adapter_writes_the_best_recipe_on_the_held_out_pairs(tmp_path):
    """Each recipe is solved and calibrated on the held-out pairs; the best (recipe, scale) is written; a recipe that
    preserves keys is skipped for pairs without unrelated sentences; without held-out pairs the first recipe."""
    model, editor = trained_editor(tmp_path)
    edit, held_out = samples(16)[:8], samples(16)[8:]
    recipes = (JointRecipe(), JointRecipe(ridge=1.0), JointRecipe(preserve=10.0))
    report = deployable_adapter(editor, model, TOKENIZER, edit, held_out, batch_size=2, scales=(0.5, 2.0),
                                progress=False, recipes=recipes)
    assert [(r["preserve"], r["ridge"]) for r in report["recipes"]] == [(0.0, None), (0.0, 1.0), (10.0, None)]
    best = min(report["recipes"], key=lambda r: r["selection"])
    assert (report["recipe"]["preserve"], report["recipe"]["ridge"], report["scale"]) == \
        (best["preserve"], best["ridge"], best["scale"])
    statistics, _ = pooled_statistics(editor, peft_model(), TOKENIZER, edit, 2, [s.unrelated for s in edit])
    chosen = recipe_solutions(statistics, JointRecipe(**report["recipe"]))
    written, layers = get_deltas(model), editor.check_compatible(model)
    for name, solution in chosen.items():
        got = written[name] if layers[name].fan_in_fan_out else written[name].T
        torch.testing.assert_close(got, report["scale"] * solution.delta.dense(), rtol=1e-4, atol=1e-7)
    pairs = [(s.stereotype, s.anti_stereotype) for s in edit]  # no unrelated sentences: nothing to preserve
    report = deployable_adapter(editor, peft_model(), TOKENIZER, pairs, held_out, batch_size=2, scales=(1.0,),
                                progress=False, recipes=recipes)
    assert [r["preserve"] for r in report["recipes"]] == [0.0, 0.0]
    with pytest.raises(ValueError, match="lack"):
        deployable_adapter(editor, peft_model(), TOKENIZER, pairs, held_out, batch_size=2, progress=False,
                           recipes=recipes[2:])
    alone = deployable_adapter(editor, peft_model(), TOKENIZER, edit, None, batch_size=2, progress=False,
                               recipes=recipes[1:])
    assert alone["recipe"] == {"preserve": 0.0, "ridge": 1.0} and alone["scale"] == 1.0 and len(alone["recipes"]) == 1


def test_deployment_check_by_hand():
    def result(ss_g, ss_r, lms, crows_g, crows_r, ppl, ci=None):
        return {"stereoset": {"gender": {"ss": ss_g, "lms": lms, "ss_ci": ci}, "race": {"ss": ss_r, "lms": lms}},
                "crows": {"gender": {"metric": crows_g}, "race-color": {"metric": crows_r}}, "perplexity": ppl}

    before = result(70.0, 60.0, 90.0, 60.0, 55.0, 20.0, ci=[66.0, 74.0])
    after = result(58.0, 56.0, 88.0, 57.0, 56.0, 20.5)
    check = deployment_check(before, after, ["gender", "race"])
    assert check["gender"]["ss_halfway"] is True  # |8| <= |20| / 2
    assert check["gender"]["ss_outside_ci"] is True  # 58 outside [66, 74]
    assert check["gender"]["crows_toward_50"] is True and check["gender"]["lms_drop"] == 2.0
    assert check["race"]["ss_halfway"] is False  # |6| > |10| / 2
    assert check["race"]["ss_outside_ci"] is None  # no CI given
    assert check["race"]["crows_toward_50"] is False  # 55 -> 56 (race is race-color in CrowS-Pairs)
    assert check["perplexity_rise"] == pytest.approx(0.025) and check["perplexity_ok"] is True
    assert check["all_ok"] is False
    fixed = result(58.0, 54.0, 88.0, 57.0, 52.0, 21.2)
    assert deployment_check(before, fixed, ["gender", "race"])["all_ok"] is False  # perplexity +6 %
    assert deployment_check(before, {**fixed, "perplexity": 20.9}, ["gender", "race"])["all_ok"] is True


def test_gender_swapped_benchmark_scores_the_swapped_gender_items():
    from biasedit_peft.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("testbed")
    result = evaluate_model(model, tokenizer, benchmarks=("gender_swapped",), bias_types=["gender", "race"],
                            limit=4, progress=False, n_resamples=0)
    items = gender_swapped(take_per_type(load_stereoset("test", ["gender"]), 4))
    assert set(result) >= {"gender_swapped", "perplexity"} and "stereoset" not in result
    assert result["gender_swapped"] == evaluate_stereoset(model, tokenizer, items, progress=False, n_resamples=0)
    assert result["gender_swapped"]["gender"]["n"] == 4
    assert all(item.id.endswith(":gender-swapped") for item in items)
    no_gender = evaluate_model(model, tokenizer, benchmarks=("gender_swapped",), bias_types=["race"], limit=4,
                               progress=False, n_resamples=0)
    assert "gender_swapped" not in no_gender


def test_deployable_adapter_refuses_what_it_cannot_do_before_computing(tmp_path):
    """No samples, no recipes, an untrained editor, and a preserving recipe for pairs without unrelated sentences
    (also without calibration pairs) are refused with a clear error."""
    from biasedit_peft.editor import BiasEditor
    from biasedit_peft.editor.joint import JointRecipe

    model, editor = trained_editor(tmp_path)
    with pytest.raises(ValueError, match="at least one edit sample"):
        deployable_adapter(editor, model, TOKENIZER, [], None, progress=False)
    with pytest.raises(ValueError, match="at least one joint recipe"):
        deployable_adapter(editor, model, TOKENIZER, samples(4), None, progress=False, recipes=())
    pairs = [(s.stereotype, s.anti_stereotype) for s in samples(4)]
    with pytest.raises(ValueError, match="lack"):
        deployable_adapter(editor, model, TOKENIZER, pairs, None, progress=False, recipes=(JointRecipe(preserve=1.0),))
    untrained = BiasEditor.for_model(peft_model(), rank=4)
    with pytest.raises(RuntimeError, match="no normaliser statistics"):
        deployable_adapter(untrained, peft_model(), TOKENIZER, samples(4), None, progress=False)
