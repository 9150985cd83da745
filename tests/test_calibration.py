"""Edit-scale calibration (editor/calibration.py): exact scaling, the pick, and the trainer's use of it."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from huggingface_hub import ModelCard

from biasedit_peft.editor import BiasEditor, BiasEditTrainer, BiasEditTrainingArguments
from biasedit_peft.editor import calibration as calibration_module
from biasedit_peft.editor.calibration import calibrate_edit_scale, scale_edits, scaled_solutions
from biasedit_peft.editor.folders import editor_card
from biasedit_peft.editor.trainer import selection_score
from biasedit_peft.metrics import item_ss_lms
from biasedit_peft.scoring import score_sentences

from factories import editor_tokenizer, peft_model, samples, trained_editor

TOKENIZER = editor_tokenizer()


def test_scaling_the_step_sizes_scales_every_delta_exactly(tmp_path):
    model, editor = trained_editor(tmp_path)
    cache, _, _ = editor.cache_samples(model, TOKENIZER, samples(6), 2)
    plain = editor.predict(cache)
    scale_edits(editor, 0.5)
    halved = editor.predict(cache)
    for name in plain:
        torch.testing.assert_close(halved[name].delta.dense(), 0.5 * plain[name].delta.dense(), rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(scaled_solutions(plain, 0.5)[name].delta.dense(), halved[name].delta.dense(),
                                   rtol=1e-5, atol=1e-9)


def test_calibration_rows_are_the_metrics_of_each_scaled_edit_and_the_pick_is_the_best(tmp_path):
    model, editor = trained_editor(tmp_path)
    groups = [samples(8)[:4], samples(8)[4:]]
    args = BiasEditTrainingArguments(output_dir=str(tmp_path))
    scales = (0.0, 1.0, 8.0)
    result = calibrate_edit_scale(editor, model, TOKENIZER, groups, lambda row: selection_score(row, args),
                                  batch_size=2, scales=scales)
    rows = {row["scale"]: row for row in result["rows"]}
    assert list(rows) == list(scales)
    # scale 0 edits nothing: post == pre
    assert rows[0.0]["ss_post"] == rows[0.0]["ss_pre"] and rows[0.0]["lms_post"] == rows[0.0]["lms_pre"]
    assert rows[0.0]["nll_increase"] == pytest.approx(0.0, abs=1e-6)
    # scale 8 recomputed by hand: edit each group with 8 x its solutions, score with full forwards
    stereo, anti, unrelated = [], [], []
    for group in groups:
        cache, _, _ = editor.cache_samples(model, TOKENIZER, group, 2)
        with editor.edited(model, scaled_solutions(editor.predict(cache), 8.0)):
            sentences = [s.stereotype for s in group] + [s.anti_stereotype for s in group]
            sentences += [s.unrelated for s in group]
            scores = score_sentences(model, TOKENIZER, sentences, batch_size=2).mean.view(3, -1)
        stereo.append(scores[0]), anti.append(scores[1]), unrelated.append(scores[2])
    expected = item_ss_lms(torch.cat(stereo), torch.cat(anti), torch.cat(unrelated))
    assert rows[8.0]["ss_post"] == pytest.approx(expected["ss"])
    assert rows[8.0]["lms_post"] == pytest.approx(expected["lms"])
    assert result["scale"] == min(result["rows"], key=lambda r: (r["selection"], abs(r["scale"] - 1)))["scale"]
    assert all(row["selection"] == selection_score(row, args) for row in result["rows"])


def test_the_trainer_calibrates_the_kept_editor_once_and_saves_it(tmp_path):
    model = peft_model()
    editor = BiasEditor.for_model(model, rank=8, lr=1e-2)
    args = BiasEditTrainingArguments(output_dir=str(tmp_path), n_edits=4, batch_size=2, meta_lr=1e-2, loc_coef=1.0,
                                     max_steps=3, eval_every=3, progress=False, edit_scales=(0.5, 2.0))
    trainer = BiasEditTrainer(model, editor, args, samples(12), samples(8), tokenizer=TOKENIZER)
    state = trainer.train()
    assert state.calibration is not None and state.calibration["scale"] in (0.5, 2.0)
    scale = state.calibration["scale"]
    kept = BiasEditor.from_pretrained(tmp_path)
    for net, trained in zip(kept.nets.values(), editor.nets.values()):  # best editor = the step-3 editor, scaled
        torch.testing.assert_close(net.lr, trained.lr.detach() * scale)
    saved = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())
    assert saved["trainer"]["calibration"]["scale"] == scale
    assert "calibrated on the same data" in (tmp_path / "README.md").read_text()
    # the record the kept editor was saved with (train-editor --push-to-hub makes the pushed card from it)
    record = state.kept_record()
    chosen = next(row for row in state.calibration["rows"] if row["scale"] == scale)
    assert record["edit_scale"] == scale and record["eval_ss_post"] == chosen["ss_post"]
    assert record["step"] == state.best_step and "edit_scale" not in state.best_record()
    assert editor_card(kept, **dict(editor.provenance, validation=record)).text == ModelCard.load(
        tmp_path / "README.md").text
    # a resumed, finished run does not calibrate (or scale) again
    again = BiasEditTrainer(peft_model(), BiasEditor.for_model(peft_model(), rank=8, lr=1e-2),
                            BiasEditTrainingArguments(**{**args.__dict__, "resume": True}), samples(12), samples(8),
                            tokenizer=TOKENIZER)
    again.train()
    for net, first in zip(BiasEditor.from_pretrained(tmp_path).nets.values(), kept.nets.values()):
        assert torch.equal(net.lr, first.lr)


def test_the_trainer_calibrates_on_its_calibration_data_when_given(tmp_path):
    """``calibration_data`` (e.g. dev + train-calib) replaces dev in the calibration only: every row's before
    metrics are those of the calibration samples, scored by hand, and the editor's card names them."""
    model = peft_model()
    editor = BiasEditor.for_model(model, rank=8, lr=1e-2)
    editor.provenance.update(eval_data="dev.jsonl", calibration_data="dev.jsonl + calib.jsonl")
    args = BiasEditTrainingArguments(output_dir=str(tmp_path), n_edits=4, batch_size=2, meta_lr=1e-2, loc_coef=1.0,
                                     max_steps=2, eval_every=2, progress=False, edit_scales=(0.0, 2.0))
    dev, calibration = samples(8), samples(8) + samples(24)[12:]

    def pooled(group):
        sentences = [s.stereotype for s in group] + [s.anti_stereotype for s in group] + [s.unrelated for s in group]
        scores = score_sentences(model, TOKENIZER, sentences, batch_size=2).mean.view(3, -1)
        return item_ss_lms(scores[0], scores[1], scores[2])

    expected, dev_only = pooled(calibration), pooled(dev)
    assert (expected["ss"], expected["lms"]) != (dev_only["ss"], dev_only["lms"])  # the test can tell them apart
    state = BiasEditTrainer(model, editor, args, samples(12), dev, tokenizer=TOKENIZER,
                            calibration_data=calibration).train()
    assert state.history[-1]["eval_ss_pre"] == pytest.approx(dev_only["ss"])  # validation stays on dev
    for row in state.calibration["rows"]:
        assert row["ss_pre"] == pytest.approx(expected["ss"]) and row["lms_pre"] == pytest.approx(expected["lms"])
    zero = next(row for row in state.calibration["rows"] if row["scale"] == 0.0)
    assert (zero["ss_post"], zero["lms_post"]) == (zero["ss_pre"], zero["lms_pre"])
    card = (tmp_path / "README.md").read_text()
    assert "Edit scale calibrated on: `dev.jsonl + calib.jsonl`" in card
    assert "calibrated on `dev.jsonl + calib.jsonl`" in card
    assert f"| {expected['ss']:.2f} |" in card and f"| {dev_only['ss']:.2f} |" not in card  # before, on both


def test_calibration_data_nothing_would_use_is_refused_and_a_resume_with_other_calibration_data_too(tmp_path):
    model = peft_model()
    args = BiasEditTrainingArguments(output_dir=str(tmp_path), n_edits=4, batch_size=2, max_steps=2, eval_every=2,
                                     progress=False, edit_scales=(1.0,))
    for changed, dev in (({"select_by": "loss"}, samples(4)), ({"calibrate": False}, samples(4)), ({}, None)):
        with pytest.raises(ValueError, match="calibration_data is only used by the edit-scale calibration"):
            BiasEditTrainer(model, BiasEditor.for_model(model, rank=8), replace(args, **changed), samples(8), dev,
                            tokenizer=TOKENIZER, calibration_data=samples(8))
    BiasEditTrainer(model, BiasEditor.for_model(model, rank=8), args, samples(8), samples(4), tokenizer=TOKENIZER,
                    calibration_data=samples(8)).train()
    again = BiasEditTrainer(peft_model(), BiasEditor.for_model(peft_model(), rank=8), replace(args, resume=True),
                            samples(8), samples(4), tokenizer=TOKENIZER, calibration_data=samples(12))
    with pytest.raises(ValueError, match="calibration samples: checkpoint 8, now 12"):
        again.train()


def test_no_calibration_under_loss_selection(tmp_path):
    model = peft_model()
    args = BiasEditTrainingArguments(output_dir=str(tmp_path), n_edits=4, batch_size=2, max_steps=2, eval_every=2,
                                     progress=False, select_by="loss")
    state = BiasEditTrainer(model, BiasEditor.for_model(model, rank=8), args, samples(8), samples(4),
                            tokenizer=TOKENIZER).train()
    assert state.calibration is None


def test_debias_gain_by_hand():
    from biasedit_peft.editor.calibration import debias_gain

    assert debias_gain({"ss_pre": 58.4, "ss_post": 58.2}) == pytest.approx(0.2)
    assert debias_gain({"ss_pre": 58.4, "ss_post": 49.9}) == pytest.approx(8.3)
    assert debias_gain({"ss_pre": 58.0, "ss_post": 40.0}) == pytest.approx(-2.0)  # overshot past 50


def test_a_kept_editor_that_does_not_debias_dev_is_reported_not_silent(tmp_path, monkeypatch):
    """A calibration whose best multiple moves dev SS less than MIN_DEBIAS_GAIN toward 50 warns, and the gain is
    recorded (the demo prints it); a working one does not warn."""
    import warnings

    from biasedit_peft.editor import trainer as trainer_module
    from biasedit_peft.workflows.demo import format_results

    def calibration(ss_post):
        return lambda *a, **k: {"scale": 1.0, "rows": [{"scale": 1.0, "ss_pre": 58.4, "ss_post": ss_post,
                                                         "lms_pre": 89.0, "lms_post": 88.0, "nll_increase": 0.0,
                                                         "selection": abs(ss_post - 50)}]}

    def train(ss_post, out):
        monkeypatch.setattr(trainer_module, "calibrate_edit_scale", calibration(ss_post))
        model = peft_model()
        args = BiasEditTrainingArguments(output_dir=str(out), n_edits=4, batch_size=2, max_steps=1, eval_every=1,
                                         progress=False)
        return BiasEditTrainer(model, BiasEditor.for_model(model, rank=8), args, samples(8), samples(4),
                               tokenizer=TOKENIZER).train()

    with pytest.warns(UserWarning, match="hardly debiases the validation pairs: their SS goes 58.4 -> 58.2"):
        state = train(58.2, tmp_path / "failed")
    assert state.calibration["debias_gain"] == pytest.approx(0.2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert train(50.5, tmp_path / "working").calibration["debias_gain"] == pytest.approx(7.9)
    assert not [w for w in caught if "hardly debiases" in str(w.message)]

    shown = {"before": {"stereoset": {}, "perplexity": 1.0}, "after": {"stereoset": {}, "perplexity": 1.0},
             "protocols": {"per_batch": {"before": {}, "after": {}}, "held_out": {"before": {}, "after": {}}},
             "targets": {}, "seconds": {"total": 1.0}, "training": {"calibration": {"debias_gain": 0.2}}}
    assert "WARNING: the kept editor moved dev SS only 0.20 points" in format_results(shown)
    shown["training"]["calibration"]["debias_gain"] = 7.9
    assert "WARNING" not in format_results(shown)


def _rows(*rows):
    """A calibration result from ``(scale, ss_post, selection)`` rows (ss_pre 58), best by the ranking's rule."""
    full = [{"scale": scale, "ss_pre": 58.0, "ss_post": ss_post, "selection": selection}
            for scale, ss_post, selection in rows]
    return {"scale": min(full, key=lambda r: (r["selection"], abs(r["scale"] - 1)))["scale"], "rows": full}


def test_the_next_multiple_past_the_grid_by_hand():
    from biasedit_peft.editor.calibration import next_edge_scale

    # the largest is best, within bounds and still above 50: double it
    assert next_edge_scale(_rows((1.0, 56.0, 6.0), (2.0, 55.0, 5.0), (4.0, 54.0, 4.0))) == 8.0
    # ... but not once it crossed 50 (a stronger edit goes further past), nor out of bounds
    assert next_edge_scale(_rows((1.0, 56.0, 6.0), (4.0, 49.0, 1.0))) is None
    assert next_edge_scale(_rows((1.0, 56.0, 104.0), (4.0, 54.0, 106.0))) == 0.5  # the smallest breaks least
    assert next_edge_scale(_rows((1.0, 56.0, 6.0), (4.0, 54.0, 101.0))) is None  # weaker would do worse
    assert next_edge_scale(_rows((1.0, 60.0, 10.0), (2.0, 62.0, 12.0))) == 0.5  # it pushes SS away from 50
    # the smallest is best (every stronger edit overshot): halve it; an inside best or a zero edit: stop
    assert next_edge_scale(_rows((0.25, 47.0, 3.0), (0.5, 45.0, 5.0), (1.0, 44.0, 6.0))) == 0.125
    assert next_edge_scale(_rows((0.25, 51.0, 1.0), (0.5, 47.0, 3.0), (1.0, 44.0, 6.0))) is None  # 50 lies inside
    assert next_edge_scale(_rows((0.5, 53.0, 3.0), (1.0, 50.5, 0.5), (2.0, 46.0, 4.0))) is None
    assert next_edge_scale(_rows((0.0, 58.0, 8.0), (1.0, 60.0, 10.0))) is None
    assert next_edge_scale(_rows((1.0, 56.0, 6.0))) == 2.0  # one row approaching 50: try stronger


def test_calibration_goes_past_the_grid_while_its_end_is_best_and_scores_those_multiples_alike(tmp_path):
    """With a score that puts every multiple out of bounds, the weakest first, calibration halves twice past
    (0.5, 1): its rows at 0.25 and 0.125 are those of a calibration over exactly those multiples."""
    from biasedit_peft.editor.calibration import OUT_OF_BOUNDS

    model, editor = trained_editor(tmp_path)
    groups = [samples(8)[:4], samples(8)[4:]]

    def smallest_first(row):
        return OUT_OF_BOUNDS + row["scale"]

    extended = calibrate_edit_scale(editor, model, TOKENIZER, groups, smallest_first, batch_size=2,
                                    scales=(0.5, 1.0), max_edge_steps=2)
    assert [row["scale"] for row in extended["rows"]] == [0.5, 1.0, 0.25, 0.125] and extended["scale"] == 0.125
    direct = calibrate_edit_scale(editor, model, TOKENIZER, groups, smallest_first, batch_size=2,
                                  scales=(0.125, 0.25, 0.5, 1.0), max_edge_steps=0)
    by_scale = {row["scale"]: row for row in direct["rows"]}
    for row in extended["rows"]:
        assert row == pytest.approx(by_scale[row["scale"]])
    grid_only = calibrate_edit_scale(editor, model, TOKENIZER, groups, smallest_first, batch_size=2,
                                     scales=(0.5, 1.0), max_edge_steps=0)
    assert [row["scale"] for row in grid_only["rows"]] == [0.5, 1.0]


@pytest.mark.parametrize("edge_steps", [0, 3])
def test_the_trainer_passes_its_edge_steps_to_the_calibration(tmp_path, monkeypatch, edge_steps):
    from biasedit_peft.editor import trainer as trainer_module

    seen = []

    def recording(*args, **kwargs):
        seen.append(kwargs["max_edge_steps"])
        return calibrate_edit_scale(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "calibrate_edit_scale", recording)
    model = peft_model()
    args = BiasEditTrainingArguments(output_dir=str(tmp_path), n_edits=4, batch_size=2, max_steps=1, eval_every=1,
                                     progress=False, edit_scales=(1.0,), edit_scale_edge_steps=edge_steps)
    BiasEditTrainer(model, BiasEditor.for_model(model, rank=8), args, samples(8), samples(4),
                    tokenizer=TOKENIZER).train()
    assert seen == [edge_steps]
    assert BiasEditTrainingArguments(output_dir=".").edit_scale_edge_steps == 4  # the default goes past the grid


def test_metrics_by_type_are_the_item_metrics_of_each_types_columns():
    # columns: gender, race, gender, untyped; rows: stereotype, anti-stereotype, unrelated mean log-probs
    pre = torch.tensor([[-1.0, -2.0, -3.0, -1.0],
                        [-2.0, -1.0, -1.0, -2.0],
                        [-5.0, -0.5, -5.0, -5.0]])
    post = torch.tensor([[-2.0, -2.0, -3.0, -1.0],
                         [-1.0, -1.5, -1.0, -2.0],
                         [-5.0, -5.0, -5.0, -5.0]])
    result = calibration_module.metrics_by_type(pre, post, ["gender", "race", "gender", None])
    assert list(result) == ["gender", "race"]
    # gender: pairs (s > a) before: True, False -> SS 50; after: False, False -> 0. LMS: all 4 sentences above the
    # unrelated (-5) before and after -> 100.
    # The unrelated NLL does not move for gender; race's unrelated sentence falls from -0.5 to -5: NLL +4.5.
    assert result["gender"] == {"n": 2, "ss_pre": 50.0, "ss_post": 0.0, "lms_pre": 100.0, "lms_post": 100.0,
                                "nll_increase": 0.0}
    # race: before s -2 < a -1 (SS 0), both below the unrelated -0.5 (LMS 0); after s -2 < a -1.5, both above -5
    assert result["race"] == {"n": 1, "ss_pre": 0.0, "ss_post": 0.0, "lms_pre": 0.0, "lms_post": 100.0,
                              "nll_increase": 4.5}


def test_calibration_rows_record_each_bias_type_as_pooled_rows_of_its_pairs(tmp_path):
    model, editor = trained_editor(tmp_path)
    typed = [replace(s, bias_type=("gender", "race")[i % 2]) for i, s in enumerate(samples(8))]
    groups = [typed[:4], typed[4:]]
    result = calibrate_edit_scale(editor, model, TOKENIZER, groups, calibration_module.target_score, batch_size=2,
                                  scales=(0.0, 8.0), max_edge_steps=0)
    untyped = calibrate_edit_scale(editor, model, TOKENIZER, [samples(8)[:4], samples(8)[4:]],
                                   calibration_module.target_score, batch_size=2, scales=(0.0, 8.0),
                                   max_edge_steps=0)
    assert all("by_type" not in row for row in untyped["rows"])
    for row, plain in zip(result["rows"], untyped["rows"]):
        assert {k: v for k, v in row.items() if k != "by_type"} == plain  # types change no pooled figure
        assert sum(part["n"] for part in row["by_type"].values()) == 8
    zero, eight = result["rows"]
    assert all(part["ss_post"] == part["ss_pre"] for part in zero["by_type"].values())
    # x8 by hand for gender: each group edited with 8 x its solutions, its gender pairs scored
    stereo, anti, unrelated = [], [], []
    for group in groups:
        cache, _, _ = editor.cache_samples(model, TOKENIZER, group, 2)
        gender = [s for s in group if s.bias_type == "gender"]
        with editor.edited(model, scaled_solutions(editor.predict(cache), 8.0)):
            sentences = [s.stereotype for s in gender] + [s.anti_stereotype for s in gender]
            scores = score_sentences(model, TOKENIZER, sentences + [s.unrelated for s in gender], 2).mean.view(3, -1)
        stereo.append(scores[0]), anti.append(scores[1]), unrelated.append(scores[2])
    expected = item_ss_lms(torch.cat(stereo), torch.cat(anti), torch.cat(unrelated))
    assert eight["by_type"]["gender"]["ss_post"] == pytest.approx(expected["ss"])
    assert eight["by_type"]["gender"]["lms_post"] == pytest.approx(expected["lms"])


def _fresh_editor(model):
    torch.manual_seed(0)
    return BiasEditor.for_model(model, rank=8, lr=1e-2)


def test_initial_strength_is_the_best_multiple_on_the_first_training_groups_and_keeps_the_normalisers(tmp_path):
    from biasedit_peft.editor.calibration import INITIAL_EDIT_SCALES, target_score

    model = peft_model()
    args = BiasEditTrainingArguments(output_dir=str(tmp_path), n_edits=4, batch_size=2, meta_lr=1e-2, max_steps=0,
                                     progress=False, calibrate=False, initial_edit_scale=True,
                                     initial_scale_groups=2, edit_scale_edge_steps=1)
    editor = _fresh_editor(model)
    trainer = BiasEditTrainer(model, editor, args, samples(12), None, tokenizer=TOKENIZER)
    state = trainer.train()  # max_steps 0: the initial strength alone

    # the same choice made by hand: a fresh editor whose normalisers saw the first two groups of epoch 0
    reference = _fresh_editor(model)
    groups = trainer._batches(trainer.train_data, 0)[:2]
    for group in groups:
        reference.cache_samples(model, TOKENIZER, group, 2, update_normalizers=True)
    expected = calibrate_edit_scale(reference, model, TOKENIZER, groups, lambda row: target_score(row, 3.0, 0.0488),
                                    batch_size=2, scales=INITIAL_EDIT_SCALES, max_edge_steps=1)
    assert state.initial_calibration == expected
    chosen = expected["scale"]
    assert chosen != 1.0  # this case does change the step sizes (x0.25: x1 already breaks the LMS bound here)
    for net in editor.nets.values():
        torch.testing.assert_close(net.lr, torch.full_like(net.lr, 1e-2 * chosen))
        assert net.normalizer.count.item() == 0  # put back: meta-training starts from no statistics, as without
    saved = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())
    assert saved["trainer"]["initial_calibration"]["scale"] == chosen


def test_initial_strength_is_off_by_default_and_not_chosen_again_on_resume(tmp_path, monkeypatch):
    from biasedit_peft.editor import trainer as trainer_module

    model = peft_model()
    plain = BiasEditTrainingArguments(output_dir=str(tmp_path / "plain"), n_edits=4, batch_size=2, max_steps=0,
                                      progress=False, calibrate=False)
    editor = _fresh_editor(model)
    assert BiasEditTrainer(model, editor, plain, samples(12), None, tokenizer=TOKENIZER).train() \
        .initial_calibration is None
    assert all(torch.equal(net.lr, torch.full_like(net.lr, 1e-2)) for net in editor.nets.values())

    args = replace(plain, output_dir=str(tmp_path / "run"), initial_edit_scale=True, initial_scale_groups=1,
                   max_steps=1)
    first = BiasEditTrainer(model, _fresh_editor(model), args, samples(12), None, tokenizer=TOKENIZER).train()
    assert first.initial_calibration is not None and first.global_step == 1

    def chosen_again(self):
        raise AssertionError("the initial strength was chosen again on resume")

    monkeypatch.setattr(trainer_module.BiasEditTrainer, "calibrate_initial_strength", chosen_again)
    resumed = BiasEditTrainer(model, _fresh_editor(model), replace(args, max_steps=2, resume=True), samples(12), None,
                              tokenizer=TOKENIZER).train()
    assert resumed.global_step == 2 and resumed.initial_calibration == first.initial_calibration
    with pytest.raises(ValueError, match="initial_scale_groups"):
        replace(args, initial_scale_groups=0)


def test_calibration_summary_names_the_choice_and_every_row():
    rows = [{"scale": 0.0625, "ss_pre": 60.24, "ss_post": 53.91, "lms_pre": 90.0, "lms_post": 90.39},
            {"scale": 1.0, "ss_pre": 60.24, "ss_post": 38.28, "lms_pre": 90.0, "lms_post": 68.52}]
    assert calibration_module.calibration_summary({"scale": 0.0625, "rows": rows}) == (
        "x0.0625 chosen (x0.0625: SS 60.2->53.9, LMS drop -0.39; x1: SS 60.2->38.3, LMS drop 21.48)")


def test_the_demo_prints_each_bias_type_at_the_chosen_multiple():
    """Gemma 3 270M's calibration (twenty-third session): pooled SS 54.10 -> 50.31 at x1.41 hid race's overshoot
    and gender's shortfall; the chosen row's types are printed, the other rows' are not."""
    from biasedit_peft.workflows.demo import format_results

    def typed(scale, ss_post, gender, race):
        return {"scale": scale, "ss_pre": 54.1, "ss_post": ss_post, "lms_pre": 90.0, "lms_post": 90.0,
                "by_type": {"gender": {"n": 154, "ss_pre": 60.4, "ss_post": gender},
                            "race": {"n": 614, "ss_pre": 52.0, "ss_post": race}}}

    calibration = {"scale": 1.41, "rows": [typed(1.0, 51.77, 58.4, 49.5), typed(1.41, 50.31, 61.0, 47.4)]}
    assert calibration_module.by_type_summary(calibration_module.chosen_row(calibration)) == (
        "gender 60.4->61.0 (n=154), race 52.0->47.4 (n=614)")
    assert calibration_module.by_type_summary(_rows((1.0, 52.0, 2.0))["rows"][0]) is None  # a row without by_type
    shown = {"before": {"stereoset": {}, "perplexity": 1.0}, "after": {"stereoset": {}, "perplexity": 1.0},
             "protocols": {"per_batch": {"before": {}, "after": {}}, "held_out": {"before": {}, "after": {}}},
             "targets": {}, "seconds": {"total": 1.0}, "training": {"calibration": calibration}}
    assert ("edit scale x1.41, chosen on the pooled calibration pairs (SS 54.1->50.3); by bias type there: "
            "gender 60.4->61.0 (n=154), race 52.0->47.4 (n=614)") in format_results(shown)
    shown["training"]["calibration"] = {}
    assert "by bias type" not in format_results(shown)
